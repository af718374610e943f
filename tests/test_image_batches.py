"""Image batches (one frame, one caption; batch["media"] == "image") through every encoder the project uses.

The rule (pretrain/model.py, pretrain/video_encoder.py): an image is the one-frame, one-clip video path of the
same modules; it computes only model.loss.image_losses (never MTC), and a depth stage without depth maps follows
model.video.image_depth. Cases: the presets in use and every stage list of benchmarks/ablation.py's VARIANTS,
at 32x32 pixels with a 32-wide joint embedding.
"""
import sys
from pathlib import Path

import pytest
import torch

from pretrain.attention import GraphAttention, frame_band
from pretrain.config import ConfigError, load_config
from pretrain.model import LossConfig, VideoTextModel
from pretrain.video_encoder import VideoEncoder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # benchmarks/*.py import each other by name

from ablation import IMAGE, VARIANTS, VIT_KEYS  # noqa: E402

BASE = REPO / "benchmarks/configs/ablation.yaml"  # 32x32 frames, 4 clips of 4 frames, VPC
TINY = ["model.embed_dim=32", "data.batch_size=4"]
FILL = {"grid": 4, "half": 2}  # ViT position grid at 32 px / patch 8; vpc_warmup_steps


def ablation_overrides(name: str) -> list[str]:
    """A variant's overrides; an image-initialised one with the keys its image model would set (same architecture)."""
    out = []
    for o in VARIANTS[name][1]:
        out += [k.format(**FILL) for k in VIT_KEYS] if o == IMAGE else [o.format(**FILL)]
    return out


CASES = {
    **{f"preset-{p}": [f"model.video.preset={p}"]
       for p in ("debug", "full_small", "lfvila_small", "testa_small", "stgt_small", "dast_small")},
    **{f"ablation-{name}": ablation_overrides(name) for name in VARIANTS},
    # stage 2 (MLM + VTM through the fusion stack) and token dropping, on images too
    "fusion": ["model.video.preset=debug", "model.fusion_layers=1", "model.loss.vpc_weight=0",
               "model.loss.mlm_weight=1", "model.loss.vtm_weight=1"],
    "drop_ratio": ["model.video.drop_ratio=0.5"],
}


def config(overrides):
    return load_config(BASE, [*TINY, *overrides])


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def captions(B, M, L=8, seed=0):
    ids = torch.randint(1000, 2000, (B, M, L), generator=seeded(seed))
    ids[..., 0], ids[..., -1] = 101, 102
    return ids, torch.ones_like(ids)


def image_batch(B=4, size=32, seed=0):
    """The loader's image batch: one frame, the caption as one sentence, no depth."""
    ids, mask = captions(B, 1, seed=seed)
    video = torch.randint(0, 256, (B, 1, 3, size, size), dtype=torch.uint8, generator=seeded(seed))
    return {"video": video, "input_ids": ids, "attention_mask": mask, "media": "image", "source": "cc3m"}


def video_batch(B=4, T=8, M=2, size=32, seed=0):
    ids, mask = captions(B, M, seed=seed)
    video = torch.randint(0, 256, (B, T, 3, size, size), dtype=torch.uint8, generator=seeded(seed))
    return {"video": video, "input_ids": ids, "attention_mask": mask, "media": "video", "source": "webvid"}


@pytest.mark.parametrize("case", list(CASES))
def test_an_image_batch_trains_under_every_encoder(case):
    cfg = config(CASES[case])
    torch.manual_seed(0)
    model = VideoTextModel(cfg.model).train()
    if case == "preset-dast_small":
        model.set_activation_checkpointing(1)  # the image flag survives the recomputation
    out = model(image_batch(), generator=seeded(0), step=3)
    expected = cfg.model.loss.computed(image=True)
    assert set(out) == expected | {"loss"} and "mtc" not in out
    assert all(torch.isfinite(v) for v in out.values()), out
    out["loss"].backward()
    grad = model.video.patch_embed.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def has_depth(overrides) -> bool:
    return "depth" in config(overrides).model.video.attention


@pytest.mark.parametrize("case", [c for c in CASES if not has_depth(CASES[c])])
def test_an_image_is_the_one_frame_video_path(case):
    """The encoder's output on an image equals its output on a one-frame video of the same pixels."""
    cfg = config(CASES[case])
    torch.manual_seed(0)
    enc = VideoEncoder(cfg.model.video).eval()
    pixels = image_batch(B=2)["video"]
    with torch.no_grad():
        image, video = enc(pixels, 1, image=True), enc(pixels.clone(), 1)
    for a, b in zip(image, video):
        assert (a is None and b is None) or torch.equal(a, b)


def test_under_full_attention_an_image_takes_the_first_time_position():
    cfg = config(["model.video.preset=full_small"])
    torch.manual_seed(0)
    enc = VideoEncoder(cfg.model.video).eval()
    pixels = image_batch(B=2)["video"]
    with torch.no_grad():
        _, before = enc(pixels, 1, image=True)
        _, video = enc(pixels, 1)
        enc.time_pos[1:] += 1.0  # positions after the first play no part
        _, later = enc(pixels, 1, image=True)
        enc.time_pos[0] += 1.0
        _, first = enc(pixels, 1, image=True)
    assert torch.equal(before, video) and torch.equal(before, later) and not torch.allclose(before, first)


