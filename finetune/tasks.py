"""The downstream tasks: what a training batch becomes, which head learns it, how a split is scored.

Each task has `head(backbone)`, `train_batch(batch, rng)` (loader batch + labels -> the tensors the
head reads), `evaluate(model)` (one pass over data.val_shards on every rank; the result is the
same dict on every rank) and `rows(result)` (the table lines). `TASKS` maps `task.name` to its class.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from finetune.config import FinetuneConfig
from finetune.decoder import CaptionDecoder
from finetune.heads import AnswerClassifier, MultipleChoiceHead, RetrievalHead, TaskModel, video_frames
from finetune.labels import SplitLabels, WordVocab, answer_vocab, blind_answers, constant_caption, normalise_answer
from pretrain.metrics import accuracy, caption_metrics, chance_metrics, recall_curve, retrieval_metrics
from pretrain import distributed as dist_utils
from pretrain.config import REPO_ROOT, resolve_path
from pretrain.model import VideoTextModel
from shards.loader import build_eval_loader, get_tokenizer

log = logging.getLogger("finetune")
EVAL_CHUNK = 64  # questions scored at once in evaluation


def split_labels(cfg: FinetuneConfig, split: str) -> SplitLabels:
    t = cfg.task
    style = "open" if t.name == "qa_open" else t.synthetic_qa
    shards, labels_file = (cfg.data.train_shards, t.train_labels) if split == "train" else (cfg.data.val_shards, t.val_labels)
    return SplitLabels(shards, resolve_path(labels_file) if labels_file else "", t.labels == "synthetic",
                       t.num_choices, style, str(REPO_ROOT), cfg.data.storage)


def eval_batches(cfg: FinetuneConfig):
    return build_eval_loader(cfg.data, cfg.model.text.resolved_path(), dist_utils.rank(), dist_utils.world_size(),
                             root=str(REPO_ROOT))


def merge_ranks(local: dict) -> dict:
    """Per-key results of every rank, merged (keys are unique across ranks)."""
    out = {}
    for part in dist_utils.all_gather_objects(local):
        out.update(part)
    return out


def require(meta: dict, field: str, key: str, task: str) -> list:
    if field not in meta:
        raise KeyError(f"sample {key} has no '{field}' for task {task}: put it in the shards' KEY.json, or give "
                       f"task.train_labels / task.val_labels (a finetune.adapters manifest), or task.labels=synthetic "
                       f"for the synthetic corpus")
    return meta[field]


class Task:
    cols: list[str] = []

    def __init__(self, cfg: FinetuneConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.train_labels, self.val_labels = split_labels(cfg, "train"), split_labels(cfg, "val")
        self.device = torch.device("cpu")  # where the model is; run() sets it to the accelerator's device

    def to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    @property
    def tokenizer(self):
        return get_tokenizer(self.cfg.model.text.resolved_path())

    def video_inputs(self, batch: dict) -> dict:
        out = {"video": self.to(batch["video"]), "num_clips": self.cfg.data.num_clips}
        if "depth" in batch:
            out["depth"] = self.to(batch["depth"])
        return out

    def tokens(self, texts: list[str], max_len: int, pairs: list[str] | None = None):
        t = self.tokenizer(texts, pairs, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        return self.to(t["input_ids"].long()), self.to(t["attention_mask"].long())


# ---- paragraph-to-video retrieval --------------------------------------------------------------


def paragraph_groups(sentences: list[str], M: int) -> list[str]:
    """All of a video's sentences, in order, joined into M consecutive groups (empty groups are "")."""
    return [" ".join(part) for part in np.array_split(np.array(sentences, dtype=object), M)]


