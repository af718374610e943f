"""Pretraining on the training core: the model, its optimizer and a DeepSpeed engine, then `trainer.fit`.

Called by `pretrain/run.py` inside a `deepspeed` launch; one process per rank.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pretrain import distributed as dist_utils
from pretrain.backends import DeepSpeedBackend, build_ds_config, offloads_optimizer
from pretrain.checkpoint import saved_world_size
from pretrain.config import Config, resolve_path, save_config
from pretrain.image_init import init_from_image, save_report
from pretrain.model import VideoTextModel
from pretrain.trainer import build_scheduler, fit, param_groups, step_generator
from pretrain.weights import load_weights, new_modules

log = logging.getLogger("pretrain")


def build_optimizer(model: VideoTextModel, cfg: Config, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW with two learning rates (pretrained text encoder vs. the rest); no decay on 1-D params.
    With the optimizer offloaded to the CPU, DeepSpeed's vectorised CPU Adam (the same AdamW math)."""
    t = cfg.train
    params = param_groups(model, lambda name: t.text_lr if name.startswith("text.") else t.lr, t.weight_decay)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, betas=(t.beta1, t.beta2), eps=1e-8, adamw_mode=True)
    return torch.optim.AdamW(params, betas=(t.beta1, t.beta2), eps=1e-8)


def build_model(cfg: Config, resume: bool = False) -> VideoTextModel:
    """The model with its starting weights: the video encoder from model.video.init_image (not when resuming:
    the checkpoint has them), then model.init_from. The image mapping's report is `model.image_report`."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = VideoTextModel(cfg.model)
    model.image_report = None
    if cfg.model.video.init_image and not resume:
        model.image_report = init_from_image(model.video, resolve_path(cfg.model.video.init_image))
    if cfg.model.init_from:
        load_weights(model, resolve_path(cfg.model.init_from), new_modules(cfg.model), partial=cfg.model.init_partial)
    model.freeze(cfg.model.freeze)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if cfg.train.activation_checkpointing:
        log.info("activation checkpointing: 1 in %d blocks of the video and text encoders recomputed in backward",
                 cfg.train.activation_checkpointing)
    return model


def build_backend(cfg: Config, ds_config_path: str | None, resized: bool = False, resume: bool = False,
                  run_dir: Path | None = None) -> DeepSpeedBackend:
    """The model in a DeepSpeed engine; `resized`: it will load a checkpoint written at another world size.
    Rank 0 saves the image mapping's report as RUN/image_init.json."""
    import deepspeed

    model = build_model(cfg, resume)
    if model.image_report is not None and run_dir is not None and dist_utils.rank() == 0:
        save_report(model.image_report, run_dir / "image_init.json")
    ds = build_ds_config(cfg, dist_utils.world_size(), ds_config_path)
    if resized:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    optimizer = build_optimizer(model, cfg, cpu_adam=offloads_optimizer(ds))
    scheduler = build_scheduler(optimizer, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return DeepSpeedBackend(engine, scheduler)


def train(cfg: Config, run_dir: Path, ds_config_path: str | None, resume: bool, stop=None):
    """Train to cfg.train.steps, or until a stop signal / exit_interval; returns (engine, finished)."""
    saved_ws = saved_world_size(run_dir / "checkpoints") if resume else None
    backend = build_backend(cfg, ds_config_path, resized=saved_ws not in (None, dist_utils.world_size()),
                            resume=resume and saved_ws is not None, run_dir=run_dir)
    engine, seed = backend.engine, cfg.train.seed

    def forward(batch, step, micro):
        return engine(batch, gather=dist_utils.gather_with_grad, generator=step_generator(seed, step), step=step)

    _, finished = fit(backend, forward, cfg, run_dir, resume, "pretrain", stop=stop)
    return engine, finished


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Rank 0 creates the run folder and writes the resolved config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
