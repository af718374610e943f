"""Finetuning configuration: `FinetuneConfig` extends pretraining's `Config` (data, model, train) with a
`task` section, and is loaded and saved by pretraining's one loader
(`pretrain.config.load_config(path, overrides, FinetuneConfig)`, `save_config`).

Precedence: dataclass defaults < the `base:` file(s) < the YAML file < the pretrained checkpoint's
architecture (with `--init` / `model.init_from`) < dotted command-line overrides.

- `base: other.yaml` (relative to the file): a recipe's `*_debug` variant is its full recipe plus
  the few keys that shrink it to synthetic data on a CPU; mappings merge key by key.
- With a pretrained checkpoint, `model.video`, `model.text`, `model.embed_dim` (and
  `model.fusion_layers` when the checkpoint has a fusion stack) come from the config saved beside
  it (`OUT.yaml` next to an exported `OUT.pt`, or `RUN/config.yaml` above `RUN/checkpoints`),
  because weights only load into the architecture they were trained with.
- Every cross-field check of pretraining's config about what finetuning builds (the video encoder's
  windows and grids, frames and data sizes) runs here too; of `model.loss.*` finetuning reads only
  `temperature` (the retrieval head's), so any other `model.loss` key is rejected when set.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from pretrain.config import Config, TrainConfig, check_value as _check
from pretrain.model import LossConfig

TaskName = Literal["retrieval", "qa_mc", "qa_open", "caption", "zeroshot"]
# task.* keys read by some tasks only; the others reject them when set
TASK_KEYS = {
    **{key: ("retrieval", "zeroshot") for key in ("query", "query_words")},
    "question_words": ("qa_mc", "qa_open"),
    **{key: ("qa_mc",) for key in ("num_choices", "synthetic_qa")},
    "answer_vocab_size": ("qa_open",),
    **{key: ("caption",) for key in ("caption_words", "caption_min_count", "decoder_layers", "decoder_dim",
                                     "decoder_heads", "use_depth", "beam_size")},
}
LOSS_KEYS_USED = ("temperature",)  # of model.loss.*, what finetuning reads (RetrievalHead's temperature)


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
            _check(getattr(self, name) >= 1, f"task.{name}", "an integer >= 1")
        _check(self.num_choices >= 2, "task.num_choices", "an integer >= 2")
        _check(self.decoder_dim % self.decoder_heads == 0, "task.decoder_dim",
               f"a multiple of task.decoder_heads ({self.decoder_heads})")
        _check(self.head_lr > 0, "task.head_lr", "a number > 0")


@dataclass
class FinetuneConfig(Config):
    task: TaskConfig = field(default_factory=TaskConfig)

    COMMAND: typing.ClassVar[str] = "finetuning"
    INHERITS_ARCHITECTURE: typing.ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()  # the data and video encoder checks of every command
        d, t = self.data, self.task
        if t.name in ("qa_mc", "qa_open"):
            _check(self.model.fusion_layers >= 1, "model.fusion_layers",
                   f">= 1 for task {t.name}: answers are scored through the cross-modal fusion stack")
        if t.name in ("qa_mc", "qa_open", "caption") or (t.name in ("retrieval", "zeroshot") and t.query == "all"):
            _check(d.hflip == 0, "data.hflip", f"0 for task {t.name}: labels read from KEY.json are not mirrored "
                   "with the frames (only the loader's clip sentences are)")
        if t.name in ("retrieval", "zeroshot") and t.query == "all":
            _check(d.num_clips * t.query_words <= self.model.text.max_tokens, "data.num_clips * task.query_words",
                   f"at most model.text.max_tokens = {self.model.text.max_tokens} "
                   f"(got {d.num_clips * t.query_words})")

    def check_losses(self) -> None:
        """Pretraining's objectives do not run here (model.loss.temperature > 0 is LossConfig's own check)."""

    @classmethod
    def unused_keys(cls, data: dict) -> dict[str, str]:
        out = super().unused_keys(data) | {
            f"model.loss.{f.name}": "of model.loss.* it reads only temperature, the retrieval head's"
            for f in dataclasses.fields(LossConfig) if f.name not in LOSS_KEYS_USED}
        task = data.get("task") if isinstance(data.get("task"), dict) else {}
        name = task.get("name", TaskConfig.name)
        for key, tasks in TASK_KEYS.items():
            if name not in tasks:
                out[f"task.{key}"] = f"task {name} does not read it; {', '.join(tasks)} do"
        if name == "zeroshot":  # evaluates a checkpoint: nothing trains
            out |= {f"train.{f.name}": "the zeroshot task trains nothing" for f in dataclasses.fields(TrainConfig)
                    if f.name != "seed"}
            out |= {key: "the zeroshot task trains nothing" for key in
                    ("data.train_shards", "task.head_lr", "task.eval_before", "task.train_labels")}
        return out
