"""Token dropping (model.video.drop_ratio; FLIP, UMT, ViCLIP): a tube of kept patch positions per video,
in training only, exact: the encoder's output is its output on the kept tokens alone."""
import pytest
import torch
from dataclasses import replace

from pretrain.blocks import PatchMerging, Tokens
from pretrain.config import ConfigError, load_config
from pretrain.model import LossConfig, ModelConfig, VideoTextModel
from pretrain.text_encoder import TextEncoderConfig
from pretrain.video_encoder import PRESETS, VideoEncoder, VideoEncoderConfig, preset_values

ALLOWED = [n for n in PRESETS if n.endswith("_small") and "htwa" not in PRESETS[n]["attention"]]


def encoder_cfg(name: str, **kw) -> VideoEncoderConfig:
    """A preset; "spatial" / "full": one stage of two blocks with a [CLS] and a position table; "full_x2":
    three full-attention stages with two 2x2 downsamplings (8x8 -> 4x4 -> 2x2 patches)."""
    if name in PRESETS:
        return VideoEncoderConfig(**{**preset_values(name), **kw})
    if name == "full_x2":
        return VideoEncoderConfig(**{**dict(patch_size=8, dims=[16, 32, 32], depths=[1, 1, 1], heads=[2, 2, 2],
                                            attention=["full"] * 3, temporal_windows=[1] * 3,
                                            downsample=[True, True, False], merge_frames=[0] * 3,
                                            merge_patches=[0] * 3, local_stage=1), **kw})
    one = dict(temporal_windows=[1], downsample=[False], merge_frames=[0], merge_patches=[0], clip_features="final",
               local_stage=0, cls_token=True, pos_grid=[8, 8])
    return VideoEncoderConfig(**{**one, "patch_size": 8, "dims": [32], "depths": [2], "heads": [2],
                                 "attention": [name], **kw})


def inputs(enc: VideoEncoder, B: int = 2, T: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (B, T, 3, 64, 64), dtype=torch.uint8, generator=g)
    return video, torch.rand(B, T, 64, 64, generator=g) if enc.uses_depth else None


