"""Ablation of the seed papers' mechanisms on the synthetic corpus: one table, mean +- std over seeds.

    python benchmarks/ablation.py [--steps 96] [--seeds 0 1 2] [--variants baseline mtc ...] [--out FILE] [--quick]
    python benchmarks/ablation.py --corpus geometry ...                 # the corpus that needs the relations
    python benchmarks/ablation.py --all --val-videos 64 --jobs 2        # every row of both corpora (the README's)
    python benchmarks/ablation.py --tables A.json B.json --out C.json   # one table from separate runs

Builds one corpus (long videos of 8 events with depth and image-plane relations; `shards.synth`)
once, then trains every variant in this process (world size 1, plain PyTorch with the trainer's own
optimizer, LR schedule and gradient clipping; no DeepSpeed engine, whose ZeRO-2 on one rank is the same
AdamW step) for the same number of steps per seed, and scores it on the held-out split with
`benchmarks/probes.py`: paragraph-to-video R@1, temporal-order and geometry probes (chance 50%), GFLOPs of
one video-encoder forward pass (`pretrain.flops`) and training samples/s. Prints a Markdown table that
marks each difference from the variant's reference larger than two standard errors (over seeds), and
writes every number (per seed too) to --out as JSON.

Two corpora (--corpus). "captions" (the default) draws the colours and shapes of every event, so a
paragraph is told from the others in a batch by its colour and shape words alone and nothing makes a
contrastive loss read the relations. "geometry" (`shards.synth.GEOMETRY`) shows the same three shapes
in every event, moving the same way and overlapping in every frame, so the relations (in front of /
behind, left of / right of) are what tells paragraphs apart, and the occlusion that shows the depth
order is in every sampled frame.

The image rows (`vit_image`, `graph_image`, `stgt_image*`) start the video encoder from a ViT that
`benchmarks/image_pretrain.py` pretrains on single frames of the same corpus, once per corpus (into
DATA_vit next to --data; a finished folder with the same settings is reused).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # sibling modules (probes) import by name, as `common` does

# Each variant changes one thing against its reference (the third field), on the same stage widths, so
# a difference comes from the mechanism. The baseline is full_small: four stages of full space-time
# attention, VPC loss only. HTWA's one change includes what windows allow: clip features from the
# intra-clip stage (LF-VILA's design); full attention mixes clips, so its clip features come from the end.
DAST_STAGES = ["model.video.dims=[64,128,128,128,128]", "model.video.depths=[1,1,1,1,1]",
               "model.video.heads=[2,4,4,4,4]", "model.video.downsample=[true,false,false,false,false]",
               "model.video.temporal_windows=[1,1,1,1,1]", "model.video.merge_frames=[0,0,0,0,0]",
               "model.video.merge_patches=[0,0,0,0,0]", "model.video.local_stage=4"]
VIT_STAGES = ["model.video.dims=[64,64,64,64]", "model.video.heads=[2,2,2,2]",
              "model.video.downsample=[false,false,false,false]"]
VIT_KEYS = ["model.video.cls_token=true", "model.video.pos_grid=[{grid},{grid}]", "model.video.norm_eps=1e-12"]
IMAGE = "model.video.init_image={image}"  # {image}: the image encoder's folder (it sets VIT_KEYS itself)
GRAPH = "model.video.attention=[full,graph,graph,graph]"
STGT_VIT = ["model.video.attention=[full,full,full,graph]", *VIT_STAGES]  # STGT: graph layers on an image model
SSL_ONLY = ["model.loss.vpc_weight=0", "model.loss.ssl_weight=1.0"]
VPC_SSL = ["model.loss.vpc_weight=1.0", "model.loss.ssl_weight=1.0"]
VARIANTS: dict[str, tuple[str, list[str], str | None]] = {
    "baseline": ("full attention, VPC", [], None),
    "mtc": ("+MTC (LF-VILA)", ["model.loss.mtc_weight=0.25"], "baseline"),
    "htwa": ("+HTWA (LF-VILA)", ["model.video.preset=lfvila_small"], "baseline"),
    "divided": ("divided space-time (TESTA's backbone)", ["model.video.attention=[divided,divided,divided,divided]"],
                "baseline"),
    "testa": ("+TESTA merging (on divided)", ["model.video.attention=[divided,divided,divided,divided]",
                                             "model.video.merge_frames=[0,2,2,2]", "model.video.merge_patches=[0,1,1,0]"],
              "divided"),
    "graph": ("+STGT graph attention", [GRAPH], "baseline"),
    "stgt": ("+STGT graph + self-sim. loss", [GRAPH, *SSL_ONLY], "graph"),
    "full5": ("5 full stages (DAST's control)", [*DAST_STAGES, "model.video.attention=[full,full,full,full,full]"],
              "baseline"),
    "dast": ("+DAST depth block (stage 2 of 5)", [*DAST_STAGES, "model.video.attention=[full,depth,full,full,full]"],
             "full5"),
    # Image initialisation (the papers' first step): a ViT pretrained in-project on single frames
    # (benchmarks/image_pretrain.py) starts the video encoder. A ViT has one width and no patch merging, so
    # these rows use ViT-shaped stages (4 x 64 wide, [CLS], no downsampling); "vit" is that shape from scratch.
    "vit": ("full attention, ViT-shaped (4 x 64, [CLS])", [*VIT_STAGES, *VIT_KEYS], "baseline"),
    "vit_image": ("+image init (in-project ViT)", [*VIT_STAGES, IMAGE], "vit"),
    "graph_image": ("+STGT graph layer (last stage), image init", [*STGT_VIT, IMAGE], "vit_image"),
    # STGT as STGT trains (seed-methods 3.3): its self-similarity loss alone, on an image-initialised encoder
    "stgt_image": ("+self-sim. loss alone (STGT's recipe)", [*STGT_VIT, *SSL_ONLY, IMAGE], "graph_image"),
    # our own variants: VPC beside the self-similarity loss, with and without image init, and a VPC warm-up
    "stgt_image_vpc": ("+VPC beside the self-sim. loss (ours)", [*STGT_VIT, *VPC_SSL, IMAGE], "stgt_image"),
    "stgt_vpc": ("+STGT graph, VPC + self-sim. (ours, scratch)", [GRAPH, *VPC_SSL], "stgt"),
    "stgt_warmup": ("+STGT graph, VPC warm-up then self-sim. (ours, scratch)",
                    [GRAPH, *VPC_SSL, "model.loss.vpc_warmup_steps={half}"], "stgt"),
}
COLUMNS = [("R1", "R@1"), ("order", "order (para)"), ("order_clips", "order (clips)"),
           ("depth_clip", "depth rel. (clip)"), ("plane_clip", "left/right (clip)"),
           ("depth_para", "depth rel. (para)"), ("plane_para", "left/right (para)"),
           ("gflops", "GFLOPs"), ("samples_per_s", "samples/s")]


CORPORA = ("captions", "geometry")  # --corpus


def corpus_settings(corpus: str, events: int, size: int):
    """The SynthSettings of one --corpus: long videos of 2 s events at 4 fps, depth and image-plane relations."""
    from shards.synth import GEOMETRY, SynthSettings

    extra = GEOMETRY if corpus == "geometry" else {"relations": "depth+plane"}
    return SynthSettings(events=events, size=size, fps=4.0, event_seconds=2.0, per_shard=8, **extra)


def make_corpus(out: Path, videos: int, val: int, events: int, size: int, corpus: str = "captions") -> None:
    """Writes the corpus into out/train and out/val unless there; a folder holding another corpus is an error."""
    from dataclasses import asdict

    from shards.synth import SynthSettings, write_split

    settings = corpus_settings(corpus, events, size)
    want = json.loads(json.dumps(asdict(settings)))  # tuples as JSON lists, as index.json holds them
    defaults = json.loads(json.dumps(asdict(SynthSettings())))  # what an older index.json without a field meant
    for split, n in (("train", videos), ("val", val)):
        index = out / split / "index.json"
        if not index.exists():
            write_split(str(out / split), split, n, seed=0, settings=settings, workers=1)
            continue
        have = json.loads(index.read_text())
        differs = sorted(k for k, v in want.items() if have["settings"].get(k, defaults[k]) != v)
        if differs:
            raise SystemExit(f"--data {out}: {split} holds another corpus (differs in {', '.join(differs)}); "
                             "give another --data folder or delete it")
        if have["num_samples"] != n:
            print(f"note: {out / split} has {have['num_samples']} videos (kept), not {n}", flush=True)


def train_variant(overrides: list[str], seed: int, steps: int) -> tuple[object, object, float]:
    """-> (trained model, config, training samples/s over the steps after the first 3). The training core's
    loop (`pretrain.trainer.fit`) on its plain-PyTorch backend, without checkpoints, in a run folder that is
    thrown away."""
    import tempfile

    from pretrain.backends import TorchBackend
    from pretrain.config import load_config
    from pretrain.train import build_model, build_optimizer
    from pretrain.trainer import build_scheduler, fit, step_generator

    cfg = load_config(REPO / "benchmarks/configs/ablation.yaml",
                      [*overrides, f"train.seed={seed}", f"data.seed={seed}", f"train.steps={steps}",
                       f"train.warmup_steps={max(1, steps // 10)}", "train.log_every=1", "train.save_every=0"])
    model = build_model(cfg)  # seeded by train.seed; model.video.init_image and model.freeze as in pretraining
    optimizer = build_optimizer(model, cfg)
    backend = TorchBackend(model, optimizer, build_scheduler(optimizer, cfg.train), cfg.train.grad_clip)

    def forward(batch, step, micro):
        return model(batch, generator=step_generator(cfg.train.seed, step), step=step)

    with tempfile.TemporaryDirectory(prefix="ablation-run-") as run_dir:
        state, finished = fit(backend, forward, cfg, Path(run_dir), resume=False, desc=f"seed {seed}")
        if not finished:  # SIGTERM/SIGUSR1 end the loop early; a shorter run must not be scored as this budget
            raise SystemExit(f"stopped by a signal at step {state.step} of {steps}; nothing scored for seed {seed}")
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > min(3, steps - 1)]
    samples_per_s = len(timed) * cfg.data.batch_size / sum(cfg.data.batch_size / r["samples_per_s"] for r in timed)
    return model, cfg, samples_per_s


def gflops(cfg) -> float:
    from pretrain.flops import measure

    frames = cfg.data.num_clips * cfg.data.frames_per_clip
    return measure(cfg.model.video, frames, cfg.data.hw, clips=cfg.data.num_clips)[0]


def summarise(values: list) -> dict:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(xs)}


def difference(a: dict, b: dict) -> tuple[float, float] | None:
    """(mean of a - mean of b, its standard error) from two summaries, or None without numbers."""
    if a["mean"] is None or b["mean"] is None or min(a["n"], b["n"]) < 2:
        return None
    return a["mean"] - b["mean"], math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])


def markdown(results: dict) -> str:
    """The table (mean ± std over seeds; † where the difference from the variant's reference exceeds two
    standard errors), then a line per such difference."""
    head = ["variant", "vs."] + [name for _, name in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for name, r in results.items():
        label, _, ref = VARIANTS[name]
        ref = ref if ref in results else None
        cells = [label, ref or "-"]
        for key, col in COLUMNS:
            s = r["summary"][key]
            if s["mean"] is None:
                cells.append("n/a")
                continue
            cell = f"{s['mean']:.3f}" if key == "gflops" else f"{s['mean']:.1f} ± {s['std']:.1f}"
            diff = difference(s, results[ref]["summary"][key]) if ref and key not in ("gflops", "samples_per_s") else None
            if diff and diff[1] > 0 and abs(diff[0]) > 2 * diff[1]:
                cell += " †"
                notes.append(f"{label} vs. {VARIANTS[ref][0]}: {col} {diff[0]:+.1f} (standard error {diff[1]:.1f})")
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("† differs from its reference by more than two standard errors"
                 + (":" if notes else ": none") + "".join(f"\n- {n}" for n in notes))
    return "\n".join(lines)


# --all: every comparison of the README's ablation in one command: (corpus, variants, seeds, steps) per group
GEOMETRY_VARIANTS = ["baseline", "full5", "dast"]  # DAST against its control where depth decides


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=96, help="optimizer steps per run (batch 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--videos", type=int, default=256, help="training videos in the corpus")
    p.add_argument("--val-videos", type=int, default=32)
    p.add_argument("--corpus", choices=CORPORA, default="captions",
                   help="captions: colours and shapes drawn per event; geometry: the same shapes in every event, "
                        "only the relations tell paragraphs apart (see the module docstring)")
    p.add_argument("--all", action="store_true",
                   help="every row of both corpora: --variants on the captions corpus over --seeds x --steps, then "
                        f"{' '.join(GEOMETRY_VARIANTS)} on the geometry corpus over --geometry-seeds x "
                        "--geometry-steps; one table per corpus")
    p.add_argument("--geometry-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--geometry-steps", type=int, default=192)
    p.add_argument("--size", type=int, default=32, help="frame height and width of the corpus and the model input")
    p.add_argument("--data", default=None, help="corpus folder, built if missing (default runs/ablation/data32 "
                   "for the captions corpus at 32 pixels, else runs/ablation/CORPUS{SIZE}; quick-... with --quick); "
                   "with --all, the captions corpus's folder")
    p.add_argument("--out", default=str(REPO / "runs/ablation/results.json"))
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process (one torch thread each "
                   "when > 1); every finished run is kept in OUT.runs.jsonl, and a rerun with the same settings "
                   "skips the runs found there")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: up to 2, or 1 "
                   "with --jobs > 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1 seed, 8 training and 4 held-out videos of 4 events")
    p.add_argument("--tables", nargs="+", metavar="JSON", help="print one table from earlier --out files "
                   "(e.g. variants run separately) and write it to --out; trains nothing")
    p.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)  # internal: one run, for --jobs
    return p.parse_args(argv)


def merge_tables(paths: list[str], out: Path) -> int:
    """One table from several result files with the same steps and seeds (later files win per variant)."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    if len({(f["steps"], tuple(f["seeds"])) for f in files}) != 1:
        raise SystemExit("--tables: the files differ in --steps or --seeds; their numbers are not comparable")
    if len({(f.get("corpus", "captions"), f.get("size", 32)) for f in files}) != 1:  # older files: captions, 32
        raise SystemExit("--tables: the files differ in --corpus or --size; their numbers are not comparable")
    results = {}
    for f in files:
        results.update(f["results"])
    results = {name: results[name] for name in VARIANTS if name in results}  # the table's order
    for r in results.values():  # summaries again, from the per-seed numbers
        r["summary"] = {key: summarise([run[key] for run in r["runs"]]) for key, _ in COLUMNS}
    table = markdown(results)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**files[0], "wall_seconds": sum(f["wall_seconds"] for f in files), "table": table,
                               "results": results, "merged_from": [str(p) for p in paths]}, indent=1))
    return 0


