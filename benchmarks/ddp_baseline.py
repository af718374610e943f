"""Plain PyTorch DistributedDataParallel (gloo) on the training setup of `pretrain/run.py`: the baseline
that `benchmarks/training.py` compares DeepSpeed ZeRO with.

    python -m torch.distributed.run --nproc_per_node 2 --master_port P benchmarks/ddp_baseline.py \
        --config pretrain/configs/demo.yaml --run-dir DIR [dotted.key=value ...]

The same pieces as the DeepSpeed trainer: the model (`VideoTextModel`, seeded the same on every rank),
`build_optimizer` (AdamW, two learning rates), `build_scheduler`, the loader (`build_train_loader`),
the gather-with-grad losses, the non-finite check and gradient clipping at train.grad_clip. Step
time is taken as `pretrain.train` takes it (rank 0, from fetching the batch to after the optimizer
step), and each step is written to DIR/metrics.jsonl with the same keys.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from pretrain import distributed as dist_utils  # noqa: E402
from pretrain.config import REPO_ROOT, load_config, resolve_path  # noqa: E402
from pretrain.model import VideoTextModel  # noqa: E402
from pretrain.train import build_optimizer, build_scheduler, step_generator  # noqa: E402
from shards.loader import build_train_loader  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    config = argv[argv.index("--config") + 1]
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    overrides = [a for a in argv if "=" in a and not a.startswith("--")]
    cfg = load_config(resolve_path(config), overrides)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, as in build_engine
    model = VideoTextModel(cfg.model)
    model.freeze(cfg.model.freeze)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    torch.manual_seed(cfg.train.seed + 1000 * (rank + 1))
    loader = build_train_loader(cfg.data, cfg.model.text.resolved_path(), rank, ws, root=str(REPO_ROOT))
    global_batch = cfg.data.batch_size * ws
    assert cfg.train.grad_accum == 1, "the DDP baseline runs train.grad_accum=1"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "metrics.jsonl", "w")
    ddp.train()
    it = iter(loader)
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        batch = next(it)
        wait = time.perf_counter() - t0
        out = ddp(batch, gather=dist_utils.gather_with_grad, generator=step_generator(cfg.train.seed, step))
        if dist_utils.any_rank(not bool(torch.isfinite(out["loss"]))):
            raise RuntimeError(f"non-finite loss at step {step + 1}")
        out["loss"].backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - t0
        if rank == 0:
            record = {"step": step + 1, **{k: float(v.detach()) for k, v in out.items()},
                      "samples_per_s": global_batch / step_time,
                      "clips_per_s": global_batch * cfg.data.num_clips / step_time,
                      "data_wait_s": wait, "data_wait_frac": wait / step_time}
            log.write(json.dumps(record) + "\n")
            log.flush()
    loader.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
