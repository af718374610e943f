"""Public annotation files -> build manifests: `python -m shards manifest --format F --annotations FILE ...`.

Each reader yields Entry(id, names, sentences, duration); `write_manifest` finds each video in
--videos by those names (with or without a video extension, in subfolders too), sorts the
sentences by start time and writes one JSON line per video that exists:
    {"id", "video", "sentences": [{"text", "start", "end"}], "source", "duration"}.
Videos not found are counted and listed in the log, not written.
"""

import argparse
import csv
import json
import logging
import os
import pickle
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterator

from shards.preflight import MissingInput, require_file, require_folder
from shards.storage import Storage, is_url

log = logging.getLogger("shards")
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".wmv")


@dataclass
class Entry:
    id: str
    names: list[str]  # file names to look for in --videos, best first, with or without an extension
    sentences: list[dict]  # {"text", "start", "end"} in seconds
    duration: float | None = None  # as annotated (the builder measures the real one)


def activitynet(path: str) -> Iterator[Entry]:
    """ActivityNet Captions (Krishna et al., 2017): train.json, val_1.json, val_2.json.

    One JSON object keyed by video id ("v_" + YouTube id); per video the duration in seconds and
    parallel lists of [start, end] seconds and sentences (sentences often start with a space;
    some spans run past the duration):
        {"v_QOlSCBRmfWY": {"duration": 82.73,
                           "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 79.42]],
                           "sentences": ["A young woman is seen standing ...", " She then ...", " ..."]}, ...}
    Videos are usually saved as v_ID.mp4 (some downloaders drop the "v_").
    """
    with open(path) as f:
        data = json.load(f)
    for vid, ann in data.items():
        spans = [{"text": text, "start": float(a), "end": float(b)}
                 for (a, b), text in zip(ann["timestamps"], ann["sentences"])]
        names = [vid] + ([vid[2:]] if vid.startswith("v_") else [])
        yield Entry(vid, names, spans, float(ann["duration"]))


def didemo(path: str) -> Iterator[Entry]:
    """DiDeMo (Hendricks et al., 2017): train_data.json, val_data.json, test_data.json.

    A JSON list with one item per description; a video has several. Videos are cut in 5-second
    chunks; "times" holds each annotator's [first chunk, last chunk] (inclusive), so [1, 4] means
    5 s to 25 s. Up to six chunks ("num_segments" is 5 for videos shorter than 25 s):
        [{"annotation_id": 12115, "description": "the little girl jumps back up after falling.",
          "video": "12090392@N02_13482799053_87ef417396.mov", "times": [[3, 3], [3, 3], [2, 3], [3, 3]],
          "download_link": "https://www.flickr.com/video_download.gne?id=13482799053", "num_segments": 6}, ...]
    Each description gets the annotators' most common span (ties: the earliest); the paragraph is
    the descriptions in time order. Downloaded files keep the name, often with ".mp4" appended.
    """
    with open(path) as f:
        items = json.load(f)
    by_video: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        (first, last), _ = sorted(Counter(tuple(t) for t in item["times"]).items(), key=lambda kv: (-kv[1], kv[0]))[0]
        by_video[item["video"]].append({"text": item["description"], "start": 5.0 * first, "end": 5.0 * (last + 1)})
    for video, spans in by_video.items():
        yield Entry(video, [video, strip_video_ext(video)], spans)


def queryd(captions_path: str, times_path: str, split_list: str | None = None) -> Iterator[Entry]:
    """QuerYD (Oncescu et al., 2021): raw_captions_combined_filtered[-v2].pkl + times_captions_combined_filtered[-v2].pkl.

    Two pickled dicts keyed by "video-" + YouTube id, in the same order per video: the audio
    descriptions as token lists, and their [start, end] seconds:
        captions: {"video-0A3e9lWz7Dw": [["a", "man", "walks", "in", "."], ["he", "sits", "down", "."]], ...}
        times:    {"video-0A3e9lWz7Dw": [[12.3, 15.9], [16.0, 18.2]], ...}
    The splits are train_list.txt / val_list.txt / test_list.txt, one "video-ID" per line. The
    downloader saves videos as ID.mp4 (without "video-"). JSON copies of the two dicts also load.
    """
    captions, times = _load_dict(captions_path), _load_dict(times_path)
    keep = None
    if split_list:
        with open(split_list) as f:
            keep = {line.strip() for line in f if line.strip()}
    for vid, descriptions in captions.items():
        if keep is not None and vid not in keep:
            continue
        spans = [{"text": " ".join(d) if isinstance(d, (list, tuple)) else str(d), "start": float(a), "end": float(b)}
                 for d, (a, b) in zip(descriptions, times[vid])]
        names = [vid] + ([vid[len("video-"):]] if vid.startswith("video-") else [])
        yield Entry(vid, names, spans)


