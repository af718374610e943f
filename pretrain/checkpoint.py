"""Sharded DeepSpeed checkpoints that hold the whole training state.

Layout of `RUN/checkpoints/`:
    global_step{N}/          DeepSpeed's files (model, optimizer and LR-scheduler shards) + trainstate.json
    latest                   the tag of the newest complete checkpoint

`latest` is written by rank 0 only after every rank has finished writing (a barrier), through a
temporary file and a rename, so a crash during a save leaves the previous checkpoint in force.
Besides what DeepSpeed keeps, the client state holds the step, the samples seen, and per rank the
RNG states and the data-loader position; `universal_checkpoint_info` is always present so that
`deepspeed.checkpoint.ds_to_universal` can convert the checkpoint for another world size.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pretrain import distributed as dist_utils

log = logging.getLogger("pretrain")
LATEST = "latest"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


class CheckpointError(RuntimeError):
    pass


def save(engine, ckpt_dir: str | Path, step: int, run_state: dict, rank_state: dict, keep_last: int,
         keep_every: int = 0) -> str:
    """Collective: every rank calls it. Returns the tag. If any rank fails to write (a full disk), the
    partial folder is removed, `latest` keeps pointing at the previous checkpoint, and every rank raises."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"global_step{step}"
    ranks = dist_utils.all_gather_objects(rank_state)
    client = {"run": run_state, "ranks": ranks, "world_size": dist_utils.world_size(),
              "universal_checkpoint_info": {}}
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
        if dist_utils.rank() == 0:
            info = {"tag": tag, "step": step, "world_size": dist_utils.world_size(), "time": time.time(),
                    "run": run_state, "data": [r.get("data") for r in ranks],
                    "files": sorted(os.listdir(ckpt_dir / tag))}
            (ckpt_dir / tag / "trainstate.json").write_text(json.dumps(info, indent=1, default=str))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        error = e
    if dist_utils.any_rank(error is not None):  # every rank's shards are on disk, or the save is void
        if dist_utils.rank() == 0:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        dist_utils.barrier()
        raise CheckpointError(f"saving checkpoint {ckpt_dir / tag} failed ({error or 'on another rank'}); "
                              f"the previous checkpoint {latest_tag(ckpt_dir)} is intact")
    if dist_utils.rank() == 0:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        _prune(ckpt_dir, keep_last, keep_every)
    dist_utils.barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, keep_every: int) -> None:
    """Delete all but the newest `keep_last` checkpoint folders and those at multiples of `keep_every`;
    the one `latest` names is never deleted (a folder newer than it is a save a crash left unfinished)."""
    latest = latest_tag(ckpt_dir)
    steps = sorted(int(p.name[len("global_step"):]) for p in ckpt_dir.glob("global_step*")
                   if p.is_dir() and p.name[len("global_step"):].isdigit())
    for step in steps[:-keep_last]:
        if f"global_step{step}" != latest and not (keep_every and step % keep_every == 0):
            shutil.rmtree(ckpt_dir / f"global_step{step}", ignore_errors=True)


def saved_world_size(ckpt_dir: str | Path) -> int | None:
    """The world size that wrote the latest checkpoint, or None if there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    return json.loads((Path(ckpt_dir) / tag / "trainstate.json").read_text())["world_size"]


def to_universal(ckpt_dir: str | Path) -> Path:
    """Collective. Rank 0 converts the latest checkpoint with DeepSpeed's ds_to_universal, once (the
    converter writes `universal/latest_universal` last); returns the folder DeepSpeed loads from with
    `checkpoint.load_universal`."""
    ckpt_dir = Path(ckpt_dir)
    tag, root = latest_tag(ckpt_dir), ckpt_dir / "universal"
    done = root / "latest_universal"
    if dist_utils.rank() == 0 and not (done.is_file() and done.read_text().strip() == tag):
        log.info("converting %s/%s to a universal checkpoint for a new world size", ckpt_dir, tag)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
               "--output_folder", str(root / tag), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"ds_to_universal failed on {ckpt_dir / tag}:\n{proc.stderr[-3000:]}")
    dist_utils.barrier()
    return root


def load_elastic(engine, ckpt_dir: str | Path) -> tuple[dict, list[dict]]:
    """Load the latest checkpoint, written at another world size, through its universal form (the
    engine must have been built with `checkpoint.load_universal`). Returns (run state, the saved
    per-rank states of the old world), whose RNG and data positions do not map onto the new ranks."""
    tag = latest_tag(ckpt_dir)
    root = to_universal(ckpt_dir)
    path, client = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise CheckpointError(f"could not load the universal checkpoint {root}/{tag}")
    log.info("loaded checkpoint %s/%s written by %d ranks into %d ranks (step %s)", ckpt_dir, tag,
             client["world_size"], dist_utils.world_size(), client["run"].get("step"))
    return client["run"], client["ranks"]


def load(engine, ckpt_dir: str | Path) -> tuple[dict, dict] | None:
    """Load the latest complete checkpoint into `engine`; returns (run_state, this rank's state) or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir}/{tag}")
    saved_ws, ws = client["world_size"], dist_utils.world_size()
    if saved_ws != ws:
        raise RuntimeError(f"checkpoint {tag} was written by {saved_ws} ranks, this run has {ws}; "
                           "convert it with deepspeed.checkpoint.ds_to_universal to change the world size")
    mine = client["ranks"][dist_utils.rank()]
    log.info("loaded checkpoint %s/%s (step %s, data position %s)", ckpt_dir, tag,
             client["run"].get("step"), mine.get("data"))
    return client["run"], mine


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Initial weights (`model.init_from`): a checkpoint folder written by this trainer (its `latest`
    tag, consolidated with DeepSpeed's zero_to_fp32) or a .pt file with a state dict. Parameters the
    file lacks (e.g. a new fusion stack) keep their initialisation; parameters the model lacks are an
    error."""
    path = Path(path)
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("module", state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"{path} holds weights this model does not have: {unexpected[:10]}")
    log.info("initialised from %s (%d tensors; %d left as initialised: %s)", path, len(state), len(missing),
             sorted({k.split(".")[0] for k in missing}))
