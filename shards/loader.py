"""Streaming loaders over WebDataset tar shards: an exactly resumable train stream and an eval pass.

Train stream of rank r, logical worker w of W, for epoch e = 0, 1, 2, ...:
    shards shuffled by (seed, e), the same on every rank -> this worker's part of them (below)
    -> tar members (mp4, json, depth.npz), local or s3:// -> shuffle buffer of raw bytes seeded by (seed, e, r, w)
    -> decode (late): plan the clips (shards.sampling), seek and decode only those frames,
       crop/flip/resize (shards.transforms), tokenize -> batches of `batch_size` good samples, all from one worker.
A worker's position is (epoch, raw samples consumed after the shuffle buffer). To resume, each
worker re-reads raw samples up to its position without decoding them, and DataLoader worker i
plays logical worker (i + next_worker) % W, because torch always asks worker 0 first. Every
random choice of a sample (clips, frames, crop, flip) comes from a generator seeded by
(seed, epoch, key), so a resumed run decodes the same pixels.

Each worker is one of R = world_size * W readers, reader g = r + world_size * w. With S >= R shards
it reads whole shards, [r::world_size][w::W] of the epoch's order (= order[g::R]). With S < R shards
readers share shards and split their samples (counted in tar order, before the shuffle buffer; a
sample a reader does not take is passed over as raw bytes, never decoded), so none is read twice in
an epoch (`reader_segments`):
  - split folder (index.json counts the samples of each shard): the epoch's shards, laid end to end in
    its order, are cut into R consecutive blocks, reader g taking the g-th, as long as its epoch quota
    (below); a reader reads the one or two shards its block touches, and each only up to the block's end.
  - no per-shard counts (a brace pattern): reader g reads shard g % S of the order and takes every m-th
    sample of it from sample g // S, m being the number of readers of that shard (in a shard of fewer than
    m samples some readers' share, and so their epoch, is empty).
Whether readers share is decided by num_shards, world_size and num_workers, which a saved position
already records, so the resume state is the same in both cases.

Ranks never wait on each other for data: the train stream has no end (each worker starts its
next epoch, in a new shard order, when one ends), and every batch holds exactly `batch_size` good
samples, so every rank yields one full batch per step for as many steps as the trainer asks. With a
split folder (index.json gives the sample count), an epoch is a fixed number of raw samples per rank,
`TrainLoader.samples_per_epoch` = total // world_size, split evenly over its workers: a rank whose
shards hold more stops early (the rest comes in later epochs' shard orders), one whose shards hold
fewer reads them again, so all ranks change epoch together even when shards differ in size. When
readers share shards the blocks are exactly these quotas: an epoch reads every sample once, but for
the last total % world_size of its order (they come in later orders), and no reader stops early or
reads twice. Without a count (a brace pattern) an epoch is one pass of each worker over its shards,
or over its share of one; then readers' epochs differ in length and ranks change epoch at different steps.

Bad input (truncated tars, broken or empty MP4s, missing members, bad JSON, sentences outside
the video, too few sentences, a video shorter than the clips; broken JPEGs, a missing jpg, and a sample
of the other kind than its set, "wrong_media") is skipped and counted per reason; a worker whose whole
epoch is unusable raises instead of spinning.

Images: a set whose index.json says "media": "image" (or a mixture source with media: image) holds
KEY.jpg + KEY.json samples. An image decodes to the sample dict of a one-frame, one-clip video: "video"
(1, 3, h, w) with the same train augmentation (random resized crop, flip with mirrored words) and eval
centre crop, and its caption as the one sentence, "input_ids" / "attention_mask" (1, L); no "depth".
A batch is one kind: every batch says "media" ("video" | "image") and "source" (its source's name).

Mixture: data.train_shards as a list of sources with weights (`MixSource`). Each source has its own
TrainLoader as above (sharding, shuffling, position); `MixtureLoader` takes batch n from the source
`scheduled_source(seed, n, weights)` draws, with a generator seeded by (data.seed, n) alone: every rank
draws the same source at every step, and the schedule needs no state beyond n. Its state is n, every
source's position and the samples each source handed out.

Letters: B batch, M clips (sentences) per video, F frames per clip, T = M*F, h x w frame size, L tokens.
"""

import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import transforms
from shards.format import (IMAGE_MEMBERS, MEDIA, MEMBERS, FormatError, is_split_folder, media_of, num_frames,
                           parse_meta, read_index, read_tar, resolve_shards, shard_path)
from shards.sampling import plan_clips, spans_in_video
from shards.storage import Storage
from shards.video import EPS, EmptyVideoError, ShortVideoError, decode_at_times

log = logging.getLogger("shards")

SHARD_ORDER, SHUFFLE, SAMPLE, MIXTURE = 1, 2, 3, 4  # first seed word of each random stream, so streams never collide
SINGLE = "train"  # the source name of a data.train_shards given as one set (batch["source"], metrics)
SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # it becomes a metrics.jsonl key and a TensorBoard tag


@dataclass
class MixSource:
    """One shard set of a weighted mixture (data.train_shards as a list). Checked by DataConfig."""

    name: str = ""  # what batch["source"], metrics.jsonl and TensorBoard call it: letters, digits, _ - .
    path: str = ""  # a split folder or s3:// prefix with index.json, or a brace pattern
    weight: float = 1.0  # > 0: the source of each batch is drawn with probability weight / sum of the weights
    media: str = ""  # "" = what the set's index.json says (video when it says nothing); "video" or "image"


