"""Training throughput of DeepSpeed ZeRO-1/2/3 (fp32 and bf16) against plain PyTorch DDP, on 2 CPU ranks, in one run.

    python benchmarks/training.py [--repeats 3] [--out runs/bench/training.json]  # 5 configurations, ~5 min a repeat
    python benchmarks/training.py --runs ddp zero2 settings --repeats 3          # DeepSpeed's ZeRO-2 settings
    python benchmarks/training.py --profile                                      # where ZeRO-2's step time goes
    python benchmarks/training.py --quick [--runs ...] [--repeats N] [--profile] # the smoke test: debug preset

Every configuration trains the same model (the `pretrain/configs/demo.yaml` run: `lfvila_small` HTWA
encoder, hierarchical MiniLM text encoder, VPC + 0.25 MTC), with the same optimizer and schedule, the
same loader over the same synthetic shards and the same batch (data.batch_size per rank), on
gloo with one intra-op thread per rank:
- ZeRO: the real trainer, `deepspeed --num_gpus 2 pretrain/run.py --ds-config JSON`, with a metrics
  record every step (`train.log_every=1`) and no checkpoint before the last step; `zero2_bf16` is ZeRO-2
  with `train.precision=bf16` (DeepSpeed's bf16 engine, fp32 master weights); the `zero2_*` settings
  variants are ds_configs/zero2.json with one `zero_optimization` key changed (RUNS; written into --workdir);
- DDP: `benchmarks/ddp_baseline.py` under `torch.distributed.run`, the same loop with
  torch.nn.parallel.DistributedDataParallel and gradient clipping done by hand.
Step time is the trainer's own (rank 0, from fetching the batch to after the optimizer step); the
first --warmup steps are dropped. Per launch: median step time, samples/s (global batch / mean step
time), the data-wait fraction (time blocked on the loader / step time, summed over the timed steps).
--repeats N launches every configuration N times, in rounds (each round runs every configuration once, its
order rotated by one per round), so a load drift hits all configurations alike; a ratio (step time / DDP's,
bf16 / fp32 samples/s) is taken within a round and reported as min / median / max over the rounds.
--profile runs each launch under torch.profiler (timed steps only; its times are inflated by the profiler)
and prints, per configuration, where a step's time goes against DDP: named ranges around the trainer's
pieces and DeepSpeed's (forward, loss.backward with its gradient hooks, ZeRO's end-of-backward reduce,
gradient norm, AdamW, the parameter all-gather, the rest of the optimizer phase), the self time of copy
ops, and the ops and ranges with the most extra self time; from the unmodified entry points (each profiled
rank runs its entry point's main() through this script, which wraps their functions in ranges: RANGES).
Synthetic shards are written with `python -m shards synth` into --workdir (a temporary folder by
default; reused when it already holds them); 16 videos per shard, so at least 32 videos for 2 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO, default_out, describe, load, machine, markdown, write_json  # noqa: E402

FULL = dict(videos=64, val_videos=4, steps=20, warmup=4, overrides=[])
QUICK = dict(videos=32, val_videos=2, steps=4, warmup=1,
             overrides=["model.video.preset=debug", "data.size=32", "data.frames_per_clip=2", "data.batch_size=2",
                        "model.text.sentence_layers=2"])


@dataclass(frozen=True)
class Run:
    label: str
    ds: str = ""  # ds_configs/<ds>.json; "": the DDP baseline
    zero: dict = field(default_factory=dict)  # keys of the JSON's zero_optimization changed for this run
    overrides: tuple[str, ...] = ()  # run-config overrides


RUNS = {
    "ddp": Run("PyTorch DDP (gloo)"),
    "zero1": Run("DeepSpeed ZeRO-1", "zero1"),
    "zero2": Run("DeepSpeed ZeRO-2", "zero2"),
    "zero3": Run("DeepSpeed ZeRO-3", "zero3"),
    "zero2_bf16": Run("DeepSpeed ZeRO-2, bf16", "zero2", overrides=("train.precision=bf16",)),
    # DeepSpeed's ZeRO-2 settings, one change each against ds_configs/zero2.json (overlap_comm false,
    # contiguous_gradients true, reduce_scatter true, 5e7-element buckets: the whole demo model in one)
    "zero2_overlap": Run("ZeRO-2, overlap_comm", "zero2", {"overlap_comm": True}),
    "zero2_allreduce": Run("ZeRO-2, reduce_scatter off", "zero2", {"reduce_scatter": False}),
    "zero2_buckets": Run("ZeRO-2, 6.25M-element buckets", "zero2",  # DDP's 25 MB of fp32
                         {"reduce_bucket_size": 6_250_000, "allgather_bucket_size": 6_250_000}),
    "zero2_noncontiguous": Run("ZeRO-2, contiguous_gradients off", "zero2", {"contiguous_gradients": False}),
    "zero2_round_robin": Run("ZeRO-2, round_robin_gradients", "zero2", {"round_robin_gradients": True}),
    "zero2_reduce": Run("ZeRO-2, reduce to owners", "zero2", {"use_multi_rank_bucket_allreduce": False}),
}
GROUPS = {"default": ["ddp", "zero1", "zero2", "zero3", "zero2_bf16"],
          "settings": [k for k in RUNS if k.startswith("zero2_") and not RUNS[k].overrides],
          "profile": ["ddp", "zero2"]}


def free_port(lo: int = 29700, hi: int = 29800) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi - 1}")


def make_shards(work: Path, p: dict) -> Path:
    data = work / "synth"
    if not (data / "val" / "index.json").exists():
        subprocess.run([sys.executable, "-m", "shards", "synth", "--out", str(data), "--videos", str(p["videos"]),
                        "--val-videos", str(p["val_videos"]), "--seed", "0"], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
    return data


def ds_config(name: str, work: Path) -> str:
    """The DeepSpeed JSON of a run: the shipped one, or a copy with its zero_optimization keys changed."""
    run = RUNS[name]
    if not run.zero:
        return f"ds_configs/{run.ds}.json"
    ds = json.loads((REPO / "ds_configs" / f"{run.ds}.json").read_text())
    ds["zero_optimization"] = {**ds["zero_optimization"], **run.zero}
    path = work / "ds" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds, indent=2))
    return str(path)


def command(name: str, run_dir: Path, overrides: list[str], work: Path, profile: dict | None = None) -> list[str]:
    """The launch of one configuration; with `profile` ({"warmup", "steps"}), every rank runs its entry point
    through this script's --profile-rank."""
    bindir = Path(sys.executable).parent
    port = str(free_port())
    run = RUNS[name]
    entry = [str(REPO / "benchmarks" / "ddp_baseline.py")] if not run.ds else [str(REPO / "pretrain" / "run.py"),
                                                                                 "--ds-config", ds_config(name, work)]
    args = ["--config", "pretrain/configs/demo.yaml", "--run-dir", str(run_dir), *overrides,
            "train.precision=fp32", *run.overrides]  # fp32 unless the run says otherwise (auto may pick bf16)
    if profile:
        entry = [str(Path(__file__).resolve()), "--profile-rank", str(run_dir / "profile"), "--warmup",
                 str(profile["warmup"]), "--steps", str(profile["steps"]), "--", *entry]
    if not run.ds:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                *entry, *args]
    return [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", port, *entry, *args]


def summarise(records: list[dict], warmup: int, global_batch: int) -> dict:
    timed = [r for r in records if r["step"] > warmup]
    assert timed, f"no steps after the {warmup} warm-up steps"
    steps = [global_batch / r["samples_per_s"] for r in timed]
    waits = [r["data_wait_s"] for r in timed]
    return {"timed_steps": len(timed), "median_step_s": statistics.median(steps), "mean_step_s": statistics.fmean(steps),
            "samples_per_s": global_batch / statistics.fmean(steps), "data_wait_frac": sum(waits) / sum(steps),
            "final_loss": timed[-1]["loss"]}


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": values}


def aggregate(launches: dict[str, list[dict]]) -> tuple[dict, dict | None]:
    """Per configuration: medians over its launches, and its step time / DDP's and / ZeRO-2's per round
    (min / median / max); and bf16 / fp32 samples/s of ZeRO-2 per round, or None without both."""
    def per_round(name: str, base: str, key: str = "median_step_s") -> dict | None:
        if base not in launches:
            return None
        return spread([a[key] / b[key] for a, b in zip(launches[name], launches[base], strict=True)])

    results = {}
    for name, reps in launches.items():
        med = lambda key: statistics.median(r[key] for r in reps)  # noqa: E731
        vs_ddp, vs_zero2 = per_round(name, "ddp"), per_round(name, "zero2")
        results[name] = {"label": RUNS[name].label, "timed_steps": reps[0]["timed_steps"],
                         "median_step_s": med("median_step_s"), "mean_step_s": med("mean_step_s"),
                         "samples_per_s": med("samples_per_s"), "data_wait_frac": med("data_wait_frac"),
                         "final_loss": reps[0]["final_loss"], "final_losses": [r["final_loss"] for r in reps],
                         "overhead_vs_ddp": vs_ddp["median"] if vs_ddp else None, "overhead_vs_ddp_spread": vs_ddp,
                         "vs_zero2_spread": vs_zero2, "launches": reps}
    bf16 = per_round("zero2_bf16", "zero2", "samples_per_s") if "zero2_bf16" in launches else None
    return results, bf16


# ---- --profile: the rank side ------------------------------------------------------------------------------

# (module, attribute path, range name): wrapped in a torch.profiler range in every profiled rank. Missing ones
# (another DeepSpeed version) are skipped. Pieces of one step, the same for both backends where they exist.
RANGES = [
    ("pretrain.trainer", "train_step", "step"),
    ("shards.loader", "TrainLoader.__next__", "data"),
    ("pretrain.model", "VideoTextModel.forward", "forward: model"),
    ("torch.nn.parallel", "DistributedDataParallel.forward", "forward: wrapper"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine.forward", "forward: wrapper"),
    ("torch", "Tensor.backward", "loss.backward"),
    ("pretrain.backends", "TorchBackend.backward", "backend.backward"),
    ("pretrain.backends", "DeepSpeedBackend.backward", "backend.backward"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine._backward_epilogue", "end-of-backward reduce"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.reduce_ipg_grads", "bucket reduce"),
    ("torch.nn.utils", "clip_grad_norm_", "grad norm"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.scaled_global_norm", "grad norm"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.unscale_and_clip_grads", "grad norm"),
    ("deepspeed.runtime.zero.stage_1_and_2", "all_gather_dp_groups", "parameter all-gather"),
]
ADAMW = "Optimizer.step#AdamW.step"  # PyTorch's own range around AdamW.step (DeepSpeed's inner optimizer too)
COPY = ("aten::copy_", "aten::cat", "aten::clone", "aten::_to_copy", "aten::zero_", "aten::fill_")


def wrap_in_ranges(ranges: list[tuple[str, str, str]]) -> list[str]:
    """Wrap each existing function of `ranges` in a torch.profiler range; -> the names of those wrapped."""
    import functools
    import importlib

    from torch.profiler import record_function

    done = []
    for module, path, name in ranges:
        try:
            owner = importlib.import_module(module)
        except ImportError:
            continue
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        fn = getattr(owner, attr, None) if owner is not None else None
        if fn is None:
            continue

        def wrapped(*a, _fn=fn, _name=name, **k):
            with record_function(_name):
                return _fn(*a, **k)

        setattr(owner, attr, functools.wraps(fn)(wrapped))
        done.append(f"{module}.{path}")
    return done


def in_steps(events) -> dict:
    """Per event name: count, inclusive and self CPU time (us) over the events inside a "step" range."""
    totals: dict[str, list] = {}
    for e in events:
        top = e
        while top.cpu_parent is not None:
            top = top.cpu_parent
        if top.name != "step":
            continue
        t = totals.setdefault(e.name, [0, 0.0, 0.0])
        t[0] += 1
        t[1] += e.cpu_time_total
        t[2] += e.self_cpu_time_total
    return {k: {"count": c, "total_us": tot, "self_us": own} for k, (c, tot, own) in totals.items()}


def profile_rank(argv: list[str]) -> int:
    """Rank side of --profile: `training.py [--local_rank=R] --profile-rank PREFIX --warmup W --steps S -- ENTRY
    [ARGS]` runs ENTRY's main() (pretrain/run.py or benchmarks/ddp_baseline.py) in this process, with the
    functions of RANGES in named ranges, records steps W+1..S under torch.profiler and writes the totals inside
    steps to PREFIX.rankR.json."""
    local = [a for a in argv if a.startswith("--local_rank")]  # the deepspeed launcher puts it first
    argv = [a for a in argv if a not in local]
    sep = argv.index("--")
    opts = dict(zip(argv[:sep:2], argv[1:sep:2]))
    entry, entry_args = argv[sep + 1], argv[sep + 2:]
    prefix, warmup, steps = opts["--profile-rank"], int(opts["--warmup"]), int(opts["--steps"])
    from torch.profiler import ProfilerActivity, profile

    ds = entry.endswith("run.py")  # pretrain/run.py; DDP's ranks never import DeepSpeed
    wrapped = wrap_in_ranges([r for r in RANGES if ds or not r[0].startswith("deepspeed")])
    import pretrain.trainer as trainer

    prof, done = profile(activities=[ProfilerActivity.CPU]), [0]
    step_in_range = trainer.train_step

    def train_step(*a, **k):  # starts the profiler after the warm-up, stops it after the last step
        if done[0] == warmup:
            prof.start()
        try:
            return step_in_range(*a, **k)
        finally:
            done[0] += 1
            if done[0] == steps and warmup < steps:
                prof.stop()

    trainer.train_step = train_step
    sys.argv = [entry, *local, *entry_args]
    sys.path.insert(0, str(Path(entry).parent))
    if ds:
        from pretrain.run import main as entry_main

        code = entry_main([*local, *entry_args])
    else:
        import ddp_baseline

        code = ddp_baseline.main()
    rank = int(os.environ.get("RANK", "0"))
    totals = in_steps(prof.events()) if done[0] >= steps > warmup else {}
    Path(f"{prefix}.rank{rank}.json").write_text(json.dumps({"rank": rank, "wrapped": wrapped,
                                                             "steps": steps - warmup, "events": totals}))
    return code


# ---- --profile: the breakdown ------------------------------------------------------------------------------

def read_profile(run_dir: Path) -> dict:
    """ms per timed step by event name (inclusive "total" and "self"), averaged over the ranks' files."""
    files = [json.loads(p.read_text()) for p in sorted(run_dir.glob("profile.rank*.json"))]
    assert files, f"no profile files in {run_dir}"
    out: dict[str, dict] = {}
    for f in files:
        for name, e in f["events"].items():
            o = out.setdefault(name, {"total": 0.0, "self": 0.0, "count": 0.0})
            o["total"] += e["total_us"] / 1000 / f["steps"] / len(files)
            o["self"] += e["self_us"] / 1000 / f["steps"] / len(files)
            o["count"] += e["count"] / f["steps"] / len(files)
    return out


def breakdown(p: dict) -> dict:
    """The rows of the breakdown table from read_profile's numbers: ms per step."""
    t = lambda name: p.get(name, {}).get("total", 0.0)  # noqa: E731
    backend = t("backend.backward") - t("loss.backward") - t("end-of-backward reduce")
    optimizer_parts = t("grad norm") + t(ADAMW) + t("parameter all-gather")
    return {
        "whole step": t("step"),
        "data (loader)": t("data"),
        "forward: model": t("forward: model"),
        "forward: DDP / engine wrapper": t("forward: wrapper") - t("forward: model"),
        "loss.backward (compute, gradient hooks)": t("loss.backward"),
        "  ZeRO bucket reduce (in hooks and epilogue)": t("bucket reduce"),
        "end-of-backward reduce (ZeRO epilogue)": t("end-of-backward reduce"),
        "optimizer phase (after backward)": backend,
        "  gradient norm and clipping": t("grad norm"),
        "  AdamW": t(ADAMW),
        "  parameter all-gather (ZeRO)": t("parameter all-gather"),
        "  rest: copies, flattening, zero_grad, LR schedule": backend - optimizer_parts,
        "copy ops anywhere in the step (self time)": sum(v["self"] for k, v in p.items() if k in COPY),
    }


def profile_table(profiles: dict[str, dict]) -> tuple[str, dict]:
    """ms per step of every profiled configuration and its difference from DDP; the ops with the most extra self
    time against DDP."""
    rows = {name: breakdown(p) for name, p in profiles.items()}
    names = list(profiles)
    base = rows.get("ddp")
    head = ["ms per step (mean of 2 ranks)", *(RUNS[n].label for n in names)]
    head += [f"{RUNS[n].label} - DDP" for n in names if n != "ddp" and base]
    table = []
    for key in next(iter(rows.values())):
        cells = [key, *(f"{rows[n][key]:.1f}" for n in names)]
        cells += [f"{rows[n][key] - base[key]:+.1f}" for n in names if n != "ddp" and base]
        table.append(cells)
    text = markdown(head, table)
    extra = {}
    if base:
        ddp = profiles["ddp"]
        for n in names:
            if n == "ddp":
                continue
            diff = {k: v["self"] - ddp.get(k, {}).get("self", 0.0) for k, v in profiles[n].items()}
            top = sorted(diff.items(), key=lambda kv: -kv[1])[:8]
            extra[n] = top
            text += (f"\n\nMost extra self time per step, {RUNS[n].label} against DDP: "
                     + "; ".join(f"{k} {v:+.1f} ms" for k, v in top))
    return text, {"rows": rows, "top_extra_self_ms": extra}


# ---- the benchmark ---------------------------------------------------------------------------------------

def runs_to_do(names: list[str] | None, profile: bool) -> list[str]:
    """--runs with group names expanded, in RUNS order, each once."""
    chosen = set()
    for n in names or [("profile" if profile else "default")]:
        chosen.update(GROUPS.get(n, [n]))
    return [n for n in RUNS if n in chosen]


def launch(name: str, run_dir: Path, overrides: list[str], work: Path, env: dict, p: dict,
           global_batch: int, profile: bool) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    t0, load0 = time.perf_counter(), load()
    cmd = command(name, run_dir, overrides, work, {"warmup": p["warmup"], "steps": p["steps"]} if profile else None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {**summarise(records, p["warmup"], global_batch), "wall_s": round(time.perf_counter() - t0, 1),
           "loadavg_before": load0["loadavg"], "loadavg_after": load()["loadavg"]}
    if profile:
        out["profile"] = read_profile(run_dir)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--profile-rank" in argv:
        return profile_rank(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="debug preset, tiny batch, a few steps: a smoke test")
    parser.add_argument("--out", default=None, help="JSON results (default runs/bench/training[_quick][_profile].json)")
    parser.add_argument("--workdir", help="shards and run folders go here (reused when present)")
    parser.add_argument("--steps", type=int, help="optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, help="first steps left out of the timing")
    parser.add_argument("--runs", nargs="+", choices=[*RUNS, *GROUPS], metavar="RUN",
                        help=f"configurations or groups (default: default; with --profile: profile): "
                             f"{', '.join(RUNS)}; " + "; ".join(f"{g} = {' '.join(v)}" for g, v in GROUPS.items()))
    parser.add_argument("--repeats", type=int, default=1, help="launches of every configuration, in rotated rounds")
    parser.add_argument("--profile", action="store_true", help="run under torch.profiler; print the step breakdown")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats: expected at least 1")
    p = dict(QUICK if args.quick else FULL)
    for key in ("steps", "warmup"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    names = runs_to_do(args.runs, args.profile)
    out = args.out or default_out("training" + "_quick" * args.quick + "_profile" * args.profile)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    info, before, started = machine(), load(), time.perf_counter()
    launches: dict[str, list[dict]] = {n: [] for n in names}
    try:
        data = make_shards(work, p)
        overrides = [f"data.train_shards={data / 'train'}", f"data.val_shards={data / 'val'}",
                     f"train.steps={p['steps']}", "train.log_every=1", "train.save_every=1000000",
                     "train.eval_at_end=false", *p["overrides"]]
        from pretrain.config import load_config

        cfg = load_config(REPO / "pretrain" / "configs" / "demo.yaml", overrides)
        global_batch = cfg.data.batch_size * 2
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated by one per round
                result = launch(name, work / f"run-{name}", overrides, work, env, p, global_batch, args.profile)
                launches[name].append({"round": r, **result})
                print(f"  round {r}: {name}: {result['median_step_s']:.3f} s/step", file=sys.stderr, flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results, bf16 = aggregate(launches)
    after = load()
    fmt = lambda s: "-" if s is None else f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
    rows = [[r["label"], f"{r['median_step_s']:.3f}", f"{r['samples_per_s']:.2f}",
             f"**{fmt(r['overhead_vs_ddp_spread'])}**", fmt(r["vs_zero2_spread"]), f"{r['data_wait_frac']:.2f}",
             f"{r['final_loss']:.4f}"] for r in results.values()]
    setting = (f"2 CPU ranks (gloo, 1 thread each), {cfg.model.video.preset} + MiniLM text encoder, "
               f"{cfg.data.batch_size} videos per rank (global batch {global_batch}) of {cfg.data.num_clips} clips x "
               f"{cfg.data.frames_per_clip} frames at {cfg.data.hw[0]}x{cfg.data.hw[1]}, 1 loader worker per rank, "
               f"{p['steps']} steps of which the first {p['warmup']} are not timed; {args.repeats} launch(es) per "
               f"configuration in rotated rounds: medians over launches, ratios per round as median (min-max)"
               + (". Under torch.profiler: times are inflated." if args.profile else "."))
    lines = [setting, "", markdown(["configuration", "median step s", "samples/s", "step time / DDP",
                                    "step time / ZeRO-2", "data-wait fraction", "final loss"], rows)]
    if bf16:
        lines += ["", f"bf16 / fp32 samples/s (ZeRO-2, per round): {fmt(bf16)}"]
    prof = None
    if args.profile:
        text, prof = profile_table({n: mean_profile([l["profile"] for l in launches[n]]) for n in names})
        lines += ["", "Where a step's time goes (torch.profiler, timed steps; ranges are inclusive, indented rows "
                  "are parts of the row above; time blocked in a gloo collective is not an op of its own but "
                  "the self time of the range that waits, e.g. loss.backward for DDP's last bucket):", "", text]
    lines += ["", describe(info, before, after)]
    text = "\n".join(lines)
    write_json(out, {"benchmark": "training", "quick": args.quick, "machine": info, "load_start": before,
                     "load_end": after, "seconds": round(time.perf_counter() - started, 1),
                     "settings": {**p, "global_batch": global_batch, "repeats": args.repeats, "runs": names,
                                  "zero_settings": {n: RUNS[n].zero for n in names if RUNS[n].zero},
                                  "setting": setting},
                     "results": results, "bf16_vs_fp32": bf16, "profile": prof})
    print(text)
    print(f"\nwritten: {out}")
    return 0


def mean_profile(profiles: list[dict]) -> dict:
    """read_profile numbers averaged over launches."""
    out: dict[str, dict] = {}
    for p in profiles:
        for name, v in p.items():
            o = out.setdefault(name, {k: 0.0 for k in v})
            for k, x in v.items():
                o[k] += x / len(profiles)
    return out


if __name__ == "__main__":
    sys.exit(main())
