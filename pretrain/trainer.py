"""The training core: one loop for pretraining (DeepSpeed engine), finetuning (accelerate) and the
benchmarks' plain-PyTorch baselines.

What every run gets from here: a progress bar, `metrics.jsonl` + TensorBoard, stop signals
(SIGUSR1 / SIGTERM: finish the step, save, return unfinished, which the entry points turn into
exit code 3), the non-finite guard, the save cadence with retention (`train.keep_last`,
`train.keep_every`), failed-save cleanup that names the intact checkpoint, skipped-sample counts by
reason summed over ranks, samples seen per data source (`samples_by_source`: the batches the loader handed
out, summed over ranks, a micro-batch dropped for a non-finite loss included; one source named "train"
when data.train_shards is one set), the "media" and "source" of the batch each record's losses come from
(clips_per_s counts data.num_clips clips per video sample, 1 per image sample), and the data-wait
measurement. What a backend differs in (how it runs a micro-batch and steps, how it writes and reads its
sharded files) is a `Backend` (`pretrain/backends.py`); what a command differs in (its batch -> losses) is
the `forward` it passes.
Checkpoints and the TrainState: `pretrain/checkpoint.py`.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from pretrain import distributed as dist_utils
from pretrain.checkpoint import (TrainState, latest_tag, load_checkpoint, rank_seed, rng_state, save_checkpoint,
                                 saved_world_size)
from pretrain.config import REPO_ROOT, Config
from shards.loader import build_train_loader, sum_counts

log = logging.getLogger("train")


# ---- pieces of the loop ----------------------------------------------------------------------------


class MetricsLog:
    """Rank 0's metrics.jsonl and TensorBoard events; on resume, records after the checkpoint are dropped.
    Each record is written with one write() of a whole line, so a reader never sees half a record
    unless it reads a line that does not end in a newline yet."""

    GROUPS = {"skipped": "data/skipped", "samples_by_source": "data/samples_seen"}  # dict fields -> a scalar each

    def __init__(self, run_dir: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # a last line without its newline is a record a killed run was writing: dropped
            text = self.path.read_text()
            kept = [line for line in text[:text.rfind("\n") + 1].splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key in self.GROUPS:
                for name, n in value.items():
                    self.tb.add_scalar(f"{self.GROUPS[key]}/{name}", n, record["step"])
            elif key != "step" and not isinstance(value, str):  # "media", "source": metrics.jsonl only
                self.tb.add_scalar(f"train/{key}", value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


class StopSignal:
    """SIGUSR1 / SIGTERM (SLURM's warning before the time limit, preemption): finish the step, save, stop.
    `install()` for the rest of the process, or a context manager that puts the handlers in force before
    back on exit."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received = None

    def install(self) -> "StopSignal":
        self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def any_rank(self) -> bool:
        return dist_utils.any_rank(self.received is not None)


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """A loss with a zero gradient for every trainable parameter. It stands in for a dropped micro-batch, so
    every rank runs the same backward and gradient accumulation stays in step."""
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


class StepBatches:
    """The loader's batches, as train_step draws them, noting what the current step drew (`start_step()` resets):
    the clips on this rank (data.num_clips per video sample, 1 per image sample) and the last micro-batch's
    "media" and "source" (the batch whose losses train_step returns). A mixture draws the same source on every
    rank at a micro-batch, so this rank's clips x world size are the step's."""

    def __init__(self, batches: Iterator, num_clips: int):
        self.batches, self.num_clips = batches, num_clips
        self.start_step()

    def start_step(self) -> None:
        self.clips, self.kind = 0, {}

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        media = batch.get("media", "video")
        self.clips += len(batch["key"]) * (1 if media == "image" else self.num_clips)
        self.kind = {"media": media, "source": batch.get("source", "")}
        return batch


def train_step(backend, forward: Callable, loader_iter: Iterator, grad_accum: int,
               step: int) -> tuple[dict, float, list[bool]]:
    """One optimizer step over grad_accum micro-batches -> (losses of the last micro-batch, data wait, which
    micro-batches had a finite loss on every rank). A non-finite micro-batch is dropped: with grad_accum = 1
    no backward and no optimizer step run (the step is skipped and retried on the next batch); with more, it
    contributes a zero gradient and the optimizer steps on the others, so the step count, the LR schedule and
    the backend's accumulation boundary never drift apart."""
    wait, finite = 0.0, []
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(loader_iter)
        wait += time.perf_counter() - t0
        last = micro == grad_accum - 1
        with backend.micro_batch(last):
            out = forward(batch, step, micro)
            finite.append(not dist_utils.any_rank(not bool(torch.isfinite(out["loss"]))))
            if grad_accum == 1 and not finite[-1]:
                backend.skip()
                break
            backend.backward(out["loss"] if finite[-1] else zero_loss(backend.module), last)
    return {k: float(v.detach()) for k, v in out.items()}, wait, finite


def step_taken(finite: list[bool]) -> bool:
    """Whether train_step ran an optimizer step: always with accumulation, else only on a finite loss."""
    return len(finite) > 1 or finite[0]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The same on every rank at a given step, so all ranks compute one loss on the gathered batch
    (MTC's sampled positions; MLM's masks)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def build_scheduler(optimizer: torch.optim.Optimizer, train) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to train.min_lr_ratio; or "linear" decay to it (LF-VILA's
    pretraining); or "step", LF-VILA's downstream decay by train.decay_factor every train.decay_every steps."""
    t = train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "step":
            return t.decay_factor ** (step // t.decay_every) if t.decay_every else 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        if t.schedule == "linear":
            return 1 - (1 - t.min_lr_ratio) * progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: torch.nn.Module, lr_of: Callable[[str], float], weight_decay: float) -> list[dict]:
    """AdamW groups: one per (learning rate, decayed or not); no weight decay on 1-D parameters. Groups come in
    the order of their first parameter, so the first group (whose LR metrics.jsonl logs as `lr`) is that of
    the model's first trainable parameter: the video encoder's, train.lr, unless it is frozen."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((lr_of(name), p.ndim > 1), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": weight_decay if decay else 0.0}
            for (lr, decay), ps in groups.items()]


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak resident set, KiB on Linux


# ---- the loop --------------------------------------------------------------------------------------------


def check_run_dir(run_dir: Path, resume: bool, world_size: int | None = None) -> None:
    """Before the process group starts: never train a fresh run over another run's checkpoints; a resume needs a
    checkpoint that holds a TrainState and, when `world_size` is given (a backend that cannot change it), one
    written at that world size. Raises SystemExit with the reason."""
    ckpt_dir = run_dir / "checkpoints"
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return
    if not resume:
        raise SystemExit(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another --run-dir")
    if not (ckpt_dir / tag / "trainstate.pt").is_file():
        raise SystemExit(f"{ckpt_dir / tag} holds no trainstate.pt (an older version of longvl wrote it), so it "
                         f"cannot be resumed; start a new run from its weights with model.init_from={ckpt_dir}")
    saved = saved_world_size(ckpt_dir)
    if world_size is not None and saved != world_size:
        raise SystemExit(f"{ckpt_dir / tag} was written by {saved} ranks and this run has {world_size}: "
                         "finetuning resumes at the same world size")


def fit(backend, forward: Callable, cfg: Config, run_dir: Path, resume: bool, desc: str,
        advice: str = "Lower train.lr or check the data.", stop: StopSignal | None = None) -> tuple[TrainState, bool]:
    """Train to cfg.train.steps, or until a stop signal / train.exit_interval -> (state, finished).

    `backend` steps the model and saves it (pretrain/backends.py); `forward(batch, step, micro)` returns
    the losses of one micro-batch, "loss" among them. Data come from cfg.data through the streaming
    loader, positioned where the checkpoint left it. An entry point passes the `stop` it installed when
    the process started (so a signal while the model is built, or during the evaluation after training,
    is caught too); without one, handlers are installed for the loop alone."""
    if stop is not None:
        return _fit(backend, forward, cfg, run_dir, resume, desc, advice, stop)
    with StopSignal() as stop:
        return _fit(backend, forward, cfg, run_dir, resume, desc, advice, stop)


def _fit(backend, forward, cfg, run_dir, resume, desc, advice, stop) -> tuple[TrainState, bool]:
    rank, ws, t = dist_utils.rank(), dist_utils.world_size(), cfg.train
    ckpt_dir = run_dir / "checkpoints"
    torch.manual_seed(rank_seed(t.seed, rank))
    state, data_state = TrainState(world_size=ws), None
    loaded = load_checkpoint(backend, ckpt_dir, cfg.data, t.seed) if resume else None
    if loaded is not None:
        state, data_state = loaded
    elif resume:
        log.warning("--resume: no checkpoint in %s yet, starting from step 0", ckpt_dir)
    loader = build_train_loader(cfg.data, cfg.model.text.resolved_path(), rank, ws, state=data_state,
                                root=str(REPO_ROOT))
    metrics = MetricsLog(run_dir, state.step) if rank == 0 else None
    global_batch = cfg.data.batch_size * t.grad_accum * ws
    bar = tqdm(total=t.steps, initial=state.step, desc=desc, disable=rank != 0, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
    backend.train()
    it = StepBatches(iter(loader), cfg.data.num_clips)
    guard = NonfiniteGuard(t.max_nonfinite_steps, state.nonfinite_steps,
                           lambda: f"{advice} The last checkpoint is {latest_tag(ckpt_dir)}.")
    try:
        while state.step < t.steps:
            t0 = time.perf_counter()
            it.start_step()
            losses, wait, finite = train_step(backend, forward, it, t.grad_accum, state.step)
            guard.update(finite, state.step + 1, losses)
            state.nonfinite_steps = guard.total
            if not step_taken(finite):
                continue
            state.step += 1
            state.samples_seen += global_batch
            step_time = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", refresh=False)  # drawn at the bar's own pace
            if state.step % t.log_every == 0 or state.step == t.steps:
                gathered = dist_utils.all_gather_objects((loader.skipped(), loader.samples_by_source()))
                skipped, by_source = (sum_counts([g[i] for g in gathered]) for i in (0, 1))
                if metrics is not None:
                    grad_norm = backend.grad_norm()
                    # the losses are the last micro-batch's: its media and source say of what (an image batch's
                    # vpc is a caption-image contrast, a video batch's a paragraph-video one)
                    record = {"step": state.step, **it.kind, **losses, "lr": backend.lr(),
                              "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                              "samples_per_s": global_batch / step_time,
                              "clips_per_s": it.clips * ws / step_time,
                              "data_wait_s": wait, "data_wait_frac": wait / step_time, "mem_gib": memory_gib(),
                              "samples_seen": state.samples_seen, "nonfinite_steps": state.nonfinite_steps,
                              "skipped": skipped, "samples_by_source": by_source}
                    metrics.write(record)
                    bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in record.items()))
            signalled = stop.any_rank()
            exiting = signalled or (t.exit_interval and state.step % t.exit_interval == 0)
            if t.save_every and (state.step % t.save_every == 0 or state.step == t.steps or exiting):
                rank_state = {"rng": rng_state(), "data": loader.state_dict()}
                tag = save_checkpoint(backend, ckpt_dir, state, rank_state, t.keep_last, t.keep_every)
                if rank == 0:
                    bar.write(f"saved checkpoint {ckpt_dir / tag}")
            if exiting and state.step < t.steps:
                why = f"signal {stop.received or 'on another rank'}" if signalled else "train.exit_interval"
                bar.write(f"{why}: stopping at step {state.step}; continue with --resume")
                break
    finally:
        loader.close()
        bar.close()
        if metrics is not None:
            metrics.close()
    return state, state.step >= t.steps
