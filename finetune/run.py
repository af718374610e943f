"""Finetuning entry point: paragraph-to-video retrieval, multiple-choice and open-ended video QA,
captioning, and zero-shot retrieval of a pretrained checkpoint.

    python finetune/run.py --task retrieval --config finetune/configs/anet_retrieval_debug.yaml \
        [--init runs/demo/checkpoints | model.pt] [--run-dir runs/ft] [--resume] [dotted.key=value ...]
    DS_ACCELERATOR=cpu accelerate launch --num_processes 2 --use_deepspeed \
        --deepspeed_config_file ds_configs/zero2.json finetune/run.py --task ... --config ...

Exit codes (launchers/slurm/finetune.sbatch relies on them): 0 done; 3 stopped early (SIGUSR1,
SIGTERM or train.exit_interval) after saving a checkpoint, rerun with --resume; 2 bad config or data.
`--resume` without a checkpoint starts from step 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from pretrain.config import ConfigError, REPO_ROOT, resolve_path  # noqa: E402

RESUME_ME = 3
TASK_NAMES = ("retrieval", "qa_mc", "qa_open", "caption", "zeroshot")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Finetune or evaluate a pretrained long-form video-language model.")
    p.add_argument("--task", choices=TASK_NAMES, default=None, help="default: task.name of the config")
    p.add_argument("--config", required=True, help="recipe YAML (finetune/configs/)")
    p.add_argument("--init", default=None, help="pretrained weights: a checkpoint folder or an exported .pt (model.init_from)")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--ds-config", default=None, help="train under DeepSpeed with this JSON (accelerate launch "
                   "--use_deepspeed --deepspeed_config_file does the same)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by some launchers
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")
    return p.parse_intermixed_args(argv)  # options may come after the overrides


def check_data(cfg) -> None:
    from shards.format import resolve_shards

    specs = [cfg.data.val_shards] + ([cfg.data.train_shards] if cfg.task.name != "zeroshot" else [])
    for spec in specs:
        for shard in resolve_shards(spec, str(REPO_ROOT), cfg.data.storage):
            if "://" not in shard and not os.access(shard, os.R_OK):
                raise OSError(f"shard {shard} is missing or unreadable")
    for path in (cfg.task.train_labels, cfg.task.val_labels, cfg.model.init_from):
        if path and not os.path.exists(resolve_path(path)):
            raise OSError(f"{path} does not exist")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from finetune.config import load_finetune_config

    try:  # a bad config stops the run before any process group starts
        cfg = load_finetune_config(resolve_path(args.config), args.overrides, args.task,
                                   resolve_path(args.init) if args.init else None)
        check_data(cfg)
    except (ConfigError, ValueError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(resolve_path(args.run_dir or f"runs/{Path(args.config).stem}"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    from finetune.train import run
    from pretrain.ops import clean_node
    from pretrain.train import check_run_dir

    check_run_dir(run_dir, args.resume)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one remover per node; the others only wait on locks
        clean_node()
    finished = run(cfg, run_dir, args.resume, args.ds_config, Path(args.config).name)
    return 0 if finished else RESUME_ME


if __name__ == "__main__":
    sys.exit(main())
