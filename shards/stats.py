"""`python -m shards stats DIR_OR_URL`: what a shard set holds and how big its shards are: for videos the
count, hours and sentences per video; for images (KEY.jpg samples, "media": "image") the count and pixels;
for both the words and the samples and bytes per shard.

Reads only the KEY.json members (local tars are seeked over, remote ones streamed); an image's pixels are
the width x height its KEY.json states (`shards build` writes them; images without them are counted).
"""

import argparse
import json

import numpy as np

from shards import format as fmt
from shards.preflight import require_shards
from shards.storage import Storage


def stats(spec: str, storage: Storage = Storage()) -> dict:
    urls = fmt.resolve_shards(spec, storage=storage)
    durations, sentences, words, per_shard, unreadable = [], [], [], [], 0
    megapixels, captions, unsized = [], [], 0  # images
    for url in urls:
        n = 0
        for raw in fmt.read_tar(url, storage, members=("json",)):
            try:
                meta = fmt.parse_meta(raw["json"]) if "json" in raw else None
            except fmt.FormatError:
                meta = None
            if meta is None:
                unreadable += 1
                continue
            n += 1
            words += [len(s["text"].split()) for s in meta["sentences"]]
            if fmt.media_of(meta) == "image":
                captions.append(len(meta["sentences"]))
                if "width" in meta and "height" in meta:
                    megapixels.append(meta["width"] * meta["height"] / 1e6)
                else:
                    unsized += 1
                continue
            durations.append(meta["duration"])
            sentences.append(len(meta["sentences"]))
        per_shard.append(n)
    sizes = [storage.size(url) for url in urls]
    media = "image" if captions and not durations else "mixed" if captions else "video"
    out = {"shards": len(urls), "media": media, "unreadable": unreadable}
    if media != "image":
        out |= {"videos": len(durations), "hours": sum(durations) / 3600, "video_seconds": _summary(durations),
                "sentences_per_video": _summary(sentences)}
    if media != "video":
        out |= {"images": len(captions), "pixels": round(sum(megapixels) * 1e6), "images_without_size": unsized,
                "image_megapixels": _summary(megapixels), "captions_per_image": _summary(captions)}
    return out | {
        "sentences": sum(sentences) + sum(captions), "words": sum(words), "words_per_sentence": _summary(words),
        "samples_per_shard": _summary(per_shard), "shard_bytes": _summary(sizes) | {"total": sum(sizes)},
    }


def _summary(values: list) -> dict:
    if not values:
        return {"min": 0, "median": 0, "mean": 0, "max": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()), "max": float(a.max())}


def format_table(s: dict) -> str:
    rows = [("shards", f"{s['shards']}")]
    if "videos" in s:
        rows += [("videos", f"{s['videos']}"), ("hours", f"{s['hours']:.2f}")]
    if "images" in s:
        rows += [("images", f"{s['images']}"), ("megapixels", f"{s['pixels'] / 1e6:.2f}")]
        if s["images_without_size"]:
            rows.append(("images without width/height", f"{s['images_without_size']} (not in megapixels)"))
    rows += [("sentences" if "videos" in s else "captions", f"{s['sentences']}"), ("words", f"{s['words']}")]
    if s["unreadable"]:
        rows.append(("unreadable samples", f"{s['unreadable']} (run `python -m shards verify`)"))
    names = (["video_seconds", "sentences_per_video"] if "videos" in s else []) + \
            (["image_megapixels", "captions_per_image"] if "images" in s else []) + \
            ["words_per_sentence", "samples_per_shard", "shard_bytes"]
    for name in names:
        v = s[name]
        text = " / ".join(f"{v[k]:.4g}" for k in ("min", "median", "mean", "max"))
        rows.append((f"{name.replace('_', ' ')} (min / median / mean / max)", text))
    rows.append(("shard bytes total", f"{s['shard_bytes']['total']:,}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("stats", help="count videos and hours or images and pixels, sentences, words and "
                                            "shard sizes", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="split folder or s3:// prefix with index.json, or a brace pattern of tars")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint URL")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    storage = Storage(args.s3_endpoint)
    require_shards(args.shards, None, storage)
    s = stats(args.shards, storage)
    print(json.dumps(s, indent=1) if args.json else format_table(s))
    return 0
