"""pretrain.checkpoint.load_checkpoint at another world size, for the data stream: a checkpoint written by 2
ranks is read by 1 through the path a resumed run takes (trainstate.pt on disk, the backend's load_resized),
and the data state it returns continues the stream (shards.loader.resized_state).

Data: test_mixture's two synthetic video sets and its image set, with absolute paths (load_checkpoint
resolves relative ones against the repository).
"""

import json

import pytest
import torch
from test_mixture import SOURCES, TOKENIZER, config, root  # noqa: F401  (root: the module's shard sets)

from pretrain.checkpoint import TAG, TrainState, load_checkpoint, rng_state
from shards.loader import build_train_loader, scheduled_source


class ResizingBackend:
    """The backend's side of a world-size change, recorded: load_resized must be called, load must not."""

    def __init__(self):
        self.calls = []

    def load(self, ckpt_dir, tag):
        self.calls.append(("load", tag))

    def load_resized(self, ckpt_dir, tag):
        self.calls.append(("load_resized", tag))


def write_checkpoint(ckpt_dir, step: int, data_states: list[dict]) -> None:
    """What save_checkpoint leaves for `backend.save`'s files aside: trainstate.pt of len(data_states) ranks."""
    tag = f"{TAG}{step}"
    (ckpt_dir / tag).mkdir(parents=True)
    ranks = [{"rng": rng_state(), "data": json.loads(json.dumps(d))} for d in data_states]
    state = TrainState(step=step, samples_seen=0, world_size=len(ranks), ranks=ranks)
    torch.save(state.state_dict(), ckpt_dir / tag / "trainstate.pt")
    (ckpt_dir / "latest").write_text(tag)


@pytest.mark.parametrize("mixture", [True, False])
def test_a_world_size_change_keeps_the_schedule_and_the_counts(root, tmp_path, mixture):  # noqa: F811
    """Two ranks hand out `steps` batches each, save; one rank loads: every worker of every source starts the
    epoch after the furthest any old worker reached, a mixture's schedule continues at batch `steps` (the
    next batch is the source scheduled_source draws for it), and the samples seen per source are both old
    ranks' together."""
    sources = [dict(s, path=str(root / s["path"])) for s in SOURCES]
    cfg = config(train_shards=sources if mixture else sources[0]["path"])
    steps = 6
    old = [build_train_loader(cfg, TOKENIZER, rank, 2) for rank in (0, 1)]
    for loader in old:
        for _ in range(steps):
            next(loader)
    saved = [loader.state_dict() for loader in old]
    seen = {name: sum(loader.samples_by_source()[name] for loader in old) for name in old[0].samples_by_source()}
    furthest = max(int(e) for s in saved for e, _ in s["epoch_pos"].values())
    ckpt_dir = tmp_path / "checkpoints"
    write_checkpoint(ckpt_dir, steps, saved)

    backend = ResizingBackend()
    state, data = load_checkpoint(backend, ckpt_dir, cfg, seed=0)
    assert backend.calls == [("load_resized", f"{TAG}{steps}")] and state.step == steps
    assert {tuple(p) for p in data["epoch_pos"].values()} == {(furthest + 1, 0)}
    resumed = build_train_loader(cfg, TOKENIZER, 0, 1, state=json.loads(json.dumps(data)))
    assert resumed.samples_by_source() == seen and sum(seen.values()) == 2 * steps * cfg.batch_size
    batch = next(resumed)
    if mixture:
        assert data["position"] == steps and len(seen) == 3
        weights = [s.weight for s in cfg.sources]
        assert batch["source"] == cfg.sources[scheduled_source(cfg.seed, steps, weights)].name
        assert resumed.state_dict()["position"] == steps + 1
    else:
        assert batch["source"] == "train" and list(seen) == ["train"]


@pytest.mark.parametrize("saved_as_mixture", [True, False])
def test_a_world_size_change_across_mixture_and_one_set_is_refused(root, tmp_path, saved_as_mixture):  # noqa: F811
    """Saved by 2 ranks from a mixture and resumed on 1 rank as one set (or the other way): a clear error, as at
    the same world size, not a stream that silently restarts."""
    sources = [dict(s, path=str(root / s["path"])) for s in SOURCES]
    mixed, single = config(train_shards=sources), config(train_shards=sources[0]["path"])
    saving, loading = (mixed, single) if saved_as_mixture else (single, mixed)
    saved = [build_train_loader(saving, TOKENIZER, rank, 2).state_dict() for rank in (0, 1)]
    write_checkpoint(tmp_path / "checkpoints", 3, saved)
    with pytest.raises(ValueError, match="resuming across that change is not supported"):
        load_checkpoint(ResizingBackend(), tmp_path / "checkpoints", loading, seed=0)
