"""Build manifests: JSON lines, one video each, read and checked before any work starts.

    {"id": "v_QOlSCBRmfWY", "video": "/data/anet/v_QOlSCBRmfWY.mp4", "source": "activitynet/train.json",
     "sentences": [{"text": "A young woman is seen standing in a room ...", "start": 0.83, "end": 19.86}, ...]}

"video" is a local path (absolute, or relative to the manifest's folder) or a URL; "source" is
optional (default: the manifest's file name). An optional "segment": [start, end] keeps only those
seconds of the video (the sentences count from `start`). An image record has "image" (path or URL,
the same way) instead of "video", and its caption as one sentence at 0.0-0.0; a manifest holds
videos or images, never both. `python -m shards manifest` (shards/adapters.py, shards/corpora.py)
writes manifests from public annotation files.
"""

import hashlib
import json
import math
import os

from shards import format as fmt
from shards.preflight import MissingInput
from shards.storage import Storage, is_url, join


# KEY.json fields the builder measures; a manifest may not set them. Every other field of a record
# besides id, video and sentences (task labels such as "qa" or "captions", a split) is copied into KEY.json.
BUILDER_FIELDS = frozenset({"fps", "num_frames", "width", "height", "build", "key", "media"})
NOT_COPIED = frozenset({"id", "video", "image", "sentences", "source", "key", "duration"})  # the builder writes its own
MEDIA = ("video", "image")


def media_of(record: dict) -> str:
    """"image" for an image record, else "video"."""
    return "image" if "image" in record else "video"


class ManifestError(MissingInput, ValueError):
    """A manifest that cannot be built from: str() is one line naming the file and the first bad lines."""


def read_manifest(path: str, storage: Storage = Storage()) -> tuple[list[dict], str]:
    """-> (records with "key" added and "video" resolved, sha256 of the file). Raises ManifestError
    naming the file and its first bad lines: each line is a JSON object with an id (string or int), a
    video or an image (string) and a list of sentences; keys are unique; all records are videos or all
    are images. Nothing is built before this passes."""
    data = storage.read_bytes(path)
    base = path.rpartition("/")[0] if is_url(path) else os.path.dirname(os.path.abspath(path))
    records, errors, seen, first = [], [], {}, {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ManifestError(f"manifest {path} line {line}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"line {n}: bad JSON ({e.msg} at column {e.colno})")
            continue
        try:
            records.append(_check_record(record, base, source=os.path.basename(path)))
        except KeyError as e:
            errors.append(f"line {n}: missing field {e.args[0]!r}")
            continue
        except (ValueError, TypeError) as e:
            errors.append(f"line {n}: {e}")
            continue
        first.setdefault(media_of(records[-1]), n)
        key = records[-1]["key"]
        if key in seen:
            errors.append(f"line {n}: id {records[-1]['id']!r} gives key {key!r}, as line {seen[key]} does")
        seen[key] = n
    if len(first) > 1 and not errors:
        errors.append(f"mixes videos (line {first['video']}) and images (line {first['image']}); a shard set holds "
                      "one media kind: write them into two manifests and build two sets")
    if errors:
        more = f" (and {len(errors) - 5} more bad lines)" if len(errors) > 5 else ""
        raise ManifestError(f"manifest {path} " + "; ".join(errors[:5]) + more)
    if not records:
        raise ManifestError(f"manifest {path} has no records")
    return records, hashlib.sha256(data).hexdigest()


def _check_record(record, base: str, source: str) -> dict:
    if not isinstance(record, dict):
        raise TypeError(f"a record must be a JSON object, got {type(record).__name__}")
    rid = record["id"]
    if "video" in record and "image" in record:
        raise ValueError("both 'video' and 'image': a record is one or the other")
    media = media_of(record)
    if media not in record:
        raise ValueError("missing field 'video' (or 'image')")
    video, sentences = record[media], record["sentences"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise ValueError(f"bad id {rid!r} (a non-empty string or an int)")
    if not isinstance(video, str) or not video:
        raise ValueError(f"bad {media} {video!r} (a path or URL)")
    segment = record.get("segment")
    if segment is not None and not (media == "video" and isinstance(segment, list) and len(segment) == 2
                                    and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in segment)
                                    and 0 <= segment[0] < segment[1] < math.inf):
        raise ValueError(f"bad segment {segment!r} (a video's [start, end] seconds, 0 <= start < end)")
    if not isinstance(sentences, list):
        raise TypeError(f"sentences must be a list, got {type(sentences).__name__}")
    taken = sorted(BUILDER_FIELDS & record.keys())
    if taken:
        raise ValueError(f"field(s) {taken} are measured and written by the builder; rename them in the manifest")
    for s in sentences:
        if not (isinstance(s, dict) and isinstance(s.get("text"), str)
                and all(isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool) for k in ("start", "end"))):
            raise ValueError(f"a sentence needs text (string), start and end (seconds): {s!r}")
    if not (is_url(video) or os.path.isabs(video)):
        video = join(base, video)
    return {"source": source} | record | {"id": str(rid), media: video, "key": fmt.sample_key(str(rid))}


def clip_sentences(sentences: list[dict], duration: float) -> tuple[list[dict], int]:
    """Clip spans into [0, duration]; drop empty or reversed ones -> (kept, dropped)."""
    kept = []
    for s in sentences:
        start, end = max(0.0, float(s["start"])), min(duration, float(s["end"]))
        text = s["text"].strip()
        if text and math.isfinite(start) and math.isfinite(end) and end > start:
            kept.append({"text": text, "start": start, "end": end})
    return kept, len(sentences) - len(kept)
