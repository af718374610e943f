"""Transformer blocks of the video encoder, one per attention variant, all on a `Tokens` state.

Letters: B batch, T frames, N tokens per frame, h x w patch grid (while N == h*w), D width.
Every block is pre-norm: x + attention(LN(x)), then x + MLP(LN(x)).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from pretrain.attention import BandDepthAttention, GraphAttention, MultiHeadAttention
from pretrain.htwa import HTWAttention
from pretrain.token_merging import merge_frames, merge_patches


@dataclass
class Tokens:
    x: torch.Tensor  # (B, T, N, D)
    grid: tuple[int, int] | None  # (h, w) while the N tokens of a frame are the raster-ordered patch grid
    size: torch.Tensor  # (B, T, N, 1): original patch tokens each token stands for (TESTA merging)
    depth: torch.Tensor | None = None  # (B, T, Nd, Cd) depth tokens, for DAST blocks
    frames_merged: bool = False  # TESTA merged frames: T and the temporal order changed


def mlp(dim: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, int(dim * ratio)), nn.GELU(), nn.Linear(int(dim * ratio), dim))


class Block(nn.Module):
    """The shared frame: subclasses implement `attend(tokens, y)` on the normalised tokens y."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_ratio)

    def forward(self, t: Tokens) -> Tokens:
        x = t.x + self.attend(t, self.norm1(t.x))
        return replace(t, x=x + self.mlp(self.norm2(x)))


class HTWABlock(Block):
    """LF-VILA: 3D window attention on the patch grid."""

    def __init__(self, dim, heads, window, shift, mlp_ratio):
        super().__init__(dim, mlp_ratio)
        self.attn = HTWAttention(dim, heads, window, shift)

    def attend(self, t: Tokens, y: torch.Tensor) -> torch.Tensor:
        assert t.grid is not None and not t.frames_merged, "HTWA needs the patch grid and the original frames"
        B, T, N, D = y.shape
        return self.attn(y.view(B, T, *t.grid, D)).view(B, T, N, D)


class FullBlock(Block):
    """Joint space-time attention over all T*N tokens: the baseline every variant is compared with."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__(dim, mlp_ratio)
        self.attn = MultiHeadAttention(dim, heads)

    def attend(self, t: Tokens, y: torch.Tensor) -> torch.Tensor:
        B, T, N, D = y.shape
        return self.attn(y.reshape(B, T * N, D))[0].view(B, T, N, D)


class SpatialBlock(Block):
    """Attention within each frame only (a per-frame ViT block, as under STGT's graph layer)."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__(dim, mlp_ratio)
        self.attn = MultiHeadAttention(dim, heads)

    def attend(self, t: Tokens, y: torch.Tensor) -> torch.Tensor:
        B, T, N, D = y.shape
        return self.attn(y.reshape(B * T, N, D))[0].view(B, T, N, D)


class GraphBlock(Block):
    """STGT: graph-weighted attention over the T*N tokens, edges = +-1-frame band x thresholded cosine."""

    def __init__(self, dim, heads, threshold, mlp_ratio):
        super().__init__(dim, mlp_ratio)
        self.attn = GraphAttention(dim, heads, threshold)

    def attend(self, t: Tokens, y: torch.Tensor) -> torch.Tensor:
        B, T, N, D = y.shape
        return self.attn(y.reshape(B, T * N, D), T).view(B, T, N, D)


class DepthBlock(Block):
    """DAST: RGB tokens attend to the depth tokens of frames t-w..t+w."""

    def __init__(self, dim, depth_dim, heads, window, mlp_ratio):
        super().__init__(dim, mlp_ratio)
        self.attn = BandDepthAttention(dim, depth_dim, heads, window)

    def attend(self, t: Tokens, y: torch.Tensor) -> torch.Tensor:
        assert t.depth is not None, "a depth-attention stage needs depth maps in the batch (shards with KEY.depth.npz)"
        assert not t.frames_merged, "depth attention needs the original frames"
        return self.attn(y, t.depth)


class DividedBlock(nn.Module):
    """TimeSformer's divided space-time block (TESTA's backbone): temporal attention per patch position,
    then spatial attention per frame, then the MLP; TESTA merges r_t frames after the temporal and r_s
    patches after the spatial attention, using that attention's keys as the similarity."""

    def __init__(self, dim, heads, mlp_ratio, merge_frames: int = 0, merge_patches: int = 0):
        super().__init__()
        self.norm_t, self.norm_s, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.temporal, self.spatial = MultiHeadAttention(dim, heads), MultiHeadAttention(dim, heads)
        self.mlp = mlp(dim, mlp_ratio)
        self.r_t, self.r_s = merge_frames, merge_patches

    def forward(self, t: Tokens) -> Tokens:
        x, size = t.x, t.size
        B, T, N, D = x.shape
        y, keys = self.temporal(self.norm_t(x).transpose(1, 2).reshape(B * N, T, D))  # (B*N, T, D)
        x = x + y.view(B, N, T, D).transpose(1, 2)  # (B, T, N, D)
        if self.r_t:
            x, size = merge_frames(x, size, keys.view(B, N, T, -1).transpose(1, 2), self.r_t)
            t = replace(t, frames_merged=True)
            T = x.shape[1]
        y, keys = self.spatial(self.norm_s(x).reshape(B * T, N, D))  # (B*T, N, D)
        x = x + y.view(B, T, N, D)
        if self.r_s:
            x, size = merge_patches(x, size, keys.view(B, T, N, -1), self.r_s)
            t = replace(t, grid=None)
        x = x + self.mlp(self.norm2(x))
        return replace(t, x=x, size=size)


class PatchMerging(nn.Module):
    """2x2 spatial merge on the grid: (B, T, h*w, D) -> (B, T, h/2*w/2, D_out). Time is kept."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, dim_out, bias=False)

    def forward(self, t: Tokens) -> Tokens:
        assert t.grid is not None, "spatial downsampling needs the patch grid (not after TESTA patch merging)"
        B, T, N, D = t.x.shape
        h, w = t.grid
        assert h % 2 == 0 and w % 2 == 0, f"patch merging needs an even grid, got {h}x{w}"
        g = t.x.view(B, T, h, w, D)
        x = torch.cat([g[:, :, i::2, j::2] for i in (0, 1) for j in (0, 1)], dim=-1)  # (B, T, h/2, w/2, 4D)
        size = t.size.view(B, T, h // 2, 2, w // 2, 2, 1).sum(dim=(3, 5))  # (B, T, h/2, w/2, 1)
        x = self.reduce(self.norm(x))
        return replace(t, x=x.view(B, T, -1, x.shape[-1]), size=size.view(B, T, -1, 1), grid=(h // 2, w // 2))
