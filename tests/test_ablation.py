"""The ablation benchmark (benchmarks/ablation.py --quick) and the probes it scores (benchmarks/probes.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shards.synth import SynthSettings, flip_relation, render_video, video_rng

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # benchmarks/*.py import each other by name

from probes import (ProbeTexts, alignment_scores, order_scores, pairwise_wins, relation_kinds,  # noqa: E402
                    relation_scores, shuffled_orders)


def accuracy(true, other) -> float:
    wins, n = pairwise_wins(true, other)
    return wins / n


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_shuffled_orders_differ_from_the_truth_and_from_each_other():
    rng = np.random.default_rng(0)
    for M in (2, 3, 4, 8):
        orders = shuffled_orders(M, 3, rng)
        assert len(orders) == min(3, math.factorial(M) - 1)
        assert all(sorted(o) == list(range(M)) and o != list(range(M)) for o in orders)
        assert len({tuple(o) for o in orders}) == len(orders)
    assert shuffled_orders(1, 3, rng) == []


def test_probe_texts_are_deterministic_per_key():
    s = SynthSettings(events=4, size=32, relations="depth+plane")
    sentences = [e.sentence() for e in render_video(video_rng(0, "val", 0), s)[2]]
    a, b = ProbeTexts("k", sentences, ["depth", "plane"]), ProbeTexts("k", sentences, ["depth", "plane"])
    assert a.orders == b.orders and a.one_flipped == b.one_flipped
    for kind in ("depth", "plane"):
        changed = [i for i, (x, y) in enumerate(zip(sentences, a.one_flipped[kind], strict=True)) if x != y]
        assert len(changed) == 1 and a.one_flipped[kind][changed[0]] == flip_relation(sentences[changed[0]], kind)
        assert all(x != y for x, y in zip(sentences, a.all_flipped[kind], strict=True))


def test_flipped_relation_sentences():
    s = "a red circle moves left in front of a blue square left of a green triangle"
    assert flip_relation(s, "depth") == "a red circle moves left behind a blue square left of a green triangle"
    assert flip_relation(s, "plane") == "a red circle moves left in front of a blue square right of a green triangle"
    t = "an orange triangle moves right behind an white square right of a yellow circle"
    assert flip_relation(t, "depth") == "an orange triangle moves right in front of an white square right of a yellow circle"
    assert flip_relation(flip_relation(t, "plane"), "plane") == t  # the motion direction is never touched
    old = "a red circle moves left in front of a blue square"  # the default corpus has no image-plane relation
    assert relation_kinds([old]) == ["depth"] and relation_kinds([s]) == ["depth", "plane"]
    with pytest.raises(ValueError):
        flip_relation(old, "plane")


def test_order_probe_oracle_and_reversed():
    N, K, E = 6, 3, 16
    video = unit(N, E)
    shuffled = unit(N, K, E, seed=1)
    oracle = torch.cat([video[:, None], shuffled], 1)  # the true paragraph equals the video: sim 1
    assert accuracy(*order_scores(video, oracle)) == 1.0
    reversed_ = torch.cat([-video[:, None], shuffled], 1)  # the true paragraph is the least similar
    assert accuracy(*order_scores(video, reversed_)) == 0.0
    same = torch.cat([shuffled[:, :1], shuffled[:, :1].expand(-1, K, -1)], 1)  # order-invariant: ties
    assert accuracy(*order_scores(video, same)) == 0.5


def test_clip_alignment_and_relation_probes_oracle_and_reversed():
    N, M, E = 4, 4, 32
    clips = F.normalize(torch.eye(E)[:M].expand(N, M, E) + 0.01 * unit(N, M, E), dim=-1)  # distinct per clip
    orders = torch.tensor([shuffled_orders(M, 3, np.random.default_rng(n)) for n in range(N)])  # (N, 3, M)
    assert accuracy(*alignment_scores(clips, clips, orders)) == 1.0  # sentence m = clip m
    assert accuracy(*alignment_scores(clips, -clips, orders)) == 0.0
    flipped = unit(N, M, E, seed=2)
    assert accuracy(*relation_scores(clips, clips, flipped)) == 1.0
    assert accuracy(*relation_scores(clips, flipped, clips)) == 0.0


def test_ablation_quick_has_every_variant_with_finite_metrics(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--quick", "--data",
                           str(tmp_path / "data"), "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)  # about 25 s on an idle 2-core machine
    assert proc.returncode == 0, proc.stderr[-4000:]
    variants = load_ablation().VARIANTS
    result = json.loads(out.read_text())
    assert list(result["results"]) == list(variants) and result["quick"]
    for name, (label, _, _) in variants.items():
        assert f"| {label} |" in proc.stdout and f"| {label} |" in result["table"]
        run = result["results"][name]["runs"][0]
        no_clips = name == "testa"  # TESTA merges frames before any clip-level stage: no clip probes
        for key in ("R1", "order", "depth_para", "plane_para", "gflops", "samples_per_s",
                    *([] if no_clips else ["order_clips", "depth_clip", "plane_clip"])):
            assert run[key] is not None and math.isfinite(run[key]), (name, key, run[key])
        assert run["gflops"] > 0 and run["samples_per_s"] > 0 and 0 <= run["order"] <= 100
        if no_clips:
            assert run["depth_clip"] is None and "n/a" in result["table"]


def test_table_marks_only_differences_beyond_two_standard_errors_and_merges_files(tmp_path):
    ab = load_ablation()
    keys = [k for k, _ in ab.COLUMNS]

    def result(r1s, orders):
        runs = [{**{k: 1.0 for k in keys}, "R1": a, "order": b} for a, b in zip(r1s, orders, strict=True)]
        return {"runs": runs, "summary": {k: ab.summarise([r[k] for r in runs]) for k in keys}}

    # mtc: R@1 the same within noise; order +30 with spreads of 1-2 (standard error ~1.3): marked.
    results = {"baseline": result([20, 25, 30], [50, 52, 51]), "mtc": result([21, 24, 31], [80, 82, 81])}
    table = ab.markdown(results)
    mtc_row = next(line for line in table.splitlines() if line.startswith("| +MTC"))
    assert "81.0 ± 1.0 †" in mtc_row and "25.3 ± 5.1 |" in mtc_row
    assert "+MTC (LF-VILA) vs. full attention, VPC: order (para) +30.0 (standard error 0.8)" in table
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, name in ((a, "baseline"), (b, "mtc")):
        path.write_text(json.dumps({"steps": 4, "seeds": [0, 1, 2], "quick": False, "wall_seconds": 1.0,
                                    "results": {name: results[name]}}))
    assert ab.main(["--tables", str(b), str(a), "--out", str(tmp_path / "c.json")]) == 0
    merged = json.loads((tmp_path / "c.json").read_text())
    assert list(merged["results"]) == ["baseline", "mtc"] and merged["table"] == table
    b.write_text(json.dumps({"steps": 8, "seeds": [0, 1, 2], "quick": False, "wall_seconds": 1.0, "results": {}}))
    with pytest.raises(SystemExit, match="differ in --steps or --seeds"):
        ab.main(["--tables", str(a), str(b), "--out", str(tmp_path / "d.json")])


def load_ablation():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_all_plans_both_corpora_and_a_rerun_skips_the_runs_it_finds(tmp_path, monkeypatch):
    """--all: the captions rows over --seeds x --steps, then DAST against its control on the geometry corpus over
    --geometry-seeds x --geometry-steps; run_tasks takes finished runs from the cache and runs only the others."""
    ab = load_ablation()
    args = ab.parse_args(["--all", "--seeds", "7", "8", "--geometry-seeds", "1", "2", "3", "--steps", "5"])
    assert ab.plan(args) == [
        {"corpus": "captions", "variants": list(ab.VARIANTS), "seeds": [7, 8], "steps": 5},
        {"corpus": "geometry", "variants": ["baseline", "full5", "dast"], "seeds": [1, 2, 3], "steps": 192}]
    tasks = [{"corpus": "captions", "variant": v, "seed": s, "steps": 5, "overrides": ["x=1"], "threads": 1}
             for v in ("baseline", "mtc") for s in (7, 8)]
    cache = tmp_path / "r.json.runs.jsonl"
    cache.write_text("".join(json.dumps({"key": ab.run_key(t), "metrics": {"seconds": 1.0, "seed": t["seed"]}}) + "\n"
                             for t in tasks[:3]))
    ran = []
    monkeypatch.setattr(ab, "run_one", lambda task: ran.append(task) or {"seconds": 2.0, "seed": task["seed"]})
    done = ab.run_tasks(tasks, jobs=1, cache=cache)
    assert ran == tasks[3:]  # only the run missing from the cache
    assert [done[ab.run_key(t)]["seconds"] for t in tasks] == [1.0, 1.0, 1.0, 2.0]
    assert len(cache.read_text().splitlines()) == 4  # the new run appended
    assert ab.run_tasks(tasks, jobs=1, cache=cache) == done and len(ran) == 1  # a rerun runs nothing
