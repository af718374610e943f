"""Run configuration: one dataclass per concern, composed into `Config`; one loader and one saver for
every command (pretraining builds `Config`, finetuning `finetune.config.FinetuneConfig`, a subclass).

Precedence: dataclass defaults < the `base:` chain < the YAML file < (finetuning, with `--init` /
`model.init_from`) the pretrained checkpoint's architecture < dotted command-line overrides
(`model.video.dims=[32,64]`); `model.video.preset` puts a preset's values under the keys given.

- `base: other.yaml` (relative to the file that names it; chains allowed): mappings merge key by key,
  the file's own keys win.
- Unknown keys, badly typed values and fields the command does not use (`Config.unused_keys`) are
  rejected with one line naming the dotted key and what is allowed, before any process group starts.
- The resolved config is written into the run folder (`save_config`); a saved config loads again.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pretrain.image_init import ImageInitError, check_fit, family_keys, read_image_model
from pretrain.model import IMAGE_LOSSES, ModelConfig
from pretrain.video_encoder import PRESETS, preset_values
from shards.loader import DataConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE_KEYS = ("video", "text", "embed_dim")  # model.* a pretrained checkpoint fixes (and fusion_layers)


class ConfigError(ValueError):
    """A config file, key or value is wrong; str() is one line naming the file or the dotted key and what is allowed."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def check_value(ok: bool, key: str, allowed: str) -> None:
    """Raise ConfigError("bad value for KEY: expected ALLOWED") unless ok."""
    if not ok:
        raise ConfigError(f"bad value for {key}: expected {allowed}")


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps in the whole run
    lr: float = 5e-4  # peak learning rate of the video encoder and projection heads
    text_lr: float = 5e-5  # peak learning rate of the pretrained text encoder
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 30  # linear warm-up, then the schedule
    # after warm-up: "cosine" or "linear" (LF-VILA's pretraining) decay to min_lr_ratio * lr, or "step" decay
    # (LF-VILA's downstream schedule: multiply the LR by decay_factor every decay_every steps; 0: never)
    schedule: Literal["cosine", "linear", "step"] = "cosine"
    min_lr_ratio: float = 0.05
    decay_every: int = 0
    decay_factor: float = 0.25
    grad_accum: int = 1  # gradient accumulation steps (written into the DeepSpeed config)
    grad_clip: float = 1.0  # max gradient norm (written into the DeepSpeed config); 0 disables
    seed: int = 0
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard records
    save_every: int = 100  # steps between checkpoints; the last step is always saved (0: never save, for benchmarks)
    keep_last: int = 3  # the newest checkpoints kept on disk (older ones are deleted) ...
    keep_every: int = 0  # ... except every step that is a multiple of this (0: none)
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run with an error
    exit_interval: int = 0  # save and exit when the step is a multiple of this (0: never), for time-limited jobs
    eval_at_end: bool = True  # evaluate on data.val_shards after training (pretraining: zero-shot retrieval)
    ds_config: str = "ds_configs/zero2.json"  # DeepSpeed engine JSON; batch sizes are filled in from here
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU or CPU with bf16 hardware, else fp32
    # recompute activations in the backward pass instead of keeping them (memory for ~1/3 more compute): 0 off,
    # 1 every block of the video encoder (the patch embedding counts as its first) and every BERT layer of the
    # text encoder, k every k-th, the first of each included
    activation_checkpointing: int = 0
    # seconds a rank waits in a collective (and at the start, for the others to join) before it stops with an
    # error: a lost node ends the job within this bound instead of torch's 30 min; keep it above the longest
    # time one rank works while the others wait (a checkpoint save, the evaluation, the first JIT op build)
    dist_timeout_s: int = 600

    def __post_init__(self):
        check_value(self.steps >= 1, "train.steps", "an integer >= 1")
        check_value(self.lr > 0, "train.lr", "a number > 0")
        check_value(self.text_lr >= 0, "train.text_lr", "a number >= 0")
        check_value(self.weight_decay >= 0, "train.weight_decay", "a number >= 0")
        check_value(0 <= self.beta1 < 1, "train.beta1", "a number in [0, 1)")
        check_value(0 <= self.beta2 < 1, "train.beta2", "a number in [0, 1)")
        check_value(0 <= self.warmup_steps, "train.warmup_steps", "an integer >= 0")
        check_value(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "a number in [0, 1]")
        check_value(self.decay_every >= 0, "train.decay_every", "an integer >= 0")
        check_value(0 < self.decay_factor <= 1, "train.decay_factor", "a number in (0, 1]")
        check_value(self.grad_accum >= 1, "train.grad_accum", "an integer >= 1")
        check_value(self.grad_clip >= 0, "train.grad_clip", "a number >= 0 (0 disables clipping)")
        check_value(self.log_every >= 1, "train.log_every", "an integer >= 1")
        check_value(self.save_every >= 0, "train.save_every", "an integer >= 0 (0: no checkpoints at all)")
        check_value(self.keep_last >= 1, "train.keep_last", "an integer >= 1")
        check_value(self.keep_every >= 0, "train.keep_every", "an integer >= 0")
        check_value(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "an integer >= 1")
        check_value(self.exit_interval >= 0, "train.exit_interval", "an integer >= 0")
        check_value(bool(self.ds_config), "train.ds_config", "a DeepSpeed JSON path")
        check_value(self.activation_checkpointing >= 0, "train.activation_checkpointing",
                    "an integer >= 0 (0: off, 1: every block, k: every k-th block)")
        check_value(self.dist_timeout_s >= 1, "train.dist_timeout_s", "an integer number of seconds >= 1")