def run_one(task: dict) -> dict:
    """One (variant, seed) run: train, then score on the held-out split -> its metrics."""
    import torch

    torch.set_num_threads(task["threads"])
    from probes import evaluate_probes

    t = time.perf_counter()
    model, cfg, sps = train_variant(task["overrides"], task["seed"], task["steps"])
    metrics = evaluate_probes(model, cfg)
    return metrics | {"samples_per_s": sps, "gflops": gflops(cfg), "seconds": time.perf_counter() - t,
                      "seed": task["seed"], "batch_size": cfg.data.batch_size}


def data_folder(args, corpus: str) -> Path:
    if args.data is not None and (corpus == args.corpus or args.all and corpus == "captions"):
        return Path(args.data).resolve()
    name = ("quick-" if args.quick else "") + ("data" if corpus == "captions" else corpus)
    return (REPO / "runs/ablation" / f"{name}{args.size}").resolve()  # --quick's 4-event corpus has its own


def plan(args) -> list[dict]:
    """The groups to run: [{corpus, variants, seeds, steps}], one table each."""
    groups = [{"corpus": args.corpus, "variants": args.variants, "seeds": args.seeds, "steps": args.steps}]
    if args.all:
        groups = [{"corpus": "captions", "variants": args.variants, "seeds": args.seeds, "steps": args.steps},
                  {"corpus": "geometry", "variants": GEOMETRY_VARIANTS, "seeds": args.geometry_seeds,
                   "steps": args.geometry_steps}]
    if args.quick:
        for g in groups:
            g["steps"], g["seeds"] = 2, g["seeds"][:1]
    return groups


