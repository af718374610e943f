"""Pretraining entry point.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 pretrain/run.py --config pretrain/configs/demo.yaml \
        [--ds-config ds_configs/zero2.json] [--run-dir runs/demo] [--resume] [dotted.key=value ...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from pretrain.config import ConfigError, load_config, resolve_path  # noqa: E402

RESUME_ME = 3  # exit code: stopped early (signal or train.exit_interval) after saving; rerun with --resume


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain a long-form video-language model with DeepSpeed.")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: train.ds_config)")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")
    return p.parse_args(argv)


def check_data(cfg) -> None:
    from pretrain.config import REPO_ROOT
    from shards.loader import resolve_shards

    specs = [cfg.data.train_shards] + ([cfg.data.val_shards] if cfg.train.eval_at_end else [])
    for spec in specs:
        for shard in resolve_shards(spec, str(REPO_ROOT)):
            if "://" not in shard and not os.access(shard, os.R_OK):
                raise OSError(f"shard {shard} is missing or unreadable")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # reject a bad config before any process group starts
        cfg = load_config(resolve_path(args.config), args.overrides)
    except (ConfigError, ValueError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(resolve_path(args.run_dir or f"runs/{Path(args.config).stem}"))
    try:  # missing or unreadable shards: a clear error now, not a stack trace per rank later
        check_data(cfg)
    except (OSError, ValueError) as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2

    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    import deepspeed

    from pretrain import distributed as dist_utils
    from pretrain.evaluate import evaluate_matching, evaluate_retrieval
    from pretrain.ops import clean_node, release_shm_names
    from pretrain.train import check_run_dir, prepare_run_dir, train

    check_run_dir(run_dir, args.resume)
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
