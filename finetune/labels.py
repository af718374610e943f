"""Task labels of each sample: its KEY.json, a labels manifest joined on the sample key, or the
synthetic corpus's sentences.

Label fields (in KEY.json, or in the records of a `finetune.adapters` manifest):
    "qa": [{"question": str, "choices": [str, ...], "answer": int}]   multiple choice (How2QA, VIOLIN)
    "qa": [{"question": str, "answer": str}]                          open-ended (ActivityNet-QA)
    "captions": [str, ...]                                             captioning (MSVD, MSR-VTT)
A sample without "captions" is captioned by its sentences.

Until the loader hands each sample's parsed KEY.json over as batch["meta"], `SplitLabels` reads
the JSON members of the split's shards once (local tars are read by seeking over the videos;
remote shards are streamed whole) and looks samples up by key.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import numpy as np

from pretrain.metrics import words  # the tokeniser the caption metrics use
from shards.format import read_tar, resolve_shards, sample_key
from shards.storage import Storage
from shards.synth import COLOURS, SHAPES

SYNTH_SENTENCE = re.compile(r"^an? (\w+) (\w+) moves (\w+) (in front of|behind) an? (\w+) (\w+)$")
DIRECTIONS = ("left", "right", "up", "down")


def read_split_meta(spec: str, root: str | None, storage: Storage = Storage()) -> dict[str, dict]:
    """Every sample's KEY.json in a split, by key."""
    out = {}
    for url in resolve_shards(spec, root, storage):
        for raw in read_tar(url, storage, members=("json",)):
            if "json" in raw:
                try:
                    out[raw["__key__"]] = json.loads(raw["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue  # the loader skips and counts it too
    return out


def read_labels_manifest(path: str) -> dict[str, dict]:
    """A JSONL manifest -> {sample key: record}; the key is the shards' key for the record's id."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                record = json.loads(line)
                if "id" not in record:
                    raise ValueError(f"{path} line {n}: a labels record needs an 'id'")
                out[sample_key(str(record["id"]))] = record
    return out


def key_rng(key: str, *words: int) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([digest, *words])


# ---- the synthetic corpus --------------------------------------------------------------------


def parse_synthetic(text: str) -> dict:
    """"a red circle moves left in front of a blue square" -> its parts."""
    m = SYNTH_SENTENCE.match(text.strip())
    if m is None:
        raise ValueError(f"not a synthetic-corpus sentence: {text!r}")
    colour, shape, direction, where, still_colour, still_shape = m.groups()
    return {"mover": f"{colour} {shape}", "colour": colour, "shape": shape, "direction": direction,
            "where": where, "still": f"{still_colour} {still_shape}"}


def synthetic_labels(key: str, meta: dict, num_choices: int, style: str) -> dict:
    """Task labels derived from a synthetic video's event sentences (deterministic per key).
    "qa" depends on `style`:
    - "question" (How2QA-like multiple choice): "what moves left in front of the blue square?" with
      the mover as the answer; distractors are colour-shape pairs whose colour is nowhere in the video
      first, then pairs of the video's other colours (never the mover's or the still shape's). The text
      alone cannot tell (every choice differs from the still shape in colour, as the mover does); the
      frames can, by colour, at any resolution the loader samples.
    - "statement" (VIOLIN-like): each event's sentence (true) and a copy with the mover's colour or
      direction changed (false), choices ["true", "false"].
    - "open" (ActivityNet-QA-like): "which way does the red circle move?" -> a direction; "what
      colour is the circle that moves left?" -> a colour (only where the answer is unique in the video);
      "is there a red shape?" -> yes / no (one of each per video): the first two need the motion
      and the shapes, the third the colours matched against the question's (measured on the 1-event debug
      corpus from a retrieval-finetuned backbone, 300 steps: the first two learn, the third stays at 50%).
    "captions" are the event sentences.
    """
    events = [parse_synthetic(s["text"]) for s in meta["sentences"]]
    sentences = [s["text"] for s in meta["sentences"]]
    makers = {"question": _multiple_choice, "statement": _statements, "open": _open_questions}
    if style not in makers:
        raise ValueError(f"unknown synthetic QA style {style!r}; allowed: {', '.join(makers)}")
    return {"qa": makers[style](events, sentences, num_choices, key_rng(key, 7)), "captions": sentences}


def _multiple_choice(events, sentences, num_choices, rng) -> list[dict]:
    seen = {c for e in events for c in (e["colour"], e["still"].split()[0])}
    qa = []
    for e in events:
        question = f"what moves {e['direction']} {e['where']} the {e['still']}?"
        own = {e["colour"], e["still"].split()[0]}
        absent = [f"{c} {s}" for c in COLOURS if c not in seen for s in SHAPES]
        other = [f"{c} {s}" for c in sorted(seen - own) for s in SHAPES]
        distractors = []
        for pool in (absent, other):  # one pair per colour, absent colours first
            for d in (str(d) for d in rng.permutation(pool)):
                if len(distractors) < num_choices - 1 and d.split()[0] not in {x.split()[0] for x in distractors}:
                    distractors.append(d)
        spare = [f"{c} {s}" for c in COLOURS for s in SHAPES if c not in own and f"{c} {s}" not in distractors]
        distractors += [str(d) for d in rng.permutation(spare)][: num_choices - 1 - len(distractors)]  # > 7 choices
        choices = [e["mover"]] + distractors
        order = [int(j) for j in rng.permutation(len(choices))]
        qa.append({"question": question, "choices": [choices[j] for j in order], "answer": order.index(0)})
    return qa


def _statements(events, sentences, num_choices, rng) -> list[dict]:
    qa = []
    for e, sentence in zip(events, sentences):
        if rng.random() < 0.5:
            colour = str(rng.choice([c for c in COLOURS if c != e["colour"]]))
            fake = sentence.replace(f" {e['colour']} ", f" {colour} ", 1)
        else:
            direction = str(rng.choice([d for d in DIRECTIONS if d != e["direction"]]))
            fake = sentence.replace(f" moves {e['direction']} ", f" moves {direction} ", 1)
        qa += [{"question": sentence, "choices": ["true", "false"], "answer": 0},
               {"question": fake, "choices": ["true", "false"], "answer": 1}]
    return qa


def _open_questions(events, sentences, num_choices, rng) -> list[dict]:
    movers = Counter(e["mover"] for e in events)
    shape_dirs = Counter((e["shape"], e["direction"]) for e in events)
    qa = []
    for e in events:
        if movers[e["mover"]] == 1:
            qa.append({"question": f"which way does the {e['mover']} move?", "answer": e["direction"]})
        if shape_dirs[(e["shape"], e["direction"])] == 1:
            qa.append({"question": f"what colour is the {e['shape']} that moves {e['direction']}?", "answer": e["colour"]})
    # one "yes" and one "no" question about a colour being in the video at all
    seen = sorted({c for e in events for c in (e["colour"], e["still"].split()[0])})
    absent = [c for c in COLOURS if c not in seen]
    n = min(1, len(seen), len(absent))
    for colours, answer in ((seen, "yes"), (absent, "no")):
        qa += [{"question": f"is there {'an' if c[0] in 'aeiou' else 'a'} {c} shape?", "answer": answer}
               for c in map(str, rng.permutation(colours)[:n])]
    return qa


# ---- labels of a split -------------------------------------------------------------------------


class SplitLabels:
    """Label lookup for one split: batch["meta"] when the loader provides it, else the shards' JSON;
    then the labels manifest's fields by key; then, for synthetic labels, the derived fields."""

    def __init__(self, shards: str, labels_file: str, synthetic: bool, num_choices: int, style: str,
                 root: str | None, storage: Storage = Storage()):
        self.shards, self.root, self.storage = shards, root, storage
        self.extra = read_labels_manifest(labels_file) if labels_file else {}
        self.synthetic, self.num_choices, self.style = synthetic, num_choices, style
        self._index: dict[str, dict] | None = None

    def index(self) -> dict[str, dict]:
        if self._index is None:
            self._index = read_split_meta(self.shards, self.root, self.storage)
        return self._index

    def complete(self, key: str, meta: dict) -> dict:
        meta = {**meta, **{k: v for k, v in self.extra.get(key, {}).items() if k in ("qa", "captions")}}
        if self.synthetic:
            meta = {**meta, **synthetic_labels(key, meta, self.num_choices, self.style)}
        return meta

    def of_batch(self, batch: dict) -> list[dict]:
        metas = batch.get("meta") or [self.index()[k] for k in batch["key"]]
        return [self.complete(k, m) for k, m in zip(batch["key"], metas)]

    def all(self) -> dict[str, dict]:
        """Every sample of the split (reads the shards' JSON once): for building vocabularies."""
        return {k: self.complete(k, m) for k, m in self.index().items()}


# ---- vocabularies --------------------------------------------------------------------------------

def answer_vocab(answers: list[str], size: int) -> list[str]:
    """The `size` most frequent answers (normalised), most frequent first, ties alphabetical."""
    counts = Counter(normalise_answer(a) for a in answers)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def normalise_answer(answer: str) -> str:
    return " ".join(words(answer))


def blind_answers(qa: list[dict]) -> dict[str, str]:
    """The question-only baseline of open QA: each train question's most frequent (normalised) answer,
    ties alphabetical, and "" (the global majority) under the empty key. A model that reads the question
    and never the video can reach its accuracy, so it is open QA's chance."""
    by_question: dict[str, Counter] = {"": Counter()}
    for q in qa:
        answer = normalise_answer(q["answer"])
        by_question.setdefault(normalise_answer(q["question"]), Counter())[answer] += 1
        by_question[""][answer] += 1
    return {question: min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else ""
            for question, counts in by_question.items()}


def constant_caption(captions: list[str]) -> str:
    """The trivial captioner's output for every video: among the train captions of the most frequent length
    (in words), the most frequent word at each position (ties alphabetical). Scoring it gives captioning's
    chance: what a decoder reaches that learns the captions' language and never looks at the video."""
    tokenised = [words(c) for c in captions]
    if not tokenised:
        return ""
    length = min(Counter(map(len, tokenised)).items(), key=lambda kv: (-kv[1], kv[0]))[0]
    same = [t for t in tokenised if len(t) == length]
    return " ".join(min(Counter(t[i] for t in same).items(), key=lambda kv: (-kv[1], kv[0]))[0] for i in range(length))


class WordVocab:
    """Caption words: <pad> 0, <bos> 1, <eos> 2, <unk> 3, then train words by frequency."""
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    PAD, BOS, EOS, UNK = range(4)

    def __init__(self, tokens: list[str]):
        self.itos = list(tokens)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: list[str], min_count: int) -> "WordVocab":
        counts = Counter(w for c in captions for w in words(c))
        kept = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
        return cls(list(cls.SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int) -> list[int]:
        """Word ids + <eos>, at most max_len in all."""
        return [self.stoi.get(w, self.UNK) for w in words(text)][: max_len - 1] + [self.EOS]

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == self.EOS:
                break
            if i not in (self.PAD, self.BOS):
                out.append(self.itos[i])
        return " ".join(out)
