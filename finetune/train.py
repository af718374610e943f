"""Finetuning under `accelerate`: build_* functions, then train_step, train, and `run` (called by run.py).

One process per rank. `accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zeroN.json`
(or `run.py --ds-config`) wraps the model in a DeepSpeed engine through accelerate's DeepSpeed
plugin; a plain `python finetune/run.py` trains in PyTorch on one process. The DeepSpeed JSON gets
its batch sizes, clipping and precision from the run config (`pretrain.train.build_ds_config`).

Checkpoints: `RUN/checkpoints/stepN/` is `accelerator.save_state` (model, optimizer, LR schedule,
every rank's RNG states; DeepSpeed's sharded files under DeepSpeed) plus `trainstate.json` (step and
every rank's data position); `latest` names the newest complete one and moves only after every rank
has written. `--resume` continues from it at the same world size.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from finetune.config import FinetuneConfig, pretrained_config_path, save_finetune_config
from finetune.heads import TaskModel
from finetune.report import write_report
from finetune.tasks import TASKS, Task
from pretrain import checkpoint, distributed as dist_utils
from pretrain.config import REPO_ROOT, resolve_path
from pretrain.model import VideoTextModel
from pretrain.ops import release_shm_names
from pretrain.train import (MetricsLog, NonfiniteGuard, RunState, StopSignal, build_ds_config,
                            build_scheduler as cosine_scheduler, memory_gib, step_taken, zero_loss)
from shards.loader import build_train_loader

log = logging.getLogger("finetune")
LATEST = checkpoint.LATEST


# ---- wiring ---------------------------------------------------------------------------------------


def build_accelerator(cfg: FinetuneConfig, ds_config: str | None):
    """An Accelerator: with DeepSpeed when `ds_config` is given or `accelerate launch --use_deepspeed` set
    it up (ACCELERATE_DEEPSPEED_CONFIG_FILE), else plain PyTorch (DDP across processes)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

    ds_file = ds_config or (os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or cfg.train.ds_config
                            if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else None)
    gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    common = {"step_scheduler_with_optimizer": False, "gradient_accumulation_steps": cfg.train.grad_accum}
    if ds_file is None:  # plain PyTorch: on CPUs accelerate needs cpu=True for gloo DDP
        # a task uses only some of the backbone's heads (VPC: not the clip and sentence projections)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        return Accelerator(cpu=not gpu, kwargs_handlers=[ddp], **common), False
    if os.path.exists(ds_file):  # a path given relative to the working directory
        ds_file = os.path.abspath(ds_file)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    for name, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)  # one process without a launcher
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    ds = build_ds_config(cfg, world, ds_file)  # batch sizes, clipping, bf16 from the run config (checked)
    plugin = DeepSpeedPlugin(hf_ds_config=ds)
    # Without CUDA, accelerate picks no backend for DeepSpeed and would run every rank as rank 0 of 1.
    handlers = [] if gpu else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers, **common), True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrained_fusion(cfg: FinetuneConfig) -> bool:
    """Whether the checkpoint we start from has a fusion stack (else it is new and learns at head_lr)."""
    if not cfg.model.init_from:
        return False
    import yaml

    path = pretrained_config_path(resolve_path(cfg.model.init_from))
    return bool(path and (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("fusion_layers"))


def build_model(cfg: FinetuneConfig, task: Task) -> TaskModel:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    backbone = VideoTextModel(cfg.model)
    if cfg.model.init_from:
        checkpoint.load_weights(backbone, resolve_path(cfg.model.init_from))
    else:
        log.warning("no --init / model.init_from: the backbone starts from its initialisation, not a pretrained model")
    backbone.freeze(cfg.model.freeze)
    return TaskModel(backbone, task.head(backbone), gather=dist_utils.gather_with_grad)


def build_optimizer(model: TaskModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW with three learning rates: the pretrained text encoder (train.text_lr), the rest of the
    pretrained backbone (train.lr), the new head and a new fusion stack (task.head_lr); no decay on 1-D params."""
    new_prefixes = ("head.",) + (() if pretrained_fusion(cfg) else ("backbone.fusion.",))
    lrs = {"text": cfg.train.text_lr, "backbone": cfg.train.lr, "new": cfg.task.head_lr}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "new" if name.startswith(new_prefixes) else "text" if name.startswith("backbone.text.") else "backbone"
            groups.setdefault((kind, p.ndim > 1), []).append(p)
    t = cfg.train
    params = [{"params": ps, "lr": lrs[kind], "weight_decay": t.weight_decay if decay else 0.0}
              for (kind, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(params, betas=(t.beta1, t.beta2), eps=1e-8, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig):
    """Linear warm-up, then cosine decay (pretraining's) or LF-VILA's step decay."""
    t = cfg.train
    if t.schedule == "cosine":
        return cosine_scheduler(optimizer, cfg)

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        return t.decay_factor ** (step // t.decay_every) if t.decay_every else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(accelerator, ckpt_dir: Path, state: RunState, loader, keep_last: int) -> str:
    """Collective. `latest` moves to the new folder only after every rank has written its part."""
    tag = f"step{state.step}"
    accelerator.save_state(str(ckpt_dir / tag), safe_serialization=False)
    ranks = dist_utils.all_gather_objects({"data": loader.state_dict()})
    if dist_utils.rank() == 0:
        info = {"tag": tag, "step": state.step, "world_size": dist_utils.world_size(), "time": time.time(),
                "run": vars(state), "ranks": ranks}
        (ckpt_dir / tag / "trainstate.json").write_text(json.dumps(info, indent=1))
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        steps = sorted(int(p.name[4:]) for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in steps[:-keep_last]:
            shutil.rmtree(ckpt_dir / f"step{old}", ignore_errors=True)
    dist_utils.barrier()
    return tag


def load_checkpoint(accelerator, ckpt_dir: Path) -> tuple[RunState, dict] | None:
    """-> (run state, this rank's data position), or None when there is no checkpoint yet."""
    tag = checkpoint.latest_tag(ckpt_dir)
    if tag is None:
        return None
    info = json.loads((ckpt_dir / tag / "trainstate.json").read_text())
    if info["world_size"] != dist_utils.world_size():
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} was written by {info['world_size']} ranks and this run has "
                           f"{dist_utils.world_size()}: finetuning resumes at the same world size")
    accelerator.load_state(str(ckpt_dir / tag))  # model, optimizer, LR schedule, RNG states
    log.info("resumed from %s (step %d)", ckpt_dir / tag, info["step"])
    return RunState(**info["run"]), info["ranks"][dist_utils.rank()]["data"]


# ---- the loop -----------------------------------------------------------------------------------------


def step_rng(cfg: FinetuneConfig, step: int) -> np.random.Generator:
    """Label choices (which question, which caption) of one step on this rank, the same after a resume."""
    return np.random.default_rng([cfg.train.seed, step, dist_utils.rank()])


def train_step(accelerator, model, optimizer, scheduler, task: Task, loader_iter, cfg: FinetuneConfig,
               step: int, uses_ds: bool) -> tuple[dict, float, list[bool]]:
    """One optimizer step over grad_accum micro-batches -> (losses of the last micro-batch, data wait, which
    micro-batches had a finite loss on every rank). A non-finite micro-batch is dropped as in pretraining
    (pretrain.train.train_step): with grad_accum = 1 the step is skipped; with more, it adds a zero gradient."""
    wait, rng, finite = 0.0, step_rng(cfg, step), []
    for _ in range(cfg.train.grad_accum):
        t0 = time.perf_counter()
        inputs = task.train_batch(next(loader_iter), rng)
        wait += time.perf_counter() - t0
        with accelerator.accumulate(model):
            out = model(inputs)
            finite.append(not dist_utils.any_rank(not bool(torch.isfinite(out["loss"]))))
            if cfg.train.grad_accum == 1 and not finite[-1]:
                optimizer.zero_grad()
                return {k: float(v.detach()) for k, v in out.items()}, wait, finite
            accelerator.backward(out["loss"] if finite[-1] else zero_loss(model))
            if accelerator.sync_gradients and not uses_ds and cfg.train.grad_clip > 0:
                out["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
    scheduler.step()  # once per optimizer step (DeepSpeed steps its own copy inside engine.step)
    if uses_ds:
        out["grad_norm"] = model.get_global_grad_norm() or float("nan")
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}, wait, finite


def train(accelerator, model, optimizer, scheduler, task: Task, cfg: FinetuneConfig, run_dir: Path, resume: bool,
          uses_ds: bool) -> bool:
    """Train to cfg.train.steps or until a stop signal / train.exit_interval; returns whether it finished."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return _train(accelerator, model, optimizer, scheduler, task, cfg, run_dir, resume, uses_ds)
    finally:  # the caller's handlers again (the run may be a function call inside a longer process)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _train(accelerator, model, optimizer, scheduler, task: Task, cfg: FinetuneConfig, run_dir: Path, resume: bool,
           uses_ds: bool) -> bool:
    rank, ws = dist_utils.rank(), dist_utils.world_size()
    ckpt_dir = run_dir / "checkpoints"
    stop = StopSignal()
    state, data_state = RunState(), None
    loaded = load_checkpoint(accelerator, ckpt_dir) if resume else None
    if loaded is not None:
        state, data_state = loaded
    elif resume:
        log.warning("--resume: no checkpoint in %s yet, starting from step 0", ckpt_dir)
    loader = build_train_loader(cfg.data, cfg.model.text.resolved_path(), rank, ws, state=data_state, root=str(REPO_ROOT))
    metrics = MetricsLog(run_dir, state.step) if rank == 0 else None
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * ws
    bar = tqdm(total=cfg.train.steps, initial=state.step, desc=f"finetune {cfg.task.name}", disable=rank != 0,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    model.train()
    it = iter(loader)
    guard = NonfiniteGuard(cfg.train.max_nonfinite_steps, state.nonfinite_steps,
                           lambda: "Lower train.lr / task.head_lr or check the data.")
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        losses, wait, finite = train_step(accelerator, model, optimizer, scheduler, task, it, cfg, state.step, uses_ds)
        guard.update(finite, state.step + 1, losses)
        state.nonfinite_steps = guard.total
        if not step_taken(finite):
            continue
        state.step += 1
        state.samples_seen += global_batch
        step_time = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{losses['loss']:.3f}")
        if metrics is not None and (state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps):
            record = {"step": state.step, **losses, "lr": scheduler.get_last_lr()[0],
                      "samples_per_s": global_batch / step_time, "data_wait_s": wait, "mem_gib": memory_gib(),
                      "samples_seen": state.samples_seen, "nonfinite_steps": state.nonfinite_steps}
            metrics.write(record)
        signalled = stop.any_rank()
        exiting = signalled or (cfg.train.exit_interval and state.step % cfg.train.exit_interval == 0)
        if state.step % cfg.train.save_every == 0 or state.step == cfg.train.steps or exiting:
            tag = save_checkpoint(accelerator, ckpt_dir, state, loader, cfg.train.keep_last)
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
    return state.step >= cfg.train.steps


def evaluate(task: Task, model: TaskModel, name: str) -> dict:
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    result = task.evaluate(model)
    model.train(was_training)
    log.info("%s evaluation took %.1f s", name, time.perf_counter() - t0)
    return result


def run(cfg: FinetuneConfig, run_dir: Path, resume: bool, ds_config: str | None, config_name: str) -> bool:
    """Build, (evaluate before,) train, evaluate, report. Returns whether the run finished."""
    accelerator, uses_ds = build_accelerator(cfg, ds_config)
    if dist_utils.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_finetune_config(cfg, run_dir / "config.yaml")
    dist_utils.barrier()
    release_shm_names()  # every rank has mapped its peers' all-reduce buffers by now
    task = TASKS[cfg.task.name](cfg, run_dir)
    task.device = accelerator.device
    model = build_model(cfg, task).to(accelerator.device)  # prepare() would move it too, after the zero-shot pass
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text())["results"] if resume and results_path.exists() else {}
    if cfg.task.name == "zeroshot":
        results["zero_shot"] = evaluate(task, model, "zero-shot")
        write_report(run_dir, cfg, task, results, config_name)
        return True
    if cfg.task.eval_before and "before" not in results:
        results["before"] = evaluate(task, model, "before finetuning")
        write_report(run_dir, cfg, task, results, config_name)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    finished = train(accelerator, model, optimizer, scheduler, task, cfg, run_dir, resume, uses_ds)
    if finished:
        results["after"] = evaluate(task, accelerator.unwrap_model(model), "after finetuning")
        write_report(run_dir, cfg, task, results, config_name)
    dist_utils.barrier()
    return finished
