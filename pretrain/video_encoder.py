"""Hierarchical video encoder: a stack of stages, each with its own attention and token aggregation.

Letters: B batch, T frames, N tokens per frame, h x w patch grid, D width, M clips, F = T / M.
Per stage, `attention` picks the block (a plain dict, `BLOCKS`):
  htwa     LF-VILA's 3D window attention, temporal window growing per stage, spatial-only shifts
  divided  TimeSformer's divided space-time attention (TESTA's backbone), with TESTA's frame and patch
           merging (`merge_frames` r_t, `merge_patches` r_s per block)
  spatial  attention within each frame
  full     joint space-time attention over all T*N tokens (the baseline)
  graph    STGT's spatio-temporal graph attention
  depth    DAST's depth-aware sparse attention (RGB queries, depth keys in a +-w-frame band)
`downsample[i]` merges 2x2 patches after stage i. Time is never pooled except by TESTA's merging.

Images (`forward(..., image=True)`: one frame, T = M = 1, F = 1) take the one-frame video path, the same
modules and weights, so an image gives exactly what a one-frame video of the same pixels gives. What each
part does with one frame: the frame gets the first temporal position (time_pos[0]); `htwa` windows are
clipped to the input, so a window of one frame (spatial windows and shifts as usual); `divided`'s temporal
attention has one frame to attend to (each token to itself); TESTA's frame merging finds no pair and is
skipped (r_t = min(r_t, T // 2) = 0), its patch merging runs; `graph` edges over time reduce to edges within
the frame (the +-1-frame band holds only the frame itself); `depth` uses the image's depth maps if the batch
has them, else follows `image_depth` ("skip": the depth attention adds nothing, the block's MLP runs;
"error": the batch is refused). Clip features are the image's features (M = 1); the model computes no
clip-level loss on them (model.loss.image_losses).

What an image model brings (`init_image`, pretrain/image_init.py) has its own keys: pixel mean and std,
a [CLS] token, a learned spatial position table (interpolated to the input grid), a LayerNorm after the
patch embedding, the MLP's activation and the LayerNorm epsilon.

Token dropping (`drop_ratio` r; FLIP, UMT, ViCLIP): in training only, right after the embedding, each video
keeps a random round((1 - r) * U) (half up, at least one) of its U spatial units, the same units in every
frame of the whole video (tube masking: `divided`'s temporal attention and TESTA's frame merging pair token n
of every frame, so it must be the same patch everywhere; per clip would break that). Units are single
patches, or 2^k x 2^k blocks when the encoder has k 2x2 downsamplings (the coarsest group any merge needs;
each block in Z order, so `PatchMerging` merges runs of four without the grid). The [CLS] and depth tokens
are never dropped; `size` follows the kept tokens, so pooling and per-frame features stay size-weighted
means. After dropping `Tokens.grid` is None, and every block kind but `htwa` works on any token set, so the
output is exactly the encoder's on the kept tokens. Refused (a config error): `htwa`, whose shifted windows
need the whole grid (blocks of its coarsest window are whole frames at LF-VILA's grids, and a shifted window
straddles four unshifted ones), and `maxpool` pooling, which needs each frame's grid (falling back to the
mean would pool training differently from evaluation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pretrain.blocks import (DepthBlock, DividedBlock, FullBlock, GraphBlock, HTWABlock, PatchMerging,
                             SpatialBlock, Tokens)

Attention = Literal["htwa", "divided", "spatial", "full", "graph", "depth"]


@dataclass
class VideoEncoderConfig:
    preset: str = ""  # a name from PRESETS: its values are the defaults under the YAML's own keys
    patch_size: int = 8  # pixels per patch side
    max_frames: int = 64  # size of the learned temporal position table
    dims: list[int] = field(default_factory=lambda: [64, 128, 128, 128])  # width per stage
    depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # blocks per stage
    heads: list[int] = field(default_factory=lambda: [2, 4, 4, 4])  # attention heads per stage
    attention: list[Attention] = field(default_factory=lambda: ["htwa"] * 4)  # block kind per stage
    temporal_windows: list[int] = field(default_factory=lambda: [2, 4, 8, 16])  # HTWA frames per window
    spatial_window: list[int] = field(default_factory=lambda: [4, 4])  # HTWA patches per window (h, w)
    downsample: list[bool] = field(default_factory=lambda: [True, False, False, False])  # 2x2 merge after
    merge_frames: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # TESTA r_t per block (divided)
    merge_patches: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # TESTA r_s per block (divided)
    graph_threshold: float = 0.5  # STGT sim_th: cosine similarities below it are no edge
    depth_window: int = 7  # DAST: frame t sees the depth of frames t-w..t+w
    depth_grid: int = 2  # DAST: depth tokens per frame = depth_grid ** 2
    # DAST on an image batch without depth maps (no "depth" key): "skip" leaves the depth attention out (no depth
    # keys to attend to, so it adds nothing; the block's MLP still runs), "error" refuses the batch. A video batch
    # without depth maps is always refused; an image batch with them uses them.
    image_depth: Literal["skip", "error"] = "skip"
    mlp_ratio: float = 4.0
    # "local": clip features from `local_stage`, whose windows never cross clip boundaries (LF-VILA's
    # paper); "final": from the last stage, as LF-VILA's released code does in effect.
    clip_features: Literal["local", "final"] = "local"
    local_stage: int = 1
    # Pooling of a stage's tokens into clip and video features: "mean" over frames and patches, or
    # LF-VILA's "maxpool": a (2, 3) max-pool with stride 1 over each frame's patch grid first.
    pooling: Literal["mean", "maxpool"] = "mean"
    # FLIP / UMT / ViCLIP token dropping: in training only, each video keeps a random round((1 - r) * N) of
    # its N patch positions, the same in every frame, before the first block. 0: off; refused with htwa
    # and maxpool (module docstring).
    drop_ratio: float = 0.0
    # A local `transformers` image-model folder (Swin, ViT, CLIP, BLIP, BLIP-2 vision) the encoder starts from:
    # pretrain/image_init.py inflates its weights, and sets the keys below to what the family has.
    init_image: str = ""
    pixel_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # frames: (x / 255 - mean) / std
    pixel_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    cls_token: bool = False  # a learned [CLS] token (ViT families); the first 2x2 downsampling drops it
    pos_grid: list[int] = field(default_factory=list)  # (h, w) of a learned spatial position table; []: none
    embed_norm: bool = False  # LayerNorm after the patch embedding (Swin's patch norm, CLIP's pre-norm)
    activation: Literal["gelu", "quick_gelu"] = "gelu"  # the MLPs' (CLIP: quick_gelu)
    norm_eps: float = 1e-5  # every LayerNorm's epsilon (ViT: 1e-12, BLIP-2: 1e-6)

    def __post_init__(self):
        n = len(self.dims)
        lists = ("depths", "heads", "attention", "temporal_windows", "downsample", "merge_frames", "merge_patches")
        for name in lists:
            if len(getattr(self, name)) != n:
                raise ValueError(f"bad value for model.video.{name}: expected one entry per stage ({n}, like model.video.dims)")
        for i, (d, h) in enumerate(zip(self.dims, self.heads)):
            if d % h:
                raise ValueError(f"bad value for model.video.dims[{i}]: expected divisible by model.video.heads[{i}] = {h} "
                                 f"(got {d})")
            if i + 1 < n and not self.downsample[i] and self.dims[i + 1] != d:
                raise ValueError(f"bad value for model.video.dims[{i + 1}]: expected dims[{i}] unless downsample[{i}] is true")
        frames_merged = patches_merged = False
        for i, kind in enumerate(self.attention):
            if (self.merge_frames[i] or self.merge_patches[i]) and kind != "divided":
                raise ValueError(f"bad value for model.video.merge_frames/merge_patches[{i}]: expected 0, TESTA merging "
                                 f"needs attention 'divided' (stage {i} is '{kind}')")
            if kind == "htwa" and (frames_merged or patches_merged):
                raise ValueError(f"bad value for model.video.attention[{i}]: expected not 'htwa' after TESTA merging")
            if kind == "depth" and frames_merged:
                raise ValueError(f"bad value for model.video.attention[{i}]: expected not 'depth' after TESTA frame merging")
            frames_merged |= self.merge_frames[i] > 0
            patches_merged |= self.merge_patches[i] > 0
            if self.downsample[i] and patches_merged:
                raise ValueError(f"bad value for model.video.downsample[{i}]: expected false (no 2x2 downsampling after TESTA "
                                 "patch merging)")
        if self.image_depth not in ("skip", "error"):
            raise ValueError(f"bad value for model.video.image_depth: expected one of skip, error "
                             f"(got {self.image_depth!r})")
        if not 0 <= self.local_stage < n:
            raise ValueError(f"bad value for model.video.local_stage: expected an integer in [0, {n - 1}]")
        for key in ("pixel_mean", "pixel_std"):
            values = getattr(self, key)
            if len(values) != 3 or (key == "pixel_std" and min(values) <= 0):
                raise ValueError(f"bad value for model.video.{key}: expected 3 numbers (R, G, B)"
                                 f"{', each > 0' if key == 'pixel_std' else ''} (got {values})")
        if self.pos_grid and (len(self.pos_grid) != 2 or min(self.pos_grid) < 1):
            raise ValueError(f"bad value for model.video.pos_grid: expected [] or [h, w] (got {self.pos_grid})")
        if self.norm_eps <= 0:
            raise ValueError(f"bad value for model.video.norm_eps: expected a number > 0 (got {self.norm_eps})")
        if not 0 <= self.drop_ratio < 1:
            raise ValueError("bad value for model.video.drop_ratio: expected a number in [0, 1) "
                             f"(got {self.drop_ratio})")
        if self.drop_ratio > 0 and "htwa" in self.attention:
            raise ValueError(f"bad value for model.video.drop_ratio: expected 0 with attention 'htwa' (stage "
                             f"{self.attention.index('htwa')}) because its shifted 3D windows need every patch of "
                             "the grid (set drop_ratio to 0, or use divided/spatial/full/graph/depth stages)")
        if self.drop_ratio > 0 and self.pooling == "maxpool":
            raise ValueError("bad value for model.video.drop_ratio: expected 0 with pooling 'maxpool' because "
                             "LF-VILA's max-pool needs each frame's whole patch grid (training would pool "
                             "differently from evaluation); use pooling 'mean'")

    def clip_stage(self) -> int | None:
        """The stage whose output gives clip features, or None when frames were merged by then."""
        stage = self.local_stage if self.clip_features == "local" else len(self.dims) - 1
        return None if any(self.merge_frames[: stage + 1]) else stage

    def stage_out_dim(self, i: int) -> int:
        return self.dims[i + 1] if self.downsample[i] and i + 1 < len(self.dims) else self.dims[i]


def _stages(**kw):
    """Per-stage lists with defaults filled for the stages' count."""
    n = len(kw["dims"])
    base = dict(temporal_windows=[1] * n, downsample=[False] * n, merge_frames=[0] * n, merge_patches=[0] * n)
    return {**base, **kw}


