"""Finetuning on the training core: an `accelerate` Accelerator, the task model, then `trainer.fit`.

One process per rank. `accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zeroN.json`
(or `run.py --ds-config`) wraps the model in a DeepSpeed engine through accelerate's DeepSpeed
plugin; a plain `python finetune/run.py` trains in PyTorch on one process. The DeepSpeed JSON gets
its batch sizes, clipping and precision from the run config (`pretrain.backends.build_ds_config`).

The loop, checkpoints (`RUN/checkpoints/global_stepN/`: accelerate's save_state plus the TrainState),
retention, stop signals, the non-finite guard and the metrics are pretraining's (`pretrain/trainer.py`).
`--resume` continues from the latest checkpoint at the same world size.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from finetune.config import FinetuneConfig
from finetune.heads import TaskModel
from finetune.report import write_report
from finetune.tasks import TASKS, Task
from pretrain import distributed as dist_utils
from pretrain.backends import AccelerateBackend, build_ds_config, resolve_precision
from pretrain.config import pretrained_config_path, resolve_path, save_config
from pretrain.image_init import init_from_image, save_report
from pretrain.model import VideoTextModel
from pretrain.ops import release_shm_names
from pretrain.trainer import build_scheduler, fit, param_groups
from pretrain.weights import load_weights, new_modules

log = logging.getLogger("finetune")


# ---- wiring ---------------------------------------------------------------------------------------


def deepspeed_json(cfg: FinetuneConfig, ds_config: str | None) -> tuple[str, str] | None:
    """(path, what) of the DeepSpeed JSON this run will use, or None when it trains without DeepSpeed:
    --ds-config, else under `accelerate launch --use_deepspeed` its --deepspeed_config_file or train.ds_config."""
    if ds_config:
        return ds_config, "DeepSpeed config (--ds-config)"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            return os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"], "DeepSpeed config (--deepspeed_config_file)"
        return cfg.train.ds_config, "DeepSpeed config (train.ds_config)"
    return None


def build_accelerator(cfg: FinetuneConfig, ds_config: str | None):
    """An Accelerator: with DeepSpeed when `ds_config` is given or `accelerate launch --use_deepspeed` set
    it up (ACCELERATE_DEEPSPEED_CONFIG_FILE), else plain PyTorch (DDP across processes)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

    ds = deepspeed_json(cfg, ds_config)
    gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # train.precision decides, never `accelerate launch --mixed_precision` (whose fp16 would reach DeepSpeed's JSON);
    # without DeepSpeed, bf16 is accelerate's autocast, as DeepSpeed's bf16. The zeroshot task trains nothing and
    # reads no train.* key: it scores in fp32, as pretrain.evaluate does after an fp32 run
    trains = cfg.task.name != "zeroshot"
    precision = "bf16" if trains and resolve_precision(cfg.train.precision) == "bf16" else "no"
    common = {"step_scheduler_with_optimizer": False, "gradient_accumulation_steps": cfg.train.grad_accum,
              "mixed_precision": precision}
    if ds is None:  # plain PyTorch: on CPUs accelerate needs cpu=True for gloo DDP
        # a task uses only some of the backbone's heads (VPC: not the clip and sentence projections)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        return Accelerator(cpu=not gpu, kwargs_handlers=[ddp], **common), False
    ds_file = resolve_path(ds[0])
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    for name, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)  # one process without a launcher
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    plugin = DeepSpeedPlugin(hf_ds_config=build_ds_config(cfg, world, ds_file))  # batch sizes, clipping, bf16: checked
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


def build_model(cfg: FinetuneConfig, task: Task, run_dir: Path | None = None) -> TaskModel:
    """The task model; its backbone from model.init_from, or its video encoder from model.video.init_image
    (the image mapping's report saved as RUN/image_init.json by rank 0)."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    backbone = VideoTextModel(cfg.model)
    if cfg.model.video.init_image:
        report = init_from_image(backbone.video, resolve_path(cfg.model.video.init_image))
        if run_dir is not None and dist_utils.rank() == 0:
            save_report(report, run_dir / "image_init.json")
    if cfg.model.init_from:
        load_weights(backbone, resolve_path(cfg.model.init_from), new_modules(cfg.model), partial=cfg.model.init_partial)
    elif not cfg.model.video.init_image:
        log.warning("no --init / model.init_from: the backbone starts from its initialisation, not a pretrained model")
    backbone.freeze(cfg.model.freeze)
    backbone.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if cfg.train.activation_checkpointing:
        log.info("activation checkpointing: 1 in %d blocks of the video and text encoders recomputed in backward",
                 cfg.train.activation_checkpointing)
    return TaskModel(backbone, task.head(backbone), gather=dist_utils.gather_with_grad)


def build_optimizer(model: TaskModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW with three learning rates: the pretrained text encoder (train.text_lr), the rest of the
    pretrained backbone (train.lr), the new head and a new fusion stack (task.head_lr); no decay on 1-D params."""
    new = ("head.",) + (() if pretrained_fusion(cfg) else ("backbone.fusion.",))
    t = cfg.train

    def lr_of(name: str) -> float:
        return cfg.task.head_lr if name.startswith(new) else t.text_lr if name.startswith("backbone.text.") else t.lr

    return torch.optim.AdamW(param_groups(model, lr_of, t.weight_decay), betas=(t.beta1, t.beta2), eps=1e-8,
                             foreach=True)


# ---- training ----------------------------------------------------------------------------------------


def train(accelerator, model, optimizer, scheduler, task: Task, cfg: FinetuneConfig, run_dir: Path, resume: bool,
          uses_ds: bool, stop=None) -> bool:
    """Train to cfg.train.steps or until a stop signal / train.exit_interval; returns whether it finished."""
    backend = AccelerateBackend(accelerator, model, optimizer, scheduler, cfg.train.grad_clip, uses_ds)
    seed, rank = cfg.train.seed, dist_utils.rank()

    def forward(batch, step, micro):
        # label choices (which question, which caption) of one micro-batch, the same after a resume
        return model(task.train_batch(batch, np.random.default_rng([seed, step, micro, rank])))

    _, finished = fit(backend, forward, cfg, run_dir, resume, f"finetune {cfg.task.name}",
                      advice="Lower train.lr / task.head_lr or check the data.", stop=stop)
    return finished


def evaluate(task: Task, model: TaskModel, name: str) -> dict:
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    result = task.evaluate(model)
    model.train(was_training)
    log.info("%s evaluation took %.1f s", name, time.perf_counter() - t0)
    return result


def run(cfg: FinetuneConfig, run_dir: Path, resume: bool, ds_config: str | None, config_name: str,
        stop=None) -> bool:
    """Build, (evaluate before,) train, evaluate, report. Returns whether the run finished."""
    accelerator, uses_ds = build_accelerator(cfg, ds_config)
    if dist_utils.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    dist_utils.barrier()
    release_shm_names()  # every rank has mapped its peers' all-reduce buffers by now
    task = TASKS[cfg.task.name](cfg, run_dir)
    task.device = accelerator.device
    model = build_model(cfg, task, run_dir).to(accelerator.device)  # prepare() would move it too, after the zero-shot pass
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
    scheduler = build_scheduler(optimizer, cfg.train)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    finished = train(accelerator, model, optimizer, scheduler, task, cfg, run_dir, resume, uses_ds, stop)
    if finished and cfg.train.eval_at_end:
        results["after"] = evaluate(task, accelerator.unwrap_model(model), "after finetuning")
        write_report(run_dir, cfg, task, results, config_name)
    dist_utils.barrier()
    return finished
