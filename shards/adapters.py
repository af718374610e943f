"""Public annotation files -> build manifests: `python -m shards manifest --format F --annotations FILE ...`.

Each reader yields Entry(id, names, sentences, duration, ...); `write_manifest` finds each video in
--videos by those names (with or without a video extension, in subfolders too), sorts the
sentences by start time and writes one JSON line per video that exists:
    {"id", "video", "sentences": [{"text", "start", "end"}], "source", "duration"}.
Videos not found are counted and listed in the log, not written. The downstream sets' readers are
here; the pretraining corpora's (HD-VILA-100M, LF-VILA-8M, WebVid, CC3M/CC12M) are in shards/corpora.py.
An image entry writes "image" instead of "video"; an entry found only as its longer source video
writes "segment": [start, end], the seconds of that video the builder keeps.
"""

import argparse
import csv
import json
import logging
import os
import pickle
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

from shards.format import sample_key
from shards.preflight import MissingInput, require_file, require_folder
from shards.storage import Storage, is_url

log = logging.getLogger("shards")
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".wmv")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Entry:
    id: str
    names: list[str]  # file names to look for in --videos, best first, with or without an extension
    sentences: list[dict]  # {"text", "start", "end"} in seconds
    duration: float | None = None  # as annotated (the builder measures the real one)
    media: str = "video"  # or "image": the record gets "image" instead of "video"
    urls: list[str] = field(default_factory=list)  # found by a downloader's .json beside the file ({"url": ...})
    source_names: list[str] = field(default_factory=list)  # else: a longer video holding the sample ...
    segment: tuple[float, float] | None = None  # ... as these seconds of it (the sentences count from its start)
    extra: dict = field(default_factory=dict)  # more fields for the record (copied into KEY.json)


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
    """Every video file (or every file with one of `exts`) under a folder (or prefix), findable by name
    with or without its extensions; with `by_url`, also by the "url" in a `.json` beside the file (the
    `00000/000000001.json` that img2dataset and video2dataset write next to `00000/000000001.jpg`)."""

    def __init__(self, root: str, storage: Storage = Storage(), exts: tuple[str, ...] | None = None,
                 by_url: bool = False):
        exts = exts or (VIDEO_EXTS if by_url else None)  # with by_url the .json files are not media
        paths = self._walk(root, storage)
        self.by_name: dict[str, str] = {}
        self.by_url: dict[str, str] = {}
        order = exts or VIDEO_EXTS
        rank = {ext: i for i, ext in enumerate(order)}  # prefer .mp4 when a name has several files
        media = [p for p in paths if exts is None or os.path.splitext(p)[1].lower() in exts]
        if by_url:  # a file with a downloader's url is found by it only: its name (000000001.jpg) is a counter
            stems = {os.path.splitext(p)[0]: p for p in reversed(media)}
            for path in paths:
                stem, ext = os.path.splitext(path)
                if ext.lower() == ".json" and stem in stems:
                    url = self._sidecar_url(path, storage)
                    if url:
                        self.by_url.setdefault(url, stems[stem])
            named = set(self.by_url.values())
            media = [p for p in media if p not in named]
        folders: dict[str, set[str]] = defaultdict(set)  # file name -> the folders holding a file of that name
        for path in media:
            folder, _, base = path.rpartition("/")
            folders[base].add(folder)
        # a file name in two folders (CC3M's ".../image.jpg" under many URLs) names no file: either could be the
        # one the metadata means, and pairing a caption with the wrong file would go unnoticed
        self.ambiguous = {base for base, where in folders.items() if len(where) > 1}
        for path in sorted(media, key=lambda p: rank.get(os.path.splitext(p)[1].lower(), len(rank))):
            base = path.rsplit("/", 1)[-1]
            if base in self.ambiguous:
                continue
            for name in (base, os.path.splitext(base)[0], strip_video_ext(base)):
                self.by_name.setdefault(name, path)
        if self.ambiguous:
            log.warning("%d file names occur in several folders under %s and are not matched by name (e.g. %s)",
                        len(self.ambiguous), root, sorted(self.ambiguous)[:3])

    @staticmethod
    def _sidecar_url(path: str, storage: Storage) -> str | None:
        try:
            meta = json.loads(storage.read_bytes(path) if is_url(path) else open(path, "rb").read())
        except (OSError, ValueError):
            log.warning("unreadable downloader metadata %s: ignored", path)
            return None
        url = meta.get("url") if isinstance(meta, dict) else None
        return url if isinstance(url, str) and url else None

    @staticmethod
    def _walk(root: str, storage: Storage) -> list[str]:
        if is_url(root):
            fs = storage.fs(root)
            protocol = root.split("://", 1)[0]
            return [f"{protocol}://{p}" for p in storage.retry(f"list {root}", fs.find, root)]
        return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]

    def find(self, names: list[str], urls: list[str] = ()) -> str | None:
        for url in urls:
            if url in self.by_url:
                return self.by_url[url]
        for name in names:
            if name in self.by_name:
                return self.by_name[name]
        return None


