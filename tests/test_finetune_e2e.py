"""End to end: finetune/run.py on synthetic shards built here, with the tiny model.

- every shipped config loads; every recipe's *_debug variant trains and evaluates; labels can come
  from a manifest joined on the sample key;
- finetuning beats its zero-shot starting point (retrieval on held-out videos);
- the zero-shot task scores a saved model exactly as pretraining's evaluation does;
- SIGUSR1 saves and exits 3, --resume continues with the same losses as an uninterrupted run;
- `accelerate launch` with DeepSpeed ZeRO-2 on 2 CPU ranks gives the losses of plain 2-rank DDP.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.config import TASK_KEYS, FinetuneConfig
from finetune.run import main
from pretrain.config import load_config
from test_pretrain_e2e import complete_lines, free_port, run_group

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "finetune" / "configs"
TINY = ["data.batch_size=4", "data.num_workers=1", "data.size=32", "data.frames_per_clip=2", "data.max_words=12",
        "model.video.preset=debug", "model.video.local_stage=0", "model.embed_dim=32", "model.fusion_layers=1",
        "task.decoder_dim=32", "task.decoder_layers=1", "task.query_words=12", "task.question_words=20",
        "train.warmup_steps=2", "train.log_every=1",
        "train.precision=fp32"]  # auto is bf16 on CPUs with bf16 hardware; the tests compare fp32 runs
ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
           PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def synth(out: Path, videos: int, val: int, per_shard: int) -> Path:
    subprocess.run([sys.executable, "-m", "shards", "synth", "--out", str(out), "--videos", str(videos), "--val-videos",
                    str(val), "--seed", "3", "--per-shard", str(per_shard), "--size", "32", "--event-seconds", "1.0"],
                   check=True, cwd=REPO, capture_output=True)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("synth"), 16, 8, 2)


def shards(data: Path) -> list[str]:
    return [f"data.train_shards={data}/train", f"data.val_shards={data}/val"]


def tiny(config: str) -> list[str]:
    """TINY without the task.* keys the recipe's task does not read (those are config errors)."""
    task = load_config(CONFIGS / config, cls=FinetuneConfig).task.name
    return [t for t in TINY if not t.startswith("task.") or task in TASK_KEYS.get(t[5:].split("=")[0], (task,))]


def args(config: str, run_dir: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / config), "--run-dir", str(run_dir), *tiny(config), *shards(data), *extra]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, complete_lines(run_dir / "metrics.jsonl"))]


# ---- configs and recipes ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path, cls=FinetuneConfig)
    if path.stem.endswith("_debug"):
        full = load_config(path.with_name(path.name.replace("_debug", "")), cls=FinetuneConfig)
        assert cfg.task.name == full.task.name and cfg.data.train_shards.startswith("data/synth")
        assert cfg.train.steps < full.train.steps


def test_unknown_key_and_bad_value_are_config_errors(tmp_path, capsys):
    assert main(["--config", str(CONFIGS / "how2qa_debug.yaml"), "--run-dir", str(tmp_path), "task.num_choise=3"]) == 2
    assert "task.num_choices" in capsys.readouterr().err  # the closest valid key is named
    assert main(["--config", str(CONFIGS / "how2qa_debug.yaml"), "--run-dir", str(tmp_path), "model.fusion_layers=0"]) == 2
    assert "model.fusion_layers" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*_debug.yaml")))
def test_recipe_runs_end_to_end(config, data, tmp_path):
    run_dir = tmp_path / "run"
    assert main(args(config, run_dir, data, "train.steps=2", "train.save_every=100", "task.eval_before=false")) == 0
    out = results(run_dir)
    after = out["results"]["after"]
    assert set(out["headline"]) == {"after"} and (run_dir / "results.txt").read_text().count("finetuned") >= 1
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step2" and (run_dir / "config.yaml").exists()
    task = load_config(CONFIGS / config, cls=FinetuneConfig).task.name
    if task == "retrieval":
        assert after["num_videos"] == 8 and (run_dir / "recall_at_k.png").stat().st_size > 1000
        assert len(after["recall_curve"]["paragraph_to_video"]) == 8
    elif task == "caption":
        assert after["num_videos"] == 8 and {"BLEU4", "CIDEr"} <= set(after) and len(after["examples"]) == 5
    else:  # QA: every question of the 8 val videos is scored
        assert after["num_questions"] >= 8 and 0 <= after["accuracy"] <= 100


