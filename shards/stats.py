"""`python -m shards stats DIR_OR_URL`: videos, hours, sentences, words and shard sizes of a shard set.

Reads only the KEY.json members (local tars are seeked over, remote ones streamed).
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
            durations.append(meta["duration"])
            sentences.append(len(meta["sentences"]))
            words += [len(s["text"].split()) for s in meta["sentences"]]
        per_shard.append(n)
    sizes = [storage.size(url) for url in urls]
    return {
        "shards": len(urls), "videos": len(durations), "unreadable": unreadable,
        "hours": sum(durations) / 3600, "sentences": sum(sentences), "words": sum(words),
        "video_seconds": _summary(durations), "sentences_per_video": _summary(sentences),
        "words_per_sentence": _summary(words), "samples_per_shard": _summary(per_shard),
        "shard_bytes": _summary(sizes) | {"total": sum(sizes)},
    }


def _summary(values: list) -> dict:
    if not values:
        return {"min": 0, "median": 0, "mean": 0, "max": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()), "max": float(a.max())}


def format_table(s: dict) -> str:
    rows = [("shards", f"{s['shards']}"), ("videos", f"{s['videos']}"), ("hours", f"{s['hours']:.2f}"),
            ("sentences", f"{s['sentences']}"), ("words", f"{s['words']}")]
    if s["unreadable"]:
        rows.append(("unreadable samples", f"{s['unreadable']} (run `python -m shards verify`)"))
    for name in ("video_seconds", "sentences_per_video", "words_per_sentence", "samples_per_shard", "shard_bytes"):
        v = s[name]
        text = " / ".join(f"{v[k]:.4g}" for k in ("min", "median", "mean", "max"))
        rows.append((f"{name.replace('_', ' ')} (min / median / mean / max)", text))
    rows.append(("shard bytes total", f"{s['shard_bytes']['total']:,}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("stats", help="count videos, hours, sentences, words and shard sizes",
                              description=__doc__.split("\n\n")[0])
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