class RetrievalTask(Task):
    """Paragraph-to-video retrieval with LF-VILA's VPC finetuning; also the zero-shot task."""
    cols = ["R1", "R5", "R10", "MedR", "MeanR"]

    def head(self, backbone: VideoTextModel):
        return RetrievalHead(self.cfg.model.loss.temperature)

    def query(self, batch: dict, labels: SplitLabels) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, L) paragraph tokens: the sampled clips' sentences, or every sentence in M groups."""
        if self.cfg.task.query == "clips":
            return self.to(batch["input_ids"]), self.to(batch["attention_mask"])
        M, L = self.cfg.data.num_clips, self.cfg.task.query_words
        groups = [g for meta in labels.of_batch(batch) for g in paragraph_groups([s["text"] for s in meta["sentences"]], M)]
        ids, mask = self.tokens(groups, L)
        return ids.view(-1, M, L), mask.view(-1, M, L)

    def train_batch(self, batch: dict, rng: np.random.Generator) -> dict:
        ids, mask = self.query(batch, self.train_labels)
        return self.video_inputs(batch) | {"input_ids": ids, "attention_mask": mask}

    @torch.no_grad()
    def evaluate(self, model: TaskModel) -> dict:
        backbone, local = model.backbone, {}
        for batch in eval_batches(self.cfg):
            vin = self.video_inputs(batch)
            _, v = backbone.encode_video(vin["video"], vin["num_clips"], vin.get("depth"))  # (b, E)
            _, p = backbone.encode_text(*self.query(batch, self.val_labels))  # (b, E)
            local.update({k: (vi.float().cpu(), pi.float().cpu()) for k, vi, pi in zip(batch["key"], v, p)})
        merged = merge_ranks(local)
        if not merged:
            raise RuntimeError(f"the evaluation split {self.cfg.data.val_shards} yielded no samples")
        keys = sorted(merged)
        video = torch.stack([merged[k][0] for k in keys])  # (N, E)
        paragraph = torch.stack([merged[k][1] for k in keys])  # (N, E)
        similarity = paragraph @ video.t()  # (N queries, N videos)
        curve_k = min(len(keys), 100)
        return {"num_videos": len(keys),
                "paragraph_to_video": retrieval_metrics(similarity),
                "video_to_paragraph": retrieval_metrics(similarity.t()),
                "chance": chance_metrics(len(keys)),
                "recall_curve": {"paragraph_to_video": recall_curve(similarity, curve_k),
                                 "video_to_paragraph": recall_curve(similarity.t(), curve_k)}}

    def rows(self, result: dict, name: str) -> dict:
        return {f"{name} paragraph->video": result["paragraph_to_video"],
                f"{name} video->paragraph": result["video_to_paragraph"]}

    def headline(self, result: dict) -> float:
        return result["paragraph_to_video"]["R1"]


# ---- multiple-choice QA (How2QA, VIOLIN) -------------------------------------------------------


