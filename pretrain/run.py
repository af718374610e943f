"""Pretraining entry point.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 pretrain/run.py --config pretrain/configs/demo.yaml \
        [--ds-config ds_configs/zero2.json] [--run-dir runs/demo] [--resume] [dotted.key=value ...]

Exit codes: 0 done; 3 stopped early (signal or train.exit_interval) after saving, rerun with --resume;
2 a pre-launch check failed: one line on stderr, "config error: ..." (a missing or unreadable config or
base file, a bad key or value, a missing or bad DeepSpeed JSON), "data error: ..." (a missing or
unreadable shard set, checked through data.s3_endpoint; each source of a data.train_shards mixture, named
as data.train_shards[NAME], and listed on stdout with its share of the batches) or "input error: ..." (model.init_from, a run
folder that holds another run without --resume).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from pretrain.config import Config, resolve_path  # noqa: E402
from pretrain.prelaunch import check_inputs, load_checked, prelaunch, prepare_process  # noqa: E402

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


def preflight(args) -> tuple[Config, object]:
    """The config, the DeepSpeed JSON, the shard sets (val only when evaluated at the end), model.init_from
    and the run folder, checked before any process group starts."""
    def inputs(cfg: Config) -> None:
        ds = resolve_path(args.ds_config or cfg.train.ds_config)
        what = "DeepSpeed config (--ds-config)" if args.ds_config else "DeepSpeed config (train.ds_config)"
        shard_sets = ["data.train_shards"] + (["data.val_shards"] if cfg.train.eval_at_end else [])
        check_inputs(cfg, (ds, what), shard_sets)

    return load_checked(args, Config, inputs=inputs)


def main(argv=None) -> int:
    args = parse_args(argv)
    checked, failed = prelaunch(preflight, args)  # one line and exit 2 now, not a stack trace per rank later
    if failed:
        return failed
    cfg, run_dir = checked
    from pretrain import distributed as dist_utils
    from pretrain.trainer import StopSignal

    stop = StopSignal().install()  # from here on a SIGUSR1 / SIGTERM stops the run at the next step boundary
    dist_utils.exit_with_launcher()
    prepare_process()
    import deepspeed

    from pretrain.evaluate import evaluate_matching, evaluate_retrieval
    from pretrain.ops import release_shm_names
    from pretrain.train import prepare_run_dir, train

    # a lost rank or node stops the others within train.dist_timeout_s (torch's default for gloo: 30 min)
    deepspeed.init_distributed(timeout=dist_utils.timeout(cfg.train.dist_timeout_s))
    if dist_utils.rank() == 0:
        prepare_run_dir(cfg, run_dir)
    dist_utils.barrier()
    # every rank has mapped its peers' all-reduce buffers by now. DeepSpeed's CPU accelerator creates them only
    # when every rank is on this node (its launcher's LOCAL_SIZE == WORLD_SIZE); across nodes it must not
    shm = release_shm_names()
    logging.getLogger("pretrain").info("%s; DeepSpeed's shared-memory all-reduce %s", dist_utils.placement(),
                                       "on (all ranks on this node)" if shm else "off")
    engine, finished = train(cfg, run_dir, args.ds_config, args.resume, stop)
    if finished and cfg.train.eval_at_end:
        evaluate_retrieval(engine.module, cfg, run_dir)
        if cfg.model.loss.uses_fusion():
            evaluate_matching(engine.module, cfg, run_dir)
    dist_utils.barrier()
    return 0 if finished else RESUME_ME


if __name__ == "__main__":
    sys.exit(main())
