"""Synthetic video-language shards: coloured shapes moving in front of or behind each other.

Each video is M events. In an event one shape crosses the frame in a clear direction while a
second shape stands still near the centre; one of the two is nearer the camera and occludes the
other. One sentence per event, e.g. "a red circle moves left in front of a blue square".
Every video comes from its own numpy Generator seeded by (seed, split, index), so the output
does not depend on the number of worker processes.

The geometry corpus (`GEOMETRY`, `python -m shards synth --geometry`) is one where a contrastive loss
can only match paragraphs to videos by reading the relations: every event shows the same three shapes
(`cast="fixed"`) and the mover always goes right, so the negatives in a batch differ from the positive
in little but their relations; the mover stays over the still shape for the whole event
(`motion="overlap"`), so the occlusion that shows the depth order is in every frame; the shapes are larger.

Letters: T frames, S frame size (S x S).
"""

import argparse
import json
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
from tqdm import tqdm

from shards.format import npz_bytes, write_tar
from shards.video import encode_mp4, video_codec

COLOURS = {  # RGB, far apart so a pixel's nearest colour names its object
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 235), "yellow": (235, 225, 50),
    "white": (240, 240, 240), "purple": (150, 50, 200), "orange": (245, 140, 30), "cyan": (40, 215, 225),
}
BACKGROUND = (16, 16, 24)
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows down
RELATIONS = ("depth", "depth+plane")  # SynthSettings.relations
CASTS = ("random", "fixed")  # SynthSettings.cast
FIXED_CAST = (("red", "circle"), ("blue", "square"), ("green", "triangle"))  # cast "fixed": mover, still, landmark
MOTIONS = ("cross", "overlap")  # SynthSettings.motion
FLIPS = {"depth": ("in front of", "behind"), "plane": ("left of", "right of")}  # relation kind -> its two phrases
LONG_EVENTS = 8  # `--long`: events per video (the text encoder's default max_sentences)
SPLITS = {"train": 0, "val": 1}  # the second word of each video's seed: disjoint streams per split
GOP = 8


