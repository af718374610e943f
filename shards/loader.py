"""Streaming loaders over WebDataset tar shards: an exactly resumable train stream and an eval pass.

Train stream of rank r, logical worker w of W, for epoch e = 0, 1, 2, ...:
    shards shuffled by (seed, e), the same on every rank -> [r::world_size] -> [w::W]
    -> tar members (mp4, json, depth.npz) -> shuffle buffer of raw bytes seeded by (seed, e, r, w)
    -> decode (late) -> batches of `batch_size` good samples, all from one worker.
A worker's position is (epoch, raw samples consumed after the shuffle buffer). To resume, each
worker re-reads raw samples up to its position without decoding them, and DataLoader worker i
plays logical worker (i + next_worker) % W, because torch always asks worker 0 first.

Bad input (truncated tars, broken MP4s, missing members, bad JSON, too few sentences) is skipped
and counted per reason; a worker whose whole epoch is unusable raises instead of spinning.

Letters: B batch, M clips (sentences) per video, F frames per clip, T = M*F, S size, L tokens.
"""

import functools
import hashlib
import io
import json
import logging
import math
import os
import tarfile
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as Fn
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.video import ShortVideoError, decode_frames

log = logging.getLogger("shards")

MEMBERS = ("mp4", "json", "depth.npz")  # the only tar members read
SHARD_ORDER, SHUFFLE, SAMPLE = 1, 2, 3  # first seed word of each random stream, so streams never collide


@dataclass
class DataConfig:
    train_shards: str = "data/synth/train"  # split folder with index.json, or "dir/synth-{000000..000015}.tar"
    val_shards: str = "data/synth/val"
    num_clips: int = 4  # M: clips per video, one per sentence
    frames_per_clip: int = 4  # F
    size: int = 64  # S: frames are resized to S x S
    max_words: int = 16  # L: tokens per sentence, [CLS] and [SEP] included, padded
    batch_size: int = 8  # B, per rank
    num_workers: int = 1  # DataLoader worker processes per rank (0 = in the main process)
    shuffle_buffer: int = 64  # raw samples held for shuffling (1 = no shuffling)
    seed: int = 0

    def __post_init__(self):
        for name in ("num_clips", "frames_per_clip", "size", "batch_size", "shuffle_buffer"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("max_words", self.max_words, low=3)  # [CLS], one token, [SEP]
        _check_int("num_workers", self.num_workers, low=0)
        _check_int("seed", self.seed, low=0)
        for name in ("train_shards", "val_shards"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty path or brace pattern, got {getattr(self, name)!r}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"DataConfig.{name} must be an int >= {low}, got {value!r}")


def resolve_shards(spec: str, root: str | None = None) -> list[str]:
    """A split folder (its index.json lists the shards) or a brace pattern -> existing tar paths."""
    path = spec if root is None or os.path.isabs(spec) else os.path.join(root, spec)
    if os.path.isdir(path):
        index = os.path.join(path, "index.json")
        if not os.path.isfile(index):
            raise FileNotFoundError(f"shard folder {path} has no index.json "
                                    "(it is written last: is the split complete?)")
        with open(index) as f:
            urls = [os.path.join(path, name) for name in json.load(f)["shards"]]
    else:
        urls = list(braceexpand(path))
    if not urls:
        raise ValueError(f"no shards in {spec!r} (resolved to {path})")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {spec!r} do not exist, "
                                f"e.g. {missing[0]}")
    return urls


# ---- raw stages: tar members as bytes, never decoded ----------------------------------------


def read_tar(url: str) -> Iterator[dict]:
    """Raw samples {"__key__", "__url__", ext: bytes} of one tar, grouped by key, MEMBERS only.

    A read error (truncated or garbage tar) ends the tar with one {"__error__": "bad_tar"} item,
    so the error is counted where it occurs in the stream, like any bad sample.
    """
    sample = None
    try:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if ext in MEMBERS:
                    sample[ext] = tf.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        key = sample["__key__"] if sample else os.path.basename(url)
        yield {"__key__": key, "__url__": url, "__error__": "bad_tar", "__detail__": repr(e)}
        return
    if sample is not None:
        yield sample