# Named configurations. "*_small" run on a 2-core CPU at 64x64 pixels; the others use the papers' widths.
PRESETS: dict[str, dict] = {
    "debug": _stages(patch_size=8, dims=[16, 32], depths=[1, 1], heads=[2, 2], attention=["htwa", "htwa"],
                     temporal_windows=[2, 8], spatial_window=[2, 2], downsample=[True, False], local_stage=0,
                     mlp_ratio=2.0),
    "lfvila_small": _stages(patch_size=8, dims=[64, 128, 128, 128], depths=[1, 1, 1, 1], heads=[2, 4, 4, 4],
                            attention=["htwa"] * 4, temporal_windows=[2, 4, 8, 16], spatial_window=[4, 4],
                            downsample=[True, False, False, False], local_stage=1),
    # LF-VILA: Swin-B inflated, patch 8 at 192x320, temporal windows 2-4-8-16-16-32, spatial 3x5.
    "lfvila": _stages(patch_size=8, max_frames=128, dims=[128, 256, 512, 512, 512, 1024], depths=[2, 2, 14, 2, 2, 2],
                      heads=[4, 8, 16, 16, 16, 32], attention=["htwa"] * 6, temporal_windows=[2, 4, 8, 16, 16, 32],
                      spatial_window=[3, 5], downsample=[True, True, False, False, True, False], local_stage=2,
                      pooling="maxpool"),
    "testa_small": _stages(patch_size=8, dims=[96, 96], depths=[1, 3], heads=[4, 4], attention=["divided"] * 2,
                           merge_frames=[0, 1], merge_patches=[0, 4], clip_features="final", local_stage=1),
    # TESTA: TimeSformer ViT-B/16 with [r_t, r_s] = [1, 12] in every block (32 frames) or [4, 8] (96).
    "testa": _stages(patch_size=16, max_frames=128, dims=[768], depths=[12], heads=[12], attention=["divided"],
                     merge_frames=[1], merge_patches=[12], clip_features="final", local_stage=0),
    "testa_96f": _stages(patch_size=16, max_frames=128, dims=[768], depths=[12], heads=[12], attention=["divided"],
                         merge_frames=[4], merge_patches=[8], clip_features="final", local_stage=0),
    "stgt_small": _stages(patch_size=8, dims=[64, 128], depths=[2, 1], heads=[2, 4], attention=["spatial", "graph"],
                          downsample=[True, False], graph_threshold=0.5, clip_features="final", local_stage=1),
    # STGT: per-frame EVA ViT-g/14 (39 blocks, 1408 wide, MLP 6144), then one graph-transformer layer.
    "stgt": _stages(patch_size=14, max_frames=128, dims=[1408, 1408], depths=[39, 1], heads=[16, 16],
                    attention=["spatial", "graph"], graph_threshold=0.5, clip_features="final", local_stage=1,
                    mlp_ratio=6144 / 1408),
    "dast_small": _stages(patch_size=8, dims=[64, 128, 128], depths=[1, 2, 1], heads=[2, 4, 4],
                          attention=["spatial", "depth", "divided"], downsample=[True, False, False],
                          depth_window=7, clip_features="final", local_stage=2),
    # DAST: depth-guided blocks at 512 wide, 8 heads, +-7 frames, over per-frame features.
    "dast": _stages(patch_size=16, max_frames=128, dims=[512, 512], depths=[4, 6], heads=[8, 8],
                    attention=["spatial", "depth"], depth_window=7, clip_features="final", local_stage=1),
    "full_small": _stages(patch_size=8, dims=[64, 128, 128, 128], depths=[1, 1, 1, 1], heads=[2, 4, 4, 4],
                          attention=["full"] * 4, downsample=[True, False, False, False], clip_features="final",
                          local_stage=3),
}