@dataclass
class RunModelConfig(ModelConfig):
    """`model`: the architecture and objectives (pretrain.model.ModelConfig) and how the weights start."""
    # With model.init_from: load only the tensors whose names and shapes match, and list every missing,
    # unexpected or mismatched one in a warning. Default false: any of them stops the run (the parameters
    # of modules the config creates new, such as a stage-2 fusion stack or a task head, are expected).
    init_partial: bool = False


@dataclass
class Config:
    """Pretraining's config, and the base of every command's."""
    data: DataConfig = field(default_factory=DataConfig)
    model: RunModelConfig = field(default_factory=RunModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    COMMAND: typing.ClassVar[str] = "pretraining"
    # Whether `model.init_from` also gives the architecture (the model.* of the config saved beside it).
    INHERITS_ARCHITECTURE: typing.ClassVar[bool] = False

    def __post_init__(self):
        self.check_data_and_video()
        self.check_losses()

    @classmethod
    def unused_keys(cls, data: dict) -> dict[str, str]:
        """Dotted keys this command does not read (given the nested config `data`, raw or resolved),
        each with the reason; setting one is an error, and save_config leaves them out."""
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        train = data.get("train") if isinstance(data.get("train"), dict) else {}
        out = {}
        if not model.get("init_from"):
            out["model.init_partial"] = "without model.init_from there are no weights to load"
        schedule = train.get("schedule", TrainConfig.schedule)
        if schedule in ("cosine", "linear"):
            for key in ("decay_every", "decay_factor"):
                out[f"train.{key}"] = f"with train.schedule={schedule}; only train.schedule=step reads it"
        else:
            out["train.min_lr_ratio"] = "with train.schedule=step; only cosine and linear read it"
        return out

    def check_data_and_video(self) -> None:
        """Cross-field checks of what every command builds: the data and the encoders that read it. They hold for
        image batches too (one frame, one caption): HTWA's windows are clipped to the one frame, and the
        clip checks (local_stage, MTC's num_key / num_value) concern video batches, the only ones with clips."""
        v, d, text = self.model.video, self.data, self.model.text
        frames = d.num_clips * d.frames_per_clip
        check_value(frames <= v.max_frames, "data.num_clips * data.frames_per_clip",
               f"at most model.video.max_frames = {v.max_frames} (got {frames})")
        (h, w), p = d.hw, v.patch_size
        check_value(h % p == 0 and w % p == 0, "data.size",
               f"a height and width that are multiples of model.video.patch_size = {p} (got {h}x{w})")
        check_value(d.num_clips <= text.max_sentences, "data.num_clips",
               f"at most model.text.max_sentences = {text.max_sentences} (got {d.num_clips})")
        check_value(d.num_clips * d.max_words <= text.max_tokens, "data.num_clips * data.max_words",
               f"at most model.text.max_tokens = {text.max_tokens} (got {d.num_clips * d.max_words})")
        check_value(-1 <= v.graph_threshold <= 1, "model.video.graph_threshold", "a cosine similarity in [-1, 1]")
        check_value(v.depth_window >= 0, "model.video.depth_window", "an integer >= 0 (frames either side)")
        check_value(v.depth_grid >= 1, "model.video.depth_grid", "an integer >= 1")
        gh, gw = h // p, w // p  # the patch grid stage 0 sees
        for i, kind in enumerate(v.attention):  # HTWA windows must tile the (frames, gh, gw) each stage sees
            tw, sh, sw = min(v.temporal_windows[i], frames), min(v.spatial_window[0], gh), min(v.spatial_window[1], gw)
            if kind == "htwa":
                check_value(min(tw, sh, sw) >= 1 and frames % tw == 0 and gh % sh == 0 and gw % sw == 0,
                       f"model.video.temporal_windows[{i}] / spatial_window",
                       f"windows that tile stage {i}'s input: {frames} frames and a {gh}x{gw} patch grid "
                       f"(got {v.temporal_windows[i]} frames, {v.spatial_window} patches)")
            if v.downsample[i]:
                check_value(gh % 2 == 0 and gw % 2 == 0, f"model.video.downsample[{i}]",
                       f"false: stage {i}'s {gh}x{gw} patch grid has an odd side (data.size / patch_size, "
                       f"halved per downsampling)")
                gh, gw = gh // 2, gw // 2
        if v.clip_features == "local":
            for i in range(v.local_stage + 1):
                tw = v.temporal_windows[i]
                check_value(v.attention[i] == "htwa" and d.frames_per_clip % tw == 0, "model.video.local_stage",
                       f"a stage up to which every stage is 'htwa' with a temporal window dividing "
                       f"data.frames_per_clip ({d.frames_per_clip}), so clip features never mix clips "
                       f"(stage {i} is '{v.attention[i]}' with window {tw}); or model.video.clip_features=final")

    def check_losses(self) -> None:
        """Cross-field checks of pretraining's objectives."""
        v, d, loss = self.model.video, self.data, self.model.loss
        if loss.mtc_weight > 0:
            check_value(v.clip_stage() is not None, "model.loss.mtc_weight",
                   "0 with this video encoder: TESTA merges frames before the clip-feature stage, so there "
                   "are no clip features (or set model.video.clip_features / local_stage to an earlier stage)")
            for key in ("num_key", "num_value"):
                check_value(1 <= getattr(loss, key) <= d.num_clips, f"model.loss.{key}",
                       f"an integer in [1, data.num_clips = {d.num_clips}] (got {getattr(loss, key)})")
        check_value(loss.num_neg >= 0, "model.loss.num_neg", f"an integer >= 0 (got {loss.num_neg})")
        check_value(0 < loss.mlm_probability < 1, "model.loss.mlm_probability", "a number in (0, 1)")
        if loss.uses_fusion():
            check_value(d.batch_size >= 4, "data.batch_size",
                   "at least 4 with model.loss.mlm_weight or vtm_weight > 0 (video-text matching pairs 2 "
                   "negatives and 2 positives per rank)")
        # what the config says of each source's kind; a source whose kind only its index.json gives (media "") is
        # checked before launch (pretrain/prelaunch.py), where the shard sets are read
        self.check_image_sources([s.name for s in d.sources if s.media == "image"], "media: image")

    def check_image_sources(self, images: list[str], how: str) -> None:
        """model.loss.image_losses = [] refuses image batches: a ConfigError naming both fields when train sources
        `images` are image sets (`how`: what says so, e.g. "media: image" or "index.json says media image")."""
        check_value(not images or bool(self.model.loss.image_losses), "model.loss.image_losses",
                    f"a non-empty list of the losses image batches compute (among {', '.join(IMAGE_LOSSES)}): "
                    f"data.train_shards has image sources ({', '.join(images)}: {how}) and [] refuses image batches; "
                    f"set model.loss.image_losses (default {list(IMAGE_LOSSES)}) or remove those sources")


# ---- building dataclasses from plain dicts ---------------------------------------------------


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types; a check in a
    section's __post_init__ that fails is reported as a ConfigError naming the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"bad value for {prefix.rstrip('.') or 'the config'}: expected a mapping of keys, "
                          f"got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {path}{hint}; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a section's own check, in the same style ("bad value for KEY: ...")
        raise ConfigError(" ".join(str(e).split())) from None


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=path + ".")
    if origin is typing.Literal:
        allowed = list(typing.get_args(tp))
        if value not in allowed:
            raise ConfigError(f"bad value for {path}: expected one of {allowed}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):  # e.g. int | list[int]: the first alternative that fits
        errors = []
        for alternative in typing.get_args(tp):
            try:
                return _coerce(alternative, value, path)
            except ConfigError as e:
                errors.append((alternative, e))
        # a value of one alternative's shape (a list for list[...], a mapping for a section) is that alternative
        # gone wrong inside: its own error names the item and key (data.train_shards[1].wieght), not the union
        for alternative, e in errors:
            if _same_shape(alternative, value):
                raise e
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(f"bad value for {path}: expected {names}, got {value!r}")
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


def _same_shape(tp, value) -> bool:
    """Whether `value` has the outer shape of type `tp`: a list for list[...], a mapping for a dataclass."""
    if typing.get_origin(tp) is list:
        return isinstance(value, (list, tuple))
    return dataclasses.is_dataclass(tp) and isinstance(value, dict)


def _type_name(tp) -> str:
    """How an error names a type: str, list[int], list of {name, path, weight, media} (a dataclass's keys)."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return f"list of {_type_name(item)}" if dataclasses.is_dataclass(item) else f"list[{_type_name(item)}]"
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return tp.__name__ if isinstance(tp, type) else str(tp)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---- reading: base chains, overrides, presets, the pretrained architecture --------------------------


def merge(base: dict, top: dict) -> dict:
    """`top` over `base`, mappings merged key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, seen: tuple = ()) -> dict:
    """A config file with its `base:` chain merged in (the file's own keys win)."""
    path = Path(path)
    what = f"base file {path} (named by {seen[-1]})" if seen else f"config file {path}"
    if not path.exists():
        raise ConfigError(f"{what} does not exist")
    if path.is_dir():
        raise ConfigError(f"{what} is a folder, not a YAML file")
    if path.resolve() in [p.resolve() for p in seen]:
        raise ConfigError(f"{what}: `base:` loops back to {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{what} is not readable ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: the top level must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"bad value for base in {path}: expected a YAML path relative to the file, got {base!r}")
        data = merge(read_yaml(path.parent / base, seen + (path,)), data)
    return data


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"bad value for {key.strip()}: {raw!r} is not a YAML value") from None
    return key.strip().split("."), value