def run_key(task: dict) -> str:
    """What makes two runs the same run (the cache's key)."""
    return json.dumps({k: task[k] for k in ("corpus", "variant", "seed", "steps", "overrides")}, sort_keys=True)


def run_tasks(tasks: list[dict], jobs: int, cache: Path) -> dict[str, dict]:
    """Every task's metrics by run_key: from the cache, else run (in this process with --jobs 1, else up to
    `jobs` child processes at once, their output in OUT.logs/). Each finished run is appended to the cache."""
    done = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["key"]] = record["metrics"]
    todo = [t for t in tasks if run_key(t) not in done]
    if len(todo) < len(tasks):
        print(f"{len(tasks) - len(todo)} of {len(tasks)} runs found in {cache}; running {len(todo)}", flush=True)
    t0 = time.perf_counter()

    def finished(task, metrics):
        done[run_key(task)] = metrics
        with cache.open("a") as f:
            f.write(json.dumps({"key": run_key(task), "metrics": metrics}) + "\n")
        n = len(tasks) - sum(run_key(t) not in done for t in tasks)
        print(f"[{n}/{len(tasks)}, {(time.perf_counter() - t0) / 60:.1f} min] {task['corpus']} {task['variant']} "
              f"seed {task['seed']}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in metrics.items() if not k.endswith("_n")), flush=True)

    if jobs <= 1:
        for task in todo:
            finished(task, run_one(task))
        return done
    import signal
    import subprocess

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally below: children stopped too
    logs = cache.with_name(cache.name.removesuffix(".runs.jsonl") + ".logs")
    logs.mkdir(parents=True, exist_ok=True)
    running, queue = [], list(todo)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                task = queue.pop(0)
                name = f"{task['corpus']}-{task['variant']}-seed{task['seed']}"
                out = logs / f"{name}.json"
                out.unlink(missing_ok=True)
                log = (logs / f"{name}.log").open("w")
                proc = subprocess.Popen([sys.executable, __file__, "--one", json.dumps(task | {"out": str(out)})],
                                        stdout=log, stderr=subprocess.STDOUT)
                running.append((proc, task, out, log))
            time.sleep(1.0)
            for item in list(running):
                proc, task, out, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                if proc.returncode != 0 or not out.is_file():
                    raise SystemExit(f"{task['corpus']} {task['variant']} seed {task['seed']} failed (exit "
                                     f"{proc.returncode}); see {log.name} in {logs}")
                finished(task, json.loads(out.read_text()))
    finally:  # an error or a signal: no run left behind; finished runs stay in the cache
        for proc, *_ in running:
            proc.terminate()
        for proc, *_ in running:
            proc.wait(timeout=60)
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tables:
        return merge_tables(args.tables, Path(args.out))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.one:
        task = json.loads(args.one)
        Path(task["out"]).write_text(json.dumps(run_one(task)))
        return 0
    events, extra = 8, []
    if args.quick:
        args.videos, args.val_videos, events = 8, 4, 4
        extra = ["data.batch_size=4", "data.num_workers=0", "model.embed_dim=32"]
    threads = args.threads or (1 if args.jobs > 1 else max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    groups, tasks = plan(args), []
    for g in groups:
        data = data_folder(args, g["corpus"])
        make_corpus(data, args.videos, args.val_videos, events, args.size, g["corpus"])
        fill = {"grid": args.size // 8, "half": g["steps"] // 2, "image": None}
        if any(IMAGE in VARIANTS[name][1] for name in g["variants"]):  # trained once per corpus, then reused
            from image_pretrain import ImagePretrainConfig, ensure_image_encoder

            fill["image"] = ensure_image_encoder(data, data.parent / f"{data.name}_vit",
                                                 ImagePretrainConfig(image_size=args.size,
                                                                     steps=2 if args.quick else 400))
        g["data"] = str(data)
        common = [*extra, f"data.train_shards={data}/train", f"data.val_shards={data}/val", f"data.size={args.size}"]
        for name in g["variants"]:
            overrides = [*common, *(o.format(**fill) for o in VARIANTS[name][1])]
            tasks += [{"corpus": g["corpus"], "variant": name, "seed": seed, "steps": g["steps"],
                       "overrides": overrides, "threads": threads} for seed in g["seeds"]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = run_tasks(tasks, args.jobs, out.with_name(out.name + ".runs.jsonl"))
    tables = []
    for g in groups:
        results = {}
        for name in g["variants"]:
            runs = [done[run_key(t)] for t in tasks if t["corpus"] == g["corpus"] and t["variant"] == name]
            results[name] = {"label": VARIANTS[name][0], "overrides": VARIANTS[name][1], "runs": runs,
                             "summary": {key: summarise([r[key] for r in runs]) for key, _ in COLUMNS}}
        table = markdown(results)
        first = results[g["variants"][0]]["runs"][0]
        print(f"\n{g['corpus']} corpus at {args.size}x{args.size}, {len(g['seeds'])} seeds x {g['steps']} steps "
              f"(batch {first['batch_size']}), {first['num_videos']} held-out videos; mean ± std over seeds; "
              f"probes: % of pairwise comparisons won (chance 50)\n\n{table}\n", flush=True)
        tables.append({"steps": g["steps"], "seeds": g["seeds"], "quick": args.quick, "corpus": g["corpus"],
                       "size": args.size, "table": table, "results": results})
    wall = time.perf_counter() - t0
    cpu = sum(done[run_key(t)]["seconds"] for t in tasks) / 60
    print(f"{len(tasks)} runs, {args.jobs} at a time: {wall / 60:.1f} min wall ({cpu:.1f} min of runs)", flush=True)
    record = tables[0] if len(tables) == 1 else {"all": True, "tables": tables}
    out.write_text(json.dumps(record | {"wall_seconds": wall, "jobs": args.jobs, "threads": threads}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