def test_mtc_is_computed_on_video_batches_and_absent_on_image_batches():
    cfg = config(["model.video.preset=lfvila_small", "model.loss.mtc_weight=0.25", "data.num_clips=2"])
    torch.manual_seed(0)
    model = VideoTextModel(cfg.model)
    video = model(video_batch(), generator=seeded(0))
    assert set(video) == {"vpc", "mtc", "loss"}
    torch.testing.assert_close(video["loss"], video["vpc"] + 0.25 * video["mtc"])
    image = model(image_batch(), generator=seeded(0))
    assert set(image) == {"vpc", "loss"}
    torch.testing.assert_close(image["loss"], image["vpc"])
    image["loss"].backward()
    assert model.video_local.weight.grad is None  # the clip head trains on video batches only


def test_image_losses_choose_the_terms_of_an_image_batch():
    cfg = config(["model.video.preset=debug", "model.loss.ssl_weight=1", "model.loss.image_losses=[ssl]"])
    torch.manual_seed(0)
    model = VideoTextModel(cfg.model)
    assert set(model(image_batch())) == {"ssl", "loss"}
    assert set(model(video_batch())) == {"vpc", "ssl", "loss"}


def test_testa_skips_frame_merging_on_an_image_and_merges_patches():
    cfg = config(["model.video.preset=testa_small"])  # merge_frames [0, 1], merge_patches [0, 4] x 3 blocks
    enc = VideoEncoder(cfg.model.video).eval()
    seen = []
    enc.stages[-1].register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        enc(image_batch(B=2)["video"], 1, image=True)
    t = seen[0]
    assert t.x.shape[:3] == (2, 1, 16 - 3 * 4) and not t.frames_merged and t.size.sum() == 2 * 16


def test_graph_edges_of_one_frame_stay_within_the_frame():
    """STGT's +-1-frame band on one frame is the frame itself: the banded form equals the dense graph
    attention over the frame's tokens (edges = thresholded cosine similarity only)."""
    torch.manual_seed(0)
    attn = GraphAttention(dim=16, heads=2, threshold=0.0)
    x = torch.randn(2, 9, 16)  # (B, T*N, D), T = 1
    dense = GraphAttention(dim=16, heads=2, threshold=0.0, banded=False)
    dense.load_state_dict(attn.state_dict())
    assert frame_band(1, 9).all()  # the dense form's band: every token of the one frame, nothing else
    torch.testing.assert_close(attn(x, 1), dense(x, 1), atol=1e-5, rtol=1e-5)


def test_depth_attention_on_images_follows_image_depth():
    skip = config(["model.video.preset=dast_small"])
    assert skip.model.video.image_depth == "skip"
    torch.manual_seed(0)
    model = VideoTextModel(skip.model)
    out = model(image_batch())
    out["loss"].backward()
    # the depth attention adds nothing (so its weights get no gradient); the depth blocks' MLPs train
    blocks = [b for i, kind in enumerate(skip.model.video.attention) if kind == "depth" for b in model.video.stages[i]]
    assert blocks and all(p.grad is None for b in blocks for p in b.attn.parameters())
    assert all(p.grad is not None for b in blocks for p in b.mlp.parameters())
    # an image with depth maps uses them (depth attention over its own frame)
    batch = image_batch(B=2)
    with torch.no_grad():
        _, without = model.video(batch["video"], 1, image=True)
        _, with_depth = model.video(batch["video"], 1, torch.rand(2, 1, 32, 32), image=True)
    assert not torch.allclose(without, with_depth)
    error = config(["model.video.preset=dast_small", "model.video.image_depth=error"])
    with pytest.raises(ValueError, match="model.video.image_depth=error"):
        VideoTextModel(error.model)(image_batch())
    with pytest.raises(AssertionError, match="needs 'depth' maps"):  # a video batch without depth: as before
        model(video_batch(T=4, M=2))


@pytest.mark.parametrize("override, match", [
    ("model.loss.image_losses=[vpc,mtc]", r"model.loss.image_losses: expected .* vpc, ssl, mlm, vtm.*mtc orders"),
    ("model.loss.image_losses=[vpc,vpc]", "model.loss.image_losses: expected a list of distinct names"),
    ("model.loss.image_losses=vpc", "model.loss.image_losses"),
    ("model.video.image_depth=zeros", r"model.video.image_depth: expected one of \['skip', 'error'\]"),
])
def test_a_bad_image_rule_is_a_config_error_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        config([override])


def test_image_losses_need_a_loss_to_train_at_every_step():
    with pytest.raises(ValueError, match="model.loss.image_losses: expected at least one loss with weight > 0"):
        LossConfig(vpc_weight=0, mtc_weight=1)  # an image batch would have nothing to train
    with pytest.raises(ValueError, match=r"image_losses: expected at least one loss with weight > 0 from step 4"):
        LossConfig(vpc_weight=1, ssl_weight=1, vpc_warmup_steps=4, image_losses=["vpc"])
    LossConfig(vpc_weight=0, mtc_weight=1, image_losses=[])  # a run without image batches
    cfg = config(["model.video.preset=debug", "model.loss.image_losses=[]"])
    model = VideoTextModel(cfg.model)
    with pytest.raises(ValueError, match=r"model.loss.image_losses is \[\]"):
        model(image_batch())


def test_a_malformed_image_batch_is_refused():
    model = VideoTextModel(config(["model.video.preset=debug"]).model)
    two_frames = {**video_batch(T=2, M=1), "media": "image"}
    with pytest.raises(ValueError, match="one frame and one caption"):
        model(two_frames)
    with pytest.raises(ValueError, match="batch\\['media'\\] must be 'image' or 'video'"):
        model({**image_batch(), "media": "picture"})