@dataclass
class DataConfig:
    # one set: a split folder or s3:// prefix with index.json, or "dir/synth-{000000..000015}.tar"; or a
    # weighted mixture, a list of sources [{name: webvid, path: data/webvid/train, weight: 2.0}, ...] (MixSource)
    train_shards: str | list[MixSource] = "data/synth/train"
    val_shards: str = "data/synth/val"
    num_clips: int = 4  # M: clips per video
    frames_per_clip: int = 4  # F
    # h x w: an integer (a square, h = w) or [height, width], e.g. [192, 320]; frames are cropped to a box of
    # that aspect ratio and resized to h x w (see `hw`)
    size: int | list[int] = 64
    max_words: int = 16  # L: tokens per sentence, [CLS] and [SEP] included, padded
    batch_size: int = 8  # B, per rank
    # DataLoader worker processes per rank and train source (0 = in the main process): a mixture of S sources
    # runs S x num_workers per rank (MixtureLoader)
    num_workers: int = 1
    shuffle_buffer: int = 64  # raw samples held for shuffling (1 = no shuffling)
    seed: int = 0  # shard orders, shuffling, clips, crops, flips and a mixture's schedule
    clip_sampling: Literal["sentences", "uniform", "window"] = "sentences"  # see shards/sampling.py
    clip_seconds: float = 2.0  # "window" sampling: seconds per clip
    crop_scale: float = 1.0  # train: random resized crop keeps [crop_scale, 1] of the frame area; 1 = the centre crop
    hflip: float = 0.0  # train: probability of a left-right flip (sentences get left <-> right swapped)
    s3_endpoint: str = ""  # S3-compatible endpoint URL for s3:// shards; "" = AWS_ENDPOINT_URL[_S3] or AWS

    def __post_init__(self):
        for name in ("num_clips", "frames_per_clip", "batch_size", "shuffle_buffer"):
            _check_int(name, getattr(self, name), low=1)
        size = list(self.size) if isinstance(self.size, (list, tuple)) else self.size  # a list: YAML reads it back
        if not (_is_int(size, 1) or isinstance(size, list) and len(size) == 2 and all(_is_int(n, 1) for n in size)):
            raise ValueError(f"bad value for data.size: expected an integer >= 1 (a square) or [height, width] "
                             f"with both >= 1 (got {self.size!r})")
        self.size = size
        _check_int("max_words", self.max_words, low=3)  # [CLS], one token, [SEP]
        _check_int("num_workers", self.num_workers, low=0)
        _check_int("seed", self.seed, low=0)
        if isinstance(self.train_shards, (list, tuple)):
            self.train_shards = check_sources(self.train_shards)
        elif not isinstance(self.train_shards, str) or not self.train_shards:
            raise ValueError(f"bad value for data.train_shards: expected a non-empty path or brace pattern, or a "
                             f"list of sources with name, path and weight (got {self.train_shards!r})")
        if not isinstance(self.val_shards, str) or not self.val_shards:
            raise ValueError(f"bad value for data.val_shards: expected a non-empty path or brace pattern "
                             f"(got {self.val_shards!r})")
        if self.clip_sampling not in ("sentences", "uniform", "window"):
            raise ValueError(f"bad value for data.clip_sampling: expected one of sentences, uniform, window "
                             f"(got {self.clip_sampling!r})")
        if not self.clip_seconds > 0:
            raise ValueError(f"bad value for data.clip_seconds: expected a number > 0 (got {self.clip_seconds!r})")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"bad value for data.crop_scale: expected a number in (0, 1] (got {self.crop_scale!r})")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"bad value for data.hflip: expected a probability in [0, 1] (got {self.hflip!r})")

    @property
    def hw(self) -> tuple[int, int]:
        """(h, w): the frame size every sample is resized to."""
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    @property
    def storage(self) -> Storage:
        return Storage(self.s3_endpoint)

    @property
    def sources(self) -> list[MixSource]:
        """The train sources: the mixture's, or one named SINGLE for a train_shards given as one set."""
        if isinstance(self.train_shards, str):
            return [MixSource(name=SINGLE, path=self.train_shards)]
        return list(self.train_shards)


def check_sources(items) -> list[MixSource]:
    """data.train_shards given as a list -> its MixSources, each checked; errors name the field."""
    if not items:
        raise ValueError("bad value for data.train_shards: expected a path, or a non-empty list of sources "
                         "with name, path and weight (got [])")
    fields = [f.name for f in dataclasses.fields(MixSource)]
    sources, names = [], set()
    for i, item in enumerate(items):
        where = f"data.train_shards[{i}]"
        if isinstance(item, dict):
            unknown = [k for k in item if k not in fields]
            if unknown:
                raise ValueError(f"unknown config key {where}.{unknown[0]}; allowed keys here: {', '.join(fields)}")
            item = MixSource(**item)
        if not isinstance(item, MixSource):
            raise ValueError(f"bad value for {where}: expected a mapping with name, path and weight (got {item!r})")
        if not (isinstance(item.name, str) and SOURCE_NAME.fullmatch(item.name)):
            raise ValueError(f"bad value for {where}.name: expected a non-empty name of letters, digits, _, - and . "
                             f"(got {item.name!r})")
        if item.name in names:
            raise ValueError(f"bad value for {where}.name: source names must be unique ({item.name!r} twice)")
        names.add(item.name)
        if not isinstance(item.path, str) or not item.path:
            raise ValueError(f"bad value for {where}.path: expected a non-empty path or brace pattern "
                             f"(got {item.path!r})")
        weight = item.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"bad value for {where}.weight: expected a finite number > 0 (got {weight!r})")
        if item.media not in ("", *MEDIA):
            raise ValueError(f"bad value for {where}.media: expected one of video, image, or \"\" (what the set's "
                             f"index.json says) (got {item.media!r})")
        sources.append(dataclasses.replace(item, weight=float(weight)))
    return sources


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_int(name: str, value, low: int) -> None:
    if not _is_int(value, low):
        raise ValueError(f"bad value for data.{name}: expected an integer >= {low} (got {value!r})")