def set_dotted(data: dict, keys: list[str], value) -> None:
    """data[k0][k1]...[kn] = value, making sections as needed."""
    node = data
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"bad key {'.'.join(keys)}: {'.'.join(keys[:i + 1])} is a value, not a section")
    node[keys[-1]] = value


def dotted_keys(data: dict, prefix: str = "") -> list[str]:
    """The leaf keys of a nested dict, dotted (a list is one leaf)."""
    out = []
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out += dotted_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def pretrained_config_path(init: str | Path) -> Path | None:
    """The config saved beside a pretrained checkpoint: OUT.yaml for OUT.pt, RUN/config.yaml for a RUN
    folder or RUN/checkpoints."""
    p = Path(init)
    candidates = [p.with_suffix(".yaml")] if p.suffix == ".pt" else [p / "config.yaml", p.parent / "config.yaml"]
    return next((c for c in candidates if c.is_file()), None)


def inherit_architecture(data: dict, init: str | Path) -> Path | None:
    """Put the pretrained model's architecture (model.video, model.text, model.embed_dim, and
    model.fusion_layers when it has a fusion stack) into `data`, in place; returns the config file used."""
    path = pretrained_config_path(init)
    if path is None:
        return None
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"the config saved beside model.init_from, {path}, is not readable: {e}") from None
    saved = saved.get("model", {}) if isinstance(saved, dict) else {}
    model = data.setdefault("model", {})
    for key in ARCHITECTURE_KEYS:
        if key in saved:
            model[key] = saved[key]
    if isinstance(model.get("video"), dict):
        model["video"].pop("init_image", None)  # the weights come from init_from, not from the image model again
        model["video"].pop("drop_ratio", None)  # pretraining's token dropping; a finetune recipe sets its own
    if saved.get("fusion_layers"):
        model["fusion_layers"] = saved["fusion_layers"]
    return path


