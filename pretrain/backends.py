"""What a training backend differs in, behind one small interface the loop (`pretrain/trainer.py`) uses:

    module                      the model being trained (its parameters feed the zero-gradient stand-in loss)
    micro_batch(last)           a context around one micro-batch's forward and backward
    backward(loss, last)        accumulate; on the last micro-batch, clip and step the optimizer and LR
    skip()                      drop a step whose only micro-batch had a non-finite loss
    lr(), grad_norm(), train()
    save(ckpt_dir, tag)         collective: write the backend's (sharded) files into ckpt_dir/tag
    load(ckpt_dir, tag)         collective: read them back at the same world size
    load_resized(ckpt_dir, tag) the same, written at another world size (only DeepSpeed can)

- `DeepSpeedBackend`: a DeepSpeed engine (pretraining; ZeRO 1-3, CPU offload, universal checkpoints).
- `AccelerateBackend`: an `accelerate` Accelerator, plain DDP or DeepSpeed through accelerate's plugin
  (finetuning).
- `TorchBackend`: plain PyTorch, optionally wrapped in DistributedDataParallel (the benchmarks' baselines).
"""
from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

from pretrain import distributed as dist_utils
from pretrain.config import Config, ConfigError, resolve_path

log = logging.getLogger("train")


# ---- DeepSpeed's JSON from the run config ----------------------------------------------------------


def build_ds_config(cfg: Config, world_size: int, path: str | None = None) -> dict:
    """The DeepSpeed JSON with batch sizes, clipping and precision filled in from the run config (and checked)."""
    path = resolve_path(path or cfg.train.ds_config)
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the DeepSpeed config {path}: {e}") from e
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove '{key}'; the optimizer and LR schedule come from train.* in the run config")
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world_size, "gradient_clipping": cfg.train.grad_clip}
    for key, value in want.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{path}: {key}={ds[key]} disagrees with the run config, which gives {value} "
                              "(data.batch_size x train.grad_accum x world size, train.grad_clip); "
                              "remove it from the JSON or make them agree")
        ds[key] = value
    for key in ("fp16", "amp"):  # DeepSpeed's fp16 with loss scaling, and its apex AMP (fp16 too)
        section = ds.get(key) or {}
        if not isinstance(section, dict) or section.get("enabled", False) is not False:
            raise ConfigError(f"{path}: {key} is not supported; use bf16 (GPU) or fp32 (train.precision) and remove "
                              f"'{key}' from the JSON")
    bf16 = resolve_precision(cfg.train.precision) == "bf16"
    if "enabled" in ds.get("bf16", {}) and ds["bf16"]["enabled"] != bf16:
        raise ConfigError(f"{path}: bf16.enabled={ds['bf16']['enabled']} disagrees with train.precision="
                          f"{cfg.train.precision}; remove it from the JSON (it is filled in from train.precision)")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    return ds


def resolve_precision(precision: str) -> str:
    """`auto`: bf16 on a GPU that supports it, and on a CPU with bf16 matrix instructions (AMX or AVX512-BF16,
    where the demo's ZeRO-2 step measured 1.37x the samples/s of fp32 and R@1 as good: README, Benchmarks);
    else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    """The CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16), as torch's CPU dispatch sees it."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private but stable since torch 2.1
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")


# ---- backends -------------------------------------------------------------------------------------------


class DeepSpeedBackend:
    """A DeepSpeed engine: it keeps its own accumulation boundary, clipping, LR schedule and sharded files."""

    def __init__(self, engine, scheduler):
        self.engine, self.scheduler = engine, scheduler
        self.module = engine.module

    def micro_batch(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed counts every micro-step and steps the optimizer at the boundary

    def skip(self) -> None:
        pass  # no backward ran, so there is nothing to drop

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def grad_norm(self):
        return self.engine.get_global_grad_norm()

    def train(self) -> None:
        self.engine.train()

    def save(self, ckpt_dir: Path, tag: str) -> None:
        # universal_checkpoint_info lets deepspeed.checkpoint.ds_to_universal convert it for another world size
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"universal_checkpoint_info": {}},
                                    save_latest=False)

    def load(self, ckpt_dir: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")

    def load_resized(self, ckpt_dir: Path, tag: str) -> None:
        """Through the universal form (the engine must have been built with `checkpoint.load_universal`)."""
        root = to_universal(ckpt_dir, tag)
        path, _ = self.engine.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {root}/{tag}")


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Collective. Rank 0 converts checkpoint `tag` with DeepSpeed's ds_to_universal, once (the converter
    writes `universal/latest_universal` last); returns the folder DeepSpeed loads from with
    `checkpoint.load_universal`."""
    root = Path(ckpt_dir) / "universal"
    done = root / "latest_universal"
    if dist_utils.rank() == 0 and not (done.is_file() and done.read_text().strip() == tag):
        log.info("converting %s/%s to a universal checkpoint for a new world size", ckpt_dir, tag)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(ckpt_dir) / tag),
               "--output_folder", str(root / tag), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {ckpt_dir}/{tag}:\n{proc.stderr[-3000:]}")
    dist_utils.barrier()
    return root


class AccelerateBackend:
    """An Accelerator with its prepared model, optimizer and LR schedule (plain DDP, or DeepSpeed through
    accelerate's plugin, which then clips and keeps the accumulation boundary itself)."""

    def __init__(self, accelerator, model, optimizer, scheduler, grad_clip: float, uses_ds: bool):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.grad_clip, self.uses_ds = grad_clip, uses_ds
        self.module = model
        self._norm = None

    def micro_batch(self, last: bool):
        return self.accelerator.accumulate(self.model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and not self.uses_ds and self.grad_clip > 0:
            self._norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()  # a no-op until accelerate's accumulation boundary
        self.optimizer.zero_grad()
        if last:
            self.scheduler.step()  # once per optimizer step

    def skip(self) -> None:
        self.optimizer.zero_grad()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def grad_norm(self):
        return self.model.get_global_grad_norm() if self.uses_ds else self._norm

    def train(self) -> None:
        self.model.train()

    def save(self, ckpt_dir: Path, tag: str) -> None:
        self.accelerator.save_state(str(ckpt_dir / tag), safe_serialization=False)

    def load(self, ckpt_dir: Path, tag: str) -> None:
        self.accelerator.load_state(str(ckpt_dir / tag))  # model, optimizer, LR schedule, RNG states

    def load_resized(self, ckpt_dir: Path, tag: str) -> None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} was written at another world size than this run's "
                           f"{dist_utils.world_size()} ranks: finetuning resumes at the same world size")


class TorchBackend:
    """Plain PyTorch: `model` (or its DistributedDataParallel wrapper `wrapped`), an optimizer and an LR schedule;
    clipping at grad_clip over the trainable parameters. Checkpoints: rank 0 writes model, optimizer and
    schedule to one file (the parameters are the same on every rank)."""

    def __init__(self, model, optimizer, scheduler, grad_clip: float, wrapped=None):
        self.module, self.wrapped = model, wrapped or model
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._norm = None

    def micro_batch(self, last: bool):
        no_sync = getattr(self.wrapped, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()
        if last:
            if self.grad_clip > 0:
                self._norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def grad_norm(self):
        return self._norm

    def train(self) -> None:
        self.wrapped.train()

    def save(self, ckpt_dir: Path, tag: str) -> None:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        if dist_utils.rank() == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, ckpt_dir / tag / "model_optim.pt")

    def load(self, ckpt_dir: Path, tag: str) -> None:
        state = torch.load(ckpt_dir / tag / "model_optim.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    load_resized = load  # the same file serves any world size
