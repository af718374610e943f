"""`python -m shards build --manifest FILE.jsonl --out DIR_OR_S3_URL`: videos + sentences -> shards.

The manifest (shards/manifest.py) lists videos with timed sentences. Worker processes prepare
samples (fetch, copy or re-encode, optional depth) in manifest order; the main process packs
them into NAME-%06d.tar, closing a shard at --per-shard samples or before it
would pass --max-shard-bytes. Each tar is written under a temporary name and renamed (or uploaded,
which S3 shows only once complete); then a line goes into build.jsonl (the journal: which records
each shard holds, which were skipped and why). A re-run reads the journal and continues after the
last finished shard; index.json is written last. A video that cannot be used is skipped and
reported, never fatal; a malformed manifest line stops the build before any work.

A manifest of images ("image" instead of "video") gives a set of one-frame samples, KEY.jpg + KEY.json:
a JPEG is stored byte for byte, any other image PIL decodes is re-encoded as JPEG (quality
JPEG_QUALITY); an image that does not decode fully is skipped (bad_image). A set holds one kind.

`--part I/N` builds only part I (0-based) of N: the contiguous manifest records [I*n//N, (I+1)*n//N),
into NAME-pIIIIofNNNN-%06d.tar with its own journal build-pIIIIofNNNN.jsonl (same resume), and no
index.json: once every part is done, `python -m shards index OUT` (shards/index.py) writes it.
"""

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
from dataclasses import asdict, dataclass, field
from functools import partial

from tqdm import tqdm

from shards import format as fmt
from shards.manifest import NOT_COPIED, clip_sentences, media_of, read_manifest
from shards.preflight import require_file, require_folder
from shards.storage import Storage, is_url, join
from shards.transcode import SegmentOutsideVideo, store
from shards.video import EmptyVideoError

log = logging.getLogger("shards")
JOURNAL = "build.jsonl"
PART_JOURNAL = re.compile(r"build-p(\d{4,})of(\d{4,})\.jsonl")
JPEG_QUALITY = 95  # images that are not JPEG already are stored as JPEG at this quality (4:2:0)


@dataclass(frozen=True, order=True)
class Part:
    """Part `index` (0-based) of `count`: the contiguous manifest records [index*n//count, (index+1)*n//count),
    so the parts in order hold exactly the records of a single-machine build, in its order."""
    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"--part must be I/N with 0 <= I < N, got {self.index}/{self.count}")

    @property
    def tag(self) -> str:  # p0003of0016: in its shard names and journal name, so parts never collide
        return f"p{self.index:04d}of{self.count:04d}"

    def records(self, n: int) -> tuple[int, int]:
        return self.index * n // self.count, (self.index + 1) * n // self.count


def journal_name(part: Part | None) -> str:
    return JOURNAL if part is None else f"build-{part.tag}.jsonl"


def part_journals(names: list[str]) -> dict[Part, str]:
    """The part journals among a folder's file names, by part."""
    return {Part(int(m[1]), int(m[2])): name for name in names if (m := PART_JOURNAL.fullmatch(name))}


def same_build(a: dict | None, b: dict | None, ignore: tuple[str, ...] = ("manifest", "part", "records")) -> bool:
    """Two journal headers describe the same build (manifest bytes, settings); by default parts of it may differ."""
    strip = lambda h: {k: v for k, v in h.items() if k not in ignore} if isinstance(h, dict) else h  # noqa: E731
    return strip(a) == strip(b)


@dataclass(frozen=True)
class BuildSettings:
    name: str = "shard"  # shards are NAME-000000.tar
    per_shard: int = 0  # samples per shard; 0 = no limit
    max_shard_bytes: int = 1_000_000_000  # a shard closes before it would pass this (one huge sample still fits)
    fps: float | None = None  # re-encode to this frame rate; None = keep
    short_side: int | None = None  # re-encode so the short side is at most this; None = keep
    gop_seconds: float = 1.0  # keyframe interval of re-encoded video: the reader's seek granularity
    crf: int = 23  # libx264 quality of re-encoded video
    depth_model: str | None = None  # local transformers depth-estimation folder; None = no depth
    depth_size: int = 64  # short side of the stored depth maps

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "./{}"):
            raise ValueError(f"--name must be non-empty without '.', '/', braces, got {self.name!r}")
        if self.per_shard < 0 or self.max_shard_bytes < 1:
            raise ValueError("--per-shard must be >= 0 and --max-shard-bytes >= 1")
        for name in ("fps", "short_side", "gop_seconds", "depth_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")


