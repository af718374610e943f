"""Pretraining corpora -> build manifests: `python -m shards manifest --format hdvila|lfvila|webvid|cc3m|cc12m`.

Each reader streams its metadata file line by line and yields `shards.adapters.Entry`s, so an
8M-line file is never held in memory; `write_manifest` (shards/adapters.py) then finds each video
or image under --videos / --images. A bad line (bad JSON, a missing field, a bad time) is skipped,
counted by reason and logged with its line number (the first LOGGED of each reason); it never
stops the run. Downloaded files are found by name as for the downstream sets, and also by the URL
that a downloader (img2dataset, video2dataset) wrote into a `.json` beside each file.
"""

import csv
import json
import logging
import re
from collections import Counter
from typing import Iterator

from shards.adapters import Entry

log = logging.getLogger("shards")
LOGGED = 10  # bad lines logged per reason; all of them are counted
DEFAULT_MAX_GAP = 1.0  # seconds; see lfvila()
DEFAULT_MIN_CLIPS = 4  # LF-VILA-8M: runs of >= 4 temporally contiguous clips


class Skips:
    """Counted, logged skips of bad input lines, by reason."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, path: str, line: int, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= LOGGED:
            log.warning("%s line %d: skipped (%s) %s", path, line, reason, detail)
        elif self.counts[reason] == LOGGED + 1:
            log.warning("%s: more lines skipped for %s; only counted from here", path, reason)

    def __str__(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items())) or "none"


# ---- HD-VILA-100M and LF-VILA-8M --------------------------------------------------------------


def clip_stem(clip_id: str) -> str:
    """"QMi8x8o55Ns.1.mp4" -> "QMi8x8o55Ns.1" (the clip id with the file extension dropped)."""
    return clip_id[: -len(".mp4")] if clip_id.lower().endswith(".mp4") else clip_id


def parse_timestamp(text) -> float:
    """"00:04:52.140" -> 292.14 (HH:MM:SS.mmm; plain seconds are accepted too)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    parts = str(text).strip().split(":")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"bad timestamp {text!r}")
    seconds = 0.0
    for p in parts:
        seconds = 60 * seconds + float(p)
    if not seconds >= 0:
        raise ValueError(f"bad timestamp {text!r}")
    return seconds


def read_transcripts(path: str, skips: Skips, keep: set[str] | None = None) -> dict[str, str]:
    """The HD-VILA-100M ASR transcripts, clip stem -> text.

    The transcripts are not public (the authors send them on request), so this layout is ASSUMED:
    JSON lines, one clip each, either an object or a [clip_id, text] pair (the pairs of LF-VILA's
    train_db / val.jsonl):
        {"clip_id": "QMi8x8o55Ns.1.mp4", "text": "so today we are going to make a simple pasta"}
        ["QMi8x8o55Ns.2.mp4", "first boil the water and add some salt"]
    The clip id may omit ".mp4". Convert other layouts to this one. Only clips in `keep` (stems)
    are kept when given; the dict holds one string per clip, so pass the transcript file of one
    metadata part at a time for all of HD-VILA (about 100 bytes per clip).
    """
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                clip, text = (item["clip_id"], item["text"]) if isinstance(item, dict) else item
                if not isinstance(clip, str) or not isinstance(text, str):
                    raise TypeError("clip_id and text must be strings")
            except (ValueError, KeyError, TypeError) as e:
                skips(path, n, "bad_transcript_line", repr(e))
                continue
            stem = clip_stem(clip)
            if (keep is None or stem in keep) and text.strip():
                out[stem] = " ".join(text.split())
    return out


def read_clip_list(path: str) -> set[str]:
    """The LF-VILA-8M clip-id list -> the set of clip stems it names.

    Its exact layout is not documented; accepted: any text in which clip ids are separated by
    white space, commas or JSON list brackets and quotes, e.g. one clip id per line
    (`QMi8x8o55Ns.1.mp4`), or one sample per line (`["QMi8x8o55Ns.1.mp4", "QMi8x8o55Ns.2.mp4", ...]`).
    Only the set of clips counts: the long samples are then formed from the listed clips by
    lfvila()'s rule, so a listed sample whose clips all qualify comes out whole.
    """
    ids: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            for token in re.split(r"[\s,\[\]\"']+", line):
                if token:
                    ids.add(clip_stem(token))
    return ids