@dataclass(frozen=True)
class SynthSettings:
    events: int = 4  # M: events (and sentences) per video
    size: int = 64  # S: frame height and width, even
    fps: float = 8.0
    event_seconds: float = 2.0
    per_shard: int = 16  # videos per tar
    relations: str = "depth"  # "depth": in front of / behind; "depth+plane": also left of / right of a landmark
    cast: str = "random"  # "random": colours and shapes drawn per event; "fixed": FIXED_CAST in every event
    motion: str = "cross"  # "cross": the mover crosses the frame; "overlap": one still-shape radius either side
    #   of the still shape's centre, so the two overlap (and one occludes the other) in every frame
    radius: tuple[float, float] = (0.12, 0.18)  # mover and still shape radii, a uniform range in frame sizes
    directions: tuple[str, ...] = tuple(DIRECTIONS)  # the mover's directions, drawn uniformly

    def __post_init__(self):
        if self.relations not in RELATIONS:
            raise ValueError(f"relations must be one of {RELATIONS}, got {self.relations!r}")
        if self.cast not in CASTS:
            raise ValueError(f"cast must be one of {CASTS}, got {self.cast!r}")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {self.motion!r}")
        object.__setattr__(self, "radius", tuple(float(r) for r in self.radius))  # lists from JSON or YAML
        object.__setattr__(self, "directions", tuple(self.directions))
        if len(self.radius) != 2 or not 0.02 <= self.radius[0] <= self.radius[1] <= 0.3:
            raise ValueError(f"radius must be (low, high) with 0.02 <= low <= high <= 0.3, got {self.radius}")
        if not self.directions or any(d not in DIRECTIONS for d in self.directions):
            raise ValueError(f"directions must be a non-empty subset of {tuple(DIRECTIONS)}, got {self.directions}")
        for name in ("events", "size", "per_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.size % 2 or self.size < 16:
            raise ValueError(f"size must be even and >= 16 (yuv420p), got {self.size}")
        if self.fps <= 0 or self.event_seconds <= 0:
            raise ValueError(f"fps and event_seconds must be > 0, got {self.fps}, {self.event_seconds}")
        n = self.event_seconds * self.fps
        if abs(n - round(n)) > 1e-6 or round(n) < 2:
            raise ValueError(f"event_seconds * fps must be a whole number of frames >= 2, got {n}")

    @property
    def frames_per_event(self) -> int:
        return round(self.event_seconds * self.fps)


# The geometry corpus: SynthSettings(**GEOMETRY, ...). The two relations, the same shapes in every event, one
# direction, the shapes overlapping in every frame, radii 0.16-0.22 of the frame (5-7 pixels at 32x32).
GEOMETRY = dict(relations="depth+plane", cast="fixed", motion="overlap", radius=(0.16, 0.22), directions=("right",))


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str  # one of SHAPES
    radius: float  # pixels
    depth: float  # distance in (0, 1), background is 1.0; smaller = nearer
    start: tuple[float, float]  # centre (x, y) at the first frame of the event
    end: tuple[float, float]  # centre (x, y) at the last frame of the event


@dataclass(frozen=True)
class Event:
    mover: Shape
    still: Shape
    direction: str  # one of DIRECTIONS
    landmark: Shape | None = None  # relations "depth+plane": a still shape beside `still`, at its depth

    @property
    def mover_in_front(self) -> bool:
        return self.mover.depth < self.still.depth

    @property
    def still_side(self) -> str | None:
        """"left of" / "right of": where the still shape is relative to the landmark (None without one)."""
        if self.landmark is None:
            return None
        return "left of" if self.still.start[0] < self.landmark.start[0] else "right of"

    def relations(self) -> dict[str, str]:
        """Relation kind -> the phrase that is true in the frames, e.g. {"depth": "behind", "plane": "left of"}."""
        out = {"depth": "in front of" if self.mover_in_front else "behind"}
        if self.landmark is not None:
            out["plane"] = self.still_side
        return out

    def sentence(self) -> str:
        m, s = self.mover, self.still
        text = f"{_name(m)} moves {self.direction} {self.relations()['depth']} {_name(s)}"
        if self.landmark is not None:
            text += f" {self.still_side} {_name(self.landmark)}"
        return text


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _name(shape: Shape) -> str:
    return f"{_a(shape.colour)} {shape.colour} {shape.kind}"


_RELATION_RE = {kind: re.compile(rf"(?<= )({a}|{b})(?= (an?) )") for kind, (a, b) in FLIPS.items()}


def flip_relation(sentence: str, kind: str) -> str:
    """The sentence with its `kind` relation ("depth" or "plane") reversed: in front of <-> behind,
    left of <-> right of. Raises ValueError if the sentence has no such relation. The direction of
    motion ("moves left") is never touched: a relation phrase is always followed by "a"/"an"."""
    a, b = FLIPS[kind]
    flipped, n = _RELATION_RE[kind].subn(lambda m: b if m.group(1) == a else a, sentence)
    if n != 1:
        raise ValueError(f"{sentence!r} has {n} {kind} relations, expected 1")
    return flipped


def sample_event(rng: np.random.Generator, size: int, plane: bool = False,
                 settings: SynthSettings = SynthSettings()) -> Event:
    """Two shapes; the mover's path crosses the still shape's centre, so they overlap mid-event.
    plane: a third still shape (the landmark) beside the still one, left or right of it with a clear
    gap, at the still shape's depth. Without `plane` the random draws are those of the first corpus.
    settings: cast, motion, radius and directions (see SynthSettings); the defaults draw as before."""
    if plane:
        colour_m, colour_s, colour_l = rng.choice(list(COLOURS), size=3, replace=False)
        kind_l = rng.choice(SHAPES)
        r_l = size * rng.uniform(0.09, 0.12)
        still_left = bool(rng.random() < 0.5)  # the still shape is left of the landmark
    else:
        colour_m, colour_s = rng.choice(list(COLOURS), size=2, replace=False)
    kind_m, kind_s = rng.choice(SHAPES, size=2)
    if settings.cast == "fixed":  # the same draws as "random", then the fixed names
        (colour_m, kind_m), (colour_s, kind_s), (colour_l, kind_l) = FIXED_CAST
    r_m, r_s = size * rng.uniform(*settings.radius, size=2)
    direction = str(rng.choice(list(settings.directions)))
    dx, dy = DIRECTIONS[direction]
    centre = size * rng.uniform(0.35, 0.65, size=2)  # (x, y) of the still shape
    if plane:  # room for the landmark on one side: still at 0.22-0.38 of the width, landmark 0.36-0.44 further
        centre[0] = size * (rng.uniform(0.22, 0.38) if still_left else rng.uniform(0.62, 0.78))
        gap = size * rng.uniform(0.36, 0.44) * (1 if still_left else -1)
        at = (float(centre[0] + gap), float(centre[1] + size * rng.uniform(-0.08, 0.08)))
    a = 0 if dx else 1  # motion axis: 0 = x, 1 = y
    margin = size * rng.uniform(0, 0.05, size=2)
    lo, hi = r_m + margin[0], size - r_m - margin[1]  # the mover's centre range on that axis
    if settings.motion == "overlap":  # one still-shape radius either side of its centre: overlapping throughout
        lo, hi = centre[a] - r_s, centre[a] + r_s
    start = centre.copy()
    start[1 - a] += rng.uniform(-0.4, 0.4) * min(r_m, r_s)  # a little off the still shape's centre
    end = start.copy()
    start[a], end[a] = (lo, hi) if dx + dy > 0 else (hi, lo)
    near, far = rng.uniform(0.25, 0.4), rng.uniform(0.55, 0.75)
    mover_front = bool(rng.random() < 0.5)
    mover = Shape(str(colour_m), str(kind_m), float(r_m), near if mover_front else far,
                  tuple(map(float, start)), tuple(map(float, end)))
    still = Shape(str(colour_s), str(kind_s), float(r_s), far if mover_front else near,
                  tuple(map(float, centre)), tuple(map(float, centre)))
    landmark = Shape(str(colour_l), str(kind_l), float(r_l), still.depth, at, at) if plane else None
    return Event(mover, still, direction, landmark)


def shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """(S, S) bool mask of a shape centred at (cx, cy) in pixel coordinates."""
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if kind == "square":
        return (np.abs(x - cx) <= 0.85 * r) & (np.abs(y - cy) <= 0.85 * r)
    if kind == "triangle":  # apex up, base 2r wide
        return (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - cy + r) / 2)
    raise ValueError(f"unknown shape {kind!r}, allowed: {SHAPES}")


