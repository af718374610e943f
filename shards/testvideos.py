"""Video files shaped like the ones users bring, for tests and the benchmark (not for training).

Unlike the synthetic corpus (square, 8 fps, a keyframe every 8 frames, no audio) these use
camera-like settings: 16:9 or odd sizes, NTSC rates like 30000/1001, long GOPs with B-frames,
an AAC audio track, and containers other than MP4. The picture is a drifting gradient with a
moving block and per-frame noise, so neighbouring frames differ and codecs cannot cheat.
"""

import math
from fractions import Fraction

import av
import numpy as np


def frames(n: int, width: int, height: int, seed: int = 0):
    """n frames (H, W, 3) uint8, one at a time."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    for i in range(n):
        img = np.empty((height, width, 3), np.uint8)
        img[..., 0] = (x * 255 // max(1, width - 1) + 3 * i) % 256
        img[..., 1] = (y * 255 // max(1, height - 1) + 5 * i) % 256
        img[..., 2] = (x + y + 7 * i) % 256
        bx, by = (i * 3) % max(1, width - 8), (i * 2) % max(1, height - 8)
        img[by : by + 8, bx : bx + 8] = 255
        img[: height // 8, :] = rng.integers(0, 256, size=(height // 8, width, 3), dtype=np.uint8)
        yield img


def write_video(path: str, seconds: float, fps: Fraction | float = Fraction(30000, 1001), width: int = 160,
                height: int = 90, codec: str = "libx264", container: str = "mp4", gop: int = 250,
                bframes: int = 2, audio: bool = False, seed: int = 0) -> int:
    """Encode a test video to `path` -> frames written."""
    rate = Fraction(fps).limit_denominator(1001)
    n = max(0, math.floor(seconds * rate))
    with av.open(path, "w", format=container) as out:
        video = out.add_stream(codec, rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.gop_size = gop
        if codec == "libx264":
            video.options = {"preset": "fast", "crf": "28",
                             "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}"}
        sound = out.add_stream("aac", rate=44100) if audio else None
        if sound is not None:
            sound.layout = "stereo"
        samples_done = 0
        for i, img in enumerate(frames(n, width, height, seed)):
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            while sound is not None and samples_done < (i + 1) / rate * 44100:
                t = (samples_done + np.arange(1024)) / 44100
                wave = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
                chunk = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
                chunk.sample_rate, chunk.pts = 44100, samples_done
                out.mux(sound.encode(chunk))
                samples_done += 1024
        out.mux(video.encode())
        if sound is not None:
            out.mux(sound.encode())
    return n