def _hdvila_videos(path: str, skips: Skips) -> Iterator[tuple[int, str, list[tuple[float, float, str]]]]:
    """hdvila_partN.jsonl -> (line, video_id, [(start, end, clip stem)] sorted by start); bad clips skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                video_id, clips = item["video_id"], item["clip"]
                if not isinstance(video_id, str) or not video_id or not isinstance(clips, list):
                    raise TypeError("video_id must be a string and clip a list")
            except (ValueError, KeyError, TypeError) as e:
                skips(path, n, "bad_metadata_line", repr(e))
                continue
            spans = []
            for c in clips:
                try:
                    start, end = (parse_timestamp(t) for t in c["span"])
                    if not end > start:
                        raise ValueError(f"span {c['span']} is empty or reversed")
                    spans.append((start, end, clip_stem(str(c["clip_id"]))))
                except (ValueError, KeyError, TypeError) as e:
                    skips(path, n, "bad_clip", f"{video_id}: {e!r}")
            yield n, video_id, sorted(spans)


def hdvila(metadata: str, transcripts: str, skips: Skips | None = None) -> Iterator[Entry]:
    """HD-VILA-100M (Xue et al., 2022), one sample per clip with its ASR sentence.

    Metadata (public): hdvila_part0.jsonl ... hdvila_part10.jsonl, JSON lines, one YouTube video each,
    its clips with [start, end] as HH:MM:SS.mmm in the full video:
        {"video_id": "QMi8x8o55Ns", "url": "https://www.youtube.com/watch?v=QMi8x8o55Ns",
         "clip": [{"clip_id": "QMi8x8o55Ns.1.mp4", "span": ["00:00:17.759", "00:00:23.279"]}, ...,
                  {"clip_id": "QMi8x8o55Ns.16.mp4", "span": ["00:04:52.140", "00:05:03.350"]}]}
    Transcripts (on request): see read_transcripts for the layout assumed. A clip becomes a sample
    with id "QMi8x8o55Ns.1" and one sentence over the whole clip. Its video is the cut clip file
    (`QMi8x8o55Ns.1.mp4`, found by name), else the downloaded full video (`QMi8x8o55Ns.mp4` or any
    video extension, found by video id) with "segment": the clip's span, which `build` cuts out.
    Clips without a transcript are skipped (counted as no_transcript).
    """
    skips = skips if skips is not None else Skips()
    text = read_transcripts(transcripts, skips)
    for n, video_id, spans in _hdvila_videos(metadata, skips):
        for start, end, stem in spans:
            if stem not in text:
                skips(metadata, n, "no_transcript", stem)
                continue
            length = round(end - start, 3)
            yield Entry(stem, [stem + ".mp4", stem], [{"text": text[stem], "start": 0.0, "end": length}],
                        duration=length, source_names=[video_id], segment=(start, end))


def contiguous_runs(spans: list[tuple[float, float, str]], allowed, max_gap: float, min_clips: int
                    ) -> Iterator[list[tuple[float, float, str]]]:
    """Runs of >= min_clips clips (sorted by start) in which each clip is allowed and starts at most
    max_gap seconds after the previous one ends (overlaps count as contiguous)."""
    run: list = []
    for clip in spans + [None]:  # None ends the last run
        ok = clip is not None and allowed(clip[2])
        if ok and run and clip[0] - run[-1][1] > max_gap:
            ok = None  # a gap: this clip starts a new run
        if not ok:
            if len(run) >= min_clips:
                yield run
            run = [clip] if ok is None else []
        else:
            run.append(clip)


def lfvila(metadata: str, transcripts: str, clip_list: str | None = None, max_gap: float = DEFAULT_MAX_GAP,
           min_clips: int = DEFAULT_MIN_CLIPS, skips: Skips | None = None) -> Iterator[Entry]:
    """LF-VILA-style long samples (Sun et al., 2022): runs of temporally contiguous HD-VILA-100M clips.

    Inputs: the HD-VILA-100M metadata and transcripts (hdvila() states both layouts) and, optionally,
    the LF-VILA-8M clip-id list (read_clip_list states what is accepted).
    Which clips qualify: a clip with a non-empty transcript (and, with a clip list, listed in it).
    Clips of one video, sorted by start time, form a run while each starts at most `max_gap` seconds
    after the previous one ends; a non-qualifying clip or a larger gap ends the run. A run of at least
    `min_clips` (4, as LF-VILA-8M) clips is one sample, whole (LF-VILA's loader picks 4 consecutive
    clips of it per step; `data.clip_sampling` does the same here); shorter runs are dropped.
    Default max_gap 1.0 s: LF-VILA-8M keeps "temporally contiguous" clips. A clip missing from the
    metadata leaves a gap as long as that clip (HD-VILA clips average 13.4 s), which 1 s does not
    bridge, while 1 s tolerates the sub-second jitter between one clip's end and the next one's start.
    Gaps: the sample is the segment [first clip's start, last clip's end] of the downloaded full
    video, gaps included (at most max_gap seconds each, with no sentence on them); each sentence
    keeps its clip's true span, measured from the segment's start. Cut clip files are not used
    (`build` does not join files): download the full videos (found by video id).
    A sample: id "QMi8x8o55Ns.3..6" (first clip .. last clip's number), "clips": the clip ids.
    """
    if not (max_gap >= 0 and min_clips >= 1):
        raise ValueError(f"--max-gap must be >= 0 and --min-clips >= 1, got {max_gap} and {min_clips}")
    skips = skips if skips is not None else Skips()
    keep = read_clip_list(clip_list) if clip_list else None
    text = read_transcripts(transcripts, skips, keep)
    for n, video_id, spans in _hdvila_videos(metadata, skips):
        for run in contiguous_runs(spans, text.__contains__, max_gap, min_clips):
            start, end = run[0][0], run[-1][1]
            last = run[-1][2]
            last = last[len(video_id) + 1:] if last.startswith(video_id + ".") else last
            sentences = [{"text": text[stem], "start": round(a - start, 3), "end": round(b - start, 3)}
                         for a, b, stem in run]
            yield Entry(f"{run[0][2]}..{last}", [], sentences, duration=round(end - start, 3),
                        source_names=[video_id], segment=(start, end), extra={"clips": [s for _, _, s in run]})


# ---- WebVid ------------------------------------------------------------------------------------


ISO_DURATION = re.compile(r"P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?")


def parse_iso_duration(text: str) -> float:
    """"PT00H00M11S" -> 11.0 (ISO 8601 durations as WebVid writes them)."""
    m = ISO_DURATION.fullmatch(text.strip())
    if not m or not any(m.groups()):
        raise ValueError(f"bad ISO 8601 duration {text!r}")
    d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


WEBVID_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")


def webvid(path: str, skips: Skips | None = None) -> Iterator[Entry]:
    """WebVid-2M / WebVid-10M (Bain et al., 2021): results_2M_train.csv, results_2M_val.csv, results_10M_train.csv.

    A CSV with a header, one stock-footage clip per row and its caption in "name":
        videoid,contentUrl,duration,page_dir,name
        21179416,https://ak.picdn.net/shutterstock/videos/21179416/preview/stock-footage-aerial-shot-winter-forest.mp4,PT00H00M11S,006001_006050,Aerial shot winter forest
    One sample per row: id = videoid, one sentence over the clip ([0, duration]; `build` clips it to
    the real length). Found under --videos as `{videoid}.mp4` (WebVid's download script writes
    `{page_dir}/{videoid}.mp4`), by the contentUrl's file name, or by the "url" in a downloader's
    `.json` beside the file (video2dataset).
    """
    skips = skips if skips is not None else Skips()
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        missing = [c for c in WEBVID_COLUMNS if c not in (header or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; WebVid CSVs have {','.join(WEBVID_COLUMNS)}")
        col = {name: header.index(name) for name in WEBVID_COLUMNS}
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as e:  # e.g. a NUL byte, or a field past csv.field_size_limit()
                skips(path, rows.line_num, "bad_row", repr(e))
                continue
            n = rows.line_num
            try:
                videoid, url, caption = row[col["videoid"]].strip(), row[col["contentUrl"]].strip(), row[col["name"]]
                duration = parse_iso_duration(row[col["duration"]])
                if not videoid or not caption.strip():
                    raise ValueError("empty videoid or name")
            except (IndexError, ValueError) as e:
                skips(path, n, "bad_row", repr(e))
                continue
            names = [videoid, url_name(url)] if url else [videoid]
            yield Entry(videoid, names, [{"text": " ".join(caption.split()), "start": 0.0, "end": duration}],
                        duration=duration if duration > 0 else None, urls=[url] if url else [])


# ---- CC3M / CC12M ------------------------------------------------------------------------------


def url_name(url: str) -> str:
    """The file name at the end of a URL, query and fragment dropped."""
    return url.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def conceptual_captions(path: str, caption_first: bool, prefix: str, skips: Skips | None = None) -> Iterator[Entry]:
    """Conceptual Captions image-text pairs, one image per line of a TSV without a header.

    CC3M (Sharma et al., 2018), Train_GCC-training.tsv / Validation_GCC-1.1.0-Validation.tsv: caption<TAB>url
        a very typical bus station\thttp://lh6.ggpht.com/-IvRtNLNcG8o/TpFyrudaT6I/AAAAAAAAM6o/_11MuAAKalQ/IMG_3422.JPG?imgmax=800
    CC12M (Changpinyo et al., 2021), cc12m.tsv: url<TAB>caption
        https://chairish-prod.freetls.fastly.net/image/product/master/d4b8/foo.jpeg\t<PERSON> walks the dog
    One sample per line, id "{prefix}-{line:09d}" (the 1-based line number: the files have no ids).
    Images are found under --images by the url in the `.json` img2dataset writes beside each image
    (`00000/000000001.jpg` + `00000/000000001.json` holding {"url": ...}), else by the url's file name
    (`IMG_3422.JPG`).
    """
    skips = skips if skips is not None else Skips()
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2:
                skips(path, n, "bad_line", f"{len(fields)} tab-separated fields, not 2")
                continue
            caption, url = fields if caption_first else fields[::-1]
            caption, url = " ".join(caption.split()), url.strip()
            if not caption or "://" not in url:
                skips(path, n, "bad_line", f"caption {caption[:40]!r}, url {url[:60]!r}")
                continue
            yield Entry(f"{prefix}-{n:09d}", [url_name(url)], [{"text": caption, "start": 0.0, "end": 0.0}],
                        media="image", urls=[url], extra={"url": url})


def cc3m(path: str, skips: Skips | None = None) -> Iterator[Entry]:
    return conceptual_captions(path, caption_first=True, prefix="cc3m", skips=skips)


def cc12m(path: str, skips: Skips | None = None) -> Iterator[Entry]:
    return conceptual_captions(path, caption_first=False, prefix="cc12m", skips=skips)
