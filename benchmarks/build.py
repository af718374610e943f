"""`shards build` throughput: re-encoding to LF-VILA's format and plain copying, against a plain PyAV loop, in one run.

    python benchmarks/build.py [--videos 8] [--seconds 30] [--repeats 5] [--out FILE]  # ~8 min, loaded 2 cores
    python benchmarks/build.py --quick                                                 # smoke test, ~15 s

Input: --videos camera-like H.264 files (shards/testvideos.py: 640x360 at 30000/1001 fps, B-frames, a keyframe
every 2 s, a drifting gradient, a moving block and a noise band, about 2 Mbit/s), written once into --workdir
and reused. Each is one manifest record with 4 timed sentences.

Every repeat runs, for --workers 1 and then 2, three jobs over the same files in rotated order (so load drift
hits all three alike):
- ceiling: the plain PyAV loop a build cannot beat: decode every frame, keep the frame on screen at each tick of
  3 fps, scale to short side 240 (swscale, area), encode libx264 with the builder's settings (preset veryfast,
  crf 23, a keyframe every second) into a temporary MP4. No manifest, no tar, no JSON.
- reencode: `shards.build.build` with `--fps 3 --short-side 240` (LF-VILA's format): manifest, worker
  processes, `shards.transcode.store`, probe, tar shards, journal, index.json.
- copy: `shards.build.build` without re-encoding (the MP4 bytes go into the tars as they are).
Both sides split the work alike: one worker runs in the main process with the codecs' own threads on every
core (the builder's `threads=0`), two workers are two processes with one codec thread each.

Reported per job: videos/s, per worker, seconds of video per second (wall clock), and CPU seconds per video
(user + system of the process and its workers, which other jobs on a shared machine inflate far less than wall
time); the ratio build / ceiling is taken per repeat (same workers), then the median (min-max).
The projection for LF-VILA-8M is arithmetic on the two-worker CPU rate (one codec thread per process, i.e. per
core) and stated assumptions, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from fractions import Fraction

import av

from common import REPO, default_out, describe, load, machine, markdown, write_json  # puts the checkout on sys.path

from shards.build import BuildSettings, build
from shards.format import parse_meta, read_tar
from shards.testvideos import write_video

FPS, SHORT_SIDE = 3.0, 240  # LF-VILA's stored format (`--fps 3 --short-side 240`)
SOURCE_FPS = Fraction(30000, 1001)
FULL = dict(videos=8, seconds=30.0, width=640, height=360, repeats=5)
QUICK = dict(videos=2, seconds=2.0, width=320, height=180, repeats=1)
MODES = ("ceiling", "reencode", "copy")
LFVILA_SAMPLES = 8_523_237  # LF-VILA-8M (/work/shared/docs/seed-methods.md, `len_lmdb_train_data`)
NODES = (1, 8, 32, 128)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=None, help=f"source videos (default {FULL['videos']})")
    p.add_argument("--seconds", type=float, default=None, help=f"length of each (default {FULL['seconds']:g})")
    p.add_argument("--repeats", type=int, default=None, help=f"rounds of all jobs (default {FULL['repeats']})")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="build --workers values to measure")
    p.add_argument("--workdir", default=None, help="source videos, kept and reused (default runs/bench/build_work)")
    p.add_argument("--out", default=None, help="JSON results (default runs/bench/build[_quick].json)")
    p.add_argument("--sample-seconds", type=float, default=100.0,
                   help="projection: average LF-VILA-8M sample length (an assumption, see the output)")
    p.add_argument("--cores-per-node", type=int, default=64, help="projection: one build worker per core")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 videos of 2 s at 320x180, 1 repeat")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    for k in ("videos", "seconds", "repeats"):
        if getattr(args, k) is None:
            setattr(args, k, size[k])
        if getattr(args, k) <= 0:
            p.error(f"--{k} must be > 0, got {getattr(args, k)}")
    args.width, args.height = size["width"], size["height"]
    return args


# ---- input ----------------------------------------------------------------------------------------


def _write_one(job: tuple) -> None:
    path, seconds, width, height, seed = job
    if not os.path.exists(path):
        write_video(path + ".tmp", seconds, SOURCE_FPS, width, height, gop=round(2 * SOURCE_FPS), bframes=2, seed=seed)
        os.replace(path + ".tmp", path)


def make_inputs(work: str, args) -> tuple[str, list[str]]:
    """The source videos (written once, in 2 processes) and a manifest naming them -> (manifest, paths)."""
    os.makedirs(work, exist_ok=True)
    size = f"{args.width}x{args.height}-{args.seconds:g}s"
    paths = [os.path.join(work, f"v{i:03d}-{size}.mp4") for i in range(args.videos)]
    jobs = [(p, args.seconds, args.width, args.height, i) for i, p in enumerate(paths) if not os.path.exists(p)]
    if jobs:
        print(f"writing {len(jobs)} source videos into {work} ...", file=sys.stderr, flush=True)
        with multiprocessing.Pool(min(2, len(jobs))) as pool:
            pool.map(_write_one, jobs, chunksize=1)
    manifest = os.path.join(work, f"manifest-{args.videos}x{args.width}x{args.height}-{args.seconds:g}s.jsonl")
    step = args.seconds / 4
    with open(manifest, "w") as f:
        for i, path in enumerate(paths):
            sentences = [{"text": f"someone does step {j} of task {i}", "start": j * step, "end": (j + 1) * step}
                         for j in range(4)]
            f.write(json.dumps({"id": f"v{i:03d}", "video": path, "sentences": sentences}) + "\n")
    return manifest, paths


# ---- the ceiling: a plain PyAV decode, resample, scale, encode loop ----------------------------------


def plain_reencode(job: tuple[str, str, int]) -> int:
    """Decode every frame of `src`, keep the frame on screen at each 3 fps tick, scale, encode to `dst` -> frames."""
    src, dst, threads = job
    settings = BuildSettings()  # crf and keyframe interval as the builder's defaults
    rate = Fraction(FPS).limit_denominator(1001)
    with av.open(src) as fin, av.open(dst, "w", format="mp4") as fout:
        stream = fin.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "AUTO", threads
        w, h = stream.codec_context.width, stream.codec_context.height
        scale = min(1.0, SHORT_SIDE / min(w, h))
        width, height = round(w * scale / 2) * 2, round(h * scale / 2) * 2
        out = fout.add_stream("libx264", rate=rate)
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"
        out.codec_context.thread_count = threads
        keyint = max(1, round(settings.gop_seconds * rate))
        out.codec_context.gop_size = keyint
        out.options = {"preset": "veryfast", "crf": str(settings.crf),
                       "x264-params": f"keyint={keyint}:min-keyint={keyint}"}
        tb, origin = float(stream.time_base), stream.start_time or 0
        written, shown, t = 0, None, 0.0

        def emit(frame: av.VideoFrame) -> None:
            nonlocal written
            small = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            small.pts, small.time_base = written, 1 / rate
            fout.mux(out.encode(small))
            written += 1

        for frame in fin.decode(stream):
            t = (frame.pts - origin) * tb
            while written / rate < t - 1e-6:  # ticks before this frame show the previous one (the first: itself)
                emit(shown if shown is not None else frame)
            shown = frame
        while shown is not None and written / rate < t + 1 / float(stream.average_rate) - 1e-6:
            emit(shown)  # the last frame stays on screen one source frame
        fout.mux(out.encode())
    return written


def ceiling(paths: list[str], workers: int, tmp: str) -> dict:
    """The plain loop over every file: in this process with the codecs' threads (1 worker), else one thread per
    process, as the builder runs them."""
    jobs = [(p, os.path.join(tmp, f"ceiling-{i}.mp4"), 0 if workers <= 1 else 1) for i, p in enumerate(paths)]
    if workers <= 1:
        frames = [plain_reencode(j) for j in jobs]
    else:
        pool = multiprocessing.Pool(workers)
        try:
            frames = pool.map(plain_reencode, jobs, chunksize=1)
        finally:  # closed and joined as the builder's pool is: the workers' CPU time is then counted
            pool.close()
            pool.join()
    return {"frames": sum(frames)}


def run_build(manifest: str, workers: int, mode: str, tmp: str, n: int) -> dict:
    """One real build into a fresh folder; checks that no video was skipped (a skip would flatter the rate)."""
    settings = BuildSettings(name="bench", **({"fps": FPS, "short_side": SHORT_SIDE} if mode == "reencode" else {}))
    index = build(manifest, os.path.join(tmp, "out"), settings, workers, tmp_root=tmp, progress=False)
    built, skipped = index["num_samples"], index["skipped"]
    assert built == n and not skipped, f"{mode}: {built} of {n} videos built, skipped {skipped}"
    return {"index": index}


def stored(out: str) -> dict:
    """Frames and format of what a build stored (read after the timing)."""
    metas = [parse_meta(s["json"]) for name in sorted(os.listdir(out)) if name.endswith(".tar")
             for s in read_tar(os.path.join(out, name))]
    return {"frames": sum(m["num_frames"] for m in metas), "fps": sorted({m["fps"] for m in metas}),
            "sizes": sorted({f"{m['width']}x{m['height']}" for m in metas}),
            "bytes": sum(os.path.getsize(os.path.join(out, x)) for x in os.listdir(out) if x.endswith(".tar"))}


def cpu_seconds() -> float:
    """User + system time of this process and of its children that have been waited for (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(mode: str, workers: int, manifest: str, paths: list[str], scratch: str) -> dict:
    tmp = tempfile.mkdtemp(prefix=f"{mode}-w{workers}-", dir=scratch)
    try:
        cpu, start = cpu_seconds(), time.perf_counter()
        if mode == "ceiling":
            result = ceiling(paths, workers, tmp)
        else:
            result = run_build(manifest, workers, mode, tmp, len(paths))
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        if mode != "ceiling":
            result = stored(os.path.join(tmp, "out"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"mode": mode, "workers": workers, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), **result}


# ---- summary ----------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarize(runs: list[dict], n: int, seconds: float) -> dict:
    """Per (mode, workers): median rates over the repeats; build / ceiling per repeat."""
    out: dict = {}
    for mode in MODES:
        for workers in sorted({r["workers"] for r in runs}):
            mine = [r for r in runs if r["mode"] == mode and r["workers"] == workers]
            if not mine:
                continue
            wall = statistics.median(r["wall_s"] for r in mine)
            cpu = statistics.median(r["cpu_s"] for r in mine)
            row = {"videos_per_s": n / wall, "videos_per_s_per_worker": n / wall / workers,
                   "video_seconds_per_s": n * seconds / wall, "cpu_s_per_video": cpu / n,
                   "video_seconds_per_cpu_s": n * seconds / cpu, "wall_s": spread([r["wall_s"] for r in mine]),
                   "frames": mine[0]["frames"]}
            if mode != "ceiling":
                base = {r["round"]: r for r in runs if r["mode"] == "ceiling" and r["workers"] == workers}
                row["vs_ceiling"] = spread([round(base[r["round"]]["wall_s"] / r["wall_s"], 3) for r in mine])
                row["cpu_vs_ceiling"] = spread([round(base[r["round"]]["cpu_s"] / r["cpu_s"], 3) for r in mine])
                row |= {k: mine[0][k] for k in ("fps", "sizes", "bytes")}
            out.setdefault(mode, {})[str(workers)] = row
    return out


def project(results: dict, sample_seconds: float, cores: int) -> dict:
    """LF-VILA-8M on N nodes from the per-core CPU rate of the 2-worker runs (1 codec thread per process)."""
    per_core = str(max(int(w) for w in results["reencode"]))
    rates = {mode: results[mode][per_core]["video_seconds_per_cpu_s"] for mode in MODES}
    wall = results["reencode"][per_core]["video_seconds_per_s"] / int(per_core)  # this loaded machine, per worker
    total = LFVILA_SAMPLES * sample_seconds
    days = lambda rate, nodes: total / (rate * cores * nodes) / 86400  # noqa: E731
    rows = [{"nodes": n, "cores": n * cores, "reencode_days": days(rates["reencode"], n),
             "reencode_720p_days": days(rates["reencode"] / 4, n), "ceiling_days": days(rates["ceiling"], n),
             "reencode_loaded_wall_days": days(wall, n), "copy_cpu_days": days(rates["copy"], n)} for n in NODES]
    return {"kind": "projection, not a measurement",
            "assumptions": {"samples": LFVILA_SAMPLES, "sample_seconds": sample_seconds, "total_hours": total / 3600,
                            "cores_per_node": cores, "per_core_from_workers": int(per_core),
                            "video_seconds_per_core_s": rates, "loaded_wall_video_seconds_per_worker_s": wall},
            "rows": rows}


def table(results: dict, workers: list[int]) -> str:
    head = ["job", "workers", "videos/s", "videos/s per worker", "video s / s", "CPU s per video",
            "build / ceiling (wall)", "build / ceiling (CPU)"]
    names = {"ceiling": "ceiling: plain PyAV decode + 3 fps + 240 + libx264",
             "reencode": "`build --fps 3 --short-side 240`", "copy": "`build` (copy)"}
    ratio = lambda s: f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" if s else "1"  # noqa: E731
    rows = []
    for mode in MODES:
        for w in workers:
            r = results[mode][str(w)]
            rows.append([names[mode], w, f"{r['videos_per_s']:.2f}", f"{r['videos_per_s_per_worker']:.2f}",
                         f"{r['video_seconds_per_s']:.0f}", f"{r['cpu_s_per_video']:.3g}",
                         ratio(r.get("vs_ceiling")), ratio(r.get("cpu_vs_ceiling"))])
    return markdown(head, rows)


def duration(days: float) -> str:
    return f"{days:.1f} d" if days >= 1 else f"{days * 24:.1f} h" if days >= 1 / 24 else f"{days * 1440:.0f} min"


def projection_table(p: dict) -> str:
    a = p["assumptions"]
    head = ["nodes", "cores", "re-encode, 360p sources as measured", "re-encode, 720p sources (cost x4)",
            "ceiling loop", "re-encode at the wall rate per worker here, under load", "copy (CPU only)"]
    keys = ("reencode_days", "reencode_720p_days", "ceiling_days", "reencode_loaded_wall_days", "copy_cpu_days")
    rows = [[r["nodes"], r["cores"], *(duration(r[k]) for k in keys)] for r in p["rows"]]
    text = (f"**Projection, not a measurement**: LF-VILA-8M = {a['samples']:,} samples x {a['sample_seconds']:g} s "
            f"(assumed) = {a['total_hours'] / 1e3:.0f}k hours of source video, each sample one file decoded once; "
            f"{a['cores_per_node']} cores per node, one build worker per core at the CPU rate measured with "
            f"{a['per_core_from_workers']} workers (re-encode {a['video_seconds_per_core_s']['reencode']:.1f} s of "
            f"video per CPU second), perfect scaling; fetching the sources and writing the shards are not counted. "
            f"720p sources (HD-VILA-100M's): the cost per second of video x4 (the pixels decoded), an upper bound, "
            f"as the 240p encode does not grow.")
    return text + "\n\n" + markdown(head, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or default_out("build_quick" if args.quick else "build")
    work = os.path.abspath(args.workdir or REPO / "runs" / "bench" / f"build_work{'_quick' if args.quick else ''}")
    info, before, started = machine(), load(), time.perf_counter()
    info["pyav"] = f"{av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))})"
    manifest, paths = make_inputs(work, args)
    inputs_s = time.perf_counter() - started
    scratch = tempfile.mkdtemp(prefix="bench-build-")
    runs = []
    try:
        for r in range(args.repeats):
            for workers in args.workers:
                for mode in MODES[r % 3:] + MODES[:r % 3]:  # rotated: no job always runs first
                    runs.append({"round": r, **timed(mode, workers, manifest, paths, scratch)})
                    x = runs[-1]
                    print(f"round {r} {mode:8} workers {workers}: {x['wall_s']:.1f} s wall, {x['cpu_s']:.1f} s CPU",
                          file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = summarize(runs, len(paths), args.seconds)
    proj = project(results, args.sample_seconds, args.cores_per_node)
    after = load()
    setting = (f"{len(paths)} source videos x {args.seconds:g} s, {args.width}x{args.height} H.264 at 30000/1001 fps "
               f"(testvideos: B-frames, a keyframe every 2 s), {args.repeats} rounds, jobs rotated within each round; "
               f"medians over rounds, ratios per round: median (min-max). PyAV {info['pyav']}.")
    text = "\n".join([setting, "", table(results, args.workers), "", projection_table(proj), "",
                      describe(info, before, after)])
    print(text)
    write_json(out, {"benchmark": "build", "quick": args.quick, "machine": info, "load_start": before,
                     "load_end": after, "seconds": round(time.perf_counter() - started, 1),
                     "inputs_seconds": round(inputs_s, 1),
                     "settings": {"videos": len(paths), "seconds": args.seconds, "width": args.width,
                                  "height": args.height, "source_fps": float(SOURCE_FPS), "fps": FPS,
                                  "short_side": SHORT_SIDE, "repeats": args.repeats, "workers": args.workers,
                                  "workdir": work, "setting": setting},
                     "runs": runs, "results": results, "projection": proj, "table": text})
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
