"""Transformer blocks of the video encoder, one per attention variant, all on a `Tokens` state.

Letters: B batch, T frames, N tokens per frame, h x w patch grid (while N == h*w), D width.
Every block is pre-norm: x + attention(LN(x)), then x + MLP(LN(x)).
An optional [CLS] token (image models of the ViT family) is one token per video, outside the frames:
attention that works within a frame (spatial, divided) puts a copy in front of every frame and averages
the copies' outputs (TimeSformer's way); joint attention (full) counts it once per frame; window, graph
and depth attention leave it alone. Every block's MLP updates it.
"""
from __future__ import annotations

import math
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
    cls: torch.Tensor | None = None  # (B, 1, D) the video's [CLS] token, if the encoder has one
    # after token dropping (grid None): a frame's tokens are whole 2^z x 2^z patch blocks, each in Z order,
    # so z more 2x2 merges can take consecutive fours (pretrain/video_encoder.py `block_patches`)
    z_levels: int = 0
    image: bool = False  # an image batch (one frame): a depth stage may have no depth tokens (image_depth=skip)


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def mlp(dim: int, ratio: float, act: str = "gelu") -> nn.Sequential:
    hidden = round(dim * ratio)  # round: EVA ViT-g's 6144 / 1408 must give 6144 back
    return nn.Sequential(nn.Linear(dim, hidden), ACTIVATIONS[act](), nn.Linear(hidden, dim))


def attend_per_frame(attn: MultiHeadAttention, y: torch.Tensor, c: torch.Tensor | None):
    """Attention within each frame of y (B, T, N, D), the [CLS] c (B, 1, D) in front of every frame.
    -> (output (B, T, N, D), [CLS] output averaged over frames (B, 1, D) or None, keys (B*T, N, Dh))."""
    B, T, N, D = y.shape
    seq = y.reshape(B * T, N, D)
    if c is not None:
        seq = torch.cat([c.expand(B, T, D).reshape(B * T, 1, D), seq], dim=1)  # (B*T, 1+N, D)
    out, keys = attn(seq)
    if c is None:
        return out.view(B, T, N, D), None, keys
    # a plain mean over the frames there are (after TESTA frame merging: not weighted by what each stands for)
    return out[:, 1:].reshape(B, T, N, D), out[:, 0].view(B, T, D).mean(1, keepdim=True), keys[:, 1:]


class Block(nn.Module):
    """The shared frame: subclasses implement `attend(tokens, y, c)` on the normalised tokens y (and
    [CLS] c, None without one) -> (update of y, update of c or None to leave it)."""

    def __init__(self, dim: int, mlp_ratio: float, eps: float = 1e-5, act: str = "gelu"):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp(dim, mlp_ratio, act)

    def forward(self, t: Tokens) -> Tokens:
        dx, dc = self.attend(t, self.norm1(t.x), None if t.cls is None else self.norm1(t.cls))
        x = t.x + dx
        cls = t.cls if dc is None else t.cls + dc
        if cls is not None:
            cls = cls + self.mlp(self.norm2(cls))
        return replace(t, x=x + self.mlp(self.norm2(x)), cls=cls)

    def attend(self, t: Tokens, y: torch.Tensor, c: torch.Tensor | None):
        raise NotImplementedError


class HTWABlock(Block):
    """LF-VILA: 3D window attention on the patch grid."""

    def __init__(self, dim, heads, window, shift, mlp_ratio, **style):
        super().__init__(dim, mlp_ratio, **style)
        self.attn = HTWAttention(dim, heads, window, shift)

    def attend(self, t: Tokens, y: torch.Tensor, c: torch.Tensor | None):
        assert t.grid is not None and not t.frames_merged, "HTWA needs the patch grid and the original frames"
        B, T, N, D = y.shape
        return self.attn(y.view(B, T, *t.grid, D)).view(B, T, N, D), None


class FullBlock(Block):
    """Joint space-time attention over all T*N tokens: the baseline every variant is compared with."""

    def __init__(self, dim, heads, mlp_ratio, **style):
        super().__init__(dim, mlp_ratio, **style)
        self.attn = MultiHeadAttention(dim, heads)

    def attend(self, t: Tokens, y: torch.Tensor, c: torch.Tensor | None):
        B, T, N, D = y.shape
        if c is None:
            return self.attn(y.reshape(B, T * N, D))[0].view(B, T, N, D), None
        # [CLS] once, its key weighted as T copies (one per frame), as if it were in front of every frame
        bias = y.new_zeros(1, 1, 1, 1 + T * N)
        bias[..., 0] = math.log(T)
        out = self.attn(torch.cat([c, y.reshape(B, T * N, D)], dim=1), mask=bias)[0]  # (B, 1+T*N, D)
        return out[:, 1:].reshape(B, T, N, D), out[:, :1]


class SpatialBlock(Block):
    """Attention within each frame only (a per-frame ViT block, as under STGT's graph layer)."""

    def __init__(self, dim, heads, mlp_ratio, **style):
        super().__init__(dim, mlp_ratio, **style)
        self.attn = MultiHeadAttention(dim, heads)

    def attend(self, t: Tokens, y: torch.Tensor, c: torch.Tensor | None):
        out, cls, _ = attend_per_frame(self.attn, y, c)
        return out, cls


