"""The shard format (see shards/FORMAT.md): sample keys, tar members, KEY.json, index.json.

One place that writes and reads it, shared by the synthetic writer, the builder, `verify`,
`stats` and the loaders.
"""

import hashlib
import io
import json
import math
import os
import re
import tarfile
import zipfile
from typing import Iterator

import numpy as np
from braceexpand import braceexpand

from shards.storage import Storage, is_url, join

MEMBERS = ("mp4", "json", "depth.npz")  # the only tar members readers of a video set use
IMAGE_MEMBERS = ("jpg", "json")  # ... and of an image set
MEDIA = ("video", "image")  # KEY.json "media" (absent: video); index.json "media" says the kind of a whole set
INDEX = "index.json"
FORMAT_VERSION = 1
FIXED_MTIME = 0  # tar members and zip entries carry fixed times so rebuilds are byte-identical
MAX_KEY = 120


class FormatError(ValueError):
    """A sample that breaks the format; `reason` is a short counter name like "bad_json"."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def sample_key(source_id: str) -> str:
    """A tar key for an id: no dots (webdataset splits keys at the basename's first dot), no slashes.

    "v_QOlSCBRmfWY" stays; "12090392@N02_13482799053_87ef417396.mov" -> "12090392_N02_13482799053_87ef417396_mov".
    """
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(source_id))
    if len(key) > MAX_KEY:  # keep it short and still unique
        key = key[: MAX_KEY - 17] + "_" + hashlib.sha256(str(source_id).encode()).hexdigest()[:16]
    return key or "_"


def split_name(name: str) -> tuple[str, str]:
    """"dir/synth_000042.depth.npz" -> ("dir/synth_000042", "depth.npz"): keys end at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


# ---- KEY.json -----------------------------------------------------------------------------------


def parse_meta(data: bytes) -> dict:
    """KEY.json bytes -> the dict, checked. A video (no "media", or "media": "video"): finite duration > 0,
    fps > 0, sentences with text, start, end. An image ("media": "image"): sentences (the caption, start and
    end 0), width and height integers > 0 when given; no duration or fps.

    Raises FormatError("bad_json" | "zero_duration"). Sentence times are not clipped here.
    """
    try:
        meta = json.loads(data.decode("utf-8"))
        media = meta.get("media", "video")
        sentences = [(s["text"], float(s["start"]), float(s["end"])) for s in meta["sentences"]]
        if not all(isinstance(text, str) for text, _, _ in sentences):
            raise TypeError("a sentence text is not a string")
        if media == "video":
            duration, fps = float(meta["duration"]), float(meta["fps"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise FormatError("bad_json", repr(e)) from None
    if media not in MEDIA:
        raise FormatError("bad_json", f"media={media!r}, expected one of {', '.join(MEDIA)}")
    if media == "image":
        for name in ("width", "height"):
            value = meta.get(name)
            if name in meta and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise FormatError("bad_json", f"{name}={value!r}")
        return meta
    if not (math.isfinite(duration) and duration > 0):
        raise FormatError("zero_duration", f"duration={duration}")
    if not (math.isfinite(fps) and fps > 0):
        raise FormatError("bad_json", f"fps={fps}")
    return meta | {"duration": duration, "fps": fps}


def media_of(meta: dict) -> str:
    """"video" or "image": the kind of one sample's KEY.json (or of a set's index.json); absent = video."""
    return meta.get("media", "video") if isinstance(meta, dict) else "video"


def num_frames(meta: dict) -> int:
    """Frames the JSON promises: its "num_frames", else duration * fps."""
    n = meta.get("num_frames")
    return int(n) if isinstance(n, int) and n >= 0 else math.floor(meta["duration"] * meta["fps"] + 1e-6)


# ---- tar members ------------------------------------------------------------------------------


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """np.savez_compressed layout, but with fixed zip entry times (numpy stamps the wall clock)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


def write_tar(path: str, members: dict[str, bytes | os.PathLike]) -> None:
    """Write members in order (bytes, or a local file streamed in) under a temporary name, then
    rename: readers never see half a tar. Fixed owner, mode and time: same input, same bytes."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = FIXED_MTIME, 0o644, 0, 0, "", ""
            if isinstance(data, bytes):
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.size = os.path.getsize(data)
                with open(data, "rb") as f:
                    tf.addfile(info, f)
    os.replace(tmp, path)


def tar_size(sizes: list[int]) -> int:
    """Bytes of a tar holding members of these sizes: 512-byte header + padded data each, end blocks,
    rounded up to tarfile's 10240-byte records."""
    body = sum(512 + -(-n // 512) * 512 for n in sizes) + 1024
    return -(-body // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def read_tar(url: str, storage: Storage = Storage(), members: tuple[str, ...] = MEMBERS) -> Iterator[dict]:
    """Raw samples {"__key__", "__url__", ext: bytes} of one tar, grouped by key, `members` only.

    A read error (missing, truncated or garbage tar) ends the tar with one {"__error__": "bad_tar"}
    item, so the error is counted where it occurs in the stream, like any bad sample.
    """
    sample = None
    try:
        mode = "r|" if is_url(url) else "r:"  # local files: seek over members we do not read
        with storage.open(url) as f, tarfile.open(fileobj=f, mode=mode) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if ext in members:
                    if ext in sample:
                        raise tarfile.TarError(f"duplicate member {member.name}")
                    sample[ext] = tf.extractfile(member).read()
                else:
                    sample.setdefault("__other__", []).append(ext)
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as e:
        key = sample["__key__"] if sample else os.path.basename(url)
        yield {"__key__": key, "__url__": url, "__error__": "bad_tar", "__detail__": repr(e)}
        return
    if sample is not None:
        yield sample


# ---- index.json and shard lists -----------------------------------------------------------------


def read_index(folder: str, storage: Storage = Storage()) -> dict:
    path = join(folder, INDEX)
    if not storage.exists(path):
        raise FileNotFoundError(f"shard folder {folder} has no {INDEX} (it is written last: is the split complete?)")
    return json.loads(storage.read_bytes(path))


def write_index(folder: str, index: dict, storage: Storage = Storage()) -> None:
    storage.write_bytes(join(folder, INDEX), json.dumps(index, indent=1).encode())


def shard_path(spec: str, root: str | None = None) -> str:
    """A spec relative to `root` (URLs and absolute paths stay as they are)."""
    return spec if root is None or is_url(spec) or os.path.isabs(spec) else os.path.join(root, spec)


def is_split_folder(path: str) -> bool:
    """A split folder or prefix (its index.json lists the shards), not a brace pattern or a .tar."""
    return "{" not in path and not path.endswith(".tar")


def expand_shards(spec: str, root: str | None = None, storage: Storage = Storage()) -> list[str]:
    """A split folder or prefix (read its index.json) or a brace pattern -> tar URLs, not checked to exist."""
    path = shard_path(spec, root)
    if is_split_folder(path):
        return [join(path, name) for name in read_index(path, storage)["shards"]]
    return list(braceexpand(path))


def resolve_shards(spec: str, root: str | None = None, storage: Storage = Storage()) -> list[str]:
    """A split folder or prefix (its index.json lists the shards) or a brace pattern -> existing tar URLs."""
    urls = expand_shards(spec, root, storage)
    if not urls:
        raise ValueError(f"no shards in {spec!r} (resolved to {shard_path(spec, root)})")
    missing = missing_shards(urls, storage)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {spec!r} do not exist, e.g. {missing[0]}")
    return urls


def missing_shards(urls: list[str], storage: Storage) -> list[str]:
    """The URLs that do not exist, in order. One listing per folder instead of one request per shard
    (matters on object stores)."""
    folders: dict[str, set[str]] = {}
    missing = []
    for url in urls:
        folder, _, name = url.rpartition("/") if is_url(url) else (os.path.dirname(url) or ".", "", os.path.basename(url))
        if folder not in folders:
            folders[folder] = set(storage.listdir(folder)) if storage.isdir(folder) else set()
        if name not in folders[folder]:
            missing.append(url)
    return missing