def first_block_input(enc: VideoEncoder, *args, **kw) -> tuple[Tokens, tuple]:
    """The Tokens entering the encoder's first block, and the forward's outputs."""
    seen = []
    hook = enc.stages[0][0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        out = enc(*args, **kw)
    finally:
        hook.remove()
    return seen[0], out


def kept_positions(full: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Recover which patch each kept token is, by exact match against the undropped embedding.
    full (B, T, N, D), kept (B, T, K, D) -> (B, T, K) patch indices."""
    match = (kept[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)  # (B, T, K, N)
    assert torch.all(match.sum(-1) == 1), "every kept token is exactly one patch's embedding"
    return match.float().argmax(-1)


def merge_by_hand(block: PatchMerging, t: Tokens, pos: torch.Tensor, w: int):
    """PatchMerging on kept tokens at raster positions pos (B, K) of a grid w wide: each kept 2x2 group
    (all four must be kept) concatenated in the order (0,0) (0,1) (1,0) (1,1), as on the full grid."""
    feats, sizes, new_pos = [], [], []
    for b in range(pos.shape[0]):
        where = {p: k for k, p in enumerate(pos[b].tolist())}
        groups = sorted({(p // w // 2) * (w // 2) + p % w // 2 for p in where})
        corner = [2 * (g // (w // 2)) * w + 2 * (g % (w // 2)) for g in groups]  # each group's (0, 0) patch
        idx = torch.tensor([[where[c + i * w + j] for i in (0, 1) for j in (0, 1)]
                            for c in corner])  # (K/4, 4); a KeyError if a group was not kept whole
        feats.append(t.x[b][:, idx].flatten(-2))  # (T, K/4, 4D)
        sizes.append(t.size[b][:, idx].sum(-2))  # (T, K/4, 1)
        new_pos.append(groups)
    x = block.reduce(block.norm(torch.stack(feats)))
    return replace(t, x=x, size=torch.stack(sizes), cls=None), torch.tensor(new_pos), w // 2


def reference(enc: VideoEncoder, video, depth, pos: torch.Tensor, M: int):
    """The encoder run on the kept patches only (raster order), pooled by hand: (clips, video, frames)."""
    enc.eval()
    full = enc.embed(video, depth)  # no dropping in eval
    B, T, N, D = full.x.shape
    take = lambda v: v.gather(2, pos[:, None, :, None].expand(B, T, -1, v.shape[-1]))
    t = Tokens(x=take(full.x), grid=None, size=take(full.size), depth=full.depth, cls=full.cls)
    w, clips = full.grid[1], None
    for i, stage in enumerate(enc.stages):
        for block in stage:
            if isinstance(block, PatchMerging):
                t, pos, w = merge_by_hand(block, t, pos, w)
            else:
                t = block(t)
        if i == enc.clip_stage:
            c, s, F_ = enc.clip_norm(t.x), t.size, T // M
            clips = torch.stack([(c[:, m * F_:(m + 1) * F_] * s[:, m * F_:(m + 1) * F_]).sum((1, 2))
                                 / s[:, m * F_:(m + 1) * F_].sum((1, 2)) for m in range(M)], dim=1)
    x, s = enc.norm(t.x), t.size
    return clips, (x * s).sum((1, 2)) / s.sum((1, 2)), (x * s).sum(2) / s.sum(2)


def test_drop_ratio_0_changes_nothing_and_evaluation_never_drops():
    torch.manual_seed(0)
    enc0 = VideoEncoder(encoder_cfg("full_small"))
    enc5 = VideoEncoder(encoder_cfg("full_small", drop_ratio=0.5))
    enc5.load_state_dict(enc0.state_dict())
    video, _ = inputs(enc0)
    g = torch.Generator().manual_seed(1)
    g_state, global_state = g.get_state(), torch.get_rng_state()
    with torch.no_grad():
        ref = enc0.eval()(video, 2, return_frames=True)
        seen, train0 = first_block_input(enc0.train(), video, 2, return_frames=True, generator=g)
        assert seen.grid == (8, 8) and seen.x.shape[2] == 64
        seen, eval5 = first_block_input(enc5.eval(), video, 2, return_frames=True, generator=g)
        assert seen.grid == (8, 8) and seen.x.shape[2] == 64
    for got in (train0, eval5):
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # nothing drawn: the step generator's later draws (MTC's positions) and the global RNG are as before
    assert torch.equal(g.get_state(), g_state) and torch.equal(torch.get_rng_state(), global_state)


@pytest.mark.parametrize("name,ratio,per_frame", [
    ("spatial", 0.25, 48), ("spatial", 0.45, 35), ("spatial", 0.5, 32), ("spatial", 0.9, 6), ("spatial", 0.995, 1),
    ("full_small", 0.5, 32), ("full_small", 0.3, 44), ("dast_small", 0.75, 16), ("full_x2", 0.5, 32),
])
def test_kept_tokens_are_a_tube_of_round_1_minus_r_units_per_video(name, ratio, per_frame):
    """round half up: 64 * 0.55 = 35.2 -> 35, 64 * 0.1 = 6.4 -> 6, at least one; with a 2x2 downsampling
    16 blocks of 2x2: 16 * 0.7 = 11.2 -> 11 blocks = 44 tokens."""
    torch.manual_seed(0)
    enc = VideoEncoder(encoder_cfg(name, drop_ratio=ratio)).train()
    video, depth = inputs(enc, B=4)
    with torch.no_grad():
        seen, _ = first_block_input(enc, video, 2, depth, generator=torch.Generator().manual_seed(0))
        full = enc.eval().embed(video, depth)
    B, T = video.shape[:2]
    assert seen.grid is None and seen.x.shape == (B, T, per_frame, full.x.shape[-1])
    assert seen.size.shape == (B, T, per_frame, 1) and torch.all(seen.size == 1)
    pos = kept_positions(full.x, seen.x)  # (B, T, K)
    assert torch.equal(pos, pos[:, :1].expand_as(pos)), "the same positions in every frame of a video"
    assert len({tuple(sorted(p)) for p in pos[:, 0].tolist()}) > 1, "videos of a batch keep different positions"
    u = 2 ** sum(enc.cfg.downsample)  # whole u x u blocks, so every downsampling's groups are whole
    blocks = (pos[:, 0] // 8 // u) * (8 // u) + pos[:, 0] % 8 // u  # (B, K) the block of each kept patch
    assert all(torch.all(blocks[b].bincount(minlength=(8 // u) ** 2) % (u * u) == 0) for b in range(B))
    if enc.cls is not None:
        assert torch.equal(seen.cls, full.cls), "the [CLS] token is never dropped"
    if depth is not None:
        assert torch.equal(seen.depth, full.depth), "depth tokens (keys) are never dropped"


@pytest.mark.parametrize("name,ratio", [("spatial", 0.5), ("full", 0.45), ("testa_small", 0.45), ("full_small", 0.5),
                                        ("stgt_small", 0.5), ("dast_small", 0.5), ("full_x2", 0.5)])
def test_dropping_is_exactly_the_encoder_on_the_kept_tokens(name, ratio):
    """testa_small at 0.45 keeps 35 patches: TESTA's bipartite matching on an odd count, then 31, 27, 23;
    full_small, stgt_small and dast_small merge the kept 2x2 blocks, full_x2 merges 4x4 blocks twice (each
    checked against a merge by hand on the raster positions)."""
    torch.manual_seed(0)
    enc = VideoEncoder(encoder_cfg(name, drop_ratio=ratio))
    for p in enc.parameters():  # zero-initialised tables ([CLS] position) would hide a mix-up
        if p.dim() and torch.all(p == 0):
            torch.nn.init.normal_(p, std=0.02)
    video, depth = inputs(enc, B=3)
    M = 2
    with torch.no_grad():
        seen, got = first_block_input(enc.train(), video, M, depth, return_frames=True,
                                      generator=torch.Generator().manual_seed(3))
        pos = kept_positions(enc.eval().embed(video, depth).x, seen.x)[:, 0].sort(-1).values  # (B, K)
        want = reference(enc, video, depth, pos, M)
    assert (got[0] is None) == (want[0] is None)
    for a, b in zip(got, want):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_refused_configurations_give_a_one_line_error():
    for name in ("debug", "lfvila_small", "lfvila"):
        with pytest.raises(ValueError, match=r"bad value for model.video.drop_ratio: expected 0 with attention 'htwa'"):
            encoder_cfg(name, drop_ratio=0.5)
    with pytest.raises(ValueError, match=r"drop_ratio: expected 0 with pooling 'maxpool' because"):
        encoder_cfg("full_small", drop_ratio=0.5, pooling="maxpool")
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"drop_ratio: expected a number in \[0, 1\)"):
            encoder_cfg("full_small", drop_ratio=bad)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.video.preset=lfvila_small", "model.video.drop_ratio=0.5"])
    assert "\n" not in str(e.value) and "model.video.drop_ratio: expected 0 with attention 'htwa'" in str(e.value)
    encoder_cfg("lfvila_small", drop_ratio=0.0)  # 0 is always allowed


@pytest.fixture(scope="module")
def text_cfg():
    return TextEncoderConfig(sentence_layers=3)


@pytest.mark.parametrize("name", ALLOWED)
def test_training_step_with_half_the_tokens(name, text_cfg):
    torch.manual_seed(0)
    mtc = 0.25 if encoder_cfg(name).clip_stage() is not None else 0.0  # TESTA merges frames: no clip features
    cfg = ModelConfig(video=encoder_cfg(name, drop_ratio=0.5), text=text_cfg, embed_dim=32,
                      loss=LossConfig(mtc_weight=mtc))
    model = VideoTextModel(cfg).train()
    B, M, L = 4, 2, 8
    video, depth = inputs(model.video, B=B)
    ids = torch.randint(1000, 2000, (B, M, L), generator=torch.Generator().manual_seed(0))
    ids[..., 0] = 101
    batch = {"video": video, "input_ids": ids, "attention_mask": torch.ones(B, M, L, dtype=torch.long)}
    if depth is not None:
        batch["depth"] = depth
    def run(seed: int) -> dict:  # dropping draws from the rank's global RNG (seeded per rank), not the
        torch.manual_seed(seed)  # step generator, which is the same on every rank
        return model(batch, generator=torch.Generator().manual_seed(0))

    out = run(0)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    missing = [n for n, p in model.video.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    model.text.eval()  # no text dropout: only the drop pattern can tell the runs apart
    with torch.no_grad():  # the same RNG seed, the same loss; another, another drop pattern
        again, other = run(0)["loss"], run(1)["loss"]
    assert torch.equal(again, run(0)["loss"]) and not torch.equal(other, again)


def test_the_same_seed_gives_the_same_pattern():
    torch.manual_seed(0)
    enc = VideoEncoder(encoder_cfg("spatial", drop_ratio=0.5)).train()
    video, _ = inputs(enc, B=4)

    def pattern(**kw):
        with torch.no_grad():
            seen, out = first_block_input(enc.train(), video, 2, **kw)
            return kept_positions(enc.eval().embed(video, None).x, seen.x), out

    (p1, o1), (p2, o2), (p3, _) = (pattern(generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert torch.equal(p1, p2) and all(torch.equal(a, b) for a, b in zip(o1, o2))
    assert not torch.equal(p1, p3)
    # without a generator: the global RNG, which checkpoints save per rank
    torch.manual_seed(5)
    g1, _ = pattern()
    torch.manual_seed(5)
    g2, _ = pattern()
    assert torch.equal(g1, g2)