def table(path: str) -> Iterator[Entry]:
    """A generic CSV (or .tsv) with a header row and one row per sentence, rows of a video together or not:
        id,video,start,end,text
        cooking_01,cooking_01.mp4,0.0,12.5,"a man chops onions"
        cooking_01,cooking_01.mp4,12.5,30.0,"he fries them in a pan"
    Required: id, start, end (seconds), text. Optional: video (file name under --videos, an absolute
    path or a URL; default: the id), duration.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    missing = {"id", "start", "end", "text"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}; need id,start,end,text[,video,duration]")
    by_id: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_id[row["id"]].append(row)
    for vid, group in by_id.items():
        spans = [{"text": r["text"], "start": float(r["start"]), "end": float(r["end"])} for r in group]
        video = group[0].get("video") or vid
        duration = group[0].get("duration")
        yield Entry(vid, [video, strip_video_ext(video)], spans, float(duration) if duration else None)


READERS = {"activitynet": activitynet, "didemo": didemo, "queryd": queryd, "csv": table}


def _load_dict(path: str) -> dict:
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    with open(path, "rb") as f:
        return pickle.load(f)  # the published QuerYD files are pickles; only open files you trust


def strip_video_ext(name: str) -> str:
    """"clip.mp4" -> "clip", "clip.avi.mp4" -> "clip": every trailing video extension removed."""
    while os.path.splitext(name)[1].lower() in VIDEO_EXTS:
        name = os.path.splitext(name)[0]
    return name


class VideoIndex:
    """Every video file under a folder (or prefix), findable by name with or without its extensions."""

    def __init__(self, root: str, storage: Storage = Storage()):
        paths = self._walk(root, storage)
        self.by_name: dict[str, str] = {}
        rank = {ext: i for i, ext in enumerate(VIDEO_EXTS)}  # prefer .mp4 when a name has several files
        for path in sorted(paths, key=lambda p: rank.get(os.path.splitext(p)[1].lower(), len(rank))):
            base = path.rsplit("/", 1)[-1]
            for name in (base, os.path.splitext(base)[0], strip_video_ext(base)):
                self.by_name.setdefault(name, path)

    @staticmethod
    def _walk(root: str, storage: Storage) -> list[str]:
        if is_url(root):
            fs = storage.fs(root)
            protocol = root.split("://", 1)[0]
            return [f"{protocol}://{p}" for p in storage.retry(f"list {root}", fs.find, root)]
        return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]

    def find(self, names: list[str]) -> str | None:
        for name in names:
            if name in self.by_name:
                return self.by_name[name]
        return None


def write_manifest(entries: Iterator[Entry], videos: str, out: str, source: str, storage: Storage = Storage()) -> dict:
    """-> counts {"written", "missing"}."""
    index = VideoIndex(videos, storage)
    written, missing = 0, []
    with open(out, "w") as f:
        for e in entries:
            path = index.find(e.names)
            if path is None:
                missing.append(e.id)
                continue
            sentences = sorted(e.sentences, key=lambda s: (s["start"], s["end"]))
            record = {"id": e.id, "video": path, "sentences": sentences, "source": source}
            if e.duration is not None:
                record["duration"] = e.duration
            f.write(json.dumps(record) + "\n")
            written += 1
    if missing:
        log.warning("%d videos not found under %s, e.g. %s", len(missing), videos, ", ".join(missing[:5]))
    return {"written": written, "missing": len(missing)}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("manifest", help="turn public annotation files into a build manifest",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=sorted(READERS))
    p.add_argument("--annotations", required=True, help="train.json / train_data.json / captions .pkl / .csv")
    p.add_argument("--times", help="queryd: the times_captions_combined_filtered .pkl")
    p.add_argument("--split-list", help="queryd: train_list.txt / val_list.txt / test_list.txt to keep")
    p.add_argument("--videos", required=True, help="folder (or s3:// prefix) holding the video files")
    p.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint URL for an s3:// --videos")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    storage = Storage(args.s3_endpoint)
    require_file(args.annotations, "annotation file")
    if args.format == "queryd":
        if not args.times:
            raise MissingInput("--format queryd needs --times (times_captions_combined_filtered .pkl)")
        require_file(args.times, "times file")
        if args.split_list:
            require_file(args.split_list, "split list")
    require_folder(args.videos, "video folder", storage)
    try:  # the annotations are read whole before any output: a malformed file is one line, not a traceback
        if args.format == "queryd":
            entries = list(queryd(args.annotations, args.times, args.split_list))
        else:
            entries = list(READERS[args.format](args.annotations))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, EOFError, pickle.UnpicklingError,
            UnicodeDecodeError, csv.Error) as e:
        raise MissingInput(f"annotation file {args.annotations} is malformed for --format {args.format} "
                           f"({type(e).__name__}: {e})") from None
    source = f"{args.format}/{os.path.basename(args.annotations)}"
    counts = write_manifest(iter(entries), args.videos, args.out, source, storage)
    print(f"{args.out}: {counts['written']} videos ({counts['missing']} not found under {args.videos})")
    return 0 if counts["written"] else 1
