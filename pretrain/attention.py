"""Attention variants of the video encoder, as small modules and pure functions.

Letters: B batch, T frames, N tokens per frame, D width, H heads, Dh = D / H, G groups (any leading
batch of independent sequences), S sequence length, w DAST's temporal half-window, Nd depth tokens
per frame.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    G, S, D = x.shape
    return x.view(G, S, heads, D // heads).transpose(1, 2)  # (G, H, S, Dh)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    G, H, S, Dh = x.shape
    return x.transpose(1, 2).reshape(G, S, H * Dh)  # (G, S, D)


class MultiHeadAttention(nn.Module):
    """Plain self-attention over (G, S, D). Also returns the keys averaged over heads (G, S, Dh), the
    similarity metric TESTA merges with."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # (G, H, S, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(merge_heads(out)), k.mean(dim=1).detach()


# ---- STGT: spatio-temporal graph attention ------------------------------------------------------

@lru_cache(maxsize=32)
def frame_band(T: int, N: int, width: int = 1) -> torch.Tensor:
    """(T*N, T*N) 0/1: token (t, p) links to every token of frames t-width..t+width (STGT's G)."""
    t = torch.arange(T).repeat_interleave(N)
    return ((t[:, None] - t[None, :]).abs() <= width).float()


def similarity_graph(x: torch.Tensor, T: int, threshold: float) -> torch.Tensor:
    """STGT's graph on (B, T*N, D) tokens: the +-1-frame band times the cosine similarity, with
    similarities below `threshold` cut to 0. Computed on detached features. (B, T*N, T*N)"""
    xn = F.normalize(x.detach(), dim=-1)
    sim = xn @ xn.transpose(1, 2)  # (B, T*N, T*N)
    sim = sim * (sim >= threshold)
    return sim * frame_band(T, x.shape[1] // T).to(x.device, x.dtype)


def graph_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
    """Graph-weighted attention: logits multiplied by the edge weights, -inf where there is no edge.
    q, k, v (B, H, S, Dh); graph (B, S, S) with graph[i, i] > 0. -> (B, H, S, Dh)"""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, S, S)
    g = graph.unsqueeze(1)  # (B, 1, S, S)
    logits = (logits * g).masked_fill(g == 0, float("-inf"))
    return logits.softmax(dim=-1) @ v


def banded_graph_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                           threshold: float) -> torch.Tensor:
    """STGT's graph attention computed per frame band: frame t's tokens attend to the tokens of frames
    t-1..t+1 whose cosine similarity (on detached x) reaches `threshold`, logits times that similarity.
    The same as `graph_attention` with `similarity_graph`, in O(T * N * 3N) memory instead of (T*N)^2.
    q, k, v (B, H, T, N, Dh); x (B, T, N, D) -> (B, H, T, N, Dh)"""
    B, H, T, N, Dh = q.shape
    xn = F.normalize(x.detach(), dim=-1)
    xb, valid = band_keys(xn, 1)  # (B, T, 3N, D), (T, 3N): frames t-1..t+1, False past either end
    sim = xn @ xb.transpose(-1, -2)  # (B, T, N, 3N)
    graph = sim * ((sim >= threshold) & valid[:, None, :])  # (B, T, N, 3N), 0 = no edge
    heads = lambda t: t.permute(0, 2, 3, 1, 4).reshape(B, T, N, H * Dh)  # (B, H, T, N, Dh) -> (B, T, N, H*Dh)
    kb, _ = band_keys(heads(k), 1)  # (B, T, 3N, H*Dh)
    vb, _ = band_keys(heads(v), 1)
    kb, vb = (t.view(B, T, 3 * N, H, Dh).permute(0, 3, 1, 2, 4) for t in (kb, vb))  # (B, H, T, 3N, Dh)
    logits = q @ kb.transpose(-1, -2) / math.sqrt(Dh)  # (B, H, T, N, 3N)
    g = graph.unsqueeze(1).to(logits.dtype)  # (B, 1, T, N, 3N)
    logits = (logits * g).masked_fill(g == 0, float("-inf"))
    return logits.softmax(dim=-1) @ vb  # (B, H, T, N, Dh)


class GraphAttention(nn.Module):
    """STGT's graph attention over (B, T*N, D). `banded` (default): per frame band, O(T * N * 3N) memory;
    False: the dense (T*N)^2 form (the reference, and the memory benchmark's "before")."""

    def __init__(self, dim: int, heads: int, threshold: float, banded: bool = True):
        super().__init__()
        self.heads, self.threshold, self.banded = heads, threshold, banded
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        B, S, D = x.shape  # S = T * N
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, S, Dh)
        if not self.banded:
            return self.proj(merge_heads(graph_attention(q, k, v, similarity_graph(x, T, self.threshold))))
        H, N = self.heads, S // T
        q, k, v = (t.reshape(B, H, T, N, D // H) for t in (q, k, v))  # (B, H, T, N, Dh)
        out = banded_graph_attention(q, k, v, x.view(B, T, N, D), self.threshold)  # (B, H, T, N, Dh)
        return self.proj(merge_heads(out.reshape(B, H, S, D // H)))


# ---- DAST: depth-aware sparse attention ----------------------------------------------------------

def band_keys(z: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, Nd, C) per-frame tokens -> for every frame the tokens of frames t-w..t+w,
    (B, T, (2w+1)*Nd, C), and the validity of each slot (T, (2w+1)*Nd) (False past either end).
    Memory is O(T * w): no T x T matrix is formed."""
    B, T, Nd, C = z.shape
    padded = F.pad(z, (0, 0, 0, 0, w, w))  # (B, T+2w, Nd, C)
    window = torch.stack([padded[:, i:i + T] for i in range(2 * w + 1)], dim=2)  # (B, T, 2w+1, Nd, C)
    src = torch.arange(T)[:, None] + torch.arange(-w, w + 1)[None, :]  # (T, 2w+1) source frame
    valid = ((src >= 0) & (src < T)).repeat_interleave(Nd, dim=1)  # (T, (2w+1)*Nd)
    return window.reshape(B, T, (2 * w + 1) * Nd, C), valid.to(z.device)


class BandDepthAttention(nn.Module):
    """RGB tokens of frame t (queries) attend to the depth tokens of frames t-w..t+w (DAST).
    The mask is (T, slots) and broadcasts over the batch (the seed code's mask did not for B > 1)."""

    def __init__(self, dim: int, depth_dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(depth_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        B, T, N, D = x.shape
        keys, valid = band_keys(depth, self.window)  # (B, T, K, Cd), (T, K)
        K = keys.shape[2]
        q = split_heads(self.q(x).reshape(B * T, N, D), self.heads)  # (B*T, H, N, Dh)
        k, v = (split_heads(t.reshape(B * T, K, D), self.heads) for t in self.kv(keys).chunk(2, dim=-1))
        mask = valid.repeat(B, 1)[:, None, None, :]  # (B*T, 1, 1, K)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B*T, H, N, Dh)
        return self.proj(merge_heads(out)).view(B, T, N, D)
