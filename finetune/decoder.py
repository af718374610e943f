"""Captioning decoder for DAST's task: a small transformer decoder attending to video tokens and,
when the shards carry depth, to depth tokens.

Letters: B batch, T frames (depth maps), T' frames left in the video encoder's output, g depth grid,
W caption tokens, D decoder width, V vocabulary.
DAST's decoder (an attention LSTM pair, seed-methods.md 4.1) attends over the video tokens, then
over the depth tokens with the attended video vector as the query, and sums the two. Here each
decoder layer does the same inside a pre-norm transformer layer: causal self-attention, attention to
the video tokens, attention from that result to the depth tokens, the two added, then an MLP.
Greedy decoding is beam search with one beam.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.heads import video_frames
from pretrain.model import VideoTextModel


class DepthTokens(nn.Module):
    """Depth maps (B, T, height, width) in [0, 1] -> g*g tokens per frame (B, T*g*g, D), with a frame position."""

    def __init__(self, patch: int, dim: int, grid: int, max_frames: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.frame_pos = nn.Parameter(torch.zeros(max_frames, dim))
        nn.init.normal_(self.frame_pos, std=0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        B, T = depth.shape[:2]
        z = self.proj(depth.to(self.proj.weight.dtype).flatten(0, 1)[:, None] * 2 - 1)  # (B*T, D, h, w)
        z = F.adaptive_avg_pool2d(z, self.grid).flatten(2).transpose(1, 2)  # (B*T, g*g, D)
        z = z.reshape(B, T, self.grid ** 2, -1) + self.frame_pos[:T, None]  # (B, T, g*g, D)
        return self.norm(z.flatten(1, 2))  # (B, T*g*g, D)


class VideoTokens(nn.Module):
    """The video encoder's frame tokens (B, T', Dv) -> decoder memory (B, T', D), with a frame position."""

    def __init__(self, video_dim: int, dim: int, max_frames: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(video_dim, dim), nn.LayerNorm(dim))
        self.frame_pos = nn.Parameter(torch.zeros(max_frames, dim))
        nn.init.normal_(self.frame_pos, std=0.02)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.proj(frames) + self.frame_pos[: frames.shape[1]]


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.norm_self, self.norm_video, self.norm_depth, self.norm_mlp = (nn.LayerNorm(dim) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.video_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.depth_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x, causal, pad, video, depth):
        """x (B, W, D); causal (W, W) bool, True = masked; pad (B, W) bool; video (B, T', D); depth (B, T*g*g, D) or None"""
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0]
        h = self.norm_video(x)
        context = self.video_attn(h, video, video, need_weights=False)[0]  # (B, W, D)
        if depth is not None:
            q = self.norm_depth(context)
            context = context + self.depth_attn(q, depth, depth, need_weights=False)[0]
        x = x + context
        return x + self.mlp(self.norm_mlp(x))


class CaptionDecoder(nn.Module):
    def __init__(self, vocab_size: int, video_dim: int, dim: int, layers: int, heads: int, max_words: int,
                 max_frames: int, depth_patch: int, use_depth: bool, pad: int, bos: int, eos: int):
        super().__init__()
        self.pad, self.bos, self.eos = pad, bos, eos
        self.video = VideoTokens(video_dim, dim, max_frames)
        self.depth = DepthTokens(depth_patch, dim, 2, max_frames) if use_depth else None
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad)
        self.pos = nn.Embedding(max_words + 1, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab_size)
        self.max_words = max_words
        # Every parameter is used inside its own module's forward, so DeepSpeed ZeRO-3 (which gathers a
        # module's parameters when that module is called) also works in evaluation, outside the engine.

    def memory(self, backbone: VideoTextModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        video = self.video(video_frames(backbone, batch))  # (B, T', D)
        depth = self.depth(batch["depth"]) if self.depth is not None and "depth" in batch else None  # (B, T*g*g, D)
        return video, depth

    def logits(self, tokens: torch.Tensor, video: torch.Tensor, depth: torch.Tensor | None) -> torch.Tensor:
        """tokens (B, W) starting with <bos> -> next-token logits (B, W, V)."""
        W = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(W, device=tokens.device))  # (B, W, D)
        causal = torch.ones(W, W, dtype=torch.bool, device=x.device).triu(1)
        pad = tokens == self.pad
        for layer in self.layers:
            x = layer(x, causal, pad, video, depth)
        return self.out(self.norm(x))  # (B, W, V)

    def forward(self, backbone: VideoTextModel, batch: dict, gather: Callable) -> dict[str, torch.Tensor]:
        """Teacher forcing: caption_in (B, W) = <bos> w1..wn, caption_out (B, W) = w1..wn <eos>, padding -100."""
        video, depth = self.memory(backbone, batch)
        logits = self.logits(batch["caption_in"], video, depth)  # (B, W, V)
        return {"ce": F.cross_entropy(logits.flatten(0, 1), batch["caption_out"].flatten(), ignore_index=-100)}

    @torch.no_grad()
    def generate(self, video: torch.Tensor, depth: torch.Tensor | None, beam: int = 1) -> list[list[int]]:
        """Beam search (beam 1 = greedy); the best beam by mean log-probability per token, <eos> included."""
        B, K = video.shape[0], beam
        video = video.repeat_interleave(K, dim=0)  # (B*K, T', D)
        depth = depth.repeat_interleave(K, dim=0) if depth is not None else None
        seqs = torch.full((B * K, 1), self.bos, dtype=torch.long, device=video.device)
        scores = torch.full((B, K), float("-inf"), device=video.device)
        scores[:, 0] = 0.0  # one live beam per video at the start
        done = torch.zeros(B * K, dtype=torch.bool, device=video.device)
        lengths = torch.zeros(B * K, device=video.device)
        base = (torch.arange(B, device=video.device) * K)[:, None]  # (B, 1)
        for _ in range(self.max_words):
            logp = self.logits(seqs, video, depth)[:, -1].float().log_softmax(-1)  # (B*K, V)
            V = logp.shape[1]
            logp[:, [self.pad, self.bos]] = float("-inf")  # never generated
            logp[done] = float("-inf")
            logp[done, self.pad] = 0.0  # a finished beam only grows padding, at no cost
            total = (scores.reshape(B * K, 1) + logp).reshape(B, K * V)
            scores, idx = total.topk(K, dim=1)  # (B, K)
            src = (base + idx // V).reshape(-1)  # (B*K,) the beam each continues
            token = (idx % V).reshape(-1)
            seqs = torch.cat([seqs[src], token[:, None]], dim=1)
            lengths = lengths[src] + (~done[src]).float()
            done = done[src] | (token == self.eos)
            if bool(done.all()):
                break
        best = (scores / lengths.reshape(B, K).clamp(min=1)).argmax(dim=1)  # (B,)
        chosen = seqs.reshape(B, K, -1)[torch.arange(B), best, 1:]  # (B, W) without <bos>
        return [[t for t in row.tolist() if t != self.pad] for row in chosen]
