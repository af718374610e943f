"""Plain PyTorch DistributedDataParallel (gloo) on the training setup of `pretrain/run.py`: the baseline
that `benchmarks/training.py` compares DeepSpeed ZeRO with.

    python -m torch.distributed.run --nproc_per_node 2 --master_port P benchmarks/ddp_baseline.py \
        --config pretrain/configs/demo.yaml --run-dir DIR [dotted.key=value ...]

The same pieces as the DeepSpeed trainer: the model (`VideoTextModel`, seeded the same on every rank),
`build_optimizer` (AdamW, two learning rates), the LR schedule and the training core's loop
(`pretrain.trainer.fit`: loader, gather-with-grad losses, non-finite guard, clipping at train.grad_clip,
step timing, metrics.jsonl with the same keys, checkpoints), through its plain-PyTorch backend.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from pretrain import distributed as dist_utils  # noqa: E402
from pretrain.backends import TorchBackend  # noqa: E402
from pretrain.config import load_config, resolve_path  # noqa: E402
from pretrain.model import VideoTextModel  # noqa: E402
from pretrain.train import build_optimizer  # noqa: E402
from pretrain.trainer import build_scheduler, fit, step_generator  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    config = argv[argv.index("--config") + 1]
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    overrides = [a for a in argv if "=" in a and not a.startswith("--")]
    cfg = load_config(resolve_path(config), overrides)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group("gloo")
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, as in pretrain.train
    model = VideoTextModel(cfg.model)
    model.freeze(cfg.model.freeze)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = build_optimizer(model, cfg)
    backend = TorchBackend(model, optimizer, build_scheduler(optimizer, cfg.train), cfg.train.grad_clip, wrapped=ddp)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    def forward(batch, step, micro):
        return ddp(batch, gather=dist_utils.gather_with_grad, generator=step_generator(cfg.train.seed, step))

    fit(backend, forward, cfg, run_dir, resume=False, desc="ddp baseline")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
