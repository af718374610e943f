"""Pre-launch checks: every input a command needs exists and is readable, before any work starts.

Used by `python -m shards ...`, `pretrain/run.py` and `finetune/run.py`. A failed check raises
`MissingInput`, whose str() is one line naming the input; a command prints it and exits with 2.
Remote inputs (s3://...) are checked through the configured `Storage`, so its endpoint is honoured.
"""

import dataclasses
import json
import os

from shards import format as fmt
from shards.storage import Storage, is_url, join

PREFLIGHT_RETRIES = 2  # a check should fail in seconds, not wait through a training read's full backoff


class MissingInput(Exception):
    """A file or shard set a command needs is missing, unreadable or malformed; str() is one line naming it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def _quick(storage: Storage | None) -> Storage:
    storage = storage if storage is not None else Storage()
    return dataclasses.replace(storage, retries=min(storage.retries, PREFLIGHT_RETRIES))


def _reason(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def require_file(path: str, what: str, storage: Storage | None = None) -> None:
    """`what` (e.g. "config", "manifest", "annotation file", "--init checkpoint") exists and is readable:
    local paths with os.access, URLs (s3://...) through `storage` (honouring its endpoint).
    Raises MissingInput("<what> <path> does not exist" / "... is not readable")."""
    if not path:
        raise MissingInput(f"{what} is not given (empty path)")
    if not is_url(path):
        if not os.path.exists(path):
            raise MissingInput(f"{what} {path} does not exist")
        if os.path.isdir(path):
            raise MissingInput(f"{what} {path} is a folder, not a file")
        if not os.access(path, os.R_OK):
            raise MissingInput(f"{what} {path} is not readable")
        return
    storage = _quick(storage)
    try:
        found = storage.exists(path) and not storage.isdir(path)
    except Exception as e:
        raise MissingInput(f"{what} {path} is not readable ({_reason(e)})") from None
    if not found:
        raise MissingInput(f"{what} {path} does not exist")
    try:
        with storage.open(path) as f:
            f.read(1)
    except Exception as e:
        raise MissingInput(f"{what} {path} is not readable ({_reason(e)})") from None


def require_folder(path: str, what: str, storage: Storage | None = None) -> None:
    """A folder (e.g. "video folder") exists and can be listed: local paths with os.access, URLs
    (an s3:// prefix) through `storage`."""
    if not path:
        raise MissingInput(f"{what} is not given (empty path)")
    if is_url(path):
        try:
            found = _quick(storage).isdir(path)
        except Exception as e:
            raise MissingInput(f"{what} {path} is not readable ({_reason(e)})") from None
        if not found:
            raise MissingInput(f"{what} {path} does not exist")
        return
    if not os.path.exists(path):
        raise MissingInput(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise MissingInput(f"{what} {path} is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise MissingInput(f"{what} {path} is not readable")


def require_shards(spec: str | list[str] | tuple[str, ...], root: str | None = None,
                   storage: Storage | None = None, what: str = "shard set") -> list[str]:
    """Expand a shard spec (a split folder or s3:// prefix with index.json, a brace pattern, a .tar, or a
    list of those) through `storage`, check that there is at least one shard and that each exists and
    is readable; return the shard list or raise MissingInput naming the first bad one."""
    storage = _quick(storage)
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs or not all(isinstance(s, str) and s for s in specs):
        raise MissingInput(f"{what} {spec!r} is empty: give a split folder, an s3:// prefix or a brace pattern")
    urls: list[str] = []
    for one in specs:
        urls += _shards_of(one, root, storage, what)
    return urls


def _shards_of(spec: str, root: str | None, storage: Storage, what: str) -> list[str]:
    path = fmt.shard_path(spec, root)
    try:
        if fmt.is_split_folder(path):
            urls = _index_shards(path, storage, what)
        else:
            urls = fmt.expand_shards(path, None, storage)
            if not urls:
                raise MissingInput(f"{what} {path} names no shards")
        missing = fmt.missing_shards(urls, storage)
    except MissingInput:
        raise
    except Exception as e:  # permissions, credentials, an unreachable endpoint
        raise MissingInput(f"{what} {path} is not readable ({_reason(e)})") from None
    if missing:
        raise MissingInput(f"{what} {path}: shard {missing[0]} does not exist"
                           + (f" ({len(missing)} of {len(urls)} shards missing)" if len(missing) > 1 else ""))
    for url in urls:
        if not is_url(url) and not os.access(url, os.R_OK):  # (a folder named like a shard is "missing")
            raise MissingInput(f"{what} {path}: shard {url} is not readable")
    remote = [u for u in urls if is_url(u)]
    if remote:  # the listing proved the objects exist; opening one proves the credentials can read them
        try:
            with storage.open(remote[0]) as f:
                f.read(1)
        except Exception as e:
            raise MissingInput(f"{what} {path}: shard {remote[0]} is not readable ({_reason(e)})") from None
    return urls


def _index_shards(path: str, storage: Storage, what: str) -> list[str]:
    """The shards a split folder's index.json lists, with each way it can be wrong named."""
    if not storage.exists(path):
        raise MissingInput(f"{what} {path} does not exist")
    index = join(path, fmt.INDEX)
    if not storage.exists(index):
        raise MissingInput(f"{what} {path} has no {fmt.INDEX} (it is written last: is the split complete?)")
    if not is_url(index) and not os.access(index, os.R_OK):
        raise MissingInput(f"{what} {path}: {index} is not readable")
    try:
        names = json.loads(storage.read_bytes(index))["shards"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise TypeError("'shards' is not a list of file names")
    except (ValueError, KeyError, TypeError) as e:
        raise MissingInput(f"{what} {path}: {index} is malformed ({_reason(e)})") from None
    if not names:
        raise MissingInput(f"{what} {path} holds no shards ({index} lists none)")
    return [join(path, name) for name in names]
