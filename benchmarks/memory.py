"""Memory of a training step of each `*_small` video encoder: the most frames under a budget, and the peak
against frames, for the baseline and for each of issue 14's memory savers, all measured in the same run.

    python benchmarks/memory.py --budget-gib 0.25 [--out runs/bench/memory.json]
    python benchmarks/memory.py --quick                # two presets, up to 32 frames (the smoke test runs less)

A training step is the encoder's forward pass on one video (batch 1, 4 clips, --size x --size pixels, uint8
frames as the loader gives them) and the backward pass of a scalar loss on both of its outputs (the mean square
of the video feature plus, where there are clip features, of those), in training mode. Variants, each one
change from the baseline (fp32, every activation kept):
  ckpt  activation checkpointing of every unit (`set_activation_checkpointing(1)`: the patch embedding, every
        block and 2x2 merge recomputed in the backward pass)
  bf16  the forward pass under `torch.autocast("cpu", dtype=torch.bfloat16)` (the weights stay fp32)
  drop  token dropping at 0.5 (`model.video.drop_ratio`, tube masks); refused for HTWA presets: "n/a (htwa)"

What is measured, in a fresh Python process per (preset, variant, frames): build the encoder and its input,
run one step (the warm-up: torch's code pages, oneDNN's kernels and caches, checkpointing's lazy imports), then
reset the kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`) and run the same step again. The number
compared with the budget, "peak", is the second step's peak resident memory minus what the process held once
the encoder and its input were built, file-backed pages (torch's code) left out: activations, gradients,
allocator and kernel scratch, and what the first step left held (oneDNN's bf16 kernel caches, ~20 MiB). It is
what a training loop at that shape needs on top of its weights and input, the steady state. Not the process
total, which adds the interpreter and torch's libraries (~0.25 GiB, the same for every configuration, and
another size with another torch build): it would compress every ratio towards 1. The JSON has the total, the
first step's increase (code pages included) and the second step's alone.
The allocator: glibc's default raises its mmap threshold each time a large block is freed, after which freed
activations stay in its heap, and the heap, not the tensors, sets the peak (lfvila_small at 256 frames: 324 MiB
without checkpointing and 308 with, ~270 of either held by glibc between the steps; 228 and 94 with a fixed
threshold). The probes therefore run with MALLOC_MMAP_THRESHOLD_=131072 (every block of 128 KiB or more is its
own mapping, returned when freed), so RSS follows the live tensors, as an accelerator's caching allocator's
allocated bytes would; --glibc-default measures without it.

1. Most frames under --budget-gib: frame counts are multiples of the clip structure (4 clips; HTWA presets also
   need counts their temporal windows tile, checked by `Config.check_data_and_video`), searched by doubling
   from the first valid count >= --start, then by bisection between the last count that fit and the first that
   did not, up to --max-frames. A probe over --probe-timeout seconds, or one that fails, ends the search (the
   cell says so).
2. The peak at --frames (16 ... 256) for every preset and variant, whatever the budget (probes the search ran
   are reused).
Probes run --jobs at a time (default 2, one thread each): memory is per process, so they do not disturb each
other's peaks, only their step times (in the JSON, not the point here).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from common import default_out, describe, load, machine, markdown, meminfo_gib, write_json  # noqa: E402
from encoder import peak_rss, reset_peak_rss, status_kib  # noqa: E402

import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from pretrain.video_encoder import VideoEncoder, VideoEncoderConfig, preset_values  # noqa: E402

PRESETS = ["lfvila_small", "testa_small", "stgt_small", "dast_small", "full_small"]
VARIANTS = {"base": {}, "ckpt": {"checkpointing": 1}, "bf16": {"bf16": True}, "drop": {"drop_ratio": 0.5}}
TITLES = {"base": "fp32 (baseline)", "ckpt": "checkpointing (every block)", "bf16": "bf16 autocast",
          "drop": "token drop 0.5"}
FULL = dict(presets=PRESETS, size=64, budget_gib=0.25, start=16, max_frames=1024, frames=[16, 32, 64, 128, 256],
            probe_timeout=600.0)
QUICK = dict(presets=["lfvila_small", "stgt_small"], size=64, budget_gib=0.023, start=16, max_frames=32,
             frames=[16, 32], probe_timeout=120.0)
CLIPS = 4
MMAP_THRESHOLD = 128 * 1024  # bytes: every allocation this large or larger is its own mapping (module docstring)


# ---- one probe, in a fresh process -------------------------------------------------------------------------

def child(spec: dict) -> dict:
    """Memory and wall time of a steady-state training step of one configuration (runs in a fresh process)."""
    torch.set_num_threads(spec["threads"])
    torch.set_num_interop_threads(1)
    T, S = spec["frames"], spec["size"]
    cfg = VideoEncoderConfig(**{**preset_values(spec["preset"]), "max_frames": T,
                                "drop_ratio": spec.get("drop_ratio", 0.0)})
    if spec.get("checkpointing"):  # its first use imports ~800 modules (sympy, torch._dynamo; ~80 MiB): pay it here
        checkpoint(torch.sin, torch.ones(1, requires_grad=True), use_reentrant=False).backward()
    torch.manual_seed(0)
    enc = VideoEncoder(cfg).train()
    enc.set_activation_checkpointing(spec.get("checkpointing", 0))
    video = torch.randint(0, 256, (1, T, 3, S, S), dtype=torch.uint8)
    depth = torch.rand(1, T, S, S) if enc.uses_depth else None
    built_anon = status_kib("RssAnon")
    first = reset_peak_rss()
    train_step(enc, video, depth, spec)  # the warm-up: torch's code pages, oneDNN's kernels and caches
    first = peak_rss() - first
    enc.zero_grad(set_to_none=True)
    before = reset_peak_rss()
    t0 = time.perf_counter()
    loss = train_step(enc, video, depth, spec)
    seconds = time.perf_counter() - t0
    peak, files = peak_rss(), status_kib("RssFile")
    return {"peak_mib": (peak - files - built_anon) / 1024, "step_mib": (peak - before) / 1024,
            "held_mib": (before - files - built_anon) / 1024, "first_step_mib": first / 1024,
            "built_mib": (built_anon + files) / 1024, "total_mib": peak / 1024, "step_s": seconds, "loss": loss}


def train_step(enc: VideoEncoder, video: torch.Tensor, depth: torch.Tensor | None, spec: dict) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.get("bf16", False)):
        clips, whole = enc(video, num_clips=CLIPS, depth=depth)
    loss = whole.float().square().mean() + (clips.float().square().mean() if clips is not None else 0.0)
    loss.backward()
    return loss.item()


def probe(preset: str, variant: str, frames: int, p: dict, args) -> dict:
    spec = {"preset": preset, "frames": frames, "size": p["size"], "threads": args.threads, **VARIANTS[variant]}
    env = os.environ if args.glibc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=p["probe_timeout"], env=env)
    except subprocess.TimeoutExpired:
        return {"frames": frames, "timeout": True, "wall_s": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0:  # e.g. killed for memory (-9)
        return {"frames": frames, "failed": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return {"frames": frames, **json.loads(proc.stdout.strip().splitlines()[-1])}


# ---- which frame counts a preset takes ---------------------------------------------------------------------

def config_error(preset: str, frames: int, size: int, drop_ratio: float = 0.0) -> str | None:
    """Why `frames` frames (4 clips) at size x size do not suit `preset`, by the pretraining config's own checks;
    None when they do."""
    from pretrain.config import ConfigError, load_config  # here: the probes, fresh processes, never need it (1 s)

    if frames < CLIPS or frames % CLIPS:
        return f"{frames} frames do not split into {CLIPS} clips"
    try:
        load_config(None, [f"model.video.preset={preset}", f"model.video.max_frames={frames}",
                           "model.loss.mtc_weight=0",  # the encoder's step alone: TESTA merges frames, no clip loss
                           f"model.video.drop_ratio={drop_ratio}", f"data.num_clips={CLIPS}",
                           f"data.frames_per_clip={frames // CLIPS}", f"data.size={size}"])
    except (ConfigError, ValueError) as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=None)
def frame_step(preset: str, size: int) -> int:
    """The smallest multiple of the clip count whose multiples the preset takes (16 for HTWA's windows 2 ... 16)."""
    for step in range(CLIPS, 257, CLIPS):
        if all(config_error(preset, k * step, size) is None for k in (1, 2, 3)):
            return step
    raise ValueError(f"{preset}: no valid frame count up to 256 at {size}x{size}")


def not_applicable(preset: str, variant: str, size: int) -> str | None:
    drop = VARIANTS[variant].get("drop_ratio", 0.0)
    if drop and config_error(preset, frame_step(preset, size), size, drop):
        attention = preset_values(preset)["attention"]
        return "n/a (htwa)" if "htwa" in attention else "n/a"
    return None


# ---- the search and the sweep ------------------------------------------------------------------------------

def fits(r: dict, budget_mib: float) -> bool:
    return "peak_mib" in r and r["peak_mib"] <= budget_mib


def search(preset: str, variant: str, p: dict, args, probes: dict) -> dict:
    """Most frames whose step stays under the budget: doubling from the first valid count >= `start`, then
    bisection, over multiples of the preset's frame step, up to max_frames; a probe that times out or fails
    ends the search (each would cost the whole timeout). `probes` (frames -> result) is filled in."""
    step, budget = frame_step(preset, p["size"]), p["budget_gib"] * 1024

    def run(t: int) -> dict:
        if t not in probes:
            probes[t] = probe(preset, variant, t, p, args)
        return probes[t]

    best, over, t = 0, None, -(-p["start"] // step) * step
    top = p["max_frames"] // step * step
    while over is None and best < top:
        t = min(t, top)
        if fits(run(t), budget):
            best, t = t, 2 * t
        else:
            over = t
    while over is not None and over - best > step and "peak_mib" in probes[over]:  # not after a timeout
        mid = (best + over) // 2 // step * step
        if fits(run(mid), budget):
            best = mid
        else:
            over = mid
    if over is None:
        limit = "max frames"
    else:
        r = probes[over]
        limit = "budget" if "peak_mib" in r else "time" if r.get("timeout") else "failed"
    return {"max_frames": best, "limit": limit, "first_over": over, "frame_step": step}


def run_preset_variant(preset: str, variant: str, p: dict, args) -> dict:
    na = not_applicable(preset, variant, p["size"])
    if na:
        return {"preset": preset, "variant": variant, "skipped": na}
    probes: dict[int, dict] = {}
    found = search(preset, variant, p, args, probes)
    for t in p["frames"]:  # the sweep, up to the first count that timed out or failed
        if t not in probes and config_error(preset, t, p["size"]) is None:
            if any(("timeout" in r or "failed" in r) for s, r in probes.items() if s < t):
                probes[t] = {"frames": t, "skipped": "a smaller frame count timed out or failed"}
            else:
                probes[t] = probe(preset, variant, t, p, args)
    print(f"  {preset} {variant}: {found['max_frames']} frames ({found['limit']}), {len(probes)} probes",
          file=sys.stderr, flush=True)
    return {"preset": preset, "variant": variant, **found, "probes": [probes[t] for t in sorted(probes)]}


# ---- tables ------------------------------------------------------------------------------------------------

def max_cell(r: dict, base: dict | None) -> str:
    if "skipped" in r:
        return r["skipped"]
    n = r["max_frames"]
    if n == 0:
        return f"none ({r['first_over']}: {r['limit'] if r['limit'] != 'budget' else 'over'})"
    text = {"budget": f"{n}", "max frames": f">= {n} (max)", "time": f">= {n} (then timed out)",
            "failed": f">= {n} (then failed)"}[r["limit"]]
    if base and "skipped" not in base and base["max_frames"] and r["variant"] != "base":
        text += f" ({n / base['max_frames']:.2f}x)"
    return text


def peak_cell(r: dict, frames: int) -> str:
    if "skipped" in r:
        return r["skipped"]
    got = next((x for x in r["probes"] if x["frames"] == frames), None)
    if got is None:
        return "-"
    if "peak_mib" in got:
        return f"{got['peak_mib']:.0f}"
    return "timeout" if got.get("timeout") else got.get("skipped") or "failed"


def tables(results: list[dict], p: dict, args) -> str:
    by = {(r["preset"], r["variant"]): r for r in results}
    presets = list(dict.fromkeys(r["preset"] for r in results))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    out = [f"Most frames per video whose training step (forward + backward, batch 1, {CLIPS} clips, "
           f"{p['size']}x{p['size']}) stays under {p['budget_gib']:g} GiB: peak resident memory of a steady-state "
           f"step above the built encoder and its input, each in a fresh process; (Nx) = against the baseline; "
           f"searched up to {p['max_frames']} frames.", "",
           markdown(["preset", "frame step"] + [TITLES[v] for v in variants],
                    [[s, by[(s, "base")].get("frame_step", "-")]
                     + [max_cell(by[(s, v)], by.get((s, "base"))) for v in variants] for s in presets]),
           "", f"Peak of one training step, MiB (as above), against frames ({p['size']}x{p['size']}, batch 1):", "",
           markdown(["preset", "variant"] + [str(t) for t in p["frames"]],
                    [[s, TITLES[v]] + [peak_cell(by[(s, v)], t) for t in p["frames"]]
                     for s in presets for v in variants])]
    target = target_check(by)
    if target:
        out += ["", target["text"]]
    return "\n".join(out)


def target_check(by: dict) -> dict | None:
    """Issue 14's target: lfvila_small trains at least 2x the frames under the same budget with checkpointing."""
    base, ckpt = by.get(("lfvila_small", "base")), by.get(("lfvila_small", "ckpt"))
    if not base or not ckpt or not base["max_frames"]:
        return None
    ratio = ckpt["max_frames"] / base["max_frames"]
    bound = " (a lower bound: the search stopped at --max-frames)" if ckpt["limit"] == "max frames" else ""
    met = "met" if ratio >= 2 else "not met"
    return {"ratio": ratio, "met": ratio >= 2, "lower_bound": bool(bound),
            "text": f"Target (issue 14): lfvila_small with checkpointing trains >= 2x the frames of the baseline under "
                    f"the same budget: {ckpt['max_frames']} / {base['max_frames']} = {ratio:.2f}x{bound}, {met}."}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two presets, a tiny budget and few frames: a smoke test")
    parser.add_argument("--out", default=None, help="JSON results (default runs/bench/memory[_quick].json)")
    parser.add_argument("--budget-gib", type=float,
                        help="budget of a step's peak (module docstring), GiB; default 0.25")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, help="video-encoder presets")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="base is always run (the ratios need it)")
    parser.add_argument("--size", type=int, help="input height = width")
    parser.add_argument("--start", type=int, help="the search doubles from the first valid count >= this")
    parser.add_argument("--max-frames", type=int, help="the search's upper bound")
    parser.add_argument("--frames", type=int, nargs="+", help="frame counts of the peak-against-frames sweep")
    parser.add_argument("--probe-timeout", type=float, help="seconds before a probe is stopped (ends its search)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each probe")
    parser.add_argument("--jobs", type=int, default=2, help="probes run at the same time")
    parser.add_argument("--glibc-default", action="store_true",
                        help=f"leave glibc's dynamic mmap threshold on (default: fixed at {MMAP_THRESHOLD} bytes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    p = dict(QUICK if args.quick else FULL)
    for key in ("presets", "size", "budget_gib", "start", "max_frames", "frames", "probe_timeout"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    variants = ["base"] + [v for v in (args.variants or VARIANTS) if v != "base"]
    if p["budget_gib"] > meminfo_gib("MemAvailable") / 4:
        print(f"warning: a probe above the budget may take several times {p['budget_gib']:g} GiB; "
              f"{meminfo_gib('MemAvailable'):.1f} GiB are available", file=sys.stderr)
    out = args.out or default_out("memory_quick" if args.quick else "memory")
    info, before, started = machine(), load(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # full_small's probes are the slowest: start them first
        futures = {(s, v): pool.submit(run_preset_variant, s, v, p, args)
                   for s in reversed(p["presets"]) for v in variants}
        results = [futures[(s, v)].result() for s in p["presets"] for v in variants]
    after = load()
    by = {(r["preset"], r["variant"]): r for r in results}
    text = tables(results, p, args) + "\n\n" + describe(info, before, after)
    payload = {"benchmark": "memory", "quick": args.quick, "machine": info, "load_start": before, "load_end": after,
               "seconds": round(time.perf_counter() - started, 1),
               "settings": {**p, "variants": variants, "clips": CLIPS, "batch": 1, "threads": args.threads,
                            "jobs": args.jobs, "malloc_mmap_threshold": None if args.glibc_default else MMAP_THRESHOLD,
                            "measure": "second of two identical steps in a fresh process: peak RSS (VmHWM, mark reset) "
                            "- file-backed RSS - anonymous RSS once the encoder and input were built"},
               "target": target_check(by), "results": results}
    write_json(out, payload)
    print(text)
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