def _apply_preset(data: dict) -> None:
    """model.video.preset: the preset's values sit under the keys the YAML and overrides give."""
    model = data.get("model")
    video = model.get("video") if isinstance(model, dict) else None
    if isinstance(video, dict) and video.get("preset"):
        name = video["preset"]
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"bad value for model.video.preset: expected one of the known presets "
                              f"({', '.join(PRESETS)}), got {name!r}")
        model["video"] = {**preset_values(name), **video}


Override = typing.Union[str, tuple]


def load_config(path: str | Path | None = None, overrides: typing.Sequence[Override] = (), cls: type = Config):
    """Defaults < `base:` chain < YAML file < (cls.INHERITS_ARCHITECTURE) the architecture saved beside
    model.init_from < overrides, validated into `cls` (Config or a subclass). An override is
    "dotted.key=value" (value read as YAML) or a ("dotted.key", value) pair."""
    data = read_yaml(path) if path is not None else {}
    parsed = [parse_override(o) if isinstance(o, str) else (str(o[0]).split("."), o[1]) for o in overrides]
    given = copy.deepcopy(data)  # what the files and overrides set, for the unused-key check
    for keys, value in parsed:
        set_dotted(given, keys, value)
    unused = cls.unused_keys(given)
    for key in dotted_keys(given):
        if key in unused:
            raise ConfigError(f"unused config key {key}: {cls.COMMAND} does not use it ({unused[key]}); remove it")
        section = next((k for k in unused if k.startswith(key + ".")), None)
        if section is not None:  # a whole section set at once, e.g. model.loss={...}
            raise ConfigError(f"unused config key {section}: {cls.COMMAND} does not use it ({unused[section]}); "
                              "remove it")
    if cls.INHERITS_ARCHITECTURE:
        init = given.get("model", {}).get("init_from") if isinstance(given.get("model"), dict) else None
        if init and isinstance(init, str):
            inherit_architecture(data, resolve_path(init))
    for keys, value in parsed:
        set_dotted(data, keys, value)
    _apply_preset(data)
    _apply_image_family(data, given)
    cfg = from_dict(cls, data)
    if cfg.model.video.init_image:
        try:
            check_fit(cfg.model.video, read_image_model(resolve_path(cfg.model.video.init_image)))
        except ImageInitError as e:
            raise ConfigError(str(e)) from None
    return cfg


