"""Pretraining entry point.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 pretrain/run.py --config pretrain/configs/demo.yaml \
        [--ds-config ds_configs/zero2.json] [--run-dir runs/demo] [--resume] [dotted.key=value ...]

Exit codes: 0 done; 3 stopped early (signal or train.exit_interval) after saving, rerun with --resume;
2 a pre-launch check failed: one line on stderr, "config error: ..." (a missing or unreadable config or
base file, a bad key or value, a missing or bad DeepSpeed JSON), "data error: ..." (a missing or
unreadable shard set, checked through data.s3_endpoint) or "input error: ..." (model.init_from, a run
folder that holds another run without --resume).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from pretrain.config import REPO_ROOT, Config, ConfigError, load_config, resolve_path  # noqa: E402
from pretrain.weights import WeightsError, check_source  # noqa: E402
from shards.preflight import MissingInput, require_file, require_shards  # noqa: E402

RESUME_ME = 3  # exit code: stopped early (signal or train.exit_interval) after saving; rerun with --resume
BAD_INPUT = 2  # exit code: a pre-launch check failed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain a long-form video-language model with DeepSpeed.")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: train.ds_config)")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")
    return p.parse_args(argv)


@contextlib.contextmanager
def reported_as(kind: str):
    """A MissingInput raised inside is reported as "KIND: ..." ("config error", "data error")."""
    try:
        yield
    except MissingInput as e:
        e.kind = kind
        raise


def check_inputs(cfg: Config, ds_config: str | None) -> None:
    """Every input the run reads exists and is readable, through the configured storage (data.s3_endpoint)."""
    from pretrain.backends import build_ds_config

    ds_path = resolve_path(ds_config or cfg.train.ds_config)
    with reported_as("config error"):
        require_file(ds_path, "DeepSpeed config (--ds-config)" if ds_config else "DeepSpeed config (train.ds_config)")
    build_ds_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), ds_path)  # parses and checks it (ConfigError)
    storage, root = cfg.data.storage, str(REPO_ROOT)
    with reported_as("data error"):
        require_shards(cfg.data.train_shards, root, storage, what="data.train_shards")
        if cfg.train.eval_at_end:
            require_shards(cfg.data.val_shards, root, storage, what="data.val_shards")
    if cfg.model.init_from:
        try:
            check_source(resolve_path(cfg.model.init_from))
        except WeightsError as e:
            raise MissingInput(f"model.init_from: {e}") from None


def preflight(args) -> tuple[Config, Path]:
    """Load and check the config and every input before any process group starts. Raises ConfigError,
    MissingInput or SystemExit (a run folder that holds another run's checkpoints)."""
    config = resolve_path(args.config)
    with reported_as("config error"):
        require_file(config, "config file")
    cfg = load_config(config, args.overrides)
    check_inputs(cfg, args.ds_config)
    run_dir = Path(resolve_path(args.run_dir or f"runs/{Path(args.config).stem}"))
    from pretrain.trainer import check_run_dir

    check_run_dir(run_dir, args.resume)
    return cfg, run_dir


def prelaunch(check, args):
    """check(args) -> (its result, None); or, when a pre-launch check fails, one line on stderr naming the
    key or the input and (None, 2). Used by every entry point (finetune/run.py too)."""
    try:
        return check(args), None
    except (ConfigError, MissingInput, OSError) as e:
        text, kind = str(e), getattr(e, "kind", "config error" if isinstance(e, ConfigError) else "input error")
    except SystemExit as e:  # check_run_dir: this run folder holds another run
        if e.code is None or isinstance(e.code, int):
            raise
        text, kind = str(e.code), "input error"
    print(f"{kind}: {' '.join(text.split())}", file=sys.stderr)
    return None, BAD_INPUT


def main(argv=None) -> int:
    args = parse_args(argv)
    checked, failed = prelaunch(preflight, args)  # one line and exit 2 now, not a stack trace per rank later
    if failed:
        return failed
    cfg, run_dir = checked
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    import deepspeed

    from pretrain import distributed as dist_utils
    from pretrain.evaluate import evaluate_matching, evaluate_retrieval
    from pretrain.ops import clean_node, release_shm_names
    from pretrain.train import prepare_run_dir, train

    dist_utils.exit_with_launcher()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one remover per node; the others only wait on locks
        clean_node()
    deepspeed.init_distributed()
    if dist_utils.rank() == 0:
        prepare_run_dir(cfg, run_dir)
    dist_utils.barrier()
    release_shm_names()  # every rank has mapped its peers' all-reduce buffers by now
    engine, finished = train(cfg, run_dir, args.ds_config, args.resume)
    if finished and cfg.train.eval_at_end:
        evaluate_retrieval(engine.module, cfg, run_dir)
        if cfg.model.loss.uses_fusion():
            evaluate_matching(engine.module, cfg, run_dir)
    dist_utils.barrier()
    return 0 if finished else RESUME_ME


if __name__ == "__main__":
    sys.exit(main())
