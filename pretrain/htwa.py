"""LF-VILA's hierarchical temporal window attention (HTWA): self-attention inside 3D windows.

Letters: B batch, T frames, h x w patch grid, D width, H heads, Nw tokens per window.
Windows tile (time, height, width); a window larger than the input is clipped to it; `shift` rolls the
windows by half a window in space only (LF-VILA's `temporal_no_shifting`), with Swin's region mask.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class HTWAttention(nn.Module):
    """Window attention over a (B, T, h, w, D) grid, windows clipped to the input, optional spatial shift."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], shift: bool):
        super().__init__()
        self.window, self.shift = window, shift
        self.attn = WindowAttention3D(dim, heads, window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h, w, D = x.shape
        win = (min(self.window[0], T), min(self.window[1], h), min(self.window[2], w))
        assert T % win[0] == 0 and h % win[1] == 0 and w % win[2] == 0, \
            f"input (T={T}, h={h}, w={w}) must be divisible by the window {win}"
        shift = (0, win[1] // 2 if win[1] < h else 0, win[2] // 2 if win[2] < w else 0) if self.shift else (0, 0, 0)
        mask = None
        if any(shift):
            x = torch.roll(x, shifts=(-shift[1], -shift[2]), dims=(2, 3))
            mask = shift_mask(T, h, w, win, shift).to(x.device)
        y = window_merge(self.attn(window_partition(x, win), win, mask), win, x.shape)  # (B, T, h, w, D)
        if any(shift):
            y = torch.roll(y, shifts=(shift[1], shift[2]), dims=(2, 3))
        return y
