"""Finetuning entry point: paragraph-to-video retrieval, multiple-choice and open QA, captioning, and
zero-shot retrieval of a pretrained checkpoint.

    python finetune/run.py --task retrieval --config finetune/configs/anet_retrieval_debug.yaml \
        [--init runs/demo/checkpoints | model.pt] [--run-dir runs/ft] [--resume] [dotted.key=value ...]
    DS_ACCELERATOR=cpu accelerate launch --num_processes 2 --use_deepspeed \
        --deepspeed_config_file ds_configs/zero2.json finetune/run.py --task ... --config ...

Exit codes (launchers/slurm/finetune.sbatch relies on them): 0 done; 3 stopped early (SIGUSR1,
SIGTERM or train.exit_interval) after saving a checkpoint, rerun with --resume; 2 a pre-launch check
failed, before any process group starts: one line on stderr, "config error: ..." (config or base file,
a bad key or value, DeepSpeed JSON), "data error: ..." (shard sets, through data.s3_endpoint; label
files) or "input error: ..." (--init / model.init_from; a run folder that holds another run without
--resume). `--resume` without a checkpoint starts from step 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from finetune.config import FinetuneConfig  # noqa: E402
from finetune.train import deepspeed_json, run  # noqa: E402
from pretrain import distributed as dist_utils  # noqa: E402
from pretrain.config import resolve_path  # noqa: E402
from pretrain.prelaunch import check_inputs, load_checked, prelaunch, prepare_process  # noqa: E402
from pretrain.trainer import StopSignal  # noqa: E402

RESUME_ME = 3
TASK_NAMES = ("retrieval", "qa_mc", "qa_open", "caption", "zeroshot")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Finetune or evaluate a pretrained long-form video-language model.")
    p.add_argument("--task", choices=TASK_NAMES, default=None, help="default: task.name of the config")
    p.add_argument("--config", required=True, help="recipe YAML (finetune/configs/)")
    p.add_argument("--init", default=None, help="pretrained weights: a checkpoint folder, a run folder or an "
                   "exported .pt (model.init_from)")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--ds-config", default=None, help="train under DeepSpeed with this JSON (accelerate launch "
                   "--use_deepspeed --deepspeed_config_file does the same)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by some launchers
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")
    return p.parse_intermixed_args(argv)  # options may come after the overrides


def preflight(args) -> tuple[FinetuneConfig, Path]:
    """The config (with --task and --init), the DeepSpeed JSON if any, the shard sets and label files the task
    reads, the weights to start from and the run folder, checked before any process starts."""
    extra = ([("task.name", args.task)] if args.task else []) + ([("model.init_from", resolve_path(args.init))]
                                                                 if args.init else [])

    def inputs(cfg: FinetuneConfig) -> None:
        ds = deepspeed_json(cfg, args.ds_config)
        if ds is not None:
            ds = (resolve_path(ds[0]), ds[1])
        train = cfg.task.name != "zeroshot"
        check_inputs(cfg, ds, ["data.train_shards"] * train + ["data.val_shards"],
                     ["task.val_labels"] + ["task.train_labels"] * train, "--init" if args.init else "model.init_from")

    return load_checked(args, FinetuneConfig, extra, inputs, same_world_size=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    checked, failed = prelaunch(preflight, args)  # stops the run before any process group starts
    if failed:
        return failed
    cfg, run_dir = checked
    prepare_process()
    # started here so that a lost rank or node stops the others within train.dist_timeout_s: accelerate
    # reuses a started group, and would otherwise start one with torch's 30 min
    dist_utils.start_process_group(cfg.train.dist_timeout_s)
    with StopSignal() as stop:  # caught from here on (main may run inside a longer process: handlers restored)
        finished = run(cfg, run_dir, args.resume, args.ds_config, Path(args.config).name, stop)
    return 0 if finished else RESUME_ME


if __name__ == "__main__":
    sys.exit(main())
