"""Wiring and the training loop: build_* functions, then train_step, train.

Called by `pretrain/run.py` inside a `deepspeed` launch; one process per rank.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pretrain import checkpoint, distributed as dist_utils
from pretrain.config import Config, ConfigError, resolve_path, save_config, REPO_ROOT
from pretrain.model import VideoTextModel
from shards.loader import build_train_loader, epoch_start_state

log = logging.getLogger("pretrain")


def build_ds_config(cfg: Config, world_size: int, path: str | None = None) -> dict:
    """The DeepSpeed JSON with batch sizes and clipping filled in from the run config (and checked)."""
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
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported; use bf16 (GPU) or fp32 (train.precision)")
    bf16 = resolve_precision(cfg.train.precision) == "bf16"
    if "enabled" in ds.get("bf16", {}) and ds["bf16"]["enabled"] != bf16:
        raise ConfigError(f"{path}: bf16.enabled={ds['bf16']['enabled']} disagrees with train.precision="
                          f"{cfg.train.precision}; remove it from the JSON (it is filled in from train.precision)")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    return ds


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")


def build_optimizer(model: VideoTextModel, cfg: Config, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW with two learning rates (pretrained text encoder vs. the rest); no decay on 1-D params.
    With the optimizer offloaded to the CPU, DeepSpeed's vectorised CPU Adam (the same AdamW math)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("text."), p.ndim > 1), []).append(p)
    t = cfg.train
    params = [{"params": ps, "lr": t.text_lr if is_text else t.lr, "weight_decay": t.weight_decay if decay else 0.0}
              for (is_text, decay), ps in sorted(groups.items())]
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, betas=(t.beta1, t.beta2), eps=1e-8, adamw_mode=True)
    return torch.optim.AdamW(params, betas=(t.beta1, t.beta2), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class RunState:
    step: int = 0
    samples_seen: int = 0
    nonfinite_steps: int = 0  # micro-batches dropped for a non-finite loss (= skipped steps when grad_accum is 1)


class MetricsLog:
    """Rank 0's metrics.jsonl and TensorBoard events; on resume, records after the checkpoint are dropped."""

    def __init__(self, run_dir: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key == "skipped":
                for reason, n in value.items():
                    self.tb.add_scalar(f"data/skipped/{reason}", n, record["step"])
            elif key != "step":
                self.tb.add_scalar(f"train/{key}", value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def step_generator(seed: int, step: int) -> torch.Generator:
    """The same on every rank at a given step, so all ranks compute one loss on the gathered batch
    (MTC's sampled positions; MLM's masks)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class StopSignal:
    """SIGUSR1 / SIGTERM (SLURM's warning before the time limit, preemption): finish the step, save, exit."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def any_rank(self) -> bool:
        return dist_utils.any_rank(self.received is not None)


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """A loss with a zero gradient for every trainable parameter. It stands in for a dropped micro-batch, so
    every rank runs the same backward and DeepSpeed's gradient accumulation stays in step."""
    return sum((p * 0).sum() for p in module.parameters() if p.requires_grad)


class NonfiniteGuard:
    """Counts micro-batches dropped for a non-finite loss on any rank (`total`, restored on resume);
    `max_in_a_row` of them in a row stop the run with an error that says what to do."""

    def __init__(self, max_in_a_row: int, total: int = 0, advice=lambda: "Lower train.lr or check the data."):
        self.max_in_a_row, self.total, self.in_a_row, self.advice = max_in_a_row, total, 0, advice

    def update(self, finite: list[bool], step: int, losses: dict) -> None:
        for ok in finite:
            self.in_a_row = 0 if ok else self.in_a_row + 1
            self.total += not ok
        if not all(finite):
            log.warning("step %d: non-finite loss %s in %d of %d micro-batches, dropped (%d in a row)", step,
                        losses, finite.count(False), len(finite), self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(f"non-finite loss in {self.in_a_row} consecutive micro-batches (train.max_nonfinite_"
                               f"steps={self.max_in_a_row}); last losses {losses}. {self.advice()}")


def train_step(engine, loader_iter, cfg: Config, step: int) -> tuple[dict, float, list[bool]]:
    """One optimizer step over grad_accum micro-batches -> (losses of the last micro-batch, data wait, which
    micro-batches had a finite loss on every rank). A non-finite micro-batch is dropped: with grad_accum = 1
    no backward and no optimizer step run (the step is skipped and retried on the next batch); with more, it
    contributes a zero gradient and the optimizer steps on the others, so the step count, the LR schedule and
    DeepSpeed's accumulation boundary never drift apart."""
    wait, finite = 0.0, []
    for _ in range(cfg.train.grad_accum):
        t0 = time.perf_counter()
        batch = next(loader_iter)
        wait += time.perf_counter() - t0
        out = engine(batch, gather=dist_utils.gather_with_grad, generator=step_generator(cfg.train.seed, step))
        finite.append(not dist_utils.any_rank(not bool(torch.isfinite(out["loss"]))))
        if cfg.train.grad_accum == 1 and not finite[-1]:
            break
        engine.backward(out["loss"] if finite[-1] else zero_loss(engine.module))
        engine.step()
    return {k: float(v.detach()) for k, v in out.items()}, wait, finite


def step_taken(finite: list[bool]) -> bool:
    """Whether train_step ran an optimizer step: always with accumulation, else only on a finite loss."""
    return len(finite) > 1 or finite[0]


def build_engine(cfg: Config, ds_config_path: str | None, ds_extra: dict | None = None):
    import deepspeed

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = VideoTextModel(cfg.model)
    if cfg.model.init_from:
        checkpoint.load_weights(model, resolve_path(cfg.model.init_from))
    model.freeze(cfg.model.freeze)
    ds = {**build_ds_config(cfg, dist_utils.world_size(), ds_config_path), **(ds_extra or {})}
    optimizer = build_optimizer(model, cfg, cpu_adam=offloads_optimizer(ds))
    scheduler = build_scheduler(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine, scheduler


def elastic_data_state(cfg: Config, old_ranks: list[dict], rank: int, world_size: int) -> dict:
    """The data position after a world-size change. Positions of the old ranks' workers do not map onto
    the new ones, so every new worker starts the epoch after the furthest any old worker reached:
    nothing is seen twice; the unseen rest of the interrupted epoch is skipped (and logged)."""
    epoch = 1 + max(int(e) for r in old_ranks for e, _ in r["data"]["epoch_pos"].values())
    if rank == 0:
        log.warning("world size changed (%d -> %d): the data stream restarts at epoch %d", len(old_ranks),
                    world_size, epoch)
    return epoch_start_state(cfg.data, rank, world_size, epoch, root=str(REPO_ROOT))


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak resident set, KiB on Linux


def train(cfg: Config, run_dir: Path, ds_config_path: str | None, resume: bool):
    """Train to cfg.train.steps, or until a stop signal / exit_interval; returns (engine, finished)."""
    rank, ws = dist_utils.rank(), dist_utils.world_size()
    ckpt_dir = run_dir / "checkpoints"
    stop = StopSignal()
    saved_ws = checkpoint.saved_world_size(ckpt_dir) if resume else None
    elastic = saved_ws is not None and saved_ws != ws
    engine, scheduler = build_engine(cfg, ds_config_path, {"checkpoint": {"load_universal": True}} if elastic else None)
    torch.manual_seed(cfg.train.seed + 1000 * (rank + 1))  # per-rank stream for dropout and MLM masks

    state, data_state = RunState(), None
    if elastic:
        run_state, old_ranks = checkpoint.load_elastic(engine, ckpt_dir)
        state = RunState(**run_state)
        torch.manual_seed(cfg.train.seed + 1000 * (rank + 1) + state.step)
        data_state = elastic_data_state(cfg, old_ranks, rank, ws)
    elif resume and saved_ws is not None:
        run_state, mine = checkpoint.load(engine, ckpt_dir)
        state = RunState(**run_state)
        checkpoint.set_rng_state(mine["rng"])
        data_state = mine["data"]
    elif resume:
        log.warning("--resume: no checkpoint in %s yet, starting from step 0", ckpt_dir)

    loader = build_train_loader(cfg.data, cfg.model.text.resolved_path(), rank, ws, state=data_state,
                                root=str(REPO_ROOT))
    metrics = MetricsLog(run_dir, state.step) if rank == 0 else None
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * ws
    bar = tqdm(total=cfg.train.steps, initial=state.step, desc="pretrain", disable=rank != 0, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
    engine.train()
    it = iter(loader)
    guard = NonfiniteGuard(cfg.train.max_nonfinite_steps, state.nonfinite_steps,
                           lambda: f"Lower train.lr or check the data; the last checkpoint is {checkpoint.latest_tag(ckpt_dir)}")
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        losses, wait, finite = train_step(engine, it, cfg, state.step)
        guard.update(finite, state.step + 1, losses)
        state.nonfinite_steps = guard.total
        if not step_taken(finite):
            continue
        state.step += 1
        state.samples_seen += global_batch
        step_time = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{losses['loss']:.3f}")
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            skipped = _sum_counts(dist_utils.all_gather_objects(loader.skipped()))
            if metrics is not None:
                grad_norm = engine.get_global_grad_norm()
                record = {"step": state.step, **losses, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                          "samples_per_s": global_batch / step_time,
                          "clips_per_s": global_batch * cfg.data.num_clips / step_time,
                          "data_wait_s": wait, "data_wait_frac": wait / step_time, "mem_gib": memory_gib(),
                          "samples_seen": state.samples_seen, "nonfinite_steps": state.nonfinite_steps,
                          "skipped": skipped}
                metrics.write(record)
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        signalled = stop.any_rank()
        exiting = signalled or (cfg.train.exit_interval and state.step % cfg.train.exit_interval == 0)
        if state.step % cfg.train.save_every == 0 or state.step == cfg.train.steps or exiting:
            rank_state = {"rng": checkpoint.rng_state(), "data": loader.state_dict()}
            tag = checkpoint.save(engine, ckpt_dir, state.step, vars(state).copy(), rank_state,
                                  cfg.train.keep_last, cfg.train.keep_every)
            if rank == 0:
                bar.write(f"saved checkpoint {ckpt_dir / tag}")
        if exiting and state.step < cfg.train.steps:
            why = f"signal {stop.received or 'on another rank'}" if signalled else "train.exit_interval"
            bar.write(f"{why}: stopping at step {state.step}; continue with --resume")
            break
    loader.close()
    bar.close()
    if metrics is not None:
        metrics.close()
    return engine, state.step >= cfg.train.steps


def _sum_counts(dicts: list[dict]) -> dict:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Every rank, before the process group starts: never train a fresh run over another run's checkpoints."""
    if (run_dir / "checkpoints" / checkpoint.LATEST).exists() and not resume:
        raise SystemExit(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another --run-dir")


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Rank 0 creates the run folder and writes the resolved config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
