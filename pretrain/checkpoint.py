"""Checkpoints that hold the whole training state, for every backend.

Layout of `RUN/checkpoints/`:
    global_step{N}/   the backend's files (DeepSpeed's sharded model, optimizer and LR-schedule states;
                      accelerate's save_state; plain PyTorch's one file) + trainstate.pt (the whole
                      TrainState: step, samples seen, non-finite count, every rank's data position and
                      RNG states) + trainstate.json (the same without the RNG states, for people and tools)
    latest            the tag of the newest complete checkpoint

`latest` is written by rank 0 only after every rank has finished writing, through a temporary file and a
rename, so a crash or a full disk during a save leaves the previous checkpoint in force.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pretrain import distributed as dist_utils
from pretrain.config import REPO_ROOT
from shards.loader import resized_state

log = logging.getLogger("train")
LATEST = "latest"
TAG = "global_step"  # DeepSpeed's folder name; every backend uses it


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@dataclass
class TrainState:
    """What a resumed run needs beyond the backend's weights and optimizer: counters and, per rank,
    the data position and RNG states (gathered when saved; `ranks[i]` is rank i's)."""
    step: int = 0
    samples_seen: int = 0
    nonfinite_steps: int = 0  # micro-batches dropped for a non-finite loss (= skipped steps when grad_accum is 1)
    world_size: int = 1
    ranks: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])

    def counters(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "nonfinite_steps": self.nonfinite_steps}


# ---- saving and loading ---------------------------------------------------------------------------------------


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def saved_world_size(ckpt_dir: str | Path) -> int | None:
    """The world size that wrote the latest checkpoint, or None if there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    return json.loads((Path(ckpt_dir) / tag / "trainstate.json").read_text())["world_size"]


def save_checkpoint(backend, ckpt_dir: Path, state: TrainState, rank_state: dict, keep_last: int,
                    keep_every: int = 0) -> str:
    """Collective: every rank calls it. Returns the tag. If any rank fails to write (a full disk), the
    partial folder is removed, `latest` keeps pointing at the previous checkpoint, and every rank raises."""
    tag = f"{TAG}{state.step}"
    state.ranks, state.world_size = dist_utils.all_gather_objects(rank_state), dist_utils.world_size()
    error = None
    try:
        backend.save(ckpt_dir, tag)
        if dist_utils.rank() == 0:
            torch.save(state.state_dict(), ckpt_dir / tag / "trainstate.pt")
            info = {"tag": tag, **state.counters(), "world_size": state.world_size, "time": time.time(),
                    "data": [r["data"] for r in state.ranks], "files": sorted(os.listdir(ckpt_dir / tag))}
            (ckpt_dir / tag / "trainstate.json").write_text(json.dumps(info, indent=1, default=str))
    except Exception as e:  # noqa: BLE001  (a full disk: OSError, or RuntimeError from torch.save); any
        # failure must reach the collective below, or the other ranks would wait in it forever
        error = e
    if dist_utils.any_rank(error is not None):  # every rank's shards are on disk, or the save is void
        if dist_utils.rank() == 0:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        dist_utils.barrier()
        previous = latest_tag(ckpt_dir)
        raise CheckpointError(f"saving checkpoint {ckpt_dir / tag} failed ({error or 'on another rank'}; "
                              f"{shutil.disk_usage(ckpt_dir).free / 2**30:.1f} GiB free there now); "
                              + (f"the previous checkpoint {previous} is intact" if previous else
                                 "there is no earlier checkpoint"))
    if dist_utils.rank() == 0:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        prune(ckpt_dir, keep_last, keep_every)
    dist_utils.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int, keep_every: int) -> None:
    """Delete all but the newest `keep_last` checkpoint folders and those at multiples of `keep_every`;
    the one `latest` names is never deleted (a folder newer than it is a save a crash left unfinished)."""
    latest = latest_tag(ckpt_dir)
    steps = sorted(int(p.name[len(TAG):]) for p in ckpt_dir.glob(f"{TAG}*")
                   if p.is_dir() and p.name[len(TAG):].isdigit())
    for step in steps[:-keep_last]:
        if f"{TAG}{step}" != latest and not (keep_every and step % keep_every == 0):
            shutil.rmtree(ckpt_dir / f"{TAG}{step}", ignore_errors=True)


def load_checkpoint(backend, ckpt_dir: Path, data_cfg, seed: int) -> tuple[TrainState, dict] | None:
    """Load the latest complete checkpoint into the backend -> (train state, this rank's data position),
    or None when there is none. Written at another world size, it goes through the backend's
    `load_resized` (DeepSpeed's universal checkpoint), and the data stream restarts at the epoch after the
    furthest any old worker reached (positions of old workers do not map onto new ones: nothing is seen
    twice; the unseen rest of the interrupted epoch is skipped, and logged): `shards.loader.resized_state`,
    which also continues a mixture's schedule at its saved batch and carries the samples seen per source over."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    state = TrainState()
    state.load_state_dict(torch.load(ckpt_dir / tag / "trainstate.pt", weights_only=False))
    rank, ws = dist_utils.rank(), dist_utils.world_size()
    if state.world_size == ws:
        backend.load(ckpt_dir, tag)
        mine = state.ranks[rank]
        set_rng_state(mine["rng"])
        log.info("loaded checkpoint %s/%s (step %d, data position %s)", ckpt_dir, tag, state.step, mine["data"])
        return state, mine["data"]
    backend.load_resized(ckpt_dir, tag)
    torch.manual_seed(rank_seed(seed, rank) + state.step)
    data = resized_state(data_cfg, rank, ws, [r["data"] for r in state.ranks], root=str(REPO_ROOT))
    if rank == 0:
        epoch = next(iter(data["epoch_pos"].values()))[0]  # the same for every worker of every source
        log.warning("loaded checkpoint %s/%s written by %d ranks into %d (step %d); the data stream restarts at "
                    "epoch %d%s", ckpt_dir, tag, state.world_size, ws, state.step, epoch,
                    f", the mixture's schedule at batch {data['position']}" if "mixture" in data else "")
    return state, data


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's stream for dropout and masks (the initial weights use `seed` itself, the same on every rank)."""
    return seed + 1000 * (rank + 1)