class GraphBlock(Block):
    """STGT: graph-weighted attention over the T*N tokens, edges = +-1-frame band x thresholded cosine."""

    def __init__(self, dim, heads, threshold, mlp_ratio, **style):
        super().__init__(dim, mlp_ratio, **style)
        self.attn = GraphAttention(dim, heads, threshold)

    def attend(self, t: Tokens, y: torch.Tensor, c: torch.Tensor | None):
        B, T, N, D = y.shape
        return self.attn(y.reshape(B, T * N, D), T).view(B, T, N, D), None


class DepthBlock(Block):
    """DAST: RGB tokens attend to the depth tokens of frames t-w..t+w."""

    def __init__(self, dim, depth_dim, heads, window, mlp_ratio, **style):
        super().__init__(dim, mlp_ratio, **style)
        self.attn = BandDepthAttention(dim, depth_dim, heads, window)

    def attend(self, t: Tokens, y: torch.Tensor, c: torch.Tensor | None):
        assert not t.frames_merged, "depth attention needs the original frames"
        if t.depth is None:  # model.video.image_depth=skip: no depth keys to attend to, so no update
            assert t.image, "a depth-attention stage needs depth maps in the batch (shards with KEY.depth.npz)"
            return torch.zeros_like(y), None
        return self.attn(y, t.depth), None


class DividedBlock(nn.Module):
    """TimeSformer's divided space-time block (TESTA's backbone): temporal attention per patch position,
    then spatial attention per frame, then the MLP; TESTA merges r_t frames after the temporal and r_s
    patches after the spatial attention, using that attention's keys as the similarity."""

    def __init__(self, dim, heads, mlp_ratio, merge_frames: int = 0, merge_patches: int = 0, eps: float = 1e-5,
                 act: str = "gelu"):
        super().__init__()
        self.norm_t, self.norm_s, self.norm2 = (nn.LayerNorm(dim, eps=eps) for _ in range(3))
        self.temporal, self.spatial = MultiHeadAttention(dim, heads), MultiHeadAttention(dim, heads)
        self.mlp = mlp(dim, mlp_ratio, act)
        self.r_t, self.r_s = merge_frames, merge_patches

    def forward(self, t: Tokens) -> Tokens:
        x, size, cls = t.x, t.size, t.cls
        B, T, N, D = x.shape
        y, keys = self.temporal(self.norm_t(x).transpose(1, 2).reshape(B * N, T, D))  # (B*N, T, D)
        x = x + y.view(B, N, T, D).transpose(1, 2)  # (B, T, N, D)
        if self.r_t:  # one frame (an image) has no pair to merge: skipped, T and the order stay
            x, size = merge_frames(x, size, keys.view(B, N, T, -1).transpose(1, 2), self.r_t)
            t = replace(t, frames_merged=t.frames_merged or x.shape[1] < T)
            T = x.shape[1]
        y, dc, keys = attend_per_frame(self.spatial, self.norm_s(x), None if cls is None else self.norm_s(cls))
        x = x + y  # (B, T, N, D)
        if self.r_s:
            x, size = merge_patches(x, size, keys.reshape(B, T, N, -1), self.r_s)
            t = replace(t, grid=None)
        x = x + self.mlp(self.norm2(x))
        if cls is not None:
            cls = cls + dc
            cls = cls + self.mlp(self.norm2(cls))
        return replace(t, x=x, size=size, cls=cls)


class PatchMerging(nn.Module):
    """2x2 spatial merge on the grid: (B, T, h*w, D) -> (B, T, h/2*w/2, D_out). Time is kept; a [CLS] token
    ends here (it has no place in the merge, and a ViT has no merge to carry one through). After token
    dropping (no grid, `z_levels` > 0) the same merge of each run of four tokens (their 2x2 groups)."""

    def __init__(self, dim: int, dim_out: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduce = nn.Linear(4 * dim, dim_out, bias=False)

    def forward(self, t: Tokens) -> Tokens:
        B, T, N, D = t.x.shape
        if t.grid is None:
            assert t.z_levels > 0, "spatial downsampling needs the patch grid (not after TESTA patch merging)"
            x = t.x.reshape(B, T, N // 4, 4 * D)  # (B, T, N/4, 4D): each run of four is a 2x2 group, in order
            size = t.size.view(B, T, N // 4, 4).sum(-1, keepdim=True)  # (B, T, N/4, 1)
            return replace(t, x=self.reduce(self.norm(x)), size=size, cls=None, z_levels=t.z_levels - 1)
        h, w = t.grid
        assert h % 2 == 0 and w % 2 == 0, f"patch merging needs an even grid, got {h}x{w}"
        g = t.x.view(B, T, h, w, D)
        x = torch.cat([g[:, :, i::2, j::2] for i in (0, 1) for j in (0, 1)], dim=-1)  # (B, T, h/2, w/2, 4D)
        size = t.size.view(B, T, h // 2, 2, w // 2, 2, 1).sum(dim=(3, 5))  # (B, T, h/2, w/2, 1)
        x = self.reduce(self.norm(x))
        return replace(t, x=x.view(B, T, -1, x.shape[-1]), size=size.view(B, T, -1, 1), grid=(h // 2, w // 2), cls=None)
