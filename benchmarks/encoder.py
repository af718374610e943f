"""Video-encoder presets against full space-time attention, measured in the same run.

    python benchmarks/encoder.py [--out runs/bench/encoder.json]   # ~3-6 minutes on 2 idle cores
    python benchmarks/encoder.py --quick                           # seconds (the smoke test runs this)

For HTWA (LF-VILA), TESTA, STGT and DAST, at 16, 32, 64 and 128 frames, each against its baseline:
the same widths and depths with every stage switched to joint space-time attention and no token
merging (`pretrain.flops.full_attention`). Every number is reported as preset / baseline.

1. GFLOPs of one forward pass (one video, 4 clips) and tokens entering each stage, counted with
   torch.utils.flop_counter on the meta device (`pretrain.flops.measure`, shapes only): at the
   papers' widths and input sizes (`lfvila` 192x320, the others 224x224) and for the `*_small`
   presets at the latency input size.
2. CPU forward latency of the `*_small` presets (full attention at the papers' widths does not fit
   this machine): one video at --size (64x64 by default), torch.no_grad, --threads intra-op threads,
   one warm-up pass, then the median over --reps passes of wall-clock time and of process CPU time
   (the CPU time is less sensitive to other jobs on the cores).
3. Peak memory of the same forward pass. Each (preset, frames, variant) runs in a fresh Python
   process: build the encoder and its input, reset the kernel's peak-RSS mark to the current RSS
   (`echo 5 > /proc/self/clear_refs`), run the passes, read the peak (VmHWM). The difference is
   what the forward pass added on top of weights and input (activations, allocator and kernel
   scratch, one-time kernel set-up), and no configuration inherits another's high-water mark.
STGT also runs a third variant, its graph attention in the dense (T*N)^2 form (`GraphAttention(banded=False)`,
the form before issue 14), with the same three measurements, in a table of its own: banded / full attention and
banded / dense, latency ratios next to GFLOPs ratios, and issue 14's targets at 128 frames (peak memory at
most 1.2x full attention's and at most 0.5x the dense form's).
Before a configuration is launched its activation peak is estimated on the meta device (the most
bytes held by live tensors during the forward pass); above --mem-budget-gib (default: half of the
memory available at the start) or above --max-gflops it is skipped, and its cell says what it
would have needed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, replace

from common import default_out, describe, load, machine, markdown, meminfo_gib, write_json  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from pretrain import attention, htwa  # noqa: E402
from pretrain.attention import GraphAttention  # noqa: E402
from pretrain.flops import INPUT_SIZE, full_attention, measure  # noqa: E402
from pretrain.video_encoder import VideoEncoder, VideoEncoderConfig, preset_values  # noqa: E402

METHODS = {"HTWA (LF-VILA)": ("lfvila_small", "lfvila"), "TESTA": ("testa_small", "testa"),
           "STGT": ("stgt_small", "stgt"), "DAST": ("dast_small", "dast")}
FULL = dict(frames=[16, 32, 64, 128], size=64, reps=5, paper=True)
QUICK = dict(frames=[8, 16], size=32, reps=2, paper=False)
CLIPS = 4


def config(preset: str, frames: int, full: bool) -> VideoEncoderConfig:
    cfg = VideoEncoderConfig(**preset_values(preset))
    cfg = full_attention(cfg) if full else cfg
    return replace(cfg, max_frames=max(cfg.max_frames, frames))


def use_dense_graph(enc: VideoEncoder) -> None:
    """STGT's graph attention in its dense (T*N)^2 form, the one before issue 14's banded form."""
    for m in enc.modules():
        if isinstance(m, GraphAttention):
            m.banded = False


def clear_shape_caches() -> None:
    """The attention modules cache index tensors per shape; ones built on the meta device must not
    reach a later real forward pass in this process."""
    for module in (attention, htwa):
        for fn in vars(module).values():
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()


class LiveBytes(TorchDispatchMode):
    """The most bytes held at once by tensors created during a forward pass (views not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and not t._is_view():
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def count(cfg: VideoEncoderConfig, frames: int, size: tuple[int, int], dense_graph: bool = False) -> dict:
    """GFLOPs, tokens per stage and an activation-peak estimate, all on the meta device (nothing allocated).
    dense_graph: STGT's graph attention in its dense form (`measure` builds the default, banded, encoder, so
    the dense form's GFLOPs are counted here)."""
    try:
        with torch.device("meta"):  # STGT's frame band and HTWA's masks are built in forward: keep them on meta
            gflops, tokens = measure(cfg, frames, size, CLIPS)
            enc = VideoEncoder(cfg)
            if dense_graph:
                use_dense_graph(enc)
            video = torch.empty(1, frames, 3, *size)
            depth = torch.empty(1, frames, *size) if enc.uses_depth else None
            flops = FlopCounterMode(display=False) if dense_graph else contextlib.nullcontext()
            with torch.no_grad(), flops, LiveBytes() as live:
                enc(video, num_clips=CLIPS, depth=depth)
    finally:
        clear_shape_caches()
    gflops = flops.get_total_flops() / 1e9 if dense_graph else gflops
    return {"gflops": gflops, "tokens": tokens, "est_act_gib": live.peak / 2**30}


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return it, in KiB; where that is
    not allowed, the high-water mark so far (ru_maxrss), which hides peaks below it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss() -> int:
    try:
        return status_kib("VmHWM")
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(spec: dict) -> dict:
    """Runs in a fresh process: latency and peak-RSS increase of the forward pass of one configuration."""
    torch.set_num_threads(spec["threads"])
    torch.set_num_interop_threads(1)
    cfg, T, S = VideoEncoderConfig(**spec["cfg"]), spec["frames"], spec["size"]
    torch.manual_seed(0)
    enc = VideoEncoder(cfg).eval()
    if spec.get("dense_graph"):
        use_dense_graph(enc)
    video = torch.randint(0, 256, (1, T, 3, S, S)).float()
    depth = torch.rand(1, T, S, S) if enc.uses_depth else None
    before = reset_peak_rss()
    wall, cpu = [], []
    with torch.no_grad():
        for i in range(spec["reps"] + 1):  # the first pass is the warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            enc(video, num_clips=CLIPS, depth=depth)
            if i:
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    after = peak_rss()
    return {"latency_ms": 1000 * statistics.median(wall), "cpu_ms": 1000 * statistics.median(cpu),
            "latency_all_ms": [round(1000 * w, 2) for w in wall], "peak_mib": (after - before) / 1024}


def run_child(cfg: VideoEncoderConfig, frames: int, p: dict, args, dense_graph: bool = False) -> dict:
    spec = {"cfg": asdict(cfg), "frames": frames, "size": p["size"], "reps": p["reps"], "threads": args.threads,
            "dense_graph": dense_graph}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=args.child_timeout)
    if proc.returncode != 0:
        return {"skipped": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_small(small: str, frames: int, p: dict, args, cache: dict) -> dict:
    """Counts and measurements of one *_small preset and its full-attention baseline, one after the other; for
    STGT then its dense graph attention."""
    out = {}
    variants = [("preset", False, False), ("full", True, False)]
    if "graph" in config(small, frames, False).attention:
        variants.append(("dense", False, True))
    for variant, full, dense in variants:
        cfg = config(small, frames, full)
        key = (json.dumps(asdict(cfg), sort_keys=True), frames, dense)  # lfvila_small's baseline is full_small
        if key not in cache:
            c = count(cfg, frames, (p["size"], p["size"]), dense)
            if c["est_act_gib"] > args.mem_budget_gib:
                c["skipped"] = f"skipped (would need ~{c['est_act_gib']:.1f} GiB, budget {args.mem_budget_gib:.1f})"
            elif c["gflops"] > args.max_gflops:
                c["skipped"] = f"skipped ({c['gflops']:.0f} GFLOPs > --max-gflops {args.max_gflops:g})"
            else:
                c.update(run_child(cfg, frames, p, args, dense))
            cache[key] = c
        out[variant] = cache[key]
    return out


def ratio(a, b) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


def rows_for(method: str, preset: str, frames: int, size: tuple[int, int], got: dict, scale: str) -> dict:
    a, b = got["preset"], got["full"]
    row = {"method": method, "preset": preset, "scale": scale, "frames": frames, "input": f"{frames}x{size[0]}x{size[1]}",
           "gflops": a["gflops"], "full_gflops": b["gflops"], "gflops_ratio": ratio(a["gflops"], b["gflops"]),
           "tokens": a["tokens"], "full_tokens": b["tokens"], "est_act_gib": a["est_act_gib"],
           "full_est_act_gib": b["est_act_gib"]}
    for key in ("latency_ms", "cpu_ms", "peak_mib"):
        if key in a or key in b or "skipped" in a or "skipped" in b:
            row[key], row["full_" + key] = a.get(key), b.get(key)
            row[key.split("_")[0] + "_ratio"] = ratio(a.get(key), b.get(key))
    for variant, r in (("", a), ("full_", b)):
        if "skipped" in r:
            row[variant + "skipped"] = r["skipped"]
    if "dense" in got:  # STGT: the same numbers for the dense graph attention, ratios = banded / dense
        c = got["dense"]
        row.update(dense_gflops=c["gflops"], dense_est_act_gib=c["est_act_gib"],
                   dense_gflops_ratio=ratio(a["gflops"], c["gflops"]))
        for key in ("latency_ms", "cpu_ms", "peak_mib"):
            row["dense_" + key] = c.get(key)
            row["dense_" + key.split("_")[0] + "_ratio"] = ratio(a.get(key), c.get(key))
        if "skipped" in c:
            row["dense_skipped"] = c["skipped"]
    return row


def tokens_cell(tokens: list[int]) -> str:
    return "/".join(map(str, tokens[:-1])) + f" -> {tokens[-1]}"


def cell(value, full, r, fmt: str, skipped: tuple) -> str:
    if value is None or full is None:
        return next(s for s in skipped if s) if any(skipped) else "-"
    return f"{value:{fmt}} / {full:{fmt}}" + (f" = **{r:.2f}**" if r is not None else "")


def triple(r: dict, key: str, fmt: str) -> str:
    values = (r.get(key), r.get("full_" + key), r.get("dense_" + key))
    return " / ".join("-" if v is None else f"{v:{fmt}}" for v in values)


def ratios(r: dict, prefix: str) -> str:
    return " / ".join("-" if r.get(prefix + k) is None else f"{r[prefix + k]:.2f}"
                      for k in ("gflops_ratio", "latency_ratio", "peak_ratio"))


def stgt_table(rows: list[dict]) -> str:
    """Banded graph attention against full attention and against the dense form; issue 14's targets at 128 frames."""
    stgt = [r for r in rows if r["scale"] == "small" and "dense_gflops" in r]
    if not stgt:
        return ""
    skipped = [f"{r['frames']} frames: {r[k]}" for r in stgt for k in ("skipped", "full_skipped", "dense_skipped")
               if k in r]
    out = ["STGT (`stgt_small`): banded graph attention (the preset) / full attention / dense (T*N)^2 graph "
           "attention (`banded=False`), same runs as above; ratios are banded / full and banded / dense.", "",
           markdown(["frames", "GFLOPs", "latency ms (wall)", "CPU ms", "peak MiB",
                     "banded / full: GFLOPs, latency, peak", "banded / dense: GFLOPs, latency, peak"],
                    [[r["frames"], triple(r, "gflops", ".2f"), triple(r, "latency_ms", ".0f"),
                      triple(r, "cpu_ms", ".0f"), triple(r, "peak_mib", ".0f"), ratios(r, ""), ratios(r, "dense_")]
                     for r in stgt])]
    if skipped:
        out += ["", "Not run: " + "; ".join(skipped)]
    target = stgt_targets(rows)
    if target:
        out += ["", f"Targets (issue 14) at 128 frames: peak memory banded / full = {target['vs_full']:.2f} (at most "
                f"1.2: {'met' if target['vs_full_met'] else 'not met'}), banded / dense = {target['vs_dense']:.2f} "
                f"(at most 0.5: {'met' if target['vs_dense_met'] else 'not met'})."]
    return "\n".join(out)


def stgt_targets(rows: list[dict]) -> dict | None:
    """Issue 14: stgt_small's peak memory at 128 frames at most 1.2x full attention's and 0.5x the dense form's."""
    at = next((r for r in rows if r["scale"] == "small" and r["frames"] == 128 and "dense_gflops" in r), None)
    if not at or at.get("peak_ratio") is None or at.get("dense_peak_ratio") is None:
        return None
    full, dense = at["peak_ratio"], at["dense_peak_ratio"]
    return {"frames": 128, "vs_full": full, "vs_full_met": full <= 1.2, "vs_dense": dense, "vs_dense_met": dense <= 0.5}


def tables(rows: list[dict], p: dict, args) -> str:
    small = [r for r in rows if r["scale"] == "small"]
    out = [f"Small presets at {p['size']}x{p['size']}, one video of 4 clips, batch 1, {args.threads} thread(s); "
           f"each cell is preset / full attention = **ratio**. Latency: median of {p['reps']} forward passes "
           "(after one warm-up) under torch.no_grad; peak: resident-set increase over the passes (VmHWM after - VmRSS before, mark reset), in a fresh process.",
           "", markdown(["method", "frames", "GFLOPs", "latency ms (wall)", "CPU ms", "peak MiB", "tokens per stage",
                         "full-attn tokens"],
                        [[r["method"], r["frames"], cell(r["gflops"], r["full_gflops"], r["gflops_ratio"], ".2f", ()),
                          cell(r.get("latency_ms"), r.get("full_latency_ms"), r.get("latency_ratio"), ".0f",
                               (r.get("skipped"), r.get("full_skipped"))),
                          cell(r.get("cpu_ms"), r.get("full_cpu_ms"), r.get("cpu_ratio"), ".0f",
                               (r.get("skipped"), r.get("full_skipped"))),
                          cell(r.get("peak_mib"), r.get("full_peak_mib"), r.get("peak_ratio"), ".0f",
                               (r.get("skipped"), r.get("full_skipped"))),
                          tokens_cell(r["tokens"]), tokens_cell(r["full_tokens"])] for r in small])]
    paper = [r for r in rows if r["scale"] == "paper"]
    if paper:
        out += ["", "Papers' widths and input sizes, counted on the meta device (not run): GFLOPs of one forward "
                "pass and an estimate of the activation peak (most bytes held by live tensors, batch 1, no_grad).", "",
                markdown(["method", "preset", "frames x H x W", "GFLOPs (preset / full = ratio)",
                          "est. activations GiB (preset / full)", "tokens per stage", "full-attn tokens"],
                         [[r["method"], r["preset"], r["input"], cell(r["gflops"], r["full_gflops"], r["gflops_ratio"],
                                                                       ".1f", ()),
                           f"{r['est_act_gib']:.2f} / {r['full_est_act_gib']:.2f}", tokens_cell(r["tokens"]),
                           tokens_cell(r["full_tokens"])] for r in paper])]
    stgt = stgt_table(rows)
    return "\n".join(out + (["", stgt] if stgt else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no paper-size counts: a smoke test")
    parser.add_argument("--out", default=None, help="JSON results (default runs/bench/encoder[_quick].json)")
    parser.add_argument("--frames", type=int, nargs="+", help="frame counts (multiples of 4)")
    parser.add_argument("--size", type=int, help="input height = width of the latency runs")
    parser.add_argument("--reps", type=int, help="timed forward passes per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each measuring process")
    parser.add_argument("--mem-budget-gib", type=float, default=None,
                        help="skip a run whose estimated activations exceed this (default: half of MemAvailable)")
    parser.add_argument("--max-gflops", type=float, default=500.0, help="skip latency runs above this many GFLOPs")
    parser.add_argument("--child-timeout", type=float, default=600.0, help="seconds before a measuring process is killed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    p = dict(QUICK if args.quick else FULL)
    for key in ("frames", "size", "reps"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    if args.mem_budget_gib is None:
        args.mem_budget_gib = meminfo_gib("MemAvailable") / 2
    out = args.out or default_out("encoder_quick" if args.quick else "encoder")
    info, before, started = machine(), load(), time.perf_counter()
    rows, cache = [], {}
    for method, (small, paper) in METHODS.items():
        for frames in p["frames"]:
            got = measure_small(small, frames, p, args, cache)
            rows.append(rows_for(method, small, frames, (p["size"], p["size"]), got, "small"))
            print(f"  {method} {frames} frames: done", file=sys.stderr, flush=True)
    if p["paper"]:
        for method, (small, paper) in METHODS.items():
            size = INPUT_SIZE[paper]
            for frames in p["frames"]:
                got = {v: count(config(paper, frames, full), frames, size) for v, full in (("preset", False), ("full", True))}
                rows.append(rows_for(method, paper, frames, size, got, "paper"))
    after = load()
    text = tables(rows, p, args) + "\n\n" + describe(info, before, after)
    payload = {"benchmark": "encoder", "quick": args.quick, "machine": info, "load_start": before, "load_end": after,
               "seconds": round(time.perf_counter() - started, 1), "settings": {**p, "threads": args.threads,
               "clips": CLIPS, "mem_budget_gib": args.mem_budget_gib, "max_gflops": args.max_gflops,
               "baseline": "pretrain.flops.full_attention(preset): every stage full attention, no merging"},
               "stgt_targets": stgt_targets(rows), "rows": rows}
    write_json(out, payload)
    print(text)
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