@dataclass
class Prepared:
    """One manifest record after the worker: a sample ready to pack, or the reason it was skipped."""
    line: int
    id: str
    key: str = ""
    meta: dict = field(default_factory=dict)
    video: str = ""  # local file holding the MP4 (or, for an image sample, the JPEG)
    video_is_temp: bool = False
    ext: str = "mp4"  # its tar member: KEY.mp4 or KEY.jpg
    depth: str = ""  # local .npz file, or ""
    meta_bytes: bytes = b""
    reason: str = ""  # set when skipped
    detail: str = ""


# ---- one sample (in a worker process) ----------------------------------------------------------


def prepare(item: tuple[int, dict], settings: BuildSettings, tmp: str, storage: Storage, threads: int) -> Prepared:
    line, record = item
    out = Prepared(line=line, id=record["id"], key=record["key"])
    if media_of(record) == "image":
        return prepare_image(out, record, tmp, storage)
    fetched = ""
    try:
        src = record["video"]
        if is_url(src):
            fetched = src = _fetch(src, tmp, storage)
        problem = _input_problem(src, "video")
        if problem:
            return _skip(out, *problem)
        out.video, out.video_is_temp = os.path.join(tmp, f"{out.key}.mp4"), True
        depth = None
        if settings.depth_model:
            from shards.depth import DepthMaps

            depth = DepthMaps(settings.depth_model, settings.depth_size)
        try:
            segment = tuple(record["segment"]) if record.get("segment") else None
            how, p = store(src, out.video, settings.fps, settings.short_side, settings.gop_seconds, settings.crf,
                           threads, on_frame=depth.add if depth else None, segment=segment)
        except SegmentOutsideVideo as e:
            return _skip(out, "segment_outside_video", str(e))
        except EmptyVideoError as e:
            return _skip(out, "zero_length_video", str(e))
        except Exception as e:  # PyAV raises many types on corrupt input
            return _skip(out, "bad_video", repr(e))
        if p.num_frames == 0 or p.fps <= 0:
            return _skip(out, "zero_length_video", f"{p.num_frames} frames at {p.fps} fps")
        sentences, dropped = clip_sentences(record["sentences"], p.duration)
        if not sentences:
            return _skip(out, "no_sentences_in_video", f"{len(record['sentences'])} sentences, duration {p.duration:.2f}s")
        if depth is not None:
            out.depth = os.path.join(tmp, f"{out.key}.depth.npz")
            with open(out.depth, "wb") as f:
                f.write(fmt.npz_bytes(depth=depth.result()))
        extra = {k: v for k, v in record.items() if k not in NOT_COPIED}  # task labels etc., as given
        out.meta = extra | {"id": record["id"], "duration": p.duration, "fps": p.fps, "num_frames": p.num_frames,
                    "width": p.width, "height": p.height, "sentences": sentences,
                    "source": record["source"],
                    "build": {"video": how, "codec": p.codec, "sentences_dropped": dropped,
                              "depth_model": os.path.basename(settings.depth_model.rstrip("/")) if depth else None}}
        return out
    finally:
        if fetched and os.path.exists(fetched):
            os.remove(fetched)


