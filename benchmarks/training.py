"""Training throughput of DeepSpeed ZeRO-1/2/3 against plain PyTorch DDP, on 2 CPU ranks, in one run.

    python benchmarks/training.py [--out runs/bench/training.json]   # ~4-6 minutes on 2 idle cores
    python benchmarks/training.py --quick                            # the smoke test: debug preset, few steps

Every configuration trains the same model (the `pretrain/configs/demo.yaml` run: `lfvila_small` HTWA
encoder, hierarchical MiniLM text encoder, VPC + 0.25 MTC), with the same optimizer and schedule, the
same loader over the same synthetic shards and the same batch (data.batch_size per rank), on
gloo with one intra-op thread per rank:
- ZeRO-k: the real trainer, `deepspeed --num_gpus 2 pretrain/run.py --ds-config ds_configs/zerok.json`,
  with a metrics record every step (`train.log_every=1`) and no checkpoint before the last step;
- DDP: `benchmarks/ddp_baseline.py` under `torch.distributed.run`, the same loop with
  torch.nn.parallel.DistributedDataParallel and gradient clipping done by hand.
Step time is the trainer's own (rank 0, from fetching the batch to after the optimizer step); the
first --warmup steps are dropped. Reported: median step time, samples/s (global batch / mean step
time), the ZeRO / DDP ratio of median step times (the overhead), and the data-wait fraction
(time blocked on the loader / step time, summed over the timed steps).
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
from pathlib import Path

from common import REPO, default_out, describe, load, machine, markdown, write_json  # noqa: E402

FULL = dict(videos=64, val_videos=4, steps=20, warmup=4, overrides=[])
QUICK = dict(videos=32, val_videos=2, steps=4, warmup=1,
             overrides=["model.video.preset=debug", "data.size=32", "data.frames_per_clip=2", "data.batch_size=2",
                        "model.text.sentence_layers=2"])
RUNS = ["ddp", "zero1", "zero2", "zero3"]


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


def command(run: str, run_dir: Path, overrides: list[str]) -> list[str]:
    bindir = Path(sys.executable).parent
    port = str(free_port())
    if run == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                str(REPO / "benchmarks" / "ddp_baseline.py"), "--config", "pretrain/configs/demo.yaml",
                "--run-dir", str(run_dir), *overrides]
    return [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", port, str(REPO / "pretrain" / "run.py"),
            "--config", "pretrain/configs/demo.yaml", "--ds-config", f"ds_configs/{run}.json", "--run-dir",
            str(run_dir), *overrides]


def summarise(records: list[dict], warmup: int, global_batch: int) -> dict:
    timed = [r for r in records if r["step"] > warmup]
    assert timed, f"no steps after the {warmup} warm-up steps"
    steps = [global_batch / r["samples_per_s"] for r in timed]
    waits = [r["data_wait_s"] for r in timed]
    return {"timed_steps": len(timed), "median_step_s": statistics.median(steps), "mean_step_s": statistics.fmean(steps),
            "samples_per_s": global_batch / statistics.fmean(steps), "data_wait_frac": sum(waits) / sum(steps),
            "final_loss": timed[-1]["loss"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="debug preset, tiny batch, a few steps: a smoke test")
    parser.add_argument("--out", default=None, help="JSON results (default runs/bench/training[_quick].json)")
    parser.add_argument("--workdir", help="shards and run folders go here (reused when present)")
    parser.add_argument("--steps", type=int, help="optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, help="first steps left out of the timing")
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    for key in ("steps", "warmup"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    out = args.out or default_out("training_quick" if args.quick else "training")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    info, before, started = machine(), load(), time.perf_counter()
    results = {}
    try:
        data = make_shards(work, p)
        overrides = [f"data.train_shards={data / 'train'}", f"data.val_shards={data / 'val'}",
                     f"train.steps={p['steps']}", "train.log_every=1", "train.save_every=1000000",
                     "train.eval_at_end=false", *p["overrides"]]
        from pretrain.config import load_config

        cfg = load_config(REPO / "pretrain" / "configs" / "demo.yaml", overrides)
        global_batch = cfg.data.batch_size * 2
        for run in args.runs:
            run_dir = work / f"run-{run}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0, load0 = time.perf_counter(), load()
            proc = subprocess.run(command(run, run_dir, overrides), cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{run} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            results[run] = {**summarise(records, p["warmup"], global_batch), "wall_s": round(time.perf_counter() - t0, 1),
                            "loadavg_before": load0["loadavg"], "loadavg_after": load()["loadavg"]}
            print(f"  {run}: {results[run]['median_step_s']:.3f} s/step", file=sys.stderr, flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    base = results.get("ddp")
    for r in results.values():
        r["overhead_vs_ddp"] = r["median_step_s"] / base["median_step_s"] if base else None
    after = load()
    names = {"ddp": "PyTorch DDP (gloo)", "zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2",
             "zero3": "DeepSpeed ZeRO-3"}
    rows = [[names[k], f"{r['median_step_s']:.3f}", f"{r['mean_step_s']:.3f}", f"{r['samples_per_s']:.2f}",
             f"**{r['overhead_vs_ddp']:.2f}**" if r["overhead_vs_ddp"] else "-", f"{r['data_wait_frac']:.2f}",
             "/".join(map(str, r["loadavg_before"]))] for k, r in results.items()]
    setting = (f"2 CPU ranks (gloo, 1 thread each), {cfg.model.video.preset} + MiniLM text encoder, "
               f"{cfg.data.batch_size} videos per rank (global batch {global_batch}) of {cfg.data.num_clips} clips x "
               f"{cfg.data.frames_per_clip} frames at {cfg.data.hw[0]}x{cfg.data.hw[1]}, 1 loader worker per rank, "
               f"{p['steps']} steps of which the first {p['warmup']} are not timed.")
    text = "\n".join([setting, "", markdown(["configuration", "median step s", "mean step s", "samples/s",
                                             "step time / DDP", "data-wait fraction", "load avg before"], rows),
                      "", describe(info, before, after)])
    write_json(out, {"benchmark": "training", "quick": args.quick, "machine": info, "load_start": before,
                     "load_end": after, "seconds": round(time.perf_counter() - started, 1),
                     "settings": {**p, "global_batch": global_batch, "setting": setting}, "results": results})
    print(text)
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
