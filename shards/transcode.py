"""Turn a source video file into the shard's MP4: copy, remux, or re-encode to a target fps and size.

- copy: an MP4/MOV source is stored byte for byte (audio and all).
- remux: another container (MKV, WebM, AVI, ...) has its video packets moved into MP4, no re-encode;
  a codec MP4 cannot hold falls back to re-encoding at the source frame rate.
- re-encode: H.264 (libx264, else MPEG-4 Part 2) at `fps` (frames picked by time: the frame on
  screen at each output tick), short side scaled down to `short_side`, a keyframe every
  `gop_seconds`, no audio. Frames stream through; a long video is never held in memory. A display
  rotation (phone video) is applied to the pixels, so the stored video, and any depth computed from
  its frames, is upright without one.
- a segment [start, end] (seconds from the first frame) is always re-encoded: decoding starts at
  the keyframe before `start`, output frame 0 is the frame on screen at `start`, and output stops
  at `end` (or the end of the video).
Copied and remuxed videos keep their display rotation; the reader applies it (shards.video).
"""

import itertools
import shutil
from fractions import Fraction
from typing import Callable

import av
import numpy as np
from av.video.frame import PictureType

from shards.video import EmptyVideoError, Probe, probe, quarter_turns, rgb_to_yuv420p, upright, video_codec

EPS = 1e-6


class SegmentOutsideVideo(EmptyVideoError):
    """A segment that starts at or after the end of its video: nothing to store."""
MP4_FAMILY = "mov,mp4,m4a,3gp,3g2,mj2"


def store(src: str, dst: str, fps: float | None = None, short_side: int | None = None, gop_seconds: float = 1.0,
          crf: int = 23, threads: int = 1, on_frame: Callable[[np.ndarray], None] | None = None,
          segment: tuple[float, float] | None = None) -> tuple[str, Probe]:
    """Write `src` (or only its `segment` [start, end] seconds) as an MP4 at `dst` -> (how: "copy" |
    "remux" | "reencode", probe of dst).

    Re-encodes when fps, short_side or segment is set, or when `on_frame` (called with each stored
    frame as (H, W, 3) uint8 RGB, e.g. for depth) needs the frames anyway.
    """
    source = probe(src)
    if source.num_frames == 0:
        raise EmptyVideoError("the video stream has no frames")
    if segment is not None and segment[0] >= source.duration:
        raise SegmentOutsideVideo(f"segment {list(segment)} starts after the video's end ({source.duration:.3f}s)")
    if fps is None and short_side is None and on_frame is None and segment is None:
        if source.container == MP4_FAMILY:
            shutil.copyfile(src, dst)
            return "copy", source
        try:
            remux(src, dst)
            stored = probe(dst)
            if stored.num_frames == source.num_frames:
                return "remux", stored
        except (av.FFmpegError, ValueError):
            pass  # e.g. a codec the MP4 muxer refuses: re-encode at the source rate
    reencode(src, dst, fps, short_side, gop_seconds, crf, threads, on_frame, segment)
    return "reencode", probe(dst)


def remux(src: str, dst: str) -> None:
    """Video packets of `src` into an MP4 at `dst`, untouched."""
    with av.open(src) as fin, av.open(dst, "w", format="mp4") as fout:
        stream = fin.streams.video[0]
        out = fout.add_stream_from_template(stream)
        for packet in fin.demux(stream):
            if packet.size == 0:  # the demuxer's flush packet (Matroska B-frame packets may lack a dts: keep them)
                continue
            packet.stream = out
            fout.mux(packet)


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Scale so the short side is at most `short_side` (never up), both sides even (yuv420p)."""
    scale = min(1.0, short_side / min(width, height)) if short_side else 1.0
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def reencode(src: str, dst: str, fps: float | None, short_side: int | None, gop_seconds: float, crf: int,
             threads: int, on_frame: Callable[[np.ndarray], None] | None,
             segment: tuple[float, float] | None = None) -> int:
    """Decode, resample in time, scale, encode -> frames written. With `segment`, only its seconds,
    resampled at `fps` or the source rate, from the frame on screen at its start."""
    with av.open(src) as fin, av.open(dst, "w", format="mp4") as fout:
        stream = fin.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "AUTO", threads
        source_rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(source_rate).limit_denominator(1001)
        ctx = stream.codec_context
        origin, tb = stream.start_time or 0, float(stream.time_base)
        begin, stop = segment if segment is not None else (0.0, float("inf"))
        if begin > 0:  # to the keyframe before the segment: frames before `begin` are decoded, not stored
            fin.seek(origin + int(begin / tb), stream=stream, backward=True, any_frame=False)
        frames = fin.decode(stream)
        first = next(frames, None)
        turns = quarter_turns(first) if first is not None else 0
        shown = (ctx.height, ctx.width) if turns % 2 else (ctx.width, ctx.height)  # as displayed
        width, height = output_size(*shown, short_side)
        out = fout.add_stream(video_codec(), rate=rate)
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"
        out.codec_context.thread_count = threads
        keyint = max(1, round(gop_seconds * rate))
        out.codec_context.gop_size = keyint
        if out.codec_context.name == "libx264":
            out.options = {"preset": "veryfast", "crf": str(crf), "x264-params": f"keyint={keyint}:min-keyint={keyint}"}
        else:
            out.codec_context.bit_rate = 2_000_000

        written = 0

        def emit(frame: av.VideoFrame) -> None:
            nonlocal written
            if turns:  # scale in the stored orientation, then turn the pixels upright
                w, h = (height, width) if turns % 2 else (width, height)
                rgb = upright(frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray(), frame)
                small = av.VideoFrame.from_ndarray(rgb_to_yuv420p(rgb), format="yuv420p")
            else:
                small = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            small.pts, small.time_base = written, 1 / rate
            small.pict_type = PictureType.NONE  # the encoder picks frame types, not the source's I/P/B
            if on_frame is not None:
                on_frame(small.to_ndarray(format="rgb24"))
            fout.mux(out.encode(small))
            written += 1

        resample = fps is not None or segment is not None
        current, current_t, span = None, 0.0, stop - begin
        for frame in itertools.chain([first] if first is not None else [], frames):
            t = (frame.pts - origin) * tb - begin if frame.pts is not None else current_t + 1 / float(source_rate)
            if not resample:
                emit(frame)
                continue
            if t <= EPS and segment is not None:  # before (or at) the segment's start: the latest one is shown at 0
                current, current_t = frame, 0.0
                continue
            if t >= span - EPS:
                break
            while current is not None and written / rate < t - EPS:  # ticks before this frame show the current one
                emit(current)
            if current is None:
                while written / rate < t - EPS:  # ticks before the first frame show the first frame
                    emit(frame)
            current, current_t = frame, t
        if resample and current is not None:
            end = min(current_t + 1 / float(source_rate), span)  # the last frame stays on screen one source frame
            while written / rate < end - EPS:
                emit(current)
        fout.mux(out.encode())  # flush
    return written