def test_labels_from_a_manifest_joined_on_the_sample_key(data, tmp_path):
    """The real-data path: labels in a finetune.adapters-style manifest (task.train_labels / val_labels),
    joined to the shards' samples by key; every val question is scored."""
    for split, n in (("train", 16), ("val", 8)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                qa = [{"question": f"is this video number {i}?", "choices": ["yes", "no", "maybe"], "answer": i % 3}]
                qa += [{"question": "how many shapes move?", "choices": ["one", "four", "none"], "answer": 1}] * (i % 2)
                f.write(json.dumps({"id": f"synth_{split}_{i:06d}", "video": "x.mp4", "sentences": [], "qa": qa}) + "\n")
    run_dir = tmp_path / "run"
    assert main(args("how2qa_debug.yaml", run_dir, data, "task.labels=meta", f"task.train_labels={tmp_path / 'train.jsonl'}",
                     f"task.val_labels={tmp_path / 'val.jsonl'}", "train.steps=2", "task.eval_before=false")) == 0
    after = results(run_dir)["results"]["after"]
    assert after["num_questions"] == 8 + 4 and after["chance"] == pytest.approx(100 / 3)


def test_labels_carried_in_the_shards_from_an_adapter_manifest(tmp_path):
    """The path of a real recipe: a manifest with "qa" (what finetune.adapters writes) -> `shards build`
    copies it into each KEY.json -> qa_mc reads it from the shards, with no labels file."""
    from shards.build import BuildSettings, build
    from shards.testvideos import write_video

    for split, n in (("train", 4), ("val", 2)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                video = tmp_path / f"{split}{i}.mp4"
                write_video(str(video), 4, fps=8, width=64, height=48, gop=8, seed=i)
                qa = [{"question": f"what is in clip {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4}] * (1 + i % 2)
                spans = [{"text": f"part {k}", "start": k, "end": k + 1} for k in range(4)]
                f.write(json.dumps({"id": f"{split}{i}", "video": str(video), "sentences": spans, "qa": qa}) + "\n")
        build(str(tmp_path / f"{split}.jsonl"), str(tmp_path / split), BuildSettings(per_shard=2), progress=False)
    run_dir = tmp_path / "run"
    assert main(["--config", str(CONFIGS / "how2qa_debug.yaml"), "--run-dir", str(run_dir), *tiny("how2qa_debug.yaml"),
                 "task.labels=meta",
                 f"data.train_shards={tmp_path / 'train'}", f"data.val_shards={tmp_path / 'val'}", "data.batch_size=2",
                 "train.steps=2", "task.eval_before=false"]) == 0
    after = results(run_dir)["results"]["after"]
    assert after["num_questions"] == 1 + 2 and after["chance"] == pytest.approx(25.0)


# ---- finetuned vs zero-shot ----------------------------------------------------------------------


def test_finetuning_beats_its_zero_shot_starting_point(tmp_path_factory, tmp_path):
    """VPC finetuning (constant LR after warm-up) for 200 steps on 128 synthetic videos, scored on 32 held-out ones before and
    after. Measured over runs: mean rank from ~15.5 to 4.6-7.8, R@5 from ~12% to 43-47%, R@1 from 3% to 12-31%."""
    big = synth(tmp_path_factory.mktemp("synth_big"), 128, 32, 8)
    run_dir = tmp_path / "run"
    assert main(args("anet_retrieval_debug.yaml", run_dir, big, "data.batch_size=8", "train.steps=200", "train.lr=1e-3",
                     "train.decay_every=0", "train.warmup_steps=4", "model.freeze=[text.]", "train.save_every=1000",
                     "train.log_every=50")) == 0
    r = results(run_dir)["results"]
    before, after = r["before"]["paragraph_to_video"], r["after"]["paragraph_to_video"]
    print("zero-shot", before, "\nfinetuned", after)
    assert after["MeanR"] <= before["MeanR"] - 5.0  # chance: 16.5
    assert after["R5"] >= before["R5"] + 15.0  # chance: 15.6
    assert after["R1"] > before["R1"]


def test_zeroshot_task_matches_pretraining_evaluation(data, tmp_path):
    """Save a (random) model as `pretrain.export` does (OUT.pt + OUT.yaml); the zero-shot task, with
    its architecture taken from OUT.yaml, scores it as pretrain.evaluate does, and the "all sentences"
    query equals the clips' sentences when a video has exactly M sentences."""
    from pretrain.config import save_config
    from pretrain.evaluate import evaluate_retrieval
    from pretrain.model import VideoTextModel

    pre = load_config(REPO / "pretrain" / "configs" / "demo.yaml",
                      [t for t in TINY if t.startswith(("data.", "model.video", "model.embed_dim"))] + shards(data))
    torch.manual_seed(7)
    model = VideoTextModel(pre.model).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_config(pre, tmp_path / "model.yaml")
    expected = evaluate_retrieval(model, pre)
    run_dir = tmp_path / "zs"
    data_args = [t for t in TINY if t.startswith("data.")] + [f"data.val_shards={data}/val"]  # no training set
    assert main(["--task", "zeroshot", "--config", str(CONFIGS / "zeroshot.yaml"), "--init", str(tmp_path / "model.pt"),
                 "--run-dir", str(run_dir), "task.query_words=12", *data_args]) == 0
    got = results(run_dir)["results"]["zero_shot"]
    assert got["num_videos"] == expected["num_videos"] == 8
    for direction in ("paragraph_to_video", "video_to_paragraph"):
        assert got[direction] == pytest.approx(expected[direction])
    saved = load_config(run_dir / "config.yaml", cls=FinetuneConfig)
    assert saved.model.video.dims == pre.model.video.dims and saved.model.embed_dim == 32


# ---- the exit contract ---------------------------------------------------------------------------


def script(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "finetune" / "run.py"), *args("how2qa_debug.yaml", run_dir, data, *extra)]


def test_sigusr1_saves_and_exits_3_then_resume_continues_exactly(data, tmp_path):
    """Stopped by SIGUSR1 (SLURM's warning before the time limit) at an unknown step, then resumed to the end:
    every logged loss, before and after the resume, equals an uninterrupted run's. The LR is constant after
    warm-up (train.schedule=step, no decay), so the stopped run's long train.steps changes nothing."""
    common = ["train.save_every=100", "task.eval_before=false", "train.schedule=step", "train.decay_every=0"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    # --resume without a checkpoint starts fresh
    log = tmp_path / "cut.log"  # a file, not a pipe nobody reads while polling (a full pipe would block the run)
    with open(log, "w") as out_file:
        proc = subprocess.Popen(script(cut, data, "--resume", *common, "train.steps=100000"), env=ENV, cwd=REPO,
                                stdout=out_file, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (cut / "metrics.jsonl").exists() or len(complete_lines(cut / "metrics.jsonl")) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no 2 logged steps within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 3, out[-3000:]
    stopped = int((cut / "checkpoints" / "latest").read_text()[len("global_step"):])
    assert stopped >= 2 and "signal SIGUSR1" in out
    steps = stopped + 3
    rc = subprocess.run(script(cut, data, "--resume", *common, f"train.steps={steps}"), env=ENV, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stdout[-2000:] + rc.stderr[-3000:]
    assert main(args("how2qa_debug.yaml", full, data, *common, f"train.steps={steps}")) == 0
    resumed, reference = losses(cut), losses(full)
    assert [s for s, _ in resumed] == [s for s, _ in reference] == list(range(1, steps + 1))  # nothing repeated
    for (step, got), (_, want) in zip(resumed, reference, strict=True):  # same data, RNG, optimizer, LR
        assert got == pytest.approx(want, rel=1e-5), step
    assert "after" in results(cut)["results"]


def test_finetuning_keeps_every_nth_checkpoint_logs_skips_and_can_skip_the_final_evaluation(data, tmp_path):
    """The training core's guarantees, through the accelerate backend: retention (keep_last 1, keep_every 2),
    skip counts and gradient norms in metrics.jsonl, and train.eval_at_end=false honoured."""
    run_dir = tmp_path / "run"
    assert main(args("anet_retrieval_debug.yaml", run_dir, data, "train.steps=5", "train.save_every=1",
                     "train.keep_last=1", "train.keep_every=2", "task.eval_before=false",
                     "train.eval_at_end=false")) == 0
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*"))
    assert kept == ["global_step2", "global_step4", "global_step5"]
    rows = [json.loads(line) for line in complete_lines(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["skipped"] == {} and r["grad_norm"] > 0 and r["samples_seen"] == 4 * r["step"] for r in rows)
    assert not (run_dir / "results.json").exists()  # no evaluation before (eval_before) or after (eval_at_end)


def test_gradient_accumulation_steps_the_optimizer_and_schedule_once_per_step(data, tmp_path):
    """accelerate backend, train.grad_accum=2: 3 steps are 3 optimizer steps (Adam's step count in the saved
    optimizer state) and 3 LR-schedule steps, over 6 micro-batches (samples seen)."""
    run_dir = tmp_path / "run"
    assert main(args("anet_retrieval_debug.yaml", run_dir, data, "train.grad_accum=2", "train.steps=3",
                     "task.eval_before=false", "train.eval_at_end=false")) == 0
    rows = [json.loads(line) for line in complete_lines(run_dir / "metrics.jsonl")]
    assert [(r["step"], r["samples_seen"]) for r in rows] == [(1, 8), (2, 16), (3, 24)]  # batch 4 x 2 micro-batches
    ckpt = run_dir / "checkpoints" / "global_step3"
    optim = torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=False)
    steps = {float(s["step"]) for s in optim["state"].values()}
    assert steps == {3.0}
    assert torch.load(ckpt / "scheduler.bin", map_location="cpu", weights_only=False)["last_epoch"] == 3


def test_finetuning_without_deepspeed_honours_train_precision_bf16(data, tmp_path):
    """train.precision=bf16 on the plain-PyTorch path is accelerate's bf16 autocast, never ignored: the first
    loss (same weights, same batch) differs from fp32's by rounding only."""
    common = ["train.steps=1", "task.eval_before=false", "train.eval_at_end=false"]
    assert main(args("anet_retrieval_debug.yaml", tmp_path / "fp32", data, *common, "train.precision=fp32")) == 0
    bf16_run = [sys.executable, str(REPO / "finetune" / "run.py"),  # a process of its own: accelerate's state is
                *args("anet_retrieval_debug.yaml", tmp_path / "bf16", data, *common, "train.precision=bf16")]  # global
    rc = subprocess.run(bf16_run, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    (_, fp32), (_, bf16) = losses(tmp_path / "fp32")[0], losses(tmp_path / "bf16")[0]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=5e-2)


def test_a_full_disk_during_a_finetuning_save_keeps_the_previous_checkpoint(data, tmp_path):
    """As in pretraining: a save that fails on one file (here a file-size limit, which fails writes like a full
    disk) is removed, `latest` keeps naming the previous one, the error names it, and the run resumes from it."""
    run_dir, common = tmp_path / "run", ["train.save_every=100", "task.eval_before=false", "train.eval_at_end=false"]
    rc = subprocess.run(script(run_dir, data, *common, "train.steps=4", "train.exit_interval=2"), env=ENV, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
    assert rc.returncode == 3, rc.stderr[-3000:]

    def limit():  # Python ignores SIGXFSZ, so the write fails with an OSError
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024,) * 2)

    rc = subprocess.run(script(run_dir, data, "--resume", *common, "train.steps=4"), env=ENV, cwd=REPO,
                        capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert rc.returncode == 1 and "previous checkpoint global_step2 is intact" in rc.stderr, rc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step2"
    assert not (run_dir / "checkpoints" / "global_step4").exists()
    rc = subprocess.run(script(run_dir, data, "--resume", *common, "train.steps=4"), env=ENV, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4]


def test_accelerate_deepspeed_two_ranks_matches_ddp(data, tmp_path):
    """accelerate launch --use_deepspeed (ZeRO-2, gloo) on 2 CPU ranks, and the same run as two plain
    processes (DDP, as launchers/slurm/task.sh starts them): the same per-step losses."""
    common = ["train.steps=3", "train.save_every=100", "task.eval_before=false", "train.lr=1e-3"]
    ds_dir, ddp_dir = tmp_path / "ds", tmp_path / "ddp"
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = run_group([str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                      "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--use_deepspeed",
                      "--deepspeed_config_file", str(REPO / "ds_configs" / "zero2.json"),
                      str(REPO / "finetune" / "run.py"), *args("anet_retrieval_debug.yaml", ds_dir, data, *common)],
                     env=ENV, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (ds_dir / "checkpoints" / "global_step3" / "pytorch_model").is_dir()  # DeepSpeed's sharded checkpoint
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, str(REPO / "finetune" / "run.py"),
                               *args("anet_retrieval_debug.yaml", ddp_dir, data, *common)],
                              env=ENV | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in ranks]
    finally:  # a rank that timed out (or the other one) does not live on after the test
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in ranks] == [0, 0], outs[0][-3000:]
    a, b = losses(ds_dir), losses(ddp_dir)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    for (_, la), (_, lb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, rel=1e-4)
    assert results(ds_dir)["results"]["after"]["num_videos"] == 8
