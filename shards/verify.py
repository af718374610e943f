"""`python -m shards verify DIR_OR_URL`: open and fully decode every sample; list bad ones; exit 1 if any.

Checks per sample: the tar reads; KEY.mp4 and KEY.json are there; the JSON has the fields the
format requires; every sentence lies inside the video (0 <= start < end <= duration + one frame);
every video frame decodes and their count matches the JSON; KEY.depth.npz, if there, holds one
map per frame. An image sample (KEY.jpg, "media": "image" in KEY.json): the JPEG decodes fully
at the JSON's width x height, and it has a caption. Across the set: keys are unique and index.json's
counts match the tars.
"""

import argparse
import io
import multiprocessing
import sys
from functools import partial

import json

import av
import numpy as np

from shards import format as fmt
from shards.preflight import require_shards
from shards.storage import Storage


def check_sample(raw: dict) -> tuple[str, str] | None:
    """-> (reason, detail) for a bad sample, None for a good one."""
    if "__error__" in raw:
        return raw["__error__"], raw.get("__detail__", "")
    if "jpg" in raw or _is_image_meta(raw.get("json")):
        return check_image(raw)
    for ext in ("json", "mp4"):
        if ext not in raw:
            return f"missing_{ext}", ""
    try:
        meta = fmt.parse_meta(raw["json"])
    except fmt.FormatError as e:
        return e.reason, e.detail
    duration, fps = meta["duration"], meta["fps"]
    if not meta["sentences"]:
        return "no_sentences", ""
    for s in meta["sentences"]:
        if not (0 <= s["start"] < s["end"] <= duration + 1 / fps) or not s["text"].strip():
            return "sentence_outside_video", f"{s} in a {duration:.3f}s video"
    if len(raw["mp4"]) == 0:
        return "zero_length_video", "0 bytes"
    try:
        frames = count_frames(raw["mp4"])
    except Exception as e:  # PyAV raises many types on corrupt input
        return "bad_video", repr(e)
    if frames == 0:
        return "zero_length_video", "no frames"
    promised = fmt.num_frames(meta)
    if abs(frames - promised) > max(1, 0.01 * promised):
        return "frame_count_mismatch", f"{frames} frames decode, the JSON says {promised}"
    if "depth.npz" in raw:
        try:
            with np.load(io.BytesIO(raw["depth.npz"]), allow_pickle=False) as npz:
                depth = npz["depth"]
            if depth.ndim != 3 or len(depth) != frames or not np.isfinite(depth).all():
                raise ValueError(f"depth {depth.shape} {depth.dtype} for {frames} frames")
        except Exception as e:
            return "bad_depth", repr(e)
    return None


def _is_image_meta(data: bytes | None) -> bool:
    try:
        meta = json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("media") == "image"


def check_image(raw: dict) -> tuple[str, str] | None:
    """An image sample: KEY.jpg and KEY.json ({"media": "image", "width", "height", "sentences", ...})."""
    from PIL import Image

    for ext in ("json", "jpg"):
        if ext not in raw:
            return f"missing_{ext}", ""
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
        if meta.get("media") != "image":
            raise ValueError(f"media is {meta.get('media')!r}, not 'image', beside a KEY.jpg")
        width, height = int(meta["width"]), int(meta["height"])
        texts = [s["text"] for s in meta["sentences"]]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("a sentence text is not a string")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        return "bad_json", repr(e)
    if not any(t.strip() for t in texts):
        return "no_sentences", ""
    if len(raw["jpg"]) == 0:
        return "zero_length_image", "0 bytes"
    try:
        with Image.open(io.BytesIO(raw["jpg"])) as img:
            if img.format != "JPEG":
                raise ValueError(f"KEY.jpg holds {img.format}, not JPEG")
            img.load()
            size = img.size
    except Exception as e:  # PIL raises many types on corrupt input
        return "bad_image", repr(e)
    if size != (width, height):
        return "size_mismatch", f"{size[0]}x{size[1]} decodes, the JSON says {width}x{height}"
    return None


def count_frames(mp4: bytes) -> int:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def verify_shard(url: str, storage: Storage) -> dict:
    keys, bad = [], []
    for raw in fmt.read_tar(url, storage, members=fmt.MEMBERS + ("jpg",)):
        problem = check_sample(raw)
        if raw.get("__error__") is None:
            keys.append(raw["__key__"])
        if problem:
            bad.append((raw["__key__"], *problem))
    return {"url": url, "keys": keys, "bad": bad}


def verify(spec: str, storage: Storage = Storage(), workers: int = 1) -> dict:
    """-> {"shards", "samples", "bad": [(url, key, reason, detail)]}."""
    urls = fmt.resolve_shards(spec, storage=storage)
    counts = None
    if "{" not in spec and not spec.endswith(".tar"):
        index = fmt.read_index(spec, storage)
        counts = dict(zip(index["shards"], index.get("counts", [])))
    check = partial(verify_shard, storage=storage)
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            results = pool.map(check, urls, chunksize=1)
    else:
        results = [check(url) for url in urls]
    bad, seen = [], {}
    for r in results:
        bad += [(r["url"], *b) for b in r["bad"]]
        name = r["url"].rsplit("/", 1)[-1]
        if counts is not None and name in counts and counts[name] != len(r["keys"]):
            bad.append((r["url"], "-", "index_count_mismatch", f"index.json says {counts[name]}, the tar has {len(r['keys'])}"))
        for key in r["keys"]:
            if key in seen:
                bad.append((r["url"], key, "duplicate_key", f"also in {seen[key]}"))
            seen[key] = r["url"]
    return {"shards": len(urls), "samples": sum(len(r["keys"]) for r in results), "bad": bad}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="decode every sample of a shard set; exit 1 if any is bad",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="split folder or s3:// prefix with index.json, or a brace pattern of tars")
    p.add_argument("--workers", type=int, default=1, help="processes (one shard each at a time)")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint URL")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    storage = Storage(args.s3_endpoint)
    require_shards(args.shards, None, storage)  # missing or unreadable: exit 2 before any work (1 = bad samples)
    report = verify(args.shards, storage, args.workers)
    reasons: dict[str, int] = {}
    for url, key, reason, detail in report["bad"]:
        reasons[reason] = reasons.get(reason, 0) + 1
        print(f"BAD {url} {key}: {reason} {detail}")
    status = "OK" if not report["bad"] else "FAILED"
    print(f"{status}: {report['shards']} shards, {report['samples']} samples, {len(report['bad'])} bad "
          f"{reasons if reasons else ''}".rstrip())
    sys.stdout.flush()
    return 1 if report["bad"] else 0
