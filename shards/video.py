"""MP4 encode (synthetic corpus), probe and decode with PyAV.

Decoding works in time, not frame numbers: `decode_at_times` returns, for each requested time
(seconds from the first frame), the frame on screen at that time. It seeks to the nearest
keyframe before each run of requested times and stops after the last one, so a few frames from
a long video cost a few GOPs of decoding, not the whole video.

Letters: T frames, H height, W width.
"""

import bisect
import functools
import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import av
import numpy as np
from av.codec.context import Flags
from av.video.reformatter import VideoReformatter


class ShortVideoError(ValueError):
    """The stream ended before a requested frame."""


class EmptyVideoError(ShortVideoError):
    """The file has no video stream, or a video stream without frames."""


@functools.cache
def video_codec() -> str:
    """libx264 when this PyAV build has it, else the built-in mpeg4 encoder."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H*3/2, W) uint8 planar Y, U, V (BT.601 limited range, 2x2 chroma mean).

    Done in numpy because swscale's rgb24 -> yuv420p path gave run-to-run different bytes here.
    """
    H, W, _ = rgb.shape
    r, g, b = np.moveaxis(rgb.astype(np.float32), -1, 0)  # (H, W) each
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    u, v = (c.reshape(H // 2, 2, W // 2, 2).mean(axis=(1, 3)) for c in (u, v))  # (H/2, W/2)
    planes = np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)])
    return planes.round().clip(0, 255).astype(np.uint8).reshape(H * 3 // 2, W)


def encode_mp4(frames: np.ndarray, fps: float, gop: int = 8) -> bytes:
    """Encode (T, H, W, 3) uint8 RGB frames as a yuv420p MP4.

    The output is byte-identical for identical input: bitexact muxer and encoder
    flags (no library version string, no creation time), one encoder thread, no
    B-frames, and the colour conversion done in numpy.
    """
    T, H, W, C = frames.shape
    assert frames.dtype == np.uint8 and C == 3, f"want (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
    assert H % 2 == 0 and W % 2 == 0, f"yuv420p needs even height and width, got {H}x{W}"
    codec = video_codec()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        ctx = stream.codec_context
        ctx.gop_size = gop
        ctx.thread_count = 1
        ctx.flags |= Flags.bitexact
        if codec == "libx264":
            # bframes=0: with B-frames this libx264 gave run-to-run different bytes for tiny frames
            stream.options = {"preset": "veryfast", "crf": "18",
                              "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
        else:
            ctx.bit_rate = 400_000
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")))
        out.mux(stream.encode())  # flush
    return buf.getvalue()


@dataclass(frozen=True)
class Probe:
    num_frames: int
    fps: float  # average frame rate
    duration: float  # seconds: num_frames / fps
    width: int
    height: int
    codec: str
    container: str  # demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"


def probe(source: bytes | str) -> Probe:
    """Stream facts of the first video stream; frames are counted by demuxing when the header has none."""
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r") as container:
        if not container.streams.video:
            raise EmptyVideoError("the file has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        n = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if not fps and n and stream.duration:
            fps = n / float(stream.duration * stream.time_base)
        ctx = stream.codec_context
        return Probe(num_frames=n, fps=fps, duration=n / fps if fps else 0.0, width=ctx.width, height=ctx.height,
                     codec=ctx.name, container=container.format.name)


EPS = 1e-6  # seconds; a frame at time t counts as shown at t


def decode_at_times(source: bytes | str, times: Sequence[float], counts: dict | None = None) -> np.ndarray:
    """For each time (seconds from the first frame), the frame shown then -> (len(times), H, W, 3) uint8 RGB.

    Seeks to the keyframe before a requested time whenever that skips frames, else decodes on.
    Only the returned frames are converted to RGB. `counts` (optional) gets "decoded" and "seeks".
    Raises ShortVideoError if the stream ends well before a requested time (or has no frame at all);
    PyAV errors on corrupt input pass through.
    """
    assert len(times) > 0 and min(times) >= 0, f"bad times {list(times)[:8]}"
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r") as container:
        reader = _Reader(container)
        try:
            rgb = {t: _to_rgb(reader.frame_at(t)) for t in sorted(set(times))}  # (H, W, 3) each
        finally:
            reader.close()  # before the container: a decode generator left to the GC would touch freed memory
    if counts is not None:
        counts.update(decoded=reader.decoded, seeks=reader.seeks)
    return np.stack([rgb[t] for t in times])


_reformatter: tuple[int, VideoReformatter] | None = None  # (pid, reformatter)


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8; the same pixels as frame.to_ndarray(format="rgb24"), which builds a new
    swscale context per call (15x slower for 384x216 frames). The reuse is per process: a context
    inherited through fork (DataLoader workers) would wait forever on its parent's threads."""
    global _reformatter
    if _reformatter is None or _reformatter[0] != os.getpid():
        _reformatter = (os.getpid(), VideoReformatter())
    return upright(_reformatter[1].reformat(frame, format="rgb24", threads=1).to_ndarray(), frame)


def quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns that show the frame upright, from its display matrix (phones
    store portrait video as landscape pixels plus a rotation); 0 without one."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def upright(rgb: np.ndarray, frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) pixels as stored -> as displayed, turned by the frame's display rotation."""
    k = quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


class _Reader:
    """Forward-only frame cursor over one video stream that seeks when a keyframe lets it skip ahead."""

    def __init__(self, container):
        self.container = container
        if not container.streams.video:
            raise EmptyVideoError("the file has no video stream")
        self.stream = stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # loader workers are the parallelism
        self.tb = float(stream.time_base)
        self.origin = stream.start_time or 0  # pts of the first frame
        self.frame_s = 1 / float(stream.average_rate) if stream.average_rate else 1.0
        # keyframe times from the demuxer's index (MP4 and AVI load it on open; Matroska only once it
        # seeks). Index timestamps are decode times; with B-frames they run a constant delay ahead of
        # presentation times, so they are measured from the first entry (the first frame).
        entries = stream.index_entries
        trusted = len(entries) > 1 or container.format.name.startswith("mov")
        base = entries[0].timestamp if len(entries) else self.origin
        self.keyframes = sorted((e.timestamp - base) * self.tb for e in entries if e.is_keyframe) if trusted else []
        self.frames = None  # PyAV's decode generator from the current position
        self.pending = None  # the first frame after the last requested time, not yet used
        self.prev = None  # the latest frame at or before the last requested time
        self.from_start = False  # decoding began at the first frame
        self.may_seek = True  # off once a seek landed after its target (a bad index): decode on instead
        self.decoded = self.seeks = 0

    def _position(self, t: float) -> None:
        """Seek to the keyframe at or before t (t <= 0: the start)."""
        self.from_start = t <= 0
        target = self.origin + math.floor(max(t - EPS, 0.0) / self.tb)
        self.close()
        self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
        self.seeks += 1
        self.frames = self.container.decode(self.stream)

    def close(self) -> None:
        if self.frames is not None:
            self.frames.close()
        self.frames = self.pending = self.prev = None

    def _time(self, frame) -> float:
        return (frame.pts - self.origin) * self.tb if frame.pts is not None else (self.prev or (0.0,))[0] + self.frame_s

    def _worth_seeking(self, t: float) -> bool:
        here = (self.pending or self.prev or (None,))[0]
        if not self.may_seek:
            return False
        if not self.keyframes:  # no index yet: seek only across long gaps
            return t - (0.0 if here is None else here) > 2.0
        i = bisect.bisect_right(self.keyframes, t + EPS) - 1
        keyframe = self.keyframes[i] if i >= 0 else 0.0
        return keyframe > (0.0 if here is None else here) + EPS

    def frame_at(self, t: float):
        """Requested times must come in increasing order."""
        if self.frames is None:
            self.frames, self.from_start = self.container.decode(self.stream), True
        if self._worth_seeking(t):
            self._position(t)
        while True:
            if self.pending is not None:
                item, self.pending = self.pending, None
            else:
                frame = next(self.frames, None)
                if frame is None:
                    break
                item = (self._time(frame), frame)
                self.decoded += 1
            if item[0] > t + EPS:
                self.pending = item
                break
            self.prev = item
        if self.prev is None:
            if self.pending is not None and self.from_start:
                return self.pending[1]  # t lies before the first frame
            if self.pending is not None:  # the seek landed after t: start over from the beginning
                self._position(0.0)
                self.may_seek = False
                return self.frame_at(t)
            raise EmptyVideoError("the stream has no video frame")
        if self.pending is None and t - self.prev[0] > 1.5 * self.frame_s:
            raise ShortVideoError(f"stream ended at {self.prev[0]:.3f}s, need the frame at {t:.3f}s")
        return self.prev[1]