class MultipleChoiceTask(Task):
    cols = ["accuracy", "chance"]

    def head(self, backbone: VideoTextModel):
        return MultipleChoiceHead(backbone.text.dim)

    def question_tokens(self, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C, L) tokens of "[CLS] question [SEP] choice [SEP]" for n questions with C choices each."""
        C = len(items[0]["choices"])
        if any(len(q["choices"]) != C for q in items):
            raise ValueError(f"questions with different numbers of choices in one batch: {[len(q['choices']) for q in items]}")
        L = self.cfg.task.question_words
        ids, mask = self.tokens([q["question"] for q in items for _ in range(C)], L,
                                [str(c) for q in items for c in q["choices"]])
        return ids.view(-1, C, L), mask.view(-1, C, L)

    def train_batch(self, batch: dict, rng: np.random.Generator) -> dict:
        items, labels = [], []
        for key, meta in zip(batch["key"], self.train_labels.of_batch(batch)):
            qa = require(meta, "qa", key, "qa_mc")
            items.append(qa[int(rng.integers(len(qa)))] if qa else None)
        template = next((q for q in items if q is not None), {"question": "", "choices": ["", ""], "answer": 0})
        labels = [int(q["answer"]) if q is not None else -100 for q in items]  # no question: no loss
        ids, mask = self.question_tokens([q if q is not None else template for q in items])
        return self.video_inputs(batch) | {"qa_ids": ids, "qa_mask": mask, "labels": self.to(torch.tensor(labels))}

    @torch.no_grad()
    def evaluate(self, model: TaskModel) -> dict:
        backbone, head, local = model.backbone, model.head, {}
        for batch in eval_batches(self.cfg):
            frames = video_frames(backbone, self.video_inputs(batch))  # (b, T', Dv)
            items = [(i, j, q) for i, (key, meta) in enumerate(zip(batch["key"], self.val_labels.of_batch(batch)))
                     for j, q in enumerate(require(meta, "qa", key, "qa_mc"))]
            for start in range(0, len(items), EVAL_CHUNK):
                chunk = items[start:start + EVAL_CHUNK]
                ids, mask = self.question_tokens([q for _, _, q in chunk])
                scores = head.scores(backbone, frames[[i for i, _, _ in chunk]], ids, mask)  # (n, C)
                for (i, j, q), pred in zip(chunk, scores.argmax(1).tolist()):
                    local[(batch["key"][i], j)] = (pred, int(q["answer"]), len(q["choices"]))
        merged = merge_ranks(local)
        preds, targets, choices = zip(*merged.values()) if merged else ((), (), ())
        return {"num_questions": len(merged), "accuracy": accuracy(list(preds), list(targets)),
                "chance": 100.0 * float(np.mean([1.0 / c for c in choices])) if choices else 0.0}

    def rows(self, result: dict, name: str) -> dict:
        return {name: {"accuracy": result["accuracy"], "chance": result["chance"]}}

    def headline(self, result: dict) -> float:
        return result["accuracy"]


# ---- open-ended QA (ActivityNet-QA) --------------------------------------------------------------


class OpenQATask(Task):
    """Classification over the `task.answer_vocab_size` most frequent train answers; every val
    question counts, so answers outside the vocabulary are wrong. Next to the accuracy: "majority" (the
    most frequent train answer for every question) and "blind" (each question's most frequent train
    answer: what a model reaches that reads the question and never the video, open QA's chance)."""
    cols = ["accuracy", "majority", "blind"]

    def __init__(self, cfg: FinetuneConfig, run_dir: Path):
        super().__init__(cfg, run_dir)
        qa = [q for key, meta in self.train_labels.all().items() for q in require(meta, "qa", key, "qa_open")]
        answers = [q["answer"] for q in qa]
        self.blind = blind_answers(qa)
        self.answers = answer_vocab(answers, cfg.task.answer_vocab_size)
        self.index = {a: i for i, a in enumerate(self.answers)}
        if dist_utils.rank() == 0:
            (run_dir / "answers.json").write_text(json.dumps(self.answers))
        log.info("answer vocabulary: %d answers (of %d distinct) cover %.1f%% of %d train questions", len(self.answers),
                 len(set(map(normalise_answer, answers))),
                 100.0 * sum(normalise_answer(a) in self.index for a in answers) / max(1, len(answers)), len(answers))

    def head(self, backbone: VideoTextModel):
        return AnswerClassifier(backbone.text.dim, len(self.answers), self.cfg.model.video.dims[-1])

    def train_batch(self, batch: dict, rng: np.random.Generator) -> dict:
        questions, labels = [], []
        for key, meta in zip(batch["key"], self.train_labels.of_batch(batch)):
            qa = require(meta, "qa", key, "qa_open")
            known = [q for q in qa if normalise_answer(q["answer"]) in self.index] or qa
            q = known[int(rng.integers(len(known)))] if known else {"question": "", "answer": ""}
            questions.append(q["question"])
            labels.append(self.index.get(normalise_answer(q["answer"]), -100))
        ids, mask = self.tokens(questions, self.cfg.task.question_words)
        return self.video_inputs(batch) | {"qa_ids": ids, "qa_mask": mask, "labels": self.to(torch.tensor(labels))}

    @torch.no_grad()
    def evaluate(self, model: TaskModel) -> dict:
        backbone, head, local = model.backbone, model.head, {}
        for batch in eval_batches(self.cfg):
            frames = video_frames(backbone, self.video_inputs(batch))  # (b, T', Dv)
            items = [(i, j, q) for i, (key, meta) in enumerate(zip(batch["key"], self.val_labels.of_batch(batch)))
                     for j, q in enumerate(require(meta, "qa", key, "qa_open"))]
            for start in range(0, len(items), EVAL_CHUNK):
                chunk = items[start:start + EVAL_CHUNK]
                ids, mask = self.tokens([q["question"] for _, _, q in chunk], self.cfg.task.question_words)
                logits = head.logits(backbone, frames[[i for i, _, _ in chunk]], ids, mask)  # (n, A)
                for (i, j, q), pred in zip(chunk, logits.argmax(1).tolist()):
                    blind = self.blind.get(normalise_answer(q["question"]), self.blind[""])
                    local[(batch["key"][i], j)] = (self.answers[pred], normalise_answer(q["answer"]), blind)
        merged = merge_ranks(local)
        preds, targets, blind = zip(*merged.values()) if merged else ((), (), ())
        return {"num_questions": len(merged), "accuracy": accuracy(list(preds), list(targets)),
                "majority": accuracy([self.answers[0]] * len(targets), list(targets)),
                "blind": accuracy(list(blind), list(targets)),
                "top_answers": dict(Counter(targets).most_common(10))}

    def rows(self, result: dict, name: str) -> dict:
        return {name: {k: result[k] for k in self.cols if k in result}}

    def headline(self, result: dict) -> float:
        return result["accuracy"]


# ---- captioning (MSVD, MSR-VTT; DAST) ------------------------------------------------------------


class CaptionTask(Task):
    cols = ["BLEU4", "CIDEr"]

    def __init__(self, cfg: FinetuneConfig, run_dir: Path):
        super().__init__(cfg, run_dir)
        captions = [c for meta in self.train_labels.all().values() for c in self.captions(meta)]
        self.vocab = WordVocab.build(captions, cfg.task.caption_min_count)
        self.constant = constant_caption(captions)  # the same caption for every video: captioning's chance
        if dist_utils.rank() == 0:
            (run_dir / "vocab.json").write_text(json.dumps(self.vocab.itos))
        log.info("caption vocabulary: %d words from %d train captions", len(self.vocab), len(captions))

    @staticmethod
    def captions(meta: dict) -> list[str]:
        return meta.get("captions") or [s["text"] for s in meta["sentences"]]

    def head(self, backbone: VideoTextModel):
        t, v = self.cfg.task, self.cfg.model.video
        return CaptionDecoder(len(self.vocab), v.dims[-1], t.decoder_dim, t.decoder_layers, t.decoder_heads,
                              t.caption_words, v.max_frames, v.patch_size, t.use_depth,
                              WordVocab.PAD, WordVocab.BOS, WordVocab.EOS)

    def train_batch(self, batch: dict, rng: np.random.Generator) -> dict:
        W = self.cfg.task.caption_words
        caption_in = torch.full((len(batch["key"]), W), WordVocab.PAD, dtype=torch.long)
        caption_out = torch.full((len(batch["key"]), W), -100, dtype=torch.long)
        for b, meta in enumerate(self.train_labels.of_batch(batch)):
            options = self.captions(meta)
            ids = self.vocab.encode(options[int(rng.integers(len(options)))], W)  # words + <eos>
            caption_in[b, : len(ids)] = torch.tensor([WordVocab.BOS] + ids[:-1])
            caption_out[b, : len(ids)] = torch.tensor(ids)
        return self.video_inputs(batch) | {"caption_in": self.to(caption_in), "caption_out": self.to(caption_out)}

    @torch.no_grad()
    def evaluate(self, model: TaskModel) -> dict:
        backbone, head, local = model.backbone, model.head, {}
        for batch in eval_batches(self.cfg):
            video, depth = head.memory(backbone, self.video_inputs(batch))
            generated = head.generate(video, depth, self.cfg.task.beam_size)
            for key, meta, ids in zip(batch["key"], self.val_labels.of_batch(batch), generated):
                local[key] = (self.vocab.decode(ids), self.captions(meta))
        merged = merge_ranks(local)
        if not merged:
            raise RuntimeError(f"the evaluation split {self.cfg.data.val_shards} yielded no samples")
        predictions = {k: p for k, (p, _) in merged.items()}
        references = {k: r for k, (_, r) in merged.items()}
        examples = {k: {"prediction": predictions[k], "references": references[k][:3]} for k in sorted(merged)[:5]}
        # chance: the scores of one constant caption (the most frequent train word at each position) for every video
        chance = caption_metrics({k: self.constant for k in merged}, references)
        # "shuffled": the model's own captions scored against the next video's references (keys sorted, rotated by
        # one). A decoder that learned the captions' language and ignores the video scores as well here as on the
        # right videos (and can beat the constant caption, measured); what "after" has above it comes from the video
        keys = sorted(merged)
        shuffled = caption_metrics(predictions, {k: references[keys[(i + 1) % len(keys)]] for i, k in enumerate(keys)})
        distinct = len(set(predictions.values()))
        return {"num_videos": len(merged), **caption_metrics(predictions, references), "examples": examples,
                "chance": chance, "constant_caption": self.constant, "shuffled": shuffled,
                "distinct_captions": distinct}

    def rows(self, result: dict, name: str) -> dict:
        return {name: {"BLEU4": result["BLEU4"], "CIDEr": result["CIDEr"]}}

    def headline(self, result: dict) -> float:
        return result["CIDEr"]


TASKS = {"retrieval": RetrievalTask, "zeroshot": RetrievalTask, "qa_mc": MultipleChoiceTask,
         "qa_open": OpenQATask, "caption": CaptionTask}
