"""Smoke tests: the encoder, training and projection benchmarks run end to end in --quick mode, and
their JSON holds what the tables claim."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def run(script: str, out: Path, *args: str, timeout: int = 300) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| " in proc.stdout and "Machine:" in proc.stdout
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_encoder_quick(tmp_path):
    result = run("encoder.py", tmp_path / "encoder.json")
    rows = result["rows"]
    frames = result["settings"]["frames"]
    assert {(r["method"], r["frames"]) for r in rows} == {(m, t) for m in ("HTWA (LF-VILA)", "TESTA", "STGT", "DAST")
                                                          for t in frames}
    for r in rows:
        assert positive(r["gflops_ratio"]) and positive(r["latency_ratio"]) and positive(r["cpu_ratio"]), r
        assert r["full_tokens"][0] == r["tokens"][0] == r["frames"] * (result["settings"]["size"] // 8) ** 2
        assert r["peak_mib"] >= 0 and r["full_peak_mib"] >= 0
    testa = {r["frames"]: r for r in rows if r["method"] == "TESTA"}
    assert all(r["tokens"][-1] < r["full_tokens"][-1] for r in testa.values())  # TESTA merges tokens away
    stgt = [r for r in rows if r["method"] == "STGT"]  # and the dense graph attention, STGT only
    assert all("dense_gflops" not in r for r in rows if r["method"] != "STGT")
    for r in stgt:
        assert r["dense_gflops"] >= r["gflops"] and positive(r["dense_latency_ratio"]) and r["dense_peak_mib"] >= 0, r


def test_encoder_counts_stay_on_meta_and_htwa_beats_full_attention_at_128_frames():
    # pretrain.flops.measure alone builds STGT's (T*N)^2 frame band on the CPU (4 GiB at 128 frames of 224x224);
    # the benchmark's count keeps it on the meta device. Small sizes here, the property at 128 frames.
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import encoder
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    htwa, full = (encoder.count(encoder.config("lfvila_small", 128, f), 128, (32, 32)) for f in (False, True))
    assert full["gflops"] > 2 * htwa["gflops"] and full["tokens"] == htwa["tokens"]
    stgt = encoder.count(encoder.config("stgt_small", 16, False), 16, (64, 64))
    assert stgt["est_act_gib"] > 0 and stgt["gflops"] > 0


def test_projection_quick(tmp_path):
    result = run("projection.py", tmp_path / "projection.json")
    assert result["kind"].startswith("projection")
    hours = {(r["gpu"], r["mfu"]): r["epoch_hours"] for r in result["results"]}
    assert all(positive(h) for h in hours.values())
    assert hours[("A100", 0.3)] > hours[("A100", 0.5)] > hours[("H100", 0.5)]  # faster GPU, higher MFU: less time
    inputs = result["recipes"]["lfvila_stage1"]  # stage 1 trains everything: training = 3 x forward
    assert inputs["frozen_gflops"] == 0
    assert inputs["train_gflops_per_sample"] == pytest.approx(3 * (inputs["video_gflops"] + inputs["text_gflops"]))


def test_projection_counts_frozen_parts_forward_only():
    """STGT's frozen ViT-g and LF-VILA stage 2's frozen encoders cost one forward pass per sample, the trained
    parts three (forward + backward); the recipes' own configs say what is frozen."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import projection
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    stgt = projection.count("stgt")
    assert 0.9 * stgt["video_gflops"] < stgt["frozen_gflops"] < stgt["video_gflops"]  # 39 of 40 blocks frozen
    assert stgt["train_gflops_per_sample"] == pytest.approx(stgt["frozen_gflops"] + 3 * stgt["trained_gflops"])
    stage2 = projection.count("lfvila_stage2")
    assert stage2["frozen_gflops"] == pytest.approx(stage2["video_gflops"] + stage2["text_gflops"])
    assert stage2["trained_gflops"] == pytest.approx(stage2["fusion_gflops"]) and stage2["fusion_gflops"] > 0


def load_training():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import training
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return training