def _apply_image_family(data: dict, given: dict) -> None:
    """model.video.init_image: the keys the image family fixes (pixel mean and std, [CLS], position table,
    pre-norm, activation, LayerNorm epsilon) are set from its folder; a different value given is an error."""
    video = data.get("model", {}).get("video") if isinstance(data.get("model"), dict) else None
    folder = video.get("init_image") if isinstance(video, dict) else None
    if not folder or not isinstance(folder, str):
        return
    try:
        keys = family_keys(read_image_model(resolve_path(folder)))
    except ImageInitError as e:
        raise ConfigError(str(e)) from None
    given_video = (given.get("model") or {}).get("video") or {}
    for key, value in keys.items():
        if key in given_video and given_video[key] != value:
            raise ConfigError(f"bad value for model.video.{key}: the image model at model.video.init_image fixes it to "
                              f"{value!r} (got {given_video[key]!r}); remove the key")
        video[key] = value


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML, without the keys its command does not use (so it loads again)."""
    data = to_dict(cfg)
    for key in type(cfg).unused_keys(data):
        *parents, leaf = key.split(".")
        node = data
        for k in parents:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def resolve_path(p: str) -> str:
    """A relative path that exists from the working directory is taken from there (as the user typed it);
    any other relative path resolves against the repository root (the configs' data/..., runs/..., ds_configs/...);
    absolute paths and URLs stay as they are."""
    if "://" in p or Path(p).is_absolute():
        return p
    return str(Path(p).resolve()) if Path(p).exists() else str(REPO_ROOT / p)
