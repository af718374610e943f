"""Non-square input: `data.size` as [height, width] in the config, the crop boxes, the cross-field checks,
and a real forward + backward on a [32, 64] batch from the real loader."""
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from pretrain.config import REPO_ROOT, ConfigError, load_config, save_config
from pretrain.flops import measure
from pretrain.train import build_model
from shards.__main__ import main as shards_main
from shards.format import num_frames
from shards.loader import DataConfig, build_train_loader, decode_sample, load_depth, load_video, read_meta
from shards.sampling import plan_clips
from shards.transforms import centre_crop, crop_resize, random_crop

DEMO = REPO_ROOT / "pretrain" / "configs" / "demo.yaml"
LFVILA = ["model.video.preset=lfvila", "data.num_clips=4", "data.frames_per_clip=8"]


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, size, hw", [("64", 64, (64, 64)), ("[192, 320]", [192, 320], (192, 320))])
def test_both_yaml_forms_load_and_a_saved_config_loads_again(tmp_path, text, size, hw):
    f = tmp_path / "c.yaml"
    f.write_text(f"base: {DEMO}\ndata:\n  size: {text}\n")
    cfg = load_config(f)
    assert cfg.data.size == size and cfg.data.hw == hw
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again.data.size == size and again.data.hw == hw
    assert DataConfig(size=tuple(hw)).size == list(hw)  # a tuple becomes a list, which YAML can write


@pytest.mark.parametrize("value", ["[0, 5]", "[1, 2, 3]", "big", "[8, x]", "true", "[]"])
def test_a_bad_size_is_one_line_naming_data_size(value):
    # a list of the right shape names the bad item: "bad value for data.size[1]: expected int, got 'x'"
    where = r"data\.size\[1\]" if value == "[8, x]" else r"data\.size"
    with pytest.raises(ConfigError, match=rf"^bad value for {where}: expected ") as e:
        load_config(None, [f"data.size={value}"])
    assert "\n" not in str(e.value)


def test_lfvila_validates_at_192x320_and_not_at_a_square():
    cfg = load_config(None, LFVILA + ["data.size=[192, 320]"])
    assert cfg.data.hw == (192, 320)
    window = (r"bad value for model\.video\.temporal_windows\[0\] / spatial_window: expected windows that tile "
              r"stage 0's input: 32 frames and a 24x24 patch grid")
    with pytest.raises(ConfigError, match=window):
        load_config(None, LFVILA + ["data.size=[192, 192]"])


def test_grid_checks_use_height_and_width():
    with pytest.raises(ConfigError, match=r"data\.size: expected a height and width that are multiples of "
                                          r"model\.video\.patch_size = 8 \(got 32x60\)"):
        load_config(None, ["data.size=[32, 60]"])
    with pytest.raises(ConfigError, match=r"model\.video\.downsample\[0\]: expected false: stage 0's 5x8 patch grid "
                                          r"has an odd side"):
        load_config(None, ["model.video.preset=full_small", "model.loss.mtc_weight=0", "data.size=[40, 64]"])
    load_config(None, ["model.video.preset=full_small", "model.loss.mtc_weight=0", "data.size=[48, 64]"])


# ---- crop boxes and resizing ---------------------------------------------------------------------


def test_centre_crop_is_the_largest_centred_box_of_the_output_aspect():
    assert centre_crop(60, 100, (30, 50)) == (0.0, 0.0, 1.0, 1.0)  # the same aspect: the whole frame
    assert centre_crop(120, 100, (30, 50)) == (0.25, 0.0, 0.75, 1.0)  # taller: 60 rows of 120
    assert centre_crop(60, 200, (30, 50)) == (0.0, 0.25, 1.0, 0.75)  # wider: 100 columns of 200
    assert centre_crop(360, 640, (192, 320)) == (0.0, 20 / 640, 1.0, 620 / 640)  # 360 x 600


def test_random_crop_keeps_the_output_aspect_within_the_jitter():
    H, W, (h, w) = 360, 640, (192, 320)
    for seed in range(50):
        top, left, bottom, right = random_crop(H, W, np.random.default_rng(seed), 0.3, (h, w))
        assert 0 <= top < bottom <= 1 and 0 <= left < right <= 1
        aspect = ((bottom - top) * H) / ((right - left) * W)  # box h/w
        assert 3 / 4 - 1e-9 <= (h / w) / aspect <= 4 / 3 + 1e-9
    top, left, bottom, right = random_crop(H, W, np.random.default_rng(0), 0.3, (h, w), ratio=(1.0, 1.0))
    assert ((bottom - top) * H) / ((right - left) * W) == pytest.approx(h / w)
    assert random_crop(H, W, np.random.default_rng(0), 1.0, (h, w)) == centre_crop(H, W, (h, w))


