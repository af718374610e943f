"""Finetuning configuration: the pretraining dataclasses (data, model, train) plus a `task` section.

Precedence: dataclass defaults < the `base:` file(s) < the YAML file < the pretrained checkpoint's
architecture (with `--init` / `model.init_from`) < dotted command-line overrides. Unknown keys and
bad values are rejected by `pretrain.config.from_dict`, naming the key.

- `base: other.yaml` (relative to the file): a recipe's `*_debug` variant is its full recipe plus
  the few keys that shrink it to synthetic data on a CPU; mappings merge key by key.
- With a pretrained checkpoint, `model.video`, `model.text`, `model.embed_dim` (and
  `model.fusion_layers` when the checkpoint has a fusion stack) come from the config saved beside
  it (`OUT.yaml` next to an exported `OUT.pt`, or `RUN/config.yaml` above `RUN/checkpoints`),
  because weights only load into the architecture they were trained with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import yaml

from pretrain.config import ConfigError, TrainConfig, from_dict, parse_override, resolve_path, set_dotted, to_dict
from pretrain.model import ModelConfig
from pretrain.video_encoder import preset_values
from shards.loader import DataConfig

TaskName = Literal["retrieval", "qa_mc", "qa_open", "caption", "zeroshot"]
ARCHITECTURE_KEYS = ("video", "text", "embed_dim")


def _check(ok: bool, key: str, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"bad value for {key}: expected {allowed}")


@dataclass
class TaskConfig:
    name: TaskName = "retrieval"  # what to train and evaluate; `run.py --task` sets it
    # Where labels come from: "meta" = fields of each sample's KEY.json (or of the train_labels /
    # val_labels manifests joined on the sample key); "synthetic" = derived from the synthetic
    # corpus's sentences (QA about the moving shapes, captions = the event sentences).
    labels: Literal["meta", "synthetic"] = "meta"
    train_labels: str = ""  # JSONL manifest (finetune.adapters output) whose records carry qa / captions
    val_labels: str = ""
    # retrieval: the paragraph query. "clips": the M sentences of the sampled clips (as in
    # pretraining); "all": every sentence of the video, in time order, joined into M groups.
    query: Literal["clips", "all"] = "all"
    query_words: int = 32  # tokens per sentence group of an "all" query
    question_words: int = 40  # tokens of question (+ choice) texts
    num_choices: int = 4  # synthetic multiple choice ("question" style): choices per question
    # synthetic multiple choice: "question" (How2QA-like: which shape did it) or "statement"
    # (VIOLIN-like: is this sentence about the video true or false)
    synthetic_qa: Literal["question", "statement"] = "question"
    answer_vocab_size: int = 1000  # open-ended QA: the most frequent train answers are the classes
    caption_words: int = 20  # caption tokens (words + <eos>) in training and decoding
    caption_min_count: int = 1  # words seen fewer times in train captions become <unk>
    decoder_layers: int = 2  # caption decoder (DAST's task)
    decoder_dim: int = 256
    decoder_heads: int = 4
    use_depth: bool = True  # caption decoder attends to depth tokens when the shards carry depth
    beam_size: int = 1  # 1 = greedy decoding
    eval_before: bool = True  # evaluate the starting point (zero-shot / untrained head) before training
    head_lr: float = 1e-3  # learning rate of the new task head (fusion stack included when freshly made)

    def __post_init__(self):
        for name in ("query_words", "question_words", "caption_words", "num_choices", "answer_vocab_size",
                     "caption_min_count", "decoder_layers", "decoder_dim", "decoder_heads", "beam_size"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"task.{name}", "an integer >= 1")
        _check(self.num_choices >= 2, "task.num_choices", "an integer >= 2")
        _check(self.decoder_dim % self.decoder_heads == 0, "task.decoder_dim",
               f"a multiple of task.decoder_heads ({self.decoder_heads})")
        _check(self.head_lr > 0, "task.head_lr", "a number > 0")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    # LF-VILA's downstream schedule is a step decay (x0.25 every 5 epochs); "cosine" is pretraining's.
    schedule: Literal["cosine", "step"] = "cosine"
    decay_every: int = 0  # "step": multiply the LR by decay_factor every this many steps (0: never)
    decay_factor: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        _check(self.decay_every >= 0, "train.decay_every", "an integer >= 0")
        _check(0 < self.decay_factor <= 1, "train.decay_factor", "a number in (0, 1]")


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self):
        d, v, t = self.data, self.model.video, self.task
        frames = d.num_clips * d.frames_per_clip
        _check(frames <= v.max_frames, "data.num_clips * data.frames_per_clip",
               f"at most model.video.max_frames = {v.max_frames} (got {frames})")
        _check(d.size % v.patch_size == 0, "data.size", f"a multiple of model.video.patch_size = {v.patch_size}")
        if t.name in ("qa_mc", "qa_open"):
            _check(self.model.fusion_layers >= 1, "model.fusion_layers",
                   f">= 1 for task {t.name}: answers are scored through the cross-modal fusion stack")
        if t.name in ("qa_mc", "qa_open", "caption") or (t.name in ("retrieval", "zeroshot") and t.query == "all"):
            _check(d.hflip == 0, "data.hflip", f"0 for task {t.name}: labels read from KEY.json are not mirrored "
                   "with the frames (only the loader's clip sentences are)")
        _check(d.num_clips <= self.model.text.max_sentences, "data.num_clips",
               f"at most model.text.max_sentences = {self.model.text.max_sentences}")


# ---- loading ---------------------------------------------------------------------------------


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, seen: tuple = ()) -> dict:
    """A config file with its `base:` chain merged in (the file's own keys win)."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"{path}: `base:` loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base:
        data = _merge(read_yaml(path.parent / base, seen + (path,)), data)
    return data


def pretrained_config_path(init: str) -> Path | None:
    """The config saved beside a pretrained checkpoint: OUT.yaml for OUT.pt, RUN/config.yaml for RUN/checkpoints."""
    p = Path(init)
    candidates = [p.with_suffix(".yaml")] if p.suffix == ".pt" else [p / "config.yaml", p.parent / "config.yaml"]
    return next((c for c in candidates if c.is_file()), None)


def inherit_architecture(data: dict, init: str) -> Path | None:
    """Put the pretrained model's architecture into `data` (in place); returns the config file used."""
    path = pretrained_config_path(init)
    if path is None:
        return None
    saved = (yaml.safe_load(path.read_text()) or {}).get("model", {})
    model = data.setdefault("model", {})
    for key in ARCHITECTURE_KEYS:
        if key in saved:
            model[key] = saved[key]
    if saved.get("fusion_layers"):
        model["fusion_layers"] = saved["fusion_layers"]
    return path


def load_finetune_config(path: str | Path | None, overrides: Sequence[str] = (), task: str | None = None,
                         init: str | None = None) -> FinetuneConfig:
    data = read_yaml(path) if path is not None else {}
    parsed = [parse_override(item) for item in overrides]
    if task is not None:
        parsed.append((["task", "name"], task))
    if init is not None:
        parsed.append((["model", "init_from"], init))
    init_from = next((v for k, v in parsed if k == ["model", "init_from"]), data.get("model", {}).get("init_from"))
    if init_from:
        inherit_architecture(data, resolve_path(str(init_from)))
    for keys, value in parsed:
        set_dotted(data, keys, value)
    video = data.get("model", {}).get("video", {})
    if isinstance(video, dict) and video.get("preset"):
        try:
            data["model"]["video"] = {**preset_values(video["preset"]), **video}
        except ValueError as e:
            raise ConfigError(str(e)) from e
    try:
        return from_dict(FinetuneConfig, data)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e


def save_finetune_config(cfg: FinetuneConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