def write_manifest(entries: Iterator[Entry], videos: str, out: str, source: str, storage: Storage = Storage(),
                   index: VideoIndex | None = None) -> dict:
    """-> counts {"written", "missing", "duplicates"}. Entries stream through: only the first missing ids
    and the keys written are kept. An entry whose id gives a key already written (a video listed twice
    in the metadata) is counted and logged, not written: `build` refuses a manifest with a repeated key."""
    index = index if index is not None else VideoIndex(videos, storage)
    written, missing, examples, keys, duplicates = 0, 0, [], set(), 0
    with open(out, "w") as f:
        for e in entries:
            key = sample_key(e.id)
            if key in keys:
                duplicates += 1
                if duplicates <= 10:
                    log.warning("%s: id %r again (key %s): left out", source, e.id, key)
                continue
            path, segment = index.find(e.names, e.urls), None
            if path is None and e.source_names:
                path, segment = index.find(e.source_names), e.segment
            if path is None:
                missing += 1
                if len(examples) < 5:
                    examples.append(e.id)
                continue
            sentences = sorted(e.sentences, key=lambda s: (s["start"], s["end"]))
            record = {"id": e.id, e.media: path, "sentences": sentences, "source": source}
            if segment is not None:
                record["segment"] = [float(segment[0]), float(segment[1])]
            if e.duration is not None:
                record["duration"] = e.duration
            f.write(json.dumps(record | e.extra) + "\n")
            keys.add(key)
            written += 1
    if missing:
        log.warning("%d not found under %s, e.g. %s", missing, videos, ", ".join(examples))
    return {"written": written, "missing": missing, "duplicates": duplicates}


CORPORA = ("hdvila", "lfvila", "webvid", "cc3m", "cc12m")  # pretraining corpora: shards/corpora.py


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("manifest", help="turn public annotation files into a build manifest",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=sorted(READERS) + list(CORPORA))
    p.add_argument("--annotations", required=True,
                   help="train.json / train_data.json / captions .pkl / .csv; hdvila_partN.jsonl (hdvila, lfvila); "
                        "results_2M_train.csv (webvid); Train_GCC-training.tsv (cc3m); cc12m.tsv (cc12m)")
    p.add_argument("--times", help="queryd: the times_captions_combined_filtered .pkl")
    p.add_argument("--split-list", help="queryd: train_list.txt / val_list.txt / test_list.txt to keep")
    p.add_argument("--transcripts", help="hdvila, lfvila: the ASR transcripts, JSON lines (layout: shards/corpora.py)")
    p.add_argument("--clip-list", help="lfvila: the LF-VILA-8M clip-id list; only listed clips are used")
    p.add_argument("--max-gap", type=float, default=1.0,
                   help="lfvila: seconds between one clip's end and the next one's start that still join a run")
    p.add_argument("--min-clips", type=int, default=4, help="lfvila: clips in a run for it to become a sample")
    p.add_argument("--videos", help="folder (or s3:// prefix) holding the video files")
    p.add_argument("--images", help="cc3m, cc12m: folder (or s3:// prefix) holding the image files")
    p.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint URL for an s3:// --videos")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    storage = Storage(args.s3_endpoint)
    require_file(args.annotations, "annotation file")
    if args.format in CORPORA:
        return run_corpus(args, storage)
    if args.format == "queryd":
        if not args.times:
            raise MissingInput("--format queryd needs --times (times_captions_combined_filtered .pkl)")
        require_file(args.times, "times file")
        if args.split_list:
            require_file(args.split_list, "split list")
    if not args.videos:
        raise MissingInput(f"--format {args.format} needs --videos (the folder holding the video files)")
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


def run_corpus(args: argparse.Namespace, storage: Storage) -> int:
    """The pretraining corpora: metadata streamed line by line, bad lines counted and logged, never fatal."""
    from shards import corpora  # corpora imports Entry from here

    images = args.format in ("cc3m", "cc12m")
    folder, flag = (args.images or args.videos, "--images") if images else (args.videos, "--videos")
    if not folder:
        raise MissingInput(f"--format {args.format} needs {flag} (the folder holding the downloaded files)")
    require_folder(folder, "image folder" if images else "video folder", storage)
    if args.format in ("hdvila", "lfvila"):
        if not args.transcripts:
            raise MissingInput(f"--format {args.format} needs --transcripts (HD-VILA-100M ASR, JSON lines; "
                               "layout in shards/corpora.py)")
        require_file(args.transcripts, "transcript file")
    if args.clip_list:
        require_file(args.clip_list, "clip list")
    if not (args.max_gap >= 0 and args.min_clips >= 1):
        raise MissingInput(f"--max-gap must be >= 0 and --min-clips >= 1, got {args.max_gap} and {args.min_clips}")
    skips = corpora.Skips()
    readers = {
        "hdvila": lambda: corpora.hdvila(args.annotations, args.transcripts, skips),
        "lfvila": lambda: corpora.lfvila(args.annotations, args.transcripts, args.clip_list, args.max_gap,
                                         args.min_clips, skips),
        "webvid": lambda: corpora.webvid(args.annotations, skips),
        "cc3m": lambda: corpora.cc3m(args.annotations, skips),
        "cc12m": lambda: corpora.cc12m(args.annotations, skips),
    }
    index = VideoIndex(folder, storage, exts=IMAGE_EXTS if images else VIDEO_EXTS,
                       by_url=args.format in ("webvid", "cc3m", "cc12m"))
    source = f"{args.format}/{os.path.basename(args.annotations)}"
    try:
        counts = write_manifest(readers[args.format](), folder, args.out, source, storage, index=index)
    except (ValueError, UnicodeDecodeError, csv.Error) as e:  # a file of another kind: not a line of it
        raise MissingInput(f"annotation file {args.annotations} is malformed for --format {args.format} "
                           f"({type(e).__name__}: {e})") from None
    kind = "images" if images else "samples"
    print(f"{args.out}: {counts['written']} {kind} ({counts['missing']} not found under {folder}, "
          f"{counts['duplicates']} repeated ids left out); input lines skipped: {skips}")
    return 0 if counts["written"] else 1