def test_training_variants_are_deepspeed_configs_with_their_one_change(tmp_path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pretrain.backends import build_ds_config
    from pretrain.config import load_config

    training = load_training()
    cfg = load_config(REPO / "pretrain/configs/demo.yaml")
    for name, run in training.RUNS.items():
        if run.ds:
            ds = build_ds_config(cfg, 2, training.ds_config(name, tmp_path))
            zero = DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed refuses a misspelt key
            assert all(getattr(zero, k) == v for k, v in run.zero.items()), name
    assert set(training.GROUPS["settings"]) < set(training.RUNS) and "zero2_bf16" not in training.GROUPS["settings"]


def test_training_repeats_in_rotated_rounds_with_a_bf16_ratio(tmp_path, monkeypatch):
    """--repeats: every configuration launched once per round, the order rotated by one each round, ratios
    paired by round. In-process with a stand-in launch (its step times chosen here, so every ratio has an
    independent value); the real launches are the profile test's and test_bf16's."""
    training = load_benchmark("training")
    step_s = {("zero2", 0): 1.0, ("zero2", 1): 1.25, ("zero2_bf16", 0): 0.8, ("zero2_bf16", 1): 0.5,
              ("ddp", 0): 0.9, ("ddp", 1): 1.0}
    order = []

    def fake_launch(name, run_dir, overrides, work, env, p, global_batch, profile):
        r = sum(n == name for n, _ in order)
        order.append((name, r))
        s = step_s[name, r]
        return {"median_step_s": s, "mean_step_s": s, "samples_per_s": global_batch / s, "data_wait_frac": 0.0,
                "final_loss": 6.0 + (name == "zero2_bf16") * 0.01, "timed_steps": p["steps"] - p["warmup"]}

    monkeypatch.setattr(training, "launch", fake_launch)
    out = tmp_path / "training.json"
    assert training.main(["--quick", "--out", str(out), "--workdir", str(tmp_path / "work"),
                          "--runs", "ddp", "zero2", "zero2_bf16", "--repeats", "2"]) == 0
    assert order == [("ddp", 0), ("zero2", 0), ("zero2_bf16", 0), ("zero2", 1), ("zero2_bf16", 1), ("ddp", 1)]
    result = json.loads(out.read_text())
    runs = result["results"]
    assert list(runs) == ["ddp", "zero2", "zero2_bf16"] and result["settings"]["repeats"] == 2
    assert [launch["round"] for launch in runs["zero2_bf16"]["launches"]] == [0, 1]
    assert runs["zero2"]["overhead_vs_ddp_spread"]["values"] == pytest.approx([1.0 / 0.9, 1.25 / 1.0])
    assert runs["zero2"]["median_step_s"] == pytest.approx(1.125)  # the median of 1.0 and 1.25
    assert runs["zero2_bf16"]["vs_zero2_spread"]["values"] == pytest.approx([0.8, 0.4])
    assert result["bf16_vs_fp32"]["values"] == pytest.approx([1.0 / 0.8, 1.25 / 0.5])  # samples/s, paired by round
    assert result["bf16_vs_fp32"]["median"] == pytest.approx((1.25 + 2.5) / 2)


def test_training_quick_profile_breaks_down_ddp_and_zero2_steps(tmp_path):
    result = run("training.py", tmp_path / "training.json", "--workdir", str(tmp_path / "work"), "--profile",
                 timeout=900)  # default under --profile: DDP and ZeRO-2, each its own 2-rank launch
    runs = result["results"]
    assert set(runs) == {"ddp", "zero2"} and runs["ddp"]["overhead_vs_ddp"] == 1.0
    for r in runs.values():
        assert positive(r["median_step_s"]) and positive(r["samples_per_s"]) and positive(r["overhead_vs_ddp"])
        assert 0 <= r["data_wait_frac"] < 1 and math.isfinite(r["final_loss"])
        assert r["timed_steps"] == result["settings"]["steps"] - result["settings"]["warmup"]
    assert runs["ddp"]["final_loss"] == pytest.approx(runs["zero2"]["final_loss"], rel=1e-4)  # the same training
    rows = result["profile"]["rows"]
    assert list(rows) == ["ddp", "zero2"]
    for r in rows.values():  # disjoint ranges inside the step: they cannot add up to more than it
        pieces = (r["data (loader)"] + r["forward: model"] + r["forward: DDP / engine wrapper"]
                  + r["loss.backward (compute, gradient hooks)"] + r["end-of-backward reduce (ZeRO epilogue)"]
                  + r["optimizer phase (after backward)"])
        assert 0 < pieces <= 1.001 * r["whole step"]
        assert r["forward: model"] > 0 and r["loss.backward (compute, gradient hooks)"] > 0 and r["  AdamW"] > 0
    assert rows["ddp"]["  parameter all-gather (ZeRO)"] == rows["ddp"]["end-of-backward reduce (ZeRO epilogue)"] == 0
    zero2 = rows["zero2"]
    assert zero2["  parameter all-gather (ZeRO)"] > 0 and zero2["end-of-backward reduce (ZeRO epilogue)"] > 0


def test_dropping_quick(tmp_path):
    result = run("dropping.py", tmp_path / "dropping.json", "--data", str(tmp_path / "data"), "--ratios", "0.5",
                 timeout=900)  # ratio 0 is always added
    timing, comp = result["timing"], result["compare"]
    assert list(timing) == list(comp) == ["0.0", "0.5"] and result["settings"]["preset"] == "full_small"
    # 32x32 frames: 4x4 patches, dropped in 2x2 blocks (full_small merges 2x2 once): 4 blocks, 2 kept
    assert [timing[r]["patches_per_frame"] for r in timing] == [16, 8]
    passes = result["settings"]["timing_passes"] * result["settings"]["timing_batches"]
    for r, c in comp.items():
        assert positive(timing[r]["encoder_samples_per_s"]) and positive(timing[r]["whole_samples_per_s"])
        assert len(timing[r]["passes"]["encoder"]) == len(timing[r]["passes"]["whole"]) == passes
        assert len(c["R1_per_seed"]) == 2 and all(0 <= x <= 100 for x in c["R1_per_seed"])
    assert comp["0.0"]["encoder_speedup"] == 1.0 and comp["0.0"]["R1_within_seed_spread"] is None
    assert isinstance(comp["0.5"]["R1_within_seed_spread"], bool)
    assert result["target"]["met"] == (comp["0.5"]["encoder_speedup"] >= 1.6)


def load_benchmark(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_encoder_counts_dense_graph_attention_quadratic_in_frames():
    encoder = load_benchmark("encoder")
    cfg = encoder.config("stgt_small", 128, False)
    banded, dense = (encoder.count(cfg, 128, (64, 64), d) for d in (False, True))
    assert dense["gflops"] > 1.5 * banded["gflops"] and dense["est_act_gib"] > 4 * banded["est_act_gib"]
    assert dense["tokens"] == banded["tokens"]


def test_memory_quick(tmp_path):
    result = run("memory.py", tmp_path / "memory.json", "--presets", "lfvila_small", "--variants", "ckpt", "drop")
    by = {r["variant"]: r for r in result["results"]}
    assert list(by) == ["base", "ckpt", "drop"] and by["drop"]["skipped"] == "n/a (htwa)"
    limit, sweep = result["settings"]["max_frames"], result["settings"]["frames"]
    for v in ("base", "ckpt"):
        r = by[v]
        assert r["frame_step"] == 16 and r["max_frames"] % 16 == 0 and 0 <= r["max_frames"] <= limit
        probes = {x["frames"]: x for x in r["probes"]}
        assert set(sweep) <= set(probes)
        assert all(positive(x["peak_mib"]) and positive(x["step_mib"]) for x in probes.values()), probes
        fit = [t for t, x in probes.items() if x["peak_mib"] <= 1024 * result["settings"]["budget_gib"]]
        assert r["max_frames"] == max(fit, default=0)
    assert by["ckpt"]["max_frames"] >= by["base"]["max_frames"]  # memory, not time: robust under load
    assert result["target"]["met"] == (by["ckpt"]["max_frames"] >= 2 * by["base"]["max_frames"] > 0)


def test_memory_search_doubles_then_bisects_over_the_frame_step(monkeypatch):
    memory = load_benchmark("memory")
    calls = []

    def fake(preset, variant, frames, p, args):  # 1 MiB per frame; a probe of more than `slow` frames times out
        calls.append(frames)
        return {"frames": frames, "timeout": True} if frames > slow else {"frames": frames, "peak_mib": float(frames)}

    monkeypatch.setattr(memory, "probe", fake)
    p = dict(size=64, budget_gib=100 / 1024, start=16, max_frames=1024)
    slow = 10**6
    got = memory.search("stgt_small", "base", p, None, {})  # frames step 4
    assert (got["max_frames"], got["limit"], got["frame_step"]) == (100, "budget", 4)
    assert calls == [16, 32, 64, 128, 96, 112, 104, 100]
    calls.clear()
    assert memory.search("lfvila_small", "base", p, None, {})["max_frames"] == 96  # HTWA: multiples of 16
    assert calls == [16, 32, 64, 128, 96, 112]
    got = memory.search("stgt_small", "base", {**p, "budget_gib": 10.0, "max_frames": 300}, None, {})
    assert (got["max_frames"], got["limit"]) == (300, "max frames")  # 16 ... 256, then 300 itself
    slow, calls[:] = 40, []
    got = memory.search("stgt_small", "base", p, None, {})
    assert (got["max_frames"], got["limit"], calls) == (32, "time", [16, 32, 64])  # no bisection after a timeout
    assert memory.not_applicable("lfvila_small", "drop", 64) == "n/a (htwa)"
    assert memory.not_applicable("stgt_small", "drop", 64) is None


def test_memory_frame_steps_exist_for_every_small_preset():
    """The frame search finds valid counts for every CPU preset (TESTA's merged frames once left it none)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import memory
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    steps = {p: memory.frame_step(p, 64) for p in ("lfvila_small", "testa_small", "stgt_small", "dast_small", "full_small")}
    assert steps["lfvila_small"] == 16 and all(s % 4 == 0 for s in steps.values())