def triangle_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Reference for antialiased bilinear downscaling: a triangle filter as wide as the scale, renormalised
    at the borders. (..., H, W) -> (..., h, w)"""
    def weights(n_in, n_out):
        scale = n_in / n_out
        centres = (np.arange(n_out) + 0.5) * scale  # output pixel centres in input coordinates
        k = np.maximum(0.0, 1 - np.abs(np.arange(n_in)[None] + 0.5 - centres[:, None]) / max(scale, 1.0))
        return k / k.sum(1, keepdims=True)  # (n_out, n_in)

    return weights(x.shape[-2], h) @ x @ weights(x.shape[-1], w).T


def pattern(T: int, H: int, W: int) -> torch.Tensor:
    """(T, 3, H, W) float: a sawtooth that differs per frame, channel, row and column."""
    t, c, y, x = torch.meshgrid(*(torch.arange(n) for n in (T, 3, H, W)), indexing="ij")
    return ((50 * t + 20 * c + 7 * y + 3 * x) % 251).float()


def test_crop_resize_gives_the_expected_pixels():
    x = pattern(2, 60, 100)
    want = torch.from_numpy(triangle_resize(x.double().numpy(), 30, 50)).float()
    torch.testing.assert_close(crop_resize(x, centre_crop(60, 100, (30, 50)), (30, 50)), want, atol=1e-3, rtol=0)
    tall = torch.cat([torch.zeros(2, 3, 30, 100), x, torch.zeros(2, 3, 30, 100)], dim=2)  # (2, 3, 120, 100)
    torch.testing.assert_close(crop_resize(tall, centre_crop(120, 100, (30, 50)), (30, 50)), want, atol=1e-3, rtol=0)
    wide = pattern(2, 60, 200).to(torch.uint8)  # a crop of exactly the output size: no resampling at all
    out = crop_resize(wide, centre_crop(60, 200, (60, 100)), (60, 100))
    assert out.dtype == torch.uint8 and torch.equal(out, wide[..., 50:150])


def test_depth_follows_the_video_box_at_a_non_square_size():
    def picture(H, W):  # (1, 1, H, W): a value that says where in the frame a pixel is
        y, x = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
        return (1000 * y + 100 * x)[None, None]

    for box in (random_crop(360, 640, np.random.default_rng(1), 0.3, (16, 32)), centre_crop(360, 640, (16, 32))):
        video, depth = crop_resize(picture(360, 640), box, (16, 32)), crop_resize(picture(90, 160), box, (16, 32))
        assert video.shape == depth.shape == (1, 1, 16, 32)
        assert (video - depth).abs().max() < 15 and video.max() - video.min() > 200


# The square transforms before non-square sizes, frozen: a square data.size must give the same pixels.
def old_centre_square(H, W):
    side = min(H, W)
    top, left = (H - side) / 2 / H, (W - side) / 2 / W
    return top, left, top + side / H, left + side / W


def old_random_crop(H, W, rng, scale_min, ratio=(3 / 4, 4 / 3)):
    if scale_min >= 1.0:
        return old_centre_square(H, W)
    for _ in range(10):
        area = H * W * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w <= W and h <= H:
            top, left = rng.uniform(0, H - h), rng.uniform(0, W - w)
            return top / H, left / W, (top + h) / H, (left + w) / W
    return old_centre_square(H, W)


def old_crop_resize(x, box, size):
    H, W = x.shape[-2:]
    top, left = round(box[0] * H), round(box[1] * W)
    bottom, right = max(top + 1, round(box[2] * H)), max(left + 1, round(box[3] * W))
    x = x[..., top:bottom, left:right]
    if tuple(x.shape[-2:]) == (size, size):
        return x.contiguous()
    if x.dtype == torch.uint8:
        return Fn.interpolate(x.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bilinear",
                              antialias=True, align_corners=False).contiguous()
    y = Fn.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.to(x.dtype)


@pytest.mark.parametrize("H, W", [(36, 64), (64, 36), (64, 64), (90, 160), (33, 71)])
def test_a_square_size_gives_the_old_pixels_bit_for_bit(H, W):
    x = torch.randint(0, 256, (2, 3, H, W), generator=torch.Generator().manual_seed(H * W), dtype=torch.uint8)
    for S in (16, 32, 36):
        assert centre_crop(H, W, DataConfig(size=S).hw) == old_centre_square(H, W)
        for seed in range(8):
            for scale_min in (0.08, 0.5, 1.0):
                box = random_crop(H, W, np.random.default_rng(seed), scale_min, (S, S))
                assert box == old_random_crop(H, W, np.random.default_rng(seed), scale_min)
                assert torch.equal(crop_resize(x, box, (S, S)), old_crop_resize(x, box, S))
                assert torch.equal(crop_resize(x.float(), box, (S, S)), old_crop_resize(x.float(), box, S))


# ---- the real loader and model at [32, 64] --------------------------------------------------------


@pytest.fixture(scope="module")
def synth64(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synth"
    assert shards_main(["synth", "--out", str(out), "--videos", "4", "--val-videos", "2", "--seed", "0",
                        "--size", "64", "--fps", "4", "--per-shard", "2", "--events", "4"]) == 0
    return out


def tiny(data) -> list[str]:
    return ["model.video.preset=debug", "model.video.local_stage=0", "model.text.sentence_layers=2",
            "model.embed_dim=16", "data.size=[32, 64]", "data.frames_per_clip=2", "data.batch_size=2",
            "data.num_workers=0", "data.max_words=12", "data.shuffle_buffer=1",
            f"data.train_shards={data}/train", f"data.val_shards={data}/val"]


def test_eval_sample_is_the_centre_band_of_a_square_video(synth64):
    """64x64 frames at [32, 64]: the box is rows 16..48, whole width, so no resampling; depth follows it."""
    cfg = load_config(DEMO, tiny(synth64))
    with tarfile.open(synth64 / "val" / "synth-000000.tar") as tf:
        members = [m for m in tf if m.isfile()]
        key = members[0].name.split(".", 1)[0]
        raw = {"__key__": key, **{m.name.split(".", 1)[1]: tf.extractfile(m).read()
                                  for m in members if m.name.startswith(key + ".")}}
    sample = decode_sample(raw, cfg.data, cfg.model.text.resolved_path(), rng=None)
    meta, spans = read_meta(raw["json"], cfg.data)
    d = cfg.data
    plan = plan_clips(d.clip_sampling, spans, meta["duration"], meta["fps"], num_frames(meta), d.num_clips,
                      d.frames_per_clip, d.clip_seconds, None)
    frames = load_video(raw["mp4"], plan.times)  # (T, 3, 64, 64)
    assert frames.shape[-2:] == (64, 64) and sample["video"].shape == (8, 3, 32, 64)
    assert torch.equal(sample["video"], frames[..., 16:48, :])
    depth = load_depth(raw["depth.npz"], plan.times, meta["fps"])  # (T, 1, h, w), any resolution
    want = crop_resize(depth, (0.25, 0.0, 0.75, 1.0), (32, 64))[:, 0].half()
    assert torch.equal(sample["depth"], want)


def test_a_non_square_batch_trains_end_to_end(synth64):
    cfg = load_config(DEMO, tiny(synth64))
    model = build_model(cfg)
    batch = next(build_train_loader(cfg.data, cfg.model.text.resolved_path(), 0, 1))
    assert batch["video"].shape == (2, 8, 3, 32, 64) and batch["depth"].shape == (2, 8, 32, 64)
    grids = []
    model.video.stages[0].register_forward_pre_hook(lambda m, args: grids.append(args[0].grid))
    out = model(batch)
    assert grids == [(4, 8)]  # 32 x 64 pixels in 8 x 8 patches
    assert set(out) == {"vpc", "mtc", "loss"} and all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("video.") and p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_full_lfvila_runs_at_32x192x320_on_the_meta_device():
    cfg = load_config(None, LFVILA + ["data.size=[192, 320]"])
    frames = cfg.data.num_clips * cfg.data.frames_per_clip
    gflops, tokens = measure(cfg.model.video, frames, cfg.data.hw, clips=cfg.data.num_clips)
    assert gflops > 0
    assert tokens == [32 * 24 * 40, 32 * 12 * 20, 32 * 6 * 10, 32 * 6 * 10, 32 * 6 * 10, 32 * 3 * 5, 32 * 3 * 5]