def _split_name(name: str) -> tuple[str, str]:
    """"dir/synth_000042.depth.npz" -> ("dir/synth_000042", "depth.npz"): keys end at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def shuffle_buffer(items: Iterator, rng: np.random.Generator, size: int) -> Iterator:
    """Hold up to `size` items; once full, emit a random one per new item; drain at the end."""
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield _pop_random(buf, rng)
    while buf:
        yield _pop_random(buf, rng)


def _pop_random(buf: list, rng: np.random.Generator):
    i = int(rng.integers(len(buf)))
    buf[i], buf[-1] = buf[-1], buf[i]
    return buf.pop()


def epoch_shards(shards: list[str], seed: int, epoch: int) -> list[str]:
    """This epoch's shard order, identical on every rank."""
    order = np.random.default_rng([SHARD_ORDER, seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


def train_source(shards: list[str], seed: int, rank: int, world_size: int, worker: int, num_workers: int,
                 buffer: int, start: tuple[int, int]) -> Iterator[tuple[int, int, dict]]:
    """Endless (epoch, consumed, raw) of one logical worker, beginning after position `start`."""
    epoch, skip = start
    while True:
        mine = epoch_shards(shards, seed, epoch)[rank::world_size][worker::num_workers]
        rng = np.random.default_rng([SHUFFLE, seed, epoch, rank, worker])
        consumed = 0
        for raw in shuffle_buffer((s for url in mine for s in read_tar(url)), rng, buffer):
            consumed += 1
            if consumed > skip:  # the first `skip` were handed out before the resume
                yield epoch, consumed, raw
        if consumed == 0:
            raise RuntimeError(f"rank {rank} worker {worker}: epoch {epoch} read no sample from {mine}")
        if consumed < skip:
            raise RuntimeError(f"rank {rank} worker {worker}: epoch {epoch} has {consumed} samples in {mine}, "
                               f"but the resume position is {skip} (did the shards change?)")
        epoch, skip = epoch + 1, 0


def eval_source(shards: list[str]) -> Iterator[tuple[int, int, dict]]:
    for i, raw in enumerate((s for url in shards for s in read_tar(url)), start=1):
        yield 0, i, raw


# ---- decode stages ----------------------------------------------------------------------------


class Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class SkipCounter:
    """Skipped samples of one worker by reason (cumulative), with a rate-limited warning."""

    def __init__(self, start: dict[str, int] | None = None):
        self.counts = dict(start or {})

    def add(self, reason: str, key: str, detail: str = "") -> None:
        n = self.counts[reason] = self.counts.get(reason, 0) + 1
        if n <= 3 or n & (n - 1) == 0:  # 1, 2, 3, 4, 8, 16, ...
            log.warning("skipped sample %s: %s %s (%d so far for this reason in this worker)",
                        key, reason, detail, n)


@functools.cache
def get_tokenizer(path: str):
    """Loaded once per process, on first use (so inside the DataLoader worker)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet and safe under fork
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def parse_meta(data: bytes, num_clips: int) -> tuple[float, float, list[tuple[str, float, float]]]:
    """JSON -> (duration, fps, [(text, start, end)]) with spans clipped into the video."""
    try:
        meta = json.loads(data.decode("utf-8"))
        duration, fps = float(meta["duration"]), float(meta["fps"])
        spans = [(s["text"], float(s["start"]), float(s["end"])) for s in meta["sentences"]]
        if not all(isinstance(text, str) for text, _, _ in spans):
            raise TypeError("a sentence text is not a string")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise Skip("bad_json", repr(e)) from None
    if not (math.isfinite(duration) and duration > 0):
        raise Skip("zero_duration", f"duration={duration}")
    if not (math.isfinite(fps) and fps > 0):
        raise Skip("bad_json", f"fps={fps}")
    spans = [(text, max(start, 0.0), min(end, duration)) for text, start, end in spans]
    spans = [s for s in spans if s[2] > s[1]]  # also drops NaN spans
    if not spans:
        raise Skip("no_sentences_in_video", f"duration={duration}")
    if len(spans) < num_clips:
        raise Skip("too_few_sentences", f"{len(spans)} < {num_clips}")
    return duration, fps, spans


def frame_indices(spans, duration: float, fps: float, frames_per_clip: int,
                  rng: np.random.Generator | None) -> list[int]:
    """F frame indices per span: segment centres (rng None) or a random point in each segment."""
    F = frames_per_clip
    last = max(1, math.floor(duration * fps + 1e-6)) - 1  # last frame inside the video
    out = []
    for _, start, end in spans:
        offsets = np.full(F, 0.5) if rng is None else rng.random(F)
        times = start + (np.arange(F) + offsets) * (end - start) / F  # (F,) seconds
        out += np.clip(np.floor(times * fps), 0, last).astype(int).tolist()
    return out  # (M*F,)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(T, C, H, W) -> (T, C, S, S), same dtype; antialiased bilinear."""
    if tuple(x.shape[-2:]) == (size, size):
        return x.contiguous()
    y = Fn.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else y.to(x.dtype)


def load_video(data: bytes, indices: list[int], size: int) -> torch.Tensor:
    """MP4 bytes -> (T, 3, S, S) uint8, decoding only up to the last needed frame."""
    try:
        frames = decode_frames(data, indices)  # (T, H, W, 3)
    except ShortVideoError as e:
        raise Skip("short_video", str(e)) from None
    except Exception as e:  # PyAV raises many types on corrupt input
        raise Skip("bad_video", repr(e)) from None
    return resize(torch.from_numpy(frames).permute(0, 3, 1, 2), size)  # (T, 3, S, S)


def load_depth(data: bytes, indices: list[int], size: int) -> torch.Tensor:
    """depth.npz bytes -> (T, S, S) float16 at the same frame indices."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            depth = npz["depth"]  # (T0, H, W)
        if depth.ndim != 3 or max(indices) >= len(depth):
            raise ValueError(f"depth shape {depth.shape}, need frame {max(indices)}")
    except Exception as e:
        raise Skip("bad_depth", repr(e)) from None
    d = torch.from_numpy(depth[indices].astype(np.float32))[:, None]  # (T, 1, H, W)
    return resize(d, size)[:, 0].half()  # (T, S, S)


def decode_sample(raw: dict, cfg: DataConfig, tokenizer_path: str, rng: np.random.Generator | None) -> dict:
    """Raw members -> {"key", "video", "input_ids", "attention_mask"[, "depth"]}; raises Skip."""
    if "__error__" in raw:
        raise Skip(raw["__error__"], raw.get("__detail__", ""))
    for ext in ("json", "mp4"):
        if ext not in raw:
            raise Skip(f"missing_{ext}")
    M = cfg.num_clips
    duration, fps, spans = parse_meta(raw["json"], M)
    first = 0 if rng is None else int(rng.integers(len(spans) - M + 1))
    spans = spans[first : first + M]
    indices = frame_indices(spans, duration, fps, cfg.frames_per_clip, rng)  # (T,)
    sample = {"key": raw["__key__"], "video": load_video(raw["mp4"], indices, cfg.size)}
    if "depth.npz" in raw:
        sample["depth"] = load_depth(raw["depth.npz"], indices, cfg.size)
    tokens = get_tokenizer(tokenizer_path)([text for text, _, _ in spans], padding="max_length",
                                           truncation=True, max_length=cfg.max_words, return_tensors="pt")
    sample["input_ids"] = tokens["input_ids"].long()  # (M, L)
    sample["attention_mask"] = tokens["attention_mask"].long()  # (M, L)
    return sample


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([SAMPLE, seed, epoch, digest])


def decode_stage(items, cfg: DataConfig, tokenizer_path: str, skips: SkipCounter, train: bool, where: str):
    """(epoch, consumed, raw) -> (epoch, consumed, sample); bad samples are counted, not passed on."""
    epoch_now, good, whole_epoch = None, 0, False
    for epoch, consumed, raw in items:
        if epoch != epoch_now:
            _check_epoch(epoch_now, good, whole_epoch, skips, where)
            epoch_now, good, whole_epoch = epoch, 0, consumed == 1
        rng = sample_rng(cfg.seed, epoch, raw["__key__"]) if train else None
        try:
            sample = decode_sample(raw, cfg, tokenizer_path, rng)
        except Skip as s:
            skips.add(s.reason, raw["__key__"], s.detail)
            continue
        good += 1
        yield epoch, consumed, sample


def _check_epoch(epoch, good: int, whole_epoch: bool, skips: SkipCounter, where: str) -> None:
    if epoch is not None and whole_epoch and good == 0:
        raise RuntimeError(f"data {where} read all of epoch {epoch} and found no usable sample "
                           f"(skipped so far: {skips.counts}); check the shards and the DataConfig")


def collate(samples: list[dict]) -> dict:
    batch = {
        "video": torch.stack([s["video"] for s in samples]),  # (B, T, 3, S, S) uint8
        "input_ids": torch.stack([s["input_ids"] for s in samples]),  # (B, M, L)
        "attention_mask": torch.stack([s["attention_mask"] for s in samples]),  # (B, M, L)
        "key": [s["key"] for s in samples],
    }
    if all("depth" in s for s in samples):
        batch["depth"] = torch.stack([s["depth"] for s in samples])  # (B, T, S, S) float16
    return batch


def batch_stage(items, batch_size: int, skips: SkipCounter, worker: int | None, keep_last: bool):
    """(epoch, consumed, sample) -> batch dicts; train batches carry "_worker" and "_pos"."""
    samples = []
    for epoch, consumed, sample in items:
        samples.append(sample)
        if len(samples) == batch_size:
            batch = collate(samples) | {"skipped": dict(skips.counts)}
            if worker is not None:
                batch |= {"_worker": worker, "_pos": [epoch, consumed]}
            yield batch
            samples = []
    if samples and keep_last:
        yield collate(samples) | {"skipped": dict(skips.counts)}


# ---- datasets and loaders ---------------------------------------------------------------------


def _identity(x):
    return x


class TrainStream(IterableDataset):
    """The endless batch stream of one rank; each DataLoader worker plays one logical worker."""

    def __init__(self, cfg: DataConfig, shards: list[str], tokenizer_path: str, rank: int, world_size: int,
                 positions: dict[int, list[int]], skipped: dict[int, dict], first_worker: int):
        self.cfg, self.shards, self.tokenizer_path = cfg, shards, tokenizer_path
        self.rank, self.world_size = rank, world_size
        self.positions, self.skipped, self.first_worker = positions, skipped, first_worker

    def __iter__(self):
        info = get_worker_info()
        W = max(1, self.cfg.num_workers)
        w = ((info.id if info else 0) + self.first_worker) % W
        skips = SkipCounter(self.skipped.get(w))
        cfg = self.cfg
        stages = [
            partial(train_source, self.shards, cfg.seed, self.rank, self.world_size, w, W,
                    cfg.shuffle_buffer, tuple(self.positions[w])),
            partial(decode_stage, cfg=cfg, tokenizer_path=self.tokenizer_path, skips=skips, train=True,
                    where=f"rank {self.rank} worker {w}"),
            partial(batch_stage, batch_size=cfg.batch_size, skips=skips, worker=w, keep_last=False),
        ]
        return iter(wds.DataPipeline(*stages))


class EvalStream(IterableDataset):
    """One finite pass over this rank's shards, split again by DataLoader worker; no shuffling."""

    def __init__(self, cfg: DataConfig, shards: list[str], tokenizer_path: str):
        self.cfg, self.shards, self.tokenizer_path = cfg, shards, tokenizer_path

    def __iter__(self):
        info = get_worker_info()
        i, n = (info.id, info.num_workers) if info else (0, 1)
        skips = SkipCounter()
        stages = [
            partial(eval_source, self.shards[i::n]),
            partial(decode_stage, cfg=self.cfg, tokenizer_path=self.tokenizer_path, skips=skips, train=False,
                    where=f"eval worker {i}"),
            partial(batch_stage, batch_size=self.cfg.batch_size, skips=skips, worker=None, keep_last=True),
        ]
        return iter(wds.DataPipeline(*stages))


class TrainLoader:
    """Endless iterator of train batches that knows its exact position (state_dict, build_train_loader(state=))."""

    def __init__(self, stream: TrainStream, check: dict):
        nw = stream.cfg.num_workers
        # its own generator: starting the workers must not draw from the trainer's global RNG (dropout)
        self.loader = DataLoader(stream, batch_size=None, num_workers=nw, collate_fn=_identity,
                                 persistent_workers=nw > 0, in_order=True,
                                 generator=torch.Generator().manual_seed(stream.cfg.seed))
        self.num_workers = max(1, nw)  # W, logical workers
        self.epoch_pos = {w: list(p) for w, p in stream.positions.items()}
        self.next_worker = stream.first_worker
        self._skipped = {w: dict(c) for w, c in stream.skipped.items()}
        self.check = check  # world_size, rank, num_workers, ... saved to refuse a mismatched resume
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)  # once: a second iter() would restart the workers
        batch = next(self._it)
        w, pos = batch.pop("_worker"), batch.pop("_pos")
        assert w == self.next_worker, f"batch from logical worker {w}, expected {self.next_worker}"
        self.epoch_pos[w] = list(pos)
        self._skipped[w] = dict(batch["skipped"])
        self.next_worker = (w + 1) % self.num_workers
        return batch

    def state_dict(self) -> dict:
        """Plain JSON-able ints; positions of the batches handed out, not of prefetched ones."""
        return {
            "epoch_pos": {w: list(p) for w, p in self.epoch_pos.items()},
            "next_worker": self.next_worker,
            "skipped": {w: dict(c) for w, c in self._skipped.items()},
            **self.check,
        }

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, summed over this rank's workers."""
        total: dict[str, int] = {}
        for counts in self._skipped.values():
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def close(self) -> None:
        self._it = None  # the DataLoader iterator shuts its workers down when released


def build_train_loader(cfg: DataConfig, tokenizer_path: str, rank: int, world_size: int,
                       state: dict | None = None, root: str | None = None) -> TrainLoader:
    shards = resolve_shards(cfg.train_shards, root)
    W = max(1, cfg.num_workers)
    if len(shards) < world_size * W:
        raise ValueError(f"the train split has {len(shards)} shards but world_size * num_workers = "
                         f"{world_size} * {W} = {world_size * W}; every data worker needs at least one shard: "
                         f"write more, smaller shards or lower DataConfig.num_workers")
    assert 0 <= rank < world_size, f"rank {rank} outside world_size {world_size}"
    check = {"world_size": world_size, "rank": rank, "num_workers": cfg.num_workers, "seed": cfg.seed,
             "shuffle_buffer": cfg.shuffle_buffer, "num_shards": len(shards)}
    positions, skipped, first = {w: [0, 0] for w in range(W)}, {}, 0
    if state is not None:
        for name, value in check.items():
            if state.get(name) != value:
                raise ValueError(f"the data state was saved with {name}={state.get(name)} but this run has "
                                 f"{name}={value}; resuming the data stream under a different {name} "
                                 f"is not supported yet")
        positions = {int(w): [int(e), int(c)] for w, (e, c) in state["epoch_pos"].items()}
        skipped = {int(w): dict(c) for w, c in state.get("skipped", {}).items()}
        first = int(state["next_worker"])
    stream = TrainStream(cfg, shards, tokenizer_path, rank, world_size, positions, skipped, first)
    return TrainLoader(stream, check)


def build_eval_loader(cfg: DataConfig, tokenizer_path: str, rank: int, world_size: int,
                      root: str | None = None) -> DataLoader:
    """Finite batches over the val split; every sample once across ranks; a rank may get none."""
    assert 0 <= rank < world_size, f"rank {rank} outside world_size {world_size}"
    mine = resolve_shards(cfg.val_shards, root)[rank::world_size]
    stream = EvalStream(cfg, mine, tokenizer_path)
    return DataLoader(stream, batch_size=None, num_workers=min(cfg.num_workers, len(mine)),
                      collate_fn=_identity, in_order=True, generator=torch.Generator().manual_seed(cfg.seed))