def shape_at(shape: Shape, t: float, size: int) -> np.ndarray:
    """Mask of `shape` at fraction t in [0, 1] of its event."""
    cx = shape.start[0] + t * (shape.end[0] - shape.start[0])
    cy = shape.start[1] + t * (shape.end[1] - shape.start[1])
    return shape_mask(shape.kind, cx, cy, shape.radius, size)


def render_event(event: Event, n_frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """-> frames (n, S, S, 3) uint8 and depth (n, S, S) float32, far shape drawn first."""
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    depth = np.empty((n_frames, size, size), np.float32)
    shapes = [event.mover, event.still] + ([event.landmark] if event.landmark else [])
    back_to_front = sorted(shapes, key=lambda s: -s.depth)  # stable: the landmark after the still shape
    for i in range(n_frames):
        frames[i], depth[i] = BACKGROUND, 1.0
        for shape in back_to_front:
            mask = shape_at(shape, i / (n_frames - 1), size)
            frames[i][mask] = COLOURS[shape.colour]
            depth[i][mask] = shape.depth
    return frames, depth


def render_video(rng: np.random.Generator, settings: SynthSettings) -> tuple[np.ndarray, np.ndarray, list[Event]]:
    """-> frames (T, S, S, 3) uint8, depth (T, S, S) float16, events; T = events * frames_per_event."""
    plane = settings.relations == "depth+plane"
    events = [sample_event(rng, settings.size, plane, settings) for _ in range(settings.events)]
    parts = [render_event(e, settings.frames_per_event, settings.size) for e in events]
    frames = np.concatenate([p[0] for p in parts])
    depth = np.concatenate([p[1] for p in parts]).astype(np.float16)
    return frames, depth, events


def video_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def video_key(split: str, index: int) -> str:
    return f"synth_{split}_{index:06d}"  # no dots: webdataset splits keys at the first dot


def make_sample(index: int, seed: int, split: str, settings: SynthSettings) -> dict[str, bytes]:
    """One video as tar members {"KEY.mp4": ..., "KEY.json": ..., "KEY.depth.npz": ...}."""
    key = video_key(split, index)
    frames, depth, events = render_video(video_rng(seed, split, index), settings)
    span = settings.event_seconds
    meta = {
        "id": key,
        "duration": len(frames) / settings.fps,
        "fps": settings.fps,
        "sentences": [{"text": e.sentence(), "start": i * span, "end": (i + 1) * span}
                      for i, e in enumerate(events)],
        "source": "synth",
    }
    if settings.relations != "depth":  # the true relation phrases per sentence (the default corpus keeps its bytes)
        for sentence, e in zip(meta["sentences"], events):
            sentence["relations"] = e.relations()
    return {
        f"{key}.mp4": encode_mp4(frames, settings.fps, gop=GOP),
        f"{key}.json": json.dumps(meta).encode("utf-8"),
        f"{key}.depth.npz": npz_bytes(depth=depth),
    }


def write_split(out_dir: str, split: str, num_videos: int, seed: int, settings: SynthSettings,
                workers: int = 1, name: str = "synth") -> dict:
    """Write `num_videos` videos as NAME-%06d.tar into out_dir, then index.json; returns the index."""
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, "index.json")
    if os.path.exists(index_path):
        os.remove(index_path)  # a half-rewritten split must not look complete
    make = partial(make_sample, seed=seed, split=split, settings=settings)
    shards, counts, pending = [], [], {}
    total_duration = num_videos * settings.events * settings.frames_per_event / settings.fps
    with _imap(make, range(num_videos), workers) as samples:
        for i, members in enumerate(tqdm(samples, total=num_videos, desc=f"synth {split}", unit="video")):
            pending.update(members)
            if (i + 1) % settings.per_shard == 0 or i + 1 == num_videos:
                shards.append(f"{name}-{len(shards):06d}.tar")
                counts.append(len(pending) // 3)
                write_tar(os.path.join(out_dir, shards[-1]), pending)
                pending = {}
    index = {"shards": shards, "counts": counts, "num_samples": num_videos,
             "total_duration": total_duration,
             "settings": {"seed": seed, "split": split, "codec": video_codec(), "gop": GOP,
                          **asdict(settings)}}
    with open(index_path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
    os.replace(index_path + ".tmp", index_path)
    return index


class _imap:
    """Ordered map over a process pool (or in-process when workers <= 1), as a context manager."""

    def __init__(self, fn, items, workers: int):
        self.fn, self.items, self.workers, self.pool = fn, items, workers, None

    def __enter__(self):
        if self.workers <= 1:
            return map(self.fn, self.items)
        self.pool = multiprocessing.Pool(self.workers)
        return self.pool.imap(self.fn, self.items, chunksize=4)

    def __exit__(self, exc_type, *exc):
        if self.pool is not None:
            self.pool.close() if exc_type is None else self.pool.terminate()
            self.pool.join()


def add_parser(subparsers) -> None:
    """`python -m shards synth ...`"""
    p = subparsers.add_parser("synth", help="write synthetic train/val shards",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder; gets train/ and val/")
    p.add_argument("--videos", type=int, required=True, help="training videos")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--val-videos", type=int, default=64, help="held-out videos (another seed stream)")
    p.add_argument("--events", type=int, default=None, help=f"events (sentences) per video (4; {LONG_EVENTS} with --long)")
    p.add_argument("--long", action="store_true", help=f"long videos: {LONG_EVENTS} events unless --events says otherwise")
    p.add_argument("--relations", choices=RELATIONS, default=None,
                   help="depth (the default): in front of / behind; depth+plane: also the still shape left of / "
                        "right of a landmark")
    p.add_argument("--geometry", action="store_true", help=f"the geometry corpus {GEOMETRY}; the flags below "
                   "and --relations override its fields")
    p.add_argument("--cast", choices=CASTS, default=None, help="random (the default): colours and shapes drawn "
                   f"per event; fixed: {FIXED_CAST} (mover, still, landmark) in every event")
    p.add_argument("--motion", choices=MOTIONS, default=None, help="cross (the default): the mover crosses the "
                   "frame; overlap: it stays over the still shape for the whole event")
    p.add_argument("--radius", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="mover and still shape radii in frame sizes (default 0.12 0.18)")
    p.add_argument("--directions", nargs="+", choices=list(DIRECTIONS), default=None,
                   help="the mover's directions (default all four)")
    p.add_argument("--size", type=int, default=64, help="frame height and width")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--event-seconds", type=float, default=2.0)
    p.add_argument("--per-shard", type=int, default=16, help="videos per tar")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    events = args.events if args.events is not None else (LONG_EVENTS if args.long else 4)
    chosen = {name: getattr(args, name) for name in ("relations", "cast", "motion", "radius", "directions")}
    corpus = {**(GEOMETRY if args.geometry else {}), **{k: v for k, v in chosen.items() if v is not None}}
    settings = SynthSettings(events=events, size=args.size, fps=args.fps, event_seconds=args.event_seconds,
                             per_shard=args.per_shard, **corpus)
    for split, n in (("train", args.videos), ("val", args.val_videos)):
        if n < 1:
            raise SystemExit(f"--{'videos' if split == 'train' else 'val-videos'} must be >= 1, got {n}")
        write_split(os.path.join(args.out, split), split, n, args.seed, settings, args.workers)
    return 0
