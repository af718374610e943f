"""MP4 encode and decode with PyAV, all in memory.

Letters: T frames, H height, W width.
"""

import functools
import io
from fractions import Fraction

import av
import numpy as np
from av.codec.context import Flags


class ShortVideoError(ValueError):
    """The stream ended before a requested frame."""


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


def decode_frames(data: bytes, indices: list[int]) -> np.ndarray:
    """Decode only the frames at `indices` (presentation order) -> (len(indices), H, W, 3) uint8.

    Decoding stops at the largest index, so a long video is never held in memory.
    Raises ShortVideoError if the stream ends first; PyAV errors pass through.
    """
    assert len(indices) > 0 and min(indices) >= 0, f"bad frame indices {indices}"
    wanted, last = set(indices), max(indices)
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # loader workers are the parallelism
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            if i >= last:
                break
    if len(kept) < len(wanted):
        raise ShortVideoError(f"stream ended after {decoded} frames, need frame {last}")
    return np.stack([kept[i] for i in indices])
