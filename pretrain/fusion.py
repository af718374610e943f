"""Cross-modal fusion stack for LF-VILA's stage-2 objectives (MLM and video-text matching).

Letters: B batch, S = 1 + M*L paragraph tokens, T' frames left in the video encoder's output, D text width.
New BERT layers (same shape as the text model's) run over [paragraph token states ; video tokens];
video tokens are the per-frame means of the video encoder's final tokens, projected to D, plus a
learned frame position.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class FusionEncoder(nn.Module):
    def __init__(self, bert_config, video_dim: int, layers: int, max_frames: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        D = bert_config.hidden_size
        self.video_proj = nn.Linear(video_dim, D)
        self.frame_pos = nn.Parameter(torch.zeros(max_frames, D))
        nn.init.normal_(self.frame_pos, std=0.02)
        self.video_norm = nn.LayerNorm(D, eps=bert_config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(bert_config) for _ in range(layers))
        self.pooler = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.vtm_head = nn.Linear(D, 2)
        self.mlm_transform = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D, eps=bert_config.layer_norm_eps))
        self.mlm_bias = nn.Parameter(torch.zeros(bert_config.vocab_size))

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """text (B, S, D), text_mask (B, S), video (B, T', Dv) -> fused states (B, S + T', D)."""
        from pretrain.text_encoder import additive_mask

        B, T = video.shape[:2]
        v = self.video_norm(self.video_proj(video) + self.frame_pos[:T])  # (B, T', D)
        x = torch.cat([text, v], dim=1)  # (B, S+T', D)
        ext = additive_mask(torch.cat([text_mask, text_mask.new_ones(B, T)], dim=1), x.dtype)
        for layer in self.layers:
            x = layer(x, attention_mask=ext)
            x = x[0] if isinstance(x, tuple) else x
        return x

    def vtm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.vtm_head(self.pooler(fused[:, 0]))  # (B, 2)

    def mlm_logits(self, fused: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for the paragraph tokens (decoder tied to the word embeddings)."""
        return self.mlm_transform(fused) @ word_embeddings.t() + self.mlm_bias  # (B, S', V)