# ---- raw stages: tar members as bytes, never decoded ----------------------------------------


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


def worker_quota(per_rank: int | None, worker: int, num_workers: int) -> int | None:
    """Raw samples logical worker `worker` reads per epoch: the rank's fixed share split evenly."""
    if per_rank is None:
        return None
    return per_rank // num_workers + (1 if worker < per_rank % num_workers else 0)


Segment = tuple[str, int, int | None, int]  # (url, first, stop, step): samples first, first + step, ... < stop of a tar


def reader_segments(order: list[str], rank: int, world_size: int, worker: int, num_workers: int,
                    counts: dict[str, int] | None = None, per_rank: int | None = None) -> list[Segment]:
    """The part of an epoch's shard `order` that logical worker `worker` of rank `rank` reads (module
    docstring): whole shards when there are at least as many shards as readers, else a block of the
    shards laid end to end (with `counts`, samples per shard, and `per_rank`) or every m-th sample of one."""
    S, R = len(order), world_size * num_workers
    if S >= R:
        return [(url, 0, None, 1) for url in order[rank::world_size][worker::num_workers]]
    g = rank + world_size * worker  # the reader that [rank::world_size][worker::num_workers] above would be
    if counts is None or per_rank is None:  # the m readers of shard g % S take turns
        return [(order[g % S], g // S, None, -(-(R - g % S) // S))]
    start = sum(worker_quota(per_rank, h // world_size, num_workers) for h in range(g))
    stop = start + worker_quota(per_rank, worker, num_workers)
    segments, offset = [], 0
    for url in order:
        n = counts[url]
        if offset < stop and start < offset + n:
            segments.append((url, max(0, start - offset), min(n, stop - offset), 1))
        offset += n
    return segments


def read_segments(segments: list[Segment], storage: Storage, members: tuple[str, ...] = MEMBERS) -> Iterator[dict]:
    """Raw samples of the segments, in order. Samples outside them are passed over as raw bytes; a tar is
    closed at its segment's stop (on s3 nothing after it is downloaded)."""
    for url, first, stop, step in segments:
        with contextlib.closing(read_tar(url, storage, members)) as samples:
            for i, raw in enumerate(samples):
                if stop is not None and i >= stop:
                    break
                if i >= first and (i - first) % step == 0:
                    yield raw


def train_source(shards: list[str], storage: Storage, seed: int, rank: int, world_size: int, worker: int,
                 num_workers: int, buffer: int, start: tuple[int, int], quota: int | None = None,
                 counts: dict[str, int] | None = None, per_rank: int | None = None,
                 members: tuple[str, ...] = MEMBERS) -> Iterator[tuple[int, int, dict]]:
    """Endless (epoch, consumed, raw) of one logical worker, beginning after position `start`. With a
    `quota`, every epoch is exactly that many raw samples: a worker whose shards hold more stops early
    (the rest waits for a later epoch's shard order), one whose shards hold fewer reads them again.
    `counts` and `per_rank` place the worker's block when readers share shards (`reader_segments`). Readers
    that take turns in a shard smaller than their number may find their share of it empty: that epoch is
    empty for them, and only a worker whose share of every shard is empty raises."""
    epoch, skip = start
    turns = len(shards) < world_size * num_workers and (counts is None or per_rank is None)
    starved: set[str] = set()  # taking turns: shards in which this worker's share was empty
    while True:
        mine = reader_segments(epoch_shards(shards, seed, epoch), rank, world_size, worker, num_workers,
                               counts, per_rank)
        rng = np.random.default_rng([SHUFFLE, seed, epoch, rank, worker])

        def passes():  # each pass through the shuffle buffer on its own, so a pass never repeats a sample
            while True:
                n = 0
                for sample in shuffle_buffer(read_segments(mine, storage, members), rng, buffer):
                    n += 1
                    yield sample
                if quota is None or n == 0:
                    return

        consumed = 0
        for raw in passes():
            consumed += 1
            if consumed > skip:  # the first `skip` were handed out before the resume
                yield epoch, consumed, raw
            if consumed == quota:
                break
        if consumed == 0:
            starved.update(url for url, *_ in mine)
            if not turns or starved >= set(shards):
                raise RuntimeError(f"rank {rank} worker {worker}: epoch {epoch} read no sample from {_named(mine)}"
                                   + (" (nor from any other shard: fewer samples than readers)" if turns else ""))
        if consumed < skip:
            raise RuntimeError(f"rank {rank} worker {worker}: epoch {epoch} has {consumed} samples in "
                               f"{_named(mine)}, but the resume position is {skip} (did the shards change?)")
        epoch, skip = epoch + 1, 0


def _named(segments: list[Segment]) -> list[str]:
    """Segments as the error messages name them: a whole shard by its URL, a part as URL[first:stop:step]."""
    return [url if (first, stop, step) == (0, None, 1) else f"{url}[{first}:{'' if stop is None else stop}:{step}]"
            for url, first, stop, step in segments]


def eval_source(shards: list[str], storage: Storage, members: tuple[str, ...] = MEMBERS) -> Iterator[tuple[int, int, dict]]:
    for i, raw in enumerate((s for url in shards for s in read_tar(url, storage, members)), start=1):
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


def read_meta(data: bytes, cfg: DataConfig) -> tuple[dict, list]:
    """JSON -> (meta, sentence spans inside the video); raises Skip when the sample cannot give M clips."""
    meta = _parse(data, "video")
    spans = spans_in_video(meta["sentences"], meta["duration"])  # also drops NaN and reversed spans
    if not spans:
        raise Skip("no_sentences_in_video", f"{len(meta['sentences'])} sentences, duration={meta['duration']}")
    if len(spans) < cfg.num_clips:
        raise Skip("too_few_sentences", f"{len(spans)} < {cfg.num_clips}")
    frames = num_frames(meta)
    if frames < cfg.num_clips * cfg.frames_per_clip:
        raise Skip("video_shorter_than_clips", f"{frames} frames < {cfg.num_clips} clips x {cfg.frames_per_clip}")
    return meta, spans


def _parse(data: bytes, media: str) -> dict:
    """KEY.json -> meta; raises Skip for a bad one, or ("wrong_media") for a sample of the other kind than its set."""
    try:
        meta = parse_meta(data)
    except FormatError as e:
        raise Skip(e.reason, e.detail) from None
    if media_of(meta) != media:
        raise Skip("wrong_media", f"a {media_of(meta)} sample in a set of {media}s")
    return meta


def _json_media(data: bytes) -> str | None:
    try:
        return media_of(parse_meta(data))
    except FormatError:
        return None


def load_image(data: bytes) -> torch.Tensor:
    """JPEG (or any image PIL reads) bytes -> (1, 3, H, W) uint8, upright per its EXIF orientation."""
    from PIL import Image, ImageOps

    if len(data) == 0:
        raise Skip("bad_image", "0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.array(ImageOps.exif_transpose(image).convert("RGB"))  # (H, W, 3), writable; a truncated file raises
    except Exception as e:  # PIL raises many types on corrupt input
        raise Skip("bad_image", repr(e)) from None
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, 3, H, W)


def load_video(data: bytes, times: np.ndarray) -> torch.Tensor:
    """MP4 bytes -> (T, 3, H, W) uint8, seeking to and decoding only the frames at `times`."""
    if len(data) == 0:
        raise Skip("zero_length_video", "0 bytes")
    try:
        frames = decode_at_times(data, times.tolist())  # (T, H, W, 3)
    except EmptyVideoError as e:
        raise Skip("zero_length_video", str(e)) from None
    except ShortVideoError as e:
        raise Skip("short_video", str(e)) from None
    except Exception as e:  # PyAV raises many types on corrupt input
        raise Skip("bad_video", repr(e)) from None
    return torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, 3, H, W)


def load_depth(data: bytes, times: np.ndarray, fps: float) -> torch.Tensor:
    """depth.npz bytes -> (T, 1, h, w) float32, map i being video frame i."""
    indices = np.floor(times * fps + EPS).astype(int)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            depth = npz["depth"]  # (T0, h, w)
        if depth.ndim != 3 or indices.max() >= len(depth):
            raise ValueError(f"depth shape {depth.shape}, need frame {indices.max()}")
    except Exception as e:
        raise Skip("bad_depth", repr(e)) from None
    return torch.from_numpy(depth[indices].astype(np.float32))[:, None]  # (T, 1, h, w)


def decode_sample(raw: dict, cfg: DataConfig, tokenizer_path: str, rng: np.random.Generator | None,
                  media: str = "video") -> dict:
    """Raw members -> {"key", "meta", "video", "input_ids", "attention_mask"[, "depth"]}; raises Skip.
    "meta" is the sample's parsed KEY.json (task fields such as QA ride there). `media` is the set's kind:
    a sample of the other kind is skipped ("wrong_media"); an image is `decode_image`.
    rng None = eval: first clips, centre frames, centre crop, no flip."""
    if "__error__" in raw:
        raise Skip(raw["__error__"], raw.get("__detail__", ""))
    if "json" not in raw:
        raise Skip("missing_json")
    if media == "image":
        return decode_image(raw, cfg, tokenizer_path, rng)
    if "mp4" not in raw:
        raise Skip("wrong_media" if _json_media(raw["json"]) == "image" else "missing_mp4")
    meta, spans = read_meta(raw["json"], cfg)
    plan = plan_clips(cfg.clip_sampling, spans, meta["duration"], meta["fps"], num_frames(meta), cfg.num_clips,
                      cfg.frames_per_clip, cfg.clip_seconds, rng)  # times (T,), texts (M,)
    video = load_video(raw["mp4"], plan.times)  # (T, 3, H, W)
    H, W = video.shape[-2:]
    hw = cfg.hw
    box = transforms.centre_crop(H, W, hw) if rng is None else transforms.random_crop(H, W, rng, cfg.crop_scale, hw)
    flip = rng is not None and cfg.hflip > 0 and bool(rng.random() < cfg.hflip)
    texts = [transforms.mirror_text(t) for t in plan.texts] if flip else plan.texts
    sample = {"key": raw["__key__"], "meta": meta, "video": transforms.crop_resize(video, box, hw)}  # (T, 3, h, w)
    if "depth.npz" in raw:
        depth = load_depth(raw["depth.npz"], plan.times, meta["fps"])  # (T, 1, h, w)
        sample["depth"] = transforms.crop_resize(depth, box, hw)[:, 0].half()  # (T, h, w)
    if flip:
        sample = {k: v.flip(-1) if k in ("video", "depth") else v for k, v in sample.items()}
    return sample | tokenize(texts, cfg, tokenizer_path)


def decode_image(raw: dict, cfg: DataConfig, tokenizer_path: str, rng: np.random.Generator | None) -> dict:
    """An image sample -> the sample dict of a one-frame, one-clip video: "video" (1, 3, h, w), "input_ids" and
    "attention_mask" (1, L) = its caption (a random one of its sentences in train, the first in eval). Train
    augmentation as for videos: the random resized crop (data.crop_scale) and the flip with mirrored words."""
    meta = _parse(raw["json"], "image")
    captions = [s["text"] for s in meta["sentences"] if s["text"].strip()]
    if not captions:
        raise Skip("no_caption", f"{len(meta['sentences'])} sentences")
    if "jpg" not in raw:
        raise Skip("missing_jpg")
    image = load_image(raw["jpg"])  # (1, 3, H, W)
    caption = captions[0] if rng is None else captions[int(rng.integers(len(captions)))]
    H, W = image.shape[-2:]
    hw = cfg.hw
    box = transforms.centre_crop(H, W, hw) if rng is None else transforms.random_crop(H, W, rng, cfg.crop_scale, hw)
    flip = rng is not None and cfg.hflip > 0 and bool(rng.random() < cfg.hflip)
    frame = transforms.crop_resize(image, box, hw)  # (1, 3, h, w)
    if flip:
        frame, caption = frame.flip(-1), transforms.mirror_text(caption)
    return {"key": raw["__key__"], "meta": meta, "video": frame} | tokenize([caption], cfg, tokenizer_path)


def tokenize(texts: list[str], cfg: DataConfig, tokenizer_path: str) -> dict:
    """M sentences -> "input_ids", "attention_mask" (M, L) int64, padded to data.max_words."""
    tokens = get_tokenizer(tokenizer_path)(texts, padding="max_length", truncation=True, max_length=cfg.max_words,
                                           return_tensors="pt")
    return {"input_ids": tokens["input_ids"].long(), "attention_mask": tokens["attention_mask"].long()}  # (M, L)


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([SAMPLE, seed, epoch, digest])


def decode_stage(items, cfg: DataConfig, tokenizer_path: str, skips: SkipCounter, train: bool, where: str,
                 media: str = "video"):
    """(epoch, consumed, raw) -> (epoch, consumed, sample); bad samples are counted, not passed on."""
    epoch_now, good, whole_epoch = None, 0, False
    for epoch, consumed, raw in items:
        if epoch != epoch_now:
            _check_epoch(epoch_now, good, whole_epoch, skips, where)
            epoch_now, good, whole_epoch = epoch, 0, consumed == 1
        rng = sample_rng(cfg.seed, epoch, raw["__key__"]) if train else None
        try:
            sample = decode_sample(raw, cfg, tokenizer_path, rng, media)
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
        "video": torch.stack([s["video"] for s in samples]),  # (B, T, 3, h, w) uint8
        "input_ids": torch.stack([s["input_ids"] for s in samples]),  # (B, M, L)
        "attention_mask": torch.stack([s["attention_mask"] for s in samples]),  # (B, M, L)
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],  # parsed KEY.json of each sample
    }
    if all("depth" in s for s in samples):
        batch["depth"] = torch.stack([s["depth"] for s in samples])  # (B, T, h, w) float16
    return batch


def batch_stage(items, batch_size: int, skips: SkipCounter, worker: int | None, keep_last: bool,
                kind: dict | None = None):
    """(epoch, consumed, sample) -> batch dicts with `kind` ({"media", "source"}) in each; train batches carry
    "_worker" and "_pos"."""
    samples, kind = [], kind or {}
    for epoch, consumed, sample in items:
        samples.append(sample)
        if len(samples) == batch_size:
            batch = collate(samples) | kind | {"skipped": dict(skips.counts)}
            if worker is not None:
                batch |= {"_worker": worker, "_pos": [epoch, consumed]}
            yield batch
            samples = []
    if samples and keep_last:
        yield collate(samples) | kind | {"skipped": dict(skips.counts)}


# ---- datasets and loaders ---------------------------------------------------------------------


def _identity(x):
    return x


class TrainStream(IterableDataset):
    """The endless batch stream of one rank and one source; each DataLoader worker plays one logical worker."""

    def __init__(self, cfg: DataConfig, shards: list[str], tokenizer_path: str, rank: int, world_size: int,
                 positions: dict[int, list[int]], skipped: dict[int, dict], first_worker: int,
                 per_rank: int | None = None, counts: dict[str, int] | None = None, media: str = "video",
                 source: str = SINGLE):
        self.cfg, self.shards, self.tokenizer_path, self.per_rank = cfg, shards, tokenizer_path, per_rank
        self.counts = counts  # samples per shard URL when readers share shards in blocks, else None
        self.rank, self.world_size = rank, world_size
        self.positions, self.skipped, self.first_worker = positions, skipped, first_worker
        self.media, self.source = media, source  # the set's kind ("video" | "image") and the source's name

    def __iter__(self):
        info = get_worker_info()
        W = max(1, self.cfg.num_workers)
        w = ((info.id if info else 0) + self.first_worker) % W
        skips = SkipCounter(self.skipped.get(w))
        cfg = self.cfg
        stages = [
            partial(train_source, self.shards, cfg.storage, cfg.seed, self.rank, self.world_size, w, W,
                    cfg.shuffle_buffer, tuple(self.positions[w]), worker_quota(self.per_rank, w, W), self.counts,
                    self.per_rank, _members(self.media)),
            partial(decode_stage, cfg=cfg, tokenizer_path=self.tokenizer_path, skips=skips, train=True,
                    where=f"rank {self.rank} worker {w}" + ("" if self.source == SINGLE else f" of {self.source}"),
                    media=self.media),
            partial(batch_stage, batch_size=cfg.batch_size, skips=skips, worker=w, keep_last=False,
                    kind={"media": self.media, "source": self.source}),
        ]
        return iter(wds.DataPipeline(*stages))


def _members(media: str) -> tuple[str, ...]:
    return IMAGE_MEMBERS if media == "image" else MEMBERS


class EvalStream(IterableDataset):
    """One finite pass over this rank's shards, split again by DataLoader worker; no shuffling."""

    def __init__(self, cfg: DataConfig, shards: list[str], tokenizer_path: str, media: str = "video"):
        self.cfg, self.shards, self.tokenizer_path, self.media = cfg, shards, tokenizer_path, media

    def __iter__(self):
        info = get_worker_info()
        i, n = (info.id, info.num_workers) if info else (0, 1)
        skips = SkipCounter()
        stages = [
            partial(eval_source, self.shards[i::n], self.cfg.storage, _members(self.media)),
            partial(decode_stage, cfg=self.cfg, tokenizer_path=self.tokenizer_path, skips=skips, train=False,
                    where=f"eval worker {i}", media=self.media),
            partial(batch_stage, batch_size=self.cfg.batch_size, skips=skips, worker=None, keep_last=True,
                    kind={"media": self.media, "source": "val"}),
        ]
        return iter(wds.DataPipeline(*stages))


class TrainLoader:
    """Endless iterator of one source's train batches that knows its exact position (state_dict,
    build_train_loader(state=)) and how many samples it handed out (`seen`)."""

    def __init__(self, stream: TrainStream, check: dict, samples_per_epoch: int | None, seen: int = 0):
        nw = stream.cfg.num_workers
        # its own generator: starting the workers must not draw from the trainer's global RNG (dropout)
        self.loader = DataLoader(stream, batch_size=None, num_workers=nw, collate_fn=_identity,
                                 persistent_workers=nw > 0, in_order=True,
                                 generator=torch.Generator().manual_seed(stream.cfg.seed))
        self.name, self.media = stream.source, stream.media
        self.num_workers = max(1, nw)  # W, logical workers
        self.epoch_pos = {w: list(p) for w, p in stream.positions.items()}
        self.next_worker = stream.first_worker
        self._skipped = {w: dict(c) for w, c in stream.skipped.items()}
        self.check = check  # world_size, rank, num_workers, ... saved to refuse a mismatched resume
        # nominal: total samples // world_size (None: unknown, or readers take turns in shards without counts)
        self.samples_per_epoch = samples_per_epoch
        self.seen = seen  # samples this rank handed out from this source, over the whole run
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
        self.seen += len(batch["key"])
        return batch

    def state_dict(self) -> dict:
        """Plain JSON-able ints; positions of the batches handed out, not of prefetched ones."""
        return {
            "epoch_pos": {w: list(p) for w, p in self.epoch_pos.items()},
            "next_worker": self.next_worker,
            "skipped": {w: dict(c) for w, c in self._skipped.items()},
            "seen": self.seen,
            **self.check,
        }

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, summed over this rank's workers."""
        return sum_counts(self._skipped.values())

    def samples_by_source(self) -> dict[str, int]:
        """Samples this rank handed out, by source name (the trainer sums them over ranks)."""
        return {self.name: self.seen}

    def close(self) -> None:
        self._it = None  # the DataLoader iterator shuts its workers down when released


def sum_counts(dicts) -> dict[str, int]:
    """Counts by name, summed over several dicts (skip reasons, samples per source)."""
    total: dict[str, int] = {}
    for counts in dicts:
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
    return total


def _check_same_kind(cfg: DataConfig, saved: list[dict]) -> None:
    """A data state saved from a mixture resumes only as a mixture, one saved from one set only as one set."""
    mixture = isinstance(cfg.train_shards, list)
    if any(("mixture" in state) != mixture for state in saved):
        raise ValueError("the data state was saved with " + ("one train set" if mixture else "a mixture of sources")
                         + " but this run's data.train_shards is " + ("a mixture" if mixture else "one set")
                         + "; resuming across that change is not supported")


def scheduled_source(seed: int, step: int, weights: list[float]) -> int:
    """The source of the mixture's batch number `step` (0, 1, ...: the batches a rank hands out, one per
    micro-batch): drawn with probabilities weight / sum(weights) from a generator seeded by (seed, step)
    alone, so every rank draws the same source at every step and a resume needs only the step."""
    cumulative = np.cumsum(weights) / sum(weights)
    u = np.random.default_rng([MIXTURE, seed, step]).random()
    return min(int(np.searchsorted(cumulative, u, side="right")), len(weights) - 1)


class MixtureLoader:
    """data.train_shards as a weighted mixture: one TrainLoader per source (each with its own sharding over
    ranks and workers, shuffling and position, as for a single set) and the schedule `scheduled_source`. A
    batch is one source's, so one kind ("media": video or image) with the shapes of that kind, and at a given
    step every rank holds the same kind: collectives (feature all-gathers) always meet tensors of one shape.

    Workers: each source has its own DataLoader with data.num_workers processes, so a rank runs
    len(sources) x num_workers worker processes (each starts on its source's first batch and holds its
    tokenizer and prefetched batches: about 2 x num_workers batches per source held in memory). num_workers
    keeps its meaning per set; lower it for many sources or set it to 0 (decoding in the trainer's process).

    State: the schedule position (batches handed out) and every source's TrainLoader state; a state saved with
    other sources or weights is refused."""

    def __init__(self, loaders: list[TrainLoader], weights: list[float], seed: int, position: int, signature: list):
        self.loaders, self.weights, self.seed, self.position = loaders, weights, seed, position
        self.signature = signature  # [[name, path, weight, media], ...] of the config, saved and checked on resume

    def __iter__(self):
        return self

    def source_at(self, step: int) -> int:
        return scheduled_source(self.seed, step, self.weights)

    def __next__(self) -> dict:
        batch = next(self.loaders[self.source_at(self.position)])
        self.position += 1
        return batch

    @property
    def samples_per_epoch(self) -> dict[str, int | None]:
        return {loader.name: loader.samples_per_epoch for loader in self.loaders}

    def state_dict(self) -> dict:
        """Plain JSON: "epoch_pos" flattens every source's worker positions ("NAME/w": [epoch, consumed]) for
        checkpoint.load_checkpoint's world-size change, which restarts every source at one later epoch."""
        return {
            "mixture": self.signature,
            "position": self.position,
            "sources": {loader.name: loader.state_dict() for loader in self.loaders},
            "epoch_pos": {f"{loader.name}/{w}": list(p) for loader in self.loaders for w, p in loader.epoch_pos.items()},
        }

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, summed over this rank's sources and workers."""
        return sum_counts(loader.skipped() for loader in self.loaders)

    def samples_by_source(self) -> dict[str, int]:
        return {loader.name: loader.seen for loader in self.loaders}

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()


def build_train_loader(cfg: DataConfig, tokenizer_path: str, rank: int, world_size: int,
                       state: dict | None = None, root: str | None = None) -> TrainLoader | MixtureLoader:
    """This rank's endless train batches of cfg.train_shards: a TrainLoader for one set, a MixtureLoader for a
    list of sources; `state` (a state_dict() of an earlier run) continues where it left off."""
    assert 0 <= rank < world_size, f"rank {rank} outside world_size {world_size}"
    mixture = isinstance(cfg.train_shards, list)
    if state is not None:
        _check_same_kind(cfg, [state])
    if not mixture:
        return _source_loader(cfg, cfg.sources[0], tokenizer_path, rank, world_size, state, root)
    signature = mixture_signature(cfg)
    if state is not None and state["mixture"] != signature:
        raise ValueError(f"the data state was saved with the mixture {state['mixture']} (name, path, weight, media) "
                         f"but this run has {signature}; resuming a mixture with other sources or weights is not "
                         f"supported")
    loaders = [_source_loader(cfg, source, tokenizer_path, rank, world_size,
                              None if state is None else state["sources"][source.name], root)
               for source in cfg.sources]
    return MixtureLoader(loaders, [s.weight for s in cfg.sources], cfg.seed,
                         0 if state is None else int(state["position"]), signature)


def mixture_signature(cfg: DataConfig) -> list:
    return [[s.name, s.path, s.weight, s.media] for s in cfg.sources]


def _source_loader(cfg: DataConfig, source: MixSource, tokenizer_path: str, rank: int, world_size: int,
                   state: dict | None, root: str | None) -> TrainLoader:
    spec = source.path
    shards = resolve_shards(spec, root, cfg.storage)
    media = set_media(spec, source.media, root, cfg.storage)
    W = max(1, cfg.num_workers)
    total, counts = _split_counts(spec, shards, root, cfg.storage)
    sharing = plan_readers(len(shards), world_size, W, total, counts is not None)  # raises if a reader gets nothing
    if sharing and rank == 0:
        log.info("%s%s", "" if source.name == SINGLE else f"{source.name}: ", sharing)
    per_rank = None if total is None else total // world_size
    if not sharing:
        counts = None  # each reader reads whole shards: today's layout, no block to place
    elif counts is None:
        per_rank = None  # readers take turns in a shard: an epoch is one pass over the share
    check = _resume_check(cfg, rank, world_size, len(shards))
    positions, skipped, first, seen = {w: [0, 0] for w in range(W)}, {}, 0, 0
    if state is not None:
        for name, value in check.items():
            if state.get(name) != value:
                raise ValueError(f"the data state was saved with {name}={state.get(name)} but this run has "
                                 f"{name}={value}; resuming the data stream under a different {name} "
                                 f"is not supported yet")
        positions = {int(w): [int(e), int(c)] for w, (e, c) in state["epoch_pos"].items()}
        skipped = {int(w): dict(c) for w, c in state.get("skipped", {}).items()}
        first, seen = int(state["next_worker"]), int(state.get("seen", 0))
    stream = TrainStream(cfg, shards, tokenizer_path, rank, world_size, positions, skipped, first, per_rank, counts,
                         media, source.name)
    return TrainLoader(stream, check, per_rank, seen)


def set_media(spec: str, given: str, root: str | None, storage: Storage) -> str:
    """The kind of samples in a set: `given` (a source's media) or its index.json's "media" (absent: video); a
    brace pattern without `given` is video. Raises ValueError when they disagree."""
    path = shard_path(spec, root)
    declared = media_of(read_index(path, storage)) if is_split_folder(path) else None
    if declared is not None and declared not in MEDIA:
        raise ValueError(f"{path}: index.json says media={declared!r}, expected one of {', '.join(MEDIA)}")
    if given and declared and given != declared:
        raise ValueError(f"{spec}: the config says media {given} but its index.json says {declared}")
    return given or declared or "video"


def plan_readers(num_shards: int, world_size: int, num_workers: int, total: int | None, counts_known: bool) -> str:
    """How the R = world_size * num_workers readers split a train split of `num_shards` shards (`total`
    samples; per-shard counts known or not): "" when each reads whole shards of its own, else one line saying
    how they share (the pre-launch check prints it). Raises ValueError when a reader would get no sample."""
    S, W = num_shards, max(1, num_workers)
    R = world_size * W
    if S >= R:
        return ""
    readers = (f"{S} shards for {R} readers ({world_size} ranks x {W} data workers): readers share shards and "
               f"split their samples, none read twice in an epoch")
    if counts_known and total is not None:
        per_rank = total // world_size
        if per_rank < W:
            raise ValueError(f"the train split has {total} samples: {total} // world_size {world_size} = {per_rank} "
                             f"per rank and epoch, fewer than num_workers = {W}; every data worker needs at least "
                             f"one sample: lower DataConfig.num_workers")
        sizes = sorted({worker_quota(per_rank, w, W) for w in range(W)})
        rest = total - world_size * per_rank
        return (f"{readers}: each epoch lays the shards end to end in that epoch's order and reader "
                f"g = rank + {world_size} * worker reads the g-th of {R} consecutive blocks of "
                f"{' or '.join(map(str, sizes))} samples" + (f" ({rest} left for later epochs)" if rest else ""))
    sharers = sorted({-(-(R - s) // S) for s in range(S)})
    return (f"{readers}: reader g = rank + {world_size} * worker reads every m-th sample of shard g % {S} of each "
            f"epoch's order, from sample g // {S} (m = {' or '.join(map(str, sharers))} readers per shard); without "
            f"per-shard counts an epoch is one pass over that share")


def describe_readers(cfg: DataConfig, world_size: int, root: str | None = None, spec: str | None = None) -> str:
    """`plan_readers` for cfg.train_shards (or one source's path `spec`) read by `world_size` ranks: what the
    pre-launch check prints."""
    spec = cfg.sources[0].path if spec is None else spec
    shards = resolve_shards(spec, root, cfg.storage)
    total, counts = _split_counts(spec, shards, root, cfg.storage)
    return plan_readers(len(shards), world_size, cfg.num_workers, total, counts is not None)


def _resume_check(cfg: DataConfig, rank: int, world_size: int, num_shards: int) -> dict:
    """What a saved data position depends on; a resume under other values is refused."""
    return {"world_size": world_size, "rank": rank, "num_workers": cfg.num_workers, "seed": cfg.seed,
            "shuffle_buffer": cfg.shuffle_buffer, "num_shards": num_shards}


def epoch_start_state(cfg: DataConfig, rank: int, world_size: int, epoch: int, root: str | None = None) -> dict:
    """A data state (for build_train_loader(state=)) with every worker of this rank at the start of
    `epoch`: where to continue when saved positions do not map onto this run (a world-size change). A
    mixture starts every source at `epoch` and its schedule and samples-seen counts from 0."""
    states = {}
    for source in cfg.sources:
        shards = resolve_shards(source.path, root, cfg.storage)
        states[source.name] = {"epoch_pos": {w: [int(epoch), 0] for w in range(max(1, cfg.num_workers))},
                               "next_worker": 0, "skipped": {}, **_resume_check(cfg, rank, world_size, len(shards))}
    if isinstance(cfg.train_shards, str):
        return states[SINGLE]
    return {"mixture": mixture_signature(cfg), "position": 0, "sources": states,
            "epoch_pos": {f"{name}/{w}": p for name, st in states.items() for w, p in st["epoch_pos"].items()}}


def resized_state(cfg: DataConfig, rank: int, world_size: int, saved: list[dict], root: str | None = None) -> dict:
    """The data state of rank `rank` of `world_size` for a run saved at another world size, from every old rank's
    state_dict() `saved`: every worker (of every source) starts the epoch after the furthest any old worker
    reached (old positions do not map onto new workers); a mixture's schedule continues at the saved position;
    the samples each source handed out carry over, all into rank 0's counts (the trainer sums over ranks)."""
    epoch = 1 + max(int(e) for old in saved for e, _ in old["epoch_pos"].values())
    state = epoch_start_state(cfg, rank, world_size, epoch, root)
    _check_same_kind(cfg, saved)
    if isinstance(cfg.train_shards, str):
        if rank == 0:
            state["seen"] = sum(int(old.get("seen", 0)) for old in saved)
        return state
    if any(old.get("mixture") != state["mixture"] for old in saved):
        raise ValueError(f"the data state was saved with the mixture {saved[0].get('mixture')} but this run has "
                         f"{state['mixture']}; resuming a mixture with other sources or weights is not supported")
    state["position"] = int(saved[0]["position"])  # the same on every rank
    for name, source in state["sources"].items():
        source["seen"] = sum(int(old["sources"][name].get("seen", 0)) for old in saved) if rank == 0 else 0
    return state


def _split_counts(spec: str, shards: list[str], root: str | None,
                  storage: Storage) -> tuple[int | None, dict[str, int] | None]:
    """(samples, samples per shard URL) of a split folder per its index.json, each None when not given
    (a brace pattern gives neither)."""
    path = shard_path(spec, root)
    if not is_split_folder(path):
        return None, None
    index = read_index(path, storage)
    total = int(index.get("num_samples", sum(index.get("counts", [])))) or None
    counts = index.get("counts")
    if not (isinstance(counts, list) and len(counts) == len(shards)):
        return total, None
    return total, {url: int(n) for url, n in zip(shards, counts)}


def build_eval_loader(cfg: DataConfig, tokenizer_path: str, rank: int, world_size: int,
                      root: str | None = None) -> DataLoader:
    """Finite batches over the val split; every sample once across ranks; a rank may get none."""
    assert 0 <= rank < world_size, f"rank {rank} outside world_size {world_size}"
    mine = resolve_shards(cfg.val_shards, root, cfg.storage)[rank::world_size]
    stream = EvalStream(cfg, mine, tokenizer_path, set_media(cfg.val_shards, "", root, cfg.storage))
    return DataLoader(stream, batch_size=None, num_workers=min(cfg.num_workers, len(mine)),
                      collate_fn=_identity, in_order=True, generator=torch.Generator().manual_seed(cfg.seed))
