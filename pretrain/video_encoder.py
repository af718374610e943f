"""Hierarchical video encoder with LF-VILA's hierarchical temporal window attention (HTWA).

Letters: B batch, T frames, h x w patch grid, D width, H heads, M clips, Nw tokens per window.
Time is never down-sampled; the temporal attention window grows from stage to stage
(e.g. 2 -> 4 -> 8 -> 16 frames), space is merged 2x2 between stages, and odd blocks shift the
windows in space only (LF-VILA's `temporal_no_shifting`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VideoEncoderConfig:
    patch_size: int = 8  # pixels per patch side
    max_frames: int = 64  # size of the learned temporal position table
    dims: list[int] = field(default_factory=lambda: [64, 128, 128, 128])  # width per stage
    depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # blocks per stage
    heads: list[int] = field(default_factory=lambda: [2, 4, 4, 4])  # attention heads per stage
    temporal_windows: list[int] = field(default_factory=lambda: [2, 4, 8, 16])  # frames per window
    downsample: list[bool] = field(default_factory=lambda: [True, False, False, False])  # 2x2 merge after stage
    spatial_window: int = 4  # patches per window side (clipped to the grid)
    mlp_ratio: float = 4.0
    # "local": clip features from `local_stage`, whose windows never cross clip boundaries (LF-VILA's
    # paper); "final": from the last stage, as LF-VILA's released code does in effect.
    clip_features: Literal["local", "final"] = "local"
    local_stage: int = 1

    def __post_init__(self):
        n = len(self.dims)
        if not (len(self.depths) == len(self.heads) == len(self.temporal_windows) == len(self.downsample) == n > 0):
            raise ValueError("model.video.dims, depths, heads, temporal_windows and downsample must have one "
                             "entry per stage")
        for i in range(n - 1):
            if not self.downsample[i] and self.dims[i + 1] != self.dims[i]:
                raise ValueError(f"model.video.dims[{i + 1}] must equal dims[{i}] unless downsample[{i}] is true")
        for d, h in zip(self.dims, self.heads):
            if d % h:
                raise ValueError(f"model.video.dims[i] must be divisible by model.video.heads[i] (got {d} and {h})")
        if not 0 <= self.local_stage < n:
            raise ValueError(f"model.video.local_stage must be in [0, {n - 1}]")


@lru_cache(maxsize=64)
def relative_position_index(window: tuple[int, int, int], table: tuple[int, int, int]) -> torch.Tensor:
    """Index into a bias table built for window `table`, for the (possibly smaller) `window`: (Nw, Nw)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in window], indexing="ij")).flatten(1)  # (3, Nw)
    rel = coords[:, :, None] - coords[:, None, :]  # (3, Nw, Nw)
    rel = rel + torch.tensor([s - 1 for s in table])[:, None, None]
    return rel[0] * (2 * table[1] - 1) * (2 * table[2] - 1) + rel[1] * (2 * table[2] - 1) + rel[2]


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3D windows, with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int, int]):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        size = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.bias_table = nn.Parameter(torch.zeros(size, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)

    def forward(self, x: torch.Tensor, window: tuple[int, int, int], mask: torch.Tensor | None = None):
        Bw, Nw, D = x.shape  # Bw = B * windows
        H = self.heads
        q, k, v = self.qkv(x).view(Bw, Nw, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (Bw, H, Nw, Dh)
        idx = relative_position_index(window, self.window).to(x.device)
        bias = self.bias_table[idx.flatten()].view(Nw, Nw, H).permute(2, 0, 1)  # (H, Nw, Nw)
        bias = bias.unsqueeze(0)  # (1, H, Nw, Nw)
        if mask is not None:  # (windows, Nw, Nw), repeated over the batch
            nwin = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).repeat(Bw // nwin, 1, 1, 1)  # (Bw, H, Nw, Nw)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (Bw, H, Nw, Dh)
        return self.proj(out.transpose(1, 2).reshape(Bw, Nw, D))


def window_partition(x: torch.Tensor, win: tuple[int, int, int]) -> torch.Tensor:
    B, T, h, w, D = x.shape
    wt, wh, ww = win
    x = x.view(B, T // wt, wt, h // wh, wh, w // ww, ww, D)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wt * wh * ww, D)  # (B*windows, Nw, D)


def window_merge(x: torch.Tensor, win: tuple[int, int, int], shape: tuple[int, ...]) -> torch.Tensor:
    B, T, h, w, D = shape
    wt, wh, ww = win
    x = x.view(B, T // wt, h // wh, w // ww, wt, wh, ww, D)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, T, h, w, D)


@lru_cache(maxsize=64)
def shift_mask(T: int, h: int, w: int, win: tuple[int, int, int], shift: tuple[int, int, int]) -> torch.Tensor:
    """Swin's mask for shifted windows: tokens from different regions never attend. (windows, Nw, Nw)"""
    region = torch.zeros(1, T, h, w, 1)
    label = 0
    for hs in (slice(0, -win[1]), slice(-win[1], -shift[1]), slice(-shift[1], None)):
        for ws in (slice(0, -win[2]), slice(-win[2], -shift[2]), slice(-shift[2], None)):
            region[:, :, hs, ws] = label
            label += 1
    r = window_partition(region, win).squeeze(-1)  # (windows, Nw)
    return (r[:, None, :] != r[:, :, None]).float() * -100.0


class HTWABlock(nn.Module):
    """Pre-norm transformer block with 3D window attention; `shift` rolls the windows in space."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], shift: bool, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, heads, window)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h, w, D = x.shape
        win = (min(self.window[0], T), min(self.window[1], h), min(self.window[2], w))  # clip to the input
        assert T % win[0] == 0 and h % win[1] == 0 and w % win[2] == 0, \
            f"input (T={T}, h={h}, w={w}) must be divisible by the window {win}"
        shift = (0, win[1] // 2 if win[1] < h else 0, win[2] // 2 if win[2] < w else 0) if self.shift else (0, 0, 0)
        y = self.norm1(x)
        mask = None
        if any(shift):
            y = torch.roll(y, shifts=(-shift[1], -shift[2]), dims=(2, 3))
            mask = shift_mask(T, h, w, win, shift).to(x.device)
        y = window_merge(self.attn(window_partition(y, win), win, mask), win, x.shape)  # (B, T, h, w, D)
        if any(shift):
            y = torch.roll(y, shifts=(shift[1], shift[2]), dims=(2, 3))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 spatial merge: (B, T, h, w, D) -> (B, T, h/2, w/2, D_out). Time is kept."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h, w, D = x.shape
        assert h % 2 == 0 and w % 2 == 0, f"patch merging needs an even grid, got {h}x{w}"
        x = torch.cat([x[:, :, i::2, j::2] for i in (0, 1) for j in (0, 1)], dim=-1)  # (B, T, h/2, w/2, 4D)
        return self.reduce(self.norm(x))


class VideoEncoder(nn.Module):
    """Video (B, T, 3, H, W) uint8 or float in [0, 255] -> clip features (B, M, D_clip), video feature (B, D)."""

    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        p, dims = cfg.patch_size, cfg.dims
        self.patch_embed = nn.Conv3d(3, dims[0], kernel_size=(1, p, p), stride=(1, p, p))
        self.time_pos = nn.Parameter(torch.zeros(cfg.max_frames, dims[0]))
        nn.init.trunc_normal_(self.time_pos, std=0.02)
        self.stages = nn.ModuleList()
        for i, (dim, depth, heads, wt) in enumerate(zip(dims, cfg.depths, cfg.heads, cfg.temporal_windows)):
            window = (wt, cfg.spatial_window, cfg.spatial_window)
            blocks = [HTWABlock(dim, heads, window, shift=j % 2 == 1, mlp_ratio=cfg.mlp_ratio) for j in range(depth)]
            if cfg.downsample[i]:
                blocks.append(PatchMerging(dim, self._stage_out_dim(i)))
            self.stages.append(nn.Sequential(*blocks))
        self.clip_stage = cfg.local_stage if cfg.clip_features == "local" else len(dims) - 1
        self.clip_dim = self._stage_out_dim(self.clip_stage)
        self.clip_norm = nn.LayerNorm(self.clip_dim)
        self.norm = nn.LayerNorm(dims[-1])

    def _stage_out_dim(self, i: int) -> int:
        dims = self.cfg.dims
        return dims[i + 1] if self.cfg.downsample[i] and i + 1 < len(dims) else dims[i]

    def forward(self, video: torch.Tensor, num_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C, H, W = video.shape
        M = num_clips
        assert T % M == 0, f"frames ({T}) must split evenly into {M} clips"
        assert T <= self.cfg.max_frames, f"{T} frames exceed model.video.max_frames={self.cfg.max_frames}"
        x = video.float().div(127.5).sub(1.0).transpose(1, 2)  # (B, 3, T, H, W) in [-1, 1]
        x = self.patch_embed(x).permute(0, 2, 3, 4, 1)  # (B, T, h, w, D0)
        x = x + self.time_pos[:T, None, None, :]
        clips = None
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (B, T, h_i, w_i, D_i)
            if i == self.clip_stage:
                c = self.clip_norm(x)
                clips = c.reshape(B, M, T // M, -1, c.shape[-1]).mean(dim=(2, 3))  # (B, M, D_clip)
        x = self.norm(x)
        video_feat = x.flatten(1, 3).mean(dim=1)  # (B, D)
        return clips, video_feat