def prepare_image(out: Prepared, record: dict, tmp: str, storage: Storage) -> Prepared:
    """An image record -> KEY.jpg (a JPEG copied byte for byte, else re-encoded) and its KEY.json."""
    from PIL import Image, ImageOps

    fetched = ""
    try:
        src = record["image"]
        if is_url(src):
            fetched = src = _fetch(src, tmp, storage)
        problem = _input_problem(src, "image")
        if problem:
            return _skip(out, *problem)
        out.video, out.video_is_temp, out.ext = os.path.join(tmp, f"{out.key}.jpg"), True, "jpg"
        try:
            with Image.open(src) as img:
                img.load()  # decodes the whole image: a truncated or corrupt file fails here
                width, height = img.size
                if img.format == "JPEG":
                    shutil.copyfile(src, out.video)
                    how = "copy"
                else:  # re-encoding drops EXIF, so its orientation is applied to the pixels first
                    upright = ImageOps.exif_transpose(img)
                    width, height = upright.size
                    alpha = "A" in upright.getbands() or "transparency" in upright.info
                    rgb = upright.convert("RGBA") if alpha else upright
                    if rgb.mode == "RGBA":  # transparent pixels become white, not whatever colour they hide
                        flat = Image.new("RGB", rgb.size, (255, 255, 255))
                        flat.paste(rgb, mask=rgb.getchannel("A"))
                        rgb = flat
                    rgb.convert("RGB").save(out.video, format="JPEG", quality=JPEG_QUALITY)
                    how = "reencode"
        except Exception as e:  # PIL raises many types on corrupt input
            return _skip(out, "bad_image", repr(e))
        if width < 1 or height < 1:
            return _skip(out, "bad_image", f"{width}x{height}")
        sentences = [{"text": s["text"].strip(), "start": 0.0, "end": 0.0} for s in record["sentences"]
                     if s["text"].strip()]
        if not sentences:
            return _skip(out, "no_sentences", "no caption")
        extra = {k: v for k, v in record.items() if k not in NOT_COPIED}
        out.meta = extra | {"id": record["id"], "media": "image", "width": width, "height": height,
                            "sentences": sentences, "source": record["source"], "build": {"image": how}}
        return out
    finally:
        if fetched and os.path.exists(fetched):
            os.remove(fetched)


def _input_problem(src: str, kind: str) -> tuple[str, str] | None:
    """("missing_KIND" | "zero_length_KIND", path) for an input file that is not there or is empty, else None."""
    if not os.path.isfile(src):
        return f"missing_{kind}", src
    if os.path.getsize(src) == 0:
        return f"zero_length_{kind}", src
    return None


def _skip(out: Prepared, reason: str, detail: str) -> Prepared:
    if out.video_is_temp and os.path.exists(out.video):
        os.remove(out.video)
    out.reason, out.detail, out.video, out.video_is_temp = reason, detail, "", False
    return out


