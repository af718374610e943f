"""Run configuration: one dataclass per concern, composed into `Config`.

Precedence: dataclass defaults < YAML file < dotted command-line overrides (`model.video.dims=[32,64]`).
Unknown keys and badly typed values are rejected with a message naming the key, before any process
group starts. The resolved config is written into the run folder (`config.yaml`).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pretrain.model import ModelConfig
from pretrain.video_encoder import preset_values
from shards.loader import DataConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what is allowed."""


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps in the whole run
    lr: float = 5e-4  # peak learning rate of the video encoder and projection heads
    text_lr: float = 5e-5  # peak learning rate of the pretrained text encoder
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 30  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    grad_accum: int = 1  # gradient accumulation steps (written into the DeepSpeed config)
    grad_clip: float = 1.0  # max gradient norm (written into the DeepSpeed config); 0 disables
    seed: int = 0
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard records
    save_every: int = 100  # steps between checkpoints; the last step is always saved
    keep_last: int = 3  # the newest checkpoints kept on disk (older ones are deleted) ...
    keep_every: int = 0  # ... except every step that is a multiple of this (0: none)
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run with an error
    exit_interval: int = 0  # save and exit when the step is a multiple of this (0: never), for time-limited jobs
    eval_at_end: bool = True  # zero-shot paragraph-to-video retrieval on data.val_shards after training
    ds_config: str = "ds_configs/zero2.json"  # DeepSpeed engine JSON; batch sizes are filled in from here
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU that supports it, else fp32

    def __post_init__(self):
        _check(self.steps >= 1, "train.steps", "an integer >= 1")
        _check(self.lr > 0 and self.text_lr >= 0, "train.lr / train.text_lr", "positive numbers")
        _check(0 <= self.warmup_steps, "train.warmup_steps", "an integer >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "a number in [0, 1]")
        _check(self.grad_accum >= 1, "train.grad_accum", "an integer >= 1")
        _check(self.log_every >= 1 and self.save_every >= 1, "train.log_every / train.save_every", "integers >= 1")
        _check(self.keep_last >= 1, "train.keep_last", "an integer >= 1")
        _check(self.keep_every >= 0, "train.keep_every", "an integer >= 0")
        _check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "an integer >= 1")
        _check(self.exit_interval >= 0, "train.exit_interval", "an integer >= 0")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        v, d, loss = self.model.video, self.data, self.model.loss
        frames = d.num_clips * d.frames_per_clip
        _check(frames <= v.max_frames, "data.num_clips * data.frames_per_clip",
               f"at most model.video.max_frames = {v.max_frames} (got {frames})")
        _check(d.size % v.patch_size == 0, "data.size", f"a multiple of model.video.patch_size = {v.patch_size}")
        if loss.mtc_weight > 0:
            _check(v.clip_stage() is not None, "model.loss.mtc_weight",
                   "0 with this video encoder: TESTA merges frames before the clip-feature stage, so there "
                   "are no clip features (or set model.video.clip_features / local_stage to an earlier stage)")
        if loss.mtc_weight > 0:
            for key in ("num_key", "num_value"):
                _check(1 <= getattr(loss, key) <= d.num_clips, f"model.loss.{key}",
                       f"an integer in [1, data.num_clips = {d.num_clips}] (got {getattr(loss, key)})")
        _check(loss.num_neg >= 0, "model.loss.num_neg", f"an integer >= 0 (got {loss.num_neg})")
        _check(0 < loss.mlm_probability < 1, "model.loss.mlm_probability", "a number in (0, 1)")
        _check(-1 <= v.graph_threshold <= 1, "model.video.graph_threshold", "a cosine similarity in [-1, 1]")
        _check(v.depth_window >= 0, "model.video.depth_window", "an integer >= 0 (frames either side)")
        _check(v.depth_grid >= 1, "model.video.depth_grid", "an integer >= 1")
        grid = d.size // v.patch_size
        for i, kind in enumerate(v.attention):  # HTWA windows must tile the (frames, grid) each stage sees
            tw, (sh, sw) = min(v.temporal_windows[i], frames), (min(n, grid) for n in v.spatial_window)
            if kind == "htwa":
                _check(min(tw, sh, sw) >= 1 and frames % tw == 0 and grid % sh == 0 and grid % sw == 0,
                       f"model.video.temporal_windows[{i}] / spatial_window",
                       f"windows that tile stage {i}'s input: {frames} frames and a {grid}x{grid} patch grid "
                       f"(got {v.temporal_windows[i]} frames, {v.spatial_window} patches)")
            if v.downsample[i]:
                _check(grid % 2 == 0, f"model.video.downsample[{i}]",
                       f"false: stage {i}'s {grid}x{grid} patch grid is odd (data.size / patch_size, halved "
                       f"per downsampling)")
                grid //= 2
        if v.clip_features == "local":
            for i in range(v.local_stage + 1):
                w = v.temporal_windows[i]
                _check(v.attention[i] == "htwa" and d.frames_per_clip % w == 0, "model.video.local_stage",
                       f"a stage up to which every stage is 'htwa' with a temporal window dividing "
                       f"data.frames_per_clip ({d.frames_per_clip}), so clip features never mix clips "
                       f"(stage {i} is '{v.attention[i]}' with window {w}); or model.video.clip_features=final")


def _check(ok: bool, key: str, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"bad value for {key}: expected {allowed}")


# ---- building dataclasses from plain dicts ---------------------------------------------------

def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {path}{hint}; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=path + ".")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"bad value for {path}: {value!r}; allowed values: {list(typing.get_args(tp))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad value for {path}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"bad value for {path}: expected true or false, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"bad value for {path}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def set_dotted(data: dict, keys: list[str], value) -> None:
    """data[k0][k1]...[kn] = value, making sections as needed."""
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults < YAML file < dotted overrides, validated."""
    data: dict = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        set_dotted(data, *parse_override(item))
    _apply_preset(data)
    return from_dict(Config, data)


def _apply_preset(data: dict) -> None:
    """model.video.preset: the preset's values sit under the keys the YAML and overrides give."""
    video = data.get("model", {}).get("video", {})
    if isinstance(video, dict) and video.get("preset"):
        try:
            data["model"]["video"] = {**preset_values(video["preset"]), **video}
        except ValueError as e:
            raise ConfigError(str(e)) from e


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def resolve_path(p: str) -> str:
    """Relative data and config paths resolve against the repository root; URLs stay as they are."""
    if "://" in p or Path(p).is_absolute():
        return p
    return str(REPO_ROOT / p)
