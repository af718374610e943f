"""Where shard bytes live: a local folder or an object store URL (s3://bucket/prefix, through fsspec/s3fs).

`Storage(endpoint)` is a small picklable handle: DataLoader workers and build processes each make
their own filesystem client on first use. Remote reads retry transient errors with exponential
backoff and jitter, and a read that fails mid-object resumes at the same byte offset, so a long
tar stream survives a dropped connection without starting over.

The S3 endpoint is never hard-coded: `Storage(endpoint=URL)` (DataConfig.s3_endpoint,
`--s3-endpoint`), else the standard AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL variables, else AWS.
Credentials come from the usual AWS sources (environment, ~/.aws, instance role).
"""

import io
import logging
import os
import random
import time
from dataclasses import dataclass

log = logging.getLogger("shards")

RETRIES = 6  # attempts after the first one
BACKOFF_S = 0.5  # first pause; doubles per attempt, jittered
MAX_BACKOFF_S = 30.0
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _transient_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError, OSError]
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from botocore import exceptions as bx

        types += [bx.ConnectionError, bx.HTTPClientError, bx.ReadTimeoutError, bx.ResponseStreamingError]
    except (ImportError, AttributeError):
        pass
    return tuple(types)


TRANSIENT = _transient_types()


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def is_transient(error: BaseException) -> bool:
    return isinstance(error, TRANSIENT) and not isinstance(error, PERMANENT)


def join(base: str, *names: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


@dataclass(frozen=True)
class Storage:
    endpoint: str = ""  # S3-compatible endpoint URL; "" = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS
    retries: int = RETRIES
    backoff_s: float = BACKOFF_S

    def fs(self, url: str):
        """The fsspec filesystem for a URL, made once per process (fsspec caches instances per pid)."""
        import fsspec

        protocol = url.split("://", 1)[0]
        if protocol in ("s3", "s3a"):
            endpoint = self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            kwargs = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
            return fsspec.filesystem("s3", **kwargs)
        return fsspec.filesystem(protocol)

    def retry(self, what: str, fn, *args, **kwargs):
        """fn(*args) with retries on transient errors; permanent errors and the last failure propagate."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                self.back_off(what, e, attempt)

    def back_off(self, what: str, error: Exception, attempt: int) -> None:
        """Re-raise `error` if it is permanent or the retries are used up; else log and sleep."""
        if not is_transient(error) or attempt >= self.retries:
            raise error
        pause = min(MAX_BACKOFF_S, self.backoff_s * 2**attempt) * random.Random().uniform(0.5, 1.5)  # jitter
        log.warning("%s failed (%r); retry %d/%d in %.2fs", what, error, attempt + 1, self.retries, pause)
        time.sleep(pause)

    # ---- reading ----

    def open(self, url: str) -> io.BufferedReader:
        """A binary reader; remote ones resume at the current offset after a transient error."""
        if not is_url(url):
            return open(url, "rb")
        return io.BufferedReader(_ResumingReader(self, url), buffer_size=1 << 20)

    def read_bytes(self, url: str) -> bytes:
        if not is_url(url):
            with open(url, "rb") as f:
                return f.read()
        with self.open(url) as f:
            return f.read()

    def exists(self, url: str) -> bool:
        if not is_url(url):
            return os.path.exists(url)
        return self.retry(f"exists {url}", self.fs(url).exists, url)

    def isdir(self, url: str) -> bool:
        if not is_url(url):
            return os.path.isdir(url)
        return self.retry(f"isdir {url}", self.fs(url).isdir, url)

    def listdir(self, url: str) -> list[str]:
        """Names (not paths) of the files directly inside a folder or prefix."""
        if not is_url(url):
            return sorted(n for n in os.listdir(url) if os.path.isfile(os.path.join(url, n)))
        fs = self.fs(url)
        entries = self.retry(f"list {url}", fs.ls, url, detail=True, refresh=True)
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file")

    def size(self, url: str) -> int:
        if not is_url(url):
            return os.path.getsize(url)
        return int(self.retry(f"size {url}", self.fs(url).size, url))

    # ---- writing: a final name never holds a partial object ----

    def put_file(self, local_path: str, url: str) -> None:
        """Move a finished local file to its final name (local: rename; remote: upload, which S3
        makes visible only once complete). The local file is removed."""
        if not is_url(url):
            os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
            os.replace(local_path, url)
            return
        self.retry(f"upload {url}", self.fs(url).put_file, local_path, url)
        os.remove(local_path)

    def write_bytes(self, url: str, data: bytes) -> None:
        if not is_url(url):
            os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
            tmp = f"{url}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, url)
            return
        self.retry(f"write {url}", self.fs(url).pipe_file, url, data)


class _ResumingReader(io.RawIOBase):
    """Sequential reads of a remote object; on a transient error, reopen and seek back to the offset."""

    def __init__(self, storage: Storage, url: str):
        self.storage, self.url, self.pos, self.f = storage, url, 0, None
        storage.retry(f"open {url}", self._reopen)  # a missing object fails here, at once

    def _reopen(self) -> None:
        self._drop()
        self.f = self.storage.fs(self.url).open(self.url, "rb", block_size=4 << 20)
        if self.pos:
            self.f.seek(self.pos)

    def _drop(self) -> None:
        f, self.f = self.f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # the connection is already broken; nothing to flush on a reader
                pass

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        for attempt in range(self.storage.retries + 1):
            try:
                if self.f is None:
                    self._reopen()
                data = self.f.read(len(view))
                break
            except Exception as e:
                self.storage.back_off(f"reading {self.url} at byte {self.pos}", e, attempt)
                self._drop()  # reopened (and seeked) on the next attempt
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()