def preset_values(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown model.video.preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


@lru_cache(maxsize=32)
def block_patches(h: int, w: int, levels: int) -> torch.Tensor:
    """(U, 4**levels): the raster indices of the patches of each 2^levels x 2^levels block of an h x w grid,
    blocks in raster order, a block's patches in Z order (finest bits last: every run of four is a 2x2
    group in PatchMerging's order (0,0) (0,1) (1,0) (1,1), and so is every run of four after a merge)."""
    u = 2 ** levels
    z = torch.arange(u * u)
    r, c = torch.zeros_like(z), torch.zeros_like(z)
    for bit in range(levels):
        r, c = r | (((z >> (2 * bit + 1)) & 1) << bit), c | (((z >> (2 * bit)) & 1) << bit)
    rows = torch.arange(h // u)[:, None, None] * u + r  # (h/u, 1, u*u)
    cols = torch.arange(w // u)[None, :, None] * u + c  # (1, w/u, u*u)
    return (rows * w + cols).reshape(-1, u * u)


def build_block(cfg: VideoEncoderConfig, i: int, j: int, depth_dim: int) -> nn.Module:
    dim, heads, r = cfg.dims[i], cfg.heads[i], cfg.mlp_ratio
    window = (cfg.temporal_windows[i], *cfg.spatial_window)
    style = dict(eps=cfg.norm_eps, act=cfg.activation)
    blocks = {
        "htwa": lambda: HTWABlock(dim, heads, window, shift=j % 2 == 1, mlp_ratio=r, **style),
        "divided": lambda: DividedBlock(dim, heads, r, cfg.merge_frames[i], cfg.merge_patches[i], **style),
        "spatial": lambda: SpatialBlock(dim, heads, r, **style),
        "full": lambda: FullBlock(dim, heads, r, **style),
        "graph": lambda: GraphBlock(dim, heads, cfg.graph_threshold, r, **style),
        "depth": lambda: DepthBlock(dim, depth_dim, heads, cfg.depth_window, r, **style),
    }
    return blocks[cfg.attention[i]]()


class DepthEmbed(nn.Module):
    """Per-frame depth maps (B, T, H, W) in [0, 1] -> depth_grid**2 tokens per frame (B, T, Nd, C)."""

    def __init__(self, patch_size: int, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        B, T, H, W = depth.shape
        z = self.proj(depth.to(self.proj.weight.dtype).reshape(B * T, 1, H, W) * 2 - 1)  # (B*T, C, h, w)
        z = F.adaptive_avg_pool2d(z, self.grid).flatten(2).transpose(1, 2)  # (B*T, Nd, C)
        return self.norm(z).view(B, T, self.grid ** 2, -1)


class Stage(nn.Sequential):
    """A stage's blocks, then its 2x2 merge; called as one module (hooks on a stage see its input and output),
    each block through `run(unit, block, tokens)`, the encoder's activation checkpointing."""

    def forward(self, t: Tokens, run=None, first_unit: int = 0) -> Tokens:
        for j, block in enumerate(self):
            t = block(t) if run is None else run(first_unit + j, block, t)
        return t


class VideoEncoder(nn.Module):
    """Video (B, T, 3, H, W) in [0, 255] (+ depth (B, T, H, W)) -> clip features (B, M, Dc) or None,
    and the video feature (B, D)."""

    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        p, dims = cfg.patch_size, cfg.dims
        self.patch_embed = nn.Conv3d(3, dims[0], kernel_size=(1, p, p), stride=(1, p, p))
        self.time_pos = nn.Parameter(torch.zeros(cfg.max_frames, dims[0]))
        nn.init.trunc_normal_(self.time_pos, std=0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dims[0])) if cfg.cls_token else None
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dims[0])) if cfg.cls_token and cfg.pos_grid else None
        self.pos = nn.Parameter(torch.zeros(cfg.pos_grid[0] * cfg.pos_grid[1], dims[0])) if cfg.pos_grid else None
        for param in (self.cls, self.pos):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        self.embed_norm = nn.LayerNorm(dims[0], eps=cfg.norm_eps) if cfg.embed_norm else None
        self.uses_depth = "depth" in cfg.attention
        self.depth_embed = DepthEmbed(p, dims[0], cfg.depth_grid) if self.uses_depth else None
        self.stages = nn.ModuleList()
        for i in range(len(dims)):
            blocks = [build_block(cfg, i, j, dims[0]) for j in range(cfg.depths[i])]
            if cfg.downsample[i]:
                blocks.append(PatchMerging(dims[i], cfg.stage_out_dim(i), eps=cfg.norm_eps))
            self.stages.append(Stage(*blocks))
        self.clip_stage = cfg.clip_stage()
        self.clip_dim = cfg.stage_out_dim(self.clip_stage) if self.clip_stage is not None else None
        self.clip_norm = nn.LayerNorm(self.clip_dim, eps=cfg.norm_eps) if self.clip_dim else None
        self.norm = nn.LayerNorm(dims[-1], eps=cfg.norm_eps)

    def embed(self, video: torch.Tensor, depth: torch.Tensor | None,
              generator: torch.Generator | None = None, image: bool = False) -> Tokens:
        B, T, C, H, W = video.shape
        assert T <= self.cfg.max_frames, f"{T} frames exceed model.video.max_frames={self.cfg.max_frames}"
        dtype = self.patch_embed.weight.dtype  # fp32, or bf16 under DeepSpeed's bf16 mode
        mean, std = (torch.tensor(v, device=video.device).view(3, 1, 1, 1) for v in (self.cfg.pixel_mean, self.cfg.pixel_std))
        x = (video.transpose(1, 2).float().div(255.0) - mean) / std  # (B, 3, T, H, W), in fp32 even under bf16
        x = self.patch_embed(x.to(dtype)).permute(0, 2, 3, 4, 1)  # (B, T, h, w, D0)
        h, w = x.shape[2:4]
        x = x.flatten(2, 3) + self.time_pos[:T, None, :]  # (B, T, N, D0); an image: time_pos[0]
        if self.pos is not None:
            x = x + self.position_table(h, w)
        cls = None
        if self.cls is not None:
            cls = self.cls.expand(B, 1, -1) + (self.cls_pos if self.cls_pos is not None else 0)  # (B, 1, D0)
        if self.embed_norm is not None:
            x, cls = self.embed_norm(x), None if cls is None else self.embed_norm(cls)
        z = None
        if self.uses_depth and depth is not None:
            z = self.depth_embed(depth)  # (B, T, Nd, D0)
        elif self.uses_depth:
            assert image, "this encoder has depth attention: the batch needs 'depth' maps"
            if self.cfg.image_depth == "error":
                raise ValueError("an image batch without 'depth' maps, and this encoder has depth attention with "
                                 "model.video.image_depth=error: give the images depth maps, or set "
                                 "model.video.image_depth=skip (the depth attention then adds nothing on images)")
        t = Tokens(x=x, grid=(h, w), size=x.new_ones(B, T, h * w, 1), depth=z, cls=cls, image=image)
        return self.drop_tokens(t, generator) if self.training and self.cfg.drop_ratio > 0 else t

    def drop_tokens(self, t: Tokens, generator: torch.Generator | None) -> Tokens:
        """Token dropping: each video keeps a random round((1 - r) * U) of the U blocks of 2^k x 2^k patches
        (k = the 2x2 downsamplings; 1 x 1 without), the same blocks in every frame. Drawn from `generator`
        (the trainer's per-step one, so a resumed step drops what it dropped; it is the same on every rank, so
        video b of each rank keeps the same blocks), else the global CPU RNG (saved per rank in checkpoints)."""
        B, T, N, D = t.x.shape
        h, w = t.grid
        levels = sum(self.cfg.downsample)
        u = 2 ** levels
        assert h % u == 0 and w % u == 0, f"token dropping in {u}x{u} blocks needs a grid divisible by {u}, got {h}x{w}"
        units = (h // u) * (w // u)
        keep = max(1, math.floor((1 - self.cfg.drop_ratio) * units + 0.5))  # round half up, at least one
        noise = torch.rand(B, units, generator=generator, device=generator.device if generator is not None else "cpu")
        kept = noise.argsort(dim=1)[:, :keep].sort(dim=1).values.to(t.x.device)  # (B, keep) blocks, raster order
        idx = block_patches(h, w, levels).to(t.x.device)[kept].flatten(1)  # (B, K) patch indices, K = keep * u * u
        take = lambda v: v.gather(2, idx[:, None, :, None].expand(B, T, -1, v.shape[-1]))  # (B, T, K, .)
        return replace(t, x=take(t.x), size=take(t.size), grid=None, z_levels=levels)

    def position_table(self, h: int, w: int) -> torch.Tensor:
        """The spatial position table for an h x w grid (N, D0): bicubic from `pos_grid` when it differs."""
        gh, gw = self.cfg.pos_grid
        if (gh, gw) == (h, w):
            return self.pos
        table = self.pos.T.reshape(1, -1, gh, gw)  # (1, D0, gh, gw)
        return F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False).reshape(-1, h * w).T

    def forward(self, video: torch.Tensor, num_clips: int, depth: torch.Tensor | None = None,
                return_frames: bool = False, generator: torch.Generator | None = None, image: bool = False):
        """[, per-frame tokens (B, T', D): the size-weighted mean of each remaining frame, for fusion].
        image=True: an image batch, one frame (T = 1, num_clips = 1); see the module docstring."""
        B, T = video.shape[:2]
        M = num_clips
        assert T % M == 0, f"frames ({T}) must split evenly into {M} clips"
        assert not image or T == M == 1, f"an image batch is one frame and one clip (got {T} frames, {M} clips)"
        t = self.checkpointed(0, partial(self.embed, image=image), video, depth, generator=generator)
        clips, unit = None, 1
        for i, stage in enumerate(self.stages):
            t = stage(t, self.checkpointed, unit)  # x: (B, T_i, N_i, D_i)
            unit += len(stage)
            if i == self.clip_stage:
                c, s = self.pool(self.clip_norm(t.x), t)  # (B, T, N', Dc), (B, T, N', 1)
                clips = (c * s).reshape(B, M, -1, c.shape[-1]).sum(2) / s.reshape(B, M, -1, 1).sum(2)  # (B, M, Dc)
        x, s = self.pool(self.norm(t.x), t)  # (B, T', N', D), (B, T', N', 1)
        video_feat = (x * s).flatten(1, 2).sum(1) / s.flatten(1, 2).sum(1)  # (B, D): size-weighted mean
        if return_frames:
            return clips, video_feat, (x * s).sum(2) / s.sum(2)  # (B, T', D)
        return clips, video_feat

    checkpoint_every = 0  # activation checkpointing: recompute every k-th unit in the backward pass (0: off)

    def set_activation_checkpointing(self, every: int) -> None:
        """Keep no activations inside every `every`-th unit (0: keep all); the backward pass recomputes them.
        The units, counted from 0: the patch embedding, then each block and 2x2 merge in order; so 1 is every
        unit and k every k-th, always with the patch embedding (the normalised frames it feeds its conv are
        the largest tensor it keeps). Only in training with gradients: eval and no_grad run as usual."""
        self.checkpoint_every = every

    def checkpointed(self, unit: int, fn, *args, generator: torch.Generator | None = None):
        """fn(*args[, generator]), through non-reentrant torch checkpointing when `unit` is one to recompute.
        Non-reentrant checkpointing takes and returns any structure (a `Tokens`), replays the global RNGs, and
        recomputes whatever shapes TESTA's merging gives (the same inputs give the same merge). A `generator`
        (token dropping's) is replayed too: fn draws from a copy started at its state, which the generator
        then takes on, so the recomputation draws what the forward pass drew."""
        k = self.checkpoint_every
        if not (k and unit % k == 0 and self.training and torch.is_grad_enabled()):
            return fn(*args) if generator is None else fn(*args, generator)
        if generator is None:
            return checkpoint(fn, *args, use_reentrant=False)
        start = generator.get_state()

        def replay(*inputs):
            g = torch.Generator(generator.device)
            g.set_state(start)
            return fn(*inputs, g), g.get_state()

        out, end = checkpoint(replay, *args, use_reentrant=False)
        generator.set_state(end)
        return out

    def pool(self, x: torch.Tensor, t: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """LF-VILA's (2, 3) max-pool over each frame's grid when configured (and a grid exists)."""
        if self.cfg.pooling != "maxpool" or t.grid is None:
            return x, t.size
        B, T, N, D = x.shape
        h, w = t.grid
        g = x.reshape(B * T, h, w, D).permute(0, 3, 1, 2)  # (B*T, D, h, w)
        g = F.max_pool2d(g, kernel_size=(min(2, h), min(3, w)), stride=1)  # (B*T, D, h', w')
        g = g.flatten(2).transpose(1, 2).reshape(B, T, -1, D)  # (B, T, h'*w', D)
        return g, g.new_ones(*g.shape[:3], 1)