def _fetch(url: str, tmp: str, storage: Storage) -> str:
    local = os.path.join(tmp, "fetch-" + hashlib.sha256(url.encode()).hexdigest()[:16])
    if not storage.exists(url):
        return local + ".missing"
    with storage.open(url) as fin, open(local, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
    return local


# ---- packing (main process) ----------------------------------------------------------------------


class Packer:
    """Collects prepared samples into the current shard; `flush` writes it and journals it."""

    def __init__(self, out: str, settings: BuildSettings, storage: Storage, journal: "Journal", next_shard: int,
                 tmp: str, stem: str):
        self.out, self.settings, self.storage, self.journal, self.stem = out, settings, storage, journal, stem
        self.shard, self.tmp = next_shard, tmp
        self.samples: list[Prepared] = []
        self.sizes: list[int] = []
        self.skipped: list[dict] = []

    def add(self, p: Prepared, cursor: int) -> None:
        if p.reason:
            log.warning("skipped %s (line %d): %s %s", p.id, p.line, p.reason, p.detail)
            self.skipped.append({"line": p.line, "id": p.id, "reason": p.reason, "detail": p.detail})
            return
        p.meta_bytes = json.dumps(p.meta).encode("utf-8")
        sizes = [os.path.getsize(p.video), len(p.meta_bytes)] + ([os.path.getsize(p.depth)] if p.depth else [])
        full = self.settings.per_shard and len(self.samples) >= self.settings.per_shard
        if self.samples and (full or fmt.tar_size(self.sizes + sizes) > self.settings.max_shard_bytes):
            self.flush(cursor)
        self.samples.append(p)
        self.sizes += sizes

    def flush(self, cursor: int, final: bool = False) -> None:
        """Write the current shard (if any), then journal it with the records up to `cursor`."""
        entry: dict = {"records_end": cursor, "skipped": self.skipped}
        if self.samples:
            name = f"{self.stem}-{self.shard:06d}.tar"
            members: dict = {}
            for p in self.samples:
                members[f"{p.key}.{p.ext}"] = p.video
                members[f"{p.key}.json"] = p.meta_bytes
                if p.depth:
                    members[f"{p.key}.depth.npz"] = p.depth
            local = join(self.out, name) if not is_url(self.out) else os.path.join(self.tmp, name)
            fmt.write_tar(local, members)
            size = os.path.getsize(local)
            if is_url(self.out):
                self.storage.put_file(local, join(self.out, name))
            entry |= {"shard": name, "count": len(self.samples), "bytes": size,
                      "duration": sum(p.meta.get("duration", 0.0) for p in self.samples),
                      "sentences": sum(len(p.meta["sentences"]) for p in self.samples)}
            for p in self.samples:
                for path in (p.video if p.video_is_temp else "", p.depth):
                    if path:
                        os.remove(path)
            self.shard += 1
        if self.samples or self.skipped or final:
            self.journal.append(entry | ({"done": True} if final else {}))
        self.samples, self.sizes, self.skipped = [], [], []


def read_journal(url: str, storage: Storage) -> list[dict]:
    """A journal's lines: the header line, then the entries. Remote ones are read whole in one request:
    another part may be rewriting its journal right now, and a reader opened through s3fs pins the ETag
    of an earlier listing of the folder, so it would fail on every retry once the object changed."""
    if is_url(url):
        data = storage.retry(f"read {url}", storage.fs(url).cat_file, url)
    else:
        data = storage.read_bytes(url)
    return [json.loads(x) for x in data.decode().splitlines() if x.strip()]


class Journal:
    """build.jsonl (a part's: build-pIIIIofNNNN.jsonl): a header line, then one line per finished shard;
    rewritten whole (object stores cannot append)."""

    def __init__(self, out: str, storage: Storage, header: dict, name: str = JOURNAL):
        self.name, self.url, self.storage = name, join(out, name), storage
        self.lines = [{"header": header}]
        if storage.exists(self.url):
            old = read_journal(self.url, storage)
            if not same_build(old[0].get("header"), header, ignore=("manifest",)):  # the same file, spelt otherwise
                raise SystemExit(f"{out} holds a build of another manifest or other settings ({self.url}); "
                                 "build into a new folder, or delete this one first")
            self.lines = old

    @property
    def header(self) -> dict:
        return self.lines[0]["header"]

    @property
    def entries(self) -> list[dict]:
        return self.lines[1:]

    def append(self, entry: dict) -> None:
        self.lines.append(entry)
        self.save()

    def save(self) -> None:
        self.storage.write_bytes(self.url, "".join(json.dumps(x) + "\n" for x in self.lines).encode())


def build(manifest: str, out: str, settings: BuildSettings, workers: int = 1, storage: Storage = Storage(),
          tmp_root: str | None = None, progress: bool = True, part: Part | None = None) -> dict:
    """Build (or finish building) the shard set, or only `part` of it; returns its index (a part's is
    not written: `python -m shards index` merges the parts' journals)."""
    records, digest = read_manifest(manifest, storage)
    start, end = part.records(len(records)) if part else (0, len(records))
    header = {"format": fmt.FORMAT_VERSION, "manifest_sha256": digest, "settings": asdict(settings)}
    if media_of(records[0]) == "image":  # (a video build's header has no "media": journals of older builds match)
        video_only = [f"--{k.replace('_', '-')}" for k in ("fps", "short_side", "depth_model") if getattr(settings, k)]
        if video_only:
            raise SystemExit(f"{manifest} holds images; {', '.join(video_only)} "
                             f"{'applies' if len(video_only) == 1 else 'apply'} to videos only")
        header["media"] = "image"
    if part:
        header |= {"part": [part.index, part.count], "records": [start, end], "manifest": manifest}
    if not is_url(out):
        os.makedirs(out, exist_ok=True)
    check_out(out, storage, header, part)
    journal = Journal(out, storage, header, journal_name(part))
    if part and not journal.entries:
        journal.save()  # before its first shard: a part starting later sees a build in parts here, not strangers
    done = journal.entries and journal.entries[-1].get("done")
    if done and (part or storage.exists(join(out, fmt.INDEX))):
        log.info("%s is complete (%s); nothing to do", out if part is None else f"part {part.tag}", journal.name)
        return fmt.read_index(out, storage) if part is None else make_index(journal.entries, journal.header, manifest)
    stem = settings.name if part is None else f"{settings.name}-{part.tag}"
    _drop_stale_temp_files(out, None if part is None else (f"{stem}-", journal.name))
    shards = [e for e in journal.entries if "shard" in e]
    existing = set(storage.listdir(out)) if storage.isdir(out) else set()
    missing = [e["shard"] for e in shards if e["shard"] not in existing]
    if missing:
        raise SystemExit(f"{journal.name} lists {missing[0]} but it is gone from {out}; delete the folder and rebuild")
    cursor = journal.entries[-1]["records_end"] if journal.entries else start
    if cursor > start:
        log.info("resuming after %d finished shards (%d of %d records done)", len(shards), cursor - start, end - start)
    tmp = tempfile.mkdtemp(prefix="shards-build-", dir=tmp_root)
    try:
        packer = Packer(out, settings, storage, journal, len(shards), tmp, stem)
        threads = 0 if workers <= 1 else 1  # one process: let the codecs use every core
        job = partial(prepare, settings=settings, tmp=tmp, storage=storage, threads=threads)
        todo = list(enumerate(records[cursor:end], start=cursor + 1))  # (line number, record)
        bar = tqdm(total=end - start, initial=cursor - start, desc=f"build {stem}", unit=header.get("media", "video"),
                   disable=not progress, dynamic_ncols=True)
        skipped = sum(len(e["skipped"]) for e in journal.entries)
        with _pool(workers) as pool:
            for n, prepared in enumerate(pool(job, todo), start=cursor):
                packer.add(prepared, cursor=n)
                skipped += bool(prepared.reason)
                bar.update(1)
                bar.set_postfix(shards=packer.shard, skipped=skipped)
        packer.flush(end, final=True)
        bar.set_postfix(shards=packer.shard, skipped=skipped)
        bar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index = make_index(journal.entries, journal.header, manifest)
    if part is None:
        fmt.write_index(out, index, storage)
    return index


def make_index(entries: list[dict], header: dict, manifest: str) -> dict:
    """index.json from journal entries (one build's, or every part's in part order) and the build's header."""
    shards = [e for e in entries if "shard" in e]
    skipped: dict[str, int] = {}
    for e in entries:
        for s in e["skipped"]:
            skipped[s["reason"]] = skipped.get(s["reason"], 0) + 1
    return {"format": fmt.FORMAT_VERSION, "media": header.get("media", "video"),
            "shards": [e["shard"] for e in shards], "counts": [e["count"] for e in shards],
            "bytes": [e["bytes"] for e in shards], "num_samples": sum(e["count"] for e in shards),
            "total_duration": sum(e["duration"] for e in shards), "num_sentences": sum(e["sentences"] for e in shards),
            "skipped": skipped,
            "settings": header["settings"] | {"manifest": manifest, "manifest_sha256": header["manifest_sha256"]}}


def check_out(out: str, storage: Storage, header: dict, part: Part | None) -> None:
    """Refuse an --out that holds shards of another kind: not from this builder, a single-machine build
    against parts (or parts of another N), parts of another manifest or other settings."""
    names = storage.listdir(out) if storage.isdir(out) else []
    parts = part_journals(names)
    if not parts and JOURNAL not in names and any(n == fmt.INDEX or n.endswith(".tar") for n in names):
        raise SystemExit(f"{out} already holds shards that this builder did not make; choose another --out")
    if part is None:
        if parts:
            first, name = min(parts.items())
            raise SystemExit(f"{out} holds a build in {first.count} parts ({name}, ...): finish it with "
                             f"--part I/{first.count} and `python -m shards index`, or choose another --out")
        return
    if JOURNAL in names:
        raise SystemExit(f"{out} holds a single-machine build ({JOURNAL}); build parts into another --out")
    other = min((p for p in parts if p.count != part.count), default=None)
    if other:
        raise SystemExit(f"{out} holds a build in {other.count} parts ({parts[other]}), not {part.count}: "
                         f"use --part I/{other.count}, or another --out")
    sibling = min((p for p in parts if p != part), default=None)
    if sibling and not same_build(read_journal(join(out, parts[sibling]), storage)[0].get("header"), header):
        raise SystemExit(f"{out} holds parts of a build of another manifest or other settings ({parts[sibling]}); "
                         "build into a new folder, or delete this one first")


def _drop_stale_temp_files(out: str, own: tuple[str, ...] | None = None) -> None:
    """Temporary files of a crashed run (local output only; remote uploads are all-or-nothing): all of
    them, or only those whose names start with `own` (a part's: other parts may be writing theirs now)."""
    if is_url(out):
        return
    for name in os.listdir(out):
        if ".tmp-" in name and (own is None or name.startswith(own)):
            os.remove(os.path.join(out, name))


class _pool:
    """Ordered map over worker processes (in-process when workers <= 1), as a context manager."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def __enter__(self):
        if self.workers <= 1:
            return map
        self.pool = multiprocessing.Pool(self.workers, initializer=_worker_init)
        return lambda fn, items: self.pool.imap(fn, items, chunksize=1)

    def __exit__(self, exc_type, *exc):
        if self.pool is not None:
            self.pool.close() if exc_type is None else self.pool.terminate()
            self.pool.join()


def _worker_init() -> None:
    import torch

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool's terminate() ends workers at once
    torch.set_num_threads(1)  # processes are the parallelism (and OpenMP after fork must not spawn threads)


def _stop(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


# ---- command line ------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """"500MB" / "1.5GB" / "2e9" / "1GiB" -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    unit = t[len(number):]
    if unit not in units:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; e.g. 500MB, 1GB, 2e9")
    return int(float(number) * units[unit])


def parse_part(text: str) -> Part:
    """"3/16" -> Part(3, 16)."""
    try:
        index, count = (int(x) for x in text.split("/"))
        return Part(index, count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad part {text!r}: I/N with 0 <= I < N, e.g. 3/16") from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("build", help="write shards from a manifest of videos and timed sentences",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="JSON lines: id, video (or image), sentences (see FORMAT.md)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    d = BuildSettings()
    p.add_argument("--name", default=None, help="shard name prefix (default: the manifest's file name)")
    p.add_argument("--per-shard", type=int, default=d.per_shard, help="samples per shard (0 = limited by bytes only)")
    p.add_argument("--max-shard-bytes", type=parse_bytes, default=d.max_shard_bytes, help="e.g. 500MB, 1GB")
    p.add_argument("--fps", type=float, default=None, help="re-encode to this frame rate (default: copy)")
    p.add_argument("--short-side", type=int, default=None, help="re-encode with this short side at most")
    p.add_argument("--gop-seconds", type=float, default=d.gop_seconds, help="keyframe interval when re-encoding")
    p.add_argument("--crf", type=int, default=d.crf, help="libx264 quality when re-encoding")
    p.add_argument("--depth-model", default=None, help="local transformers depth-estimation folder")
    p.add_argument("--depth-size", type=int, default=d.depth_size, help="short side of the depth maps")
    p.add_argument("--workers", type=int, default=1, help="processes preparing videos")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL[_S3] or AWS)")
    p.add_argument("--tmp-dir", default=None, help="local scratch space for re-encoded videos")
    p.add_argument("--part", type=parse_part, default=None, metavar="I/N",
                   help="build only part I (0-based) of N of the manifest; then `python -m shards index OUT`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    storage = Storage(args.s3_endpoint)
    require_file(args.manifest, "manifest", storage)  # its lines are checked by build() before any work
    if args.depth_model:
        require_folder(args.depth_model, "depth model")
        require_file(os.path.join(args.depth_model, "config.json"), "depth model config")
    if args.tmp_dir:
        require_folder(args.tmp_dir, "--tmp-dir")
    name = args.name or os.path.splitext(os.path.basename(args.manifest.rstrip("/")))[0].replace(".", "_")
    settings = BuildSettings(name=name, per_shard=args.per_shard, max_shard_bytes=args.max_shard_bytes, fps=args.fps,
                             short_side=args.short_side, gop_seconds=args.gop_seconds, crf=args.crf,
                             depth_model=os.path.abspath(args.depth_model) if args.depth_model else None,
                             depth_size=args.depth_size)
    # scancel, preemption: end through the cleanup (the scratch folder of re-encoded videos), then resume later
    signal.signal(signal.SIGTERM, _stop)
    index = build(args.manifest, args.out, settings, args.workers, storage, args.tmp_dir, part=args.part)
    summary = (f"{index['num_samples']} samples in {len(index['shards'])} shards, "
               f"{index['total_duration'] / 3600:.2f} h; skipped: {index['skipped'] or 'none'}")
    if args.part is None:
        print(f"{args.out}: {summary}")
        return 0 if index["num_samples"] else 1
    endpoint = f" --s3-endpoint {args.s3_endpoint}" if args.s3_endpoint else ""
    print(f"{args.out}: part {args.part.index}/{args.part.count}: {summary}\n"
          f"once all {args.part.count} parts are done: python -m shards index {args.out}{endpoint}")
    return 0  # a part without samples is no failure: the set is judged when the parts are merged
