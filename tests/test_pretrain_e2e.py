"""End to end: the real `deepspeed` launcher, 2 CPU ranks on gloo, ZeRO-2, save, resume, evaluate."""
import io
import json
import logging
import math
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "data.batch_size=4", "data.num_workers=1", "data.size=32", "data.frames_per_clip=2", "data.max_words=12",
    "model.video.preset=debug", "model.video.local_stage=0",
    "model.text.sentence_layers=4", "model.embed_dim=32",
    "train.warmup_steps=2", "train.log_every=1", "train.save_every=2",
    "train.precision=fp32",  # auto is bf16 on CPUs with bf16 hardware; the tests compare fp32 runs
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on a timeout the launcher's ranks and their data-loader
    workers are killed too, instead of living on and loading the machine for the tests after it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {cmd}\n{out[-4000:]}\n{err[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(run_dir, data, steps, *extra, resume=False, config="demo.yaml", expect=0, extra_args=(), nproc=2,
           file_size_limit_kb=None):
    """pretrain/run.py under the real deepspeed launcher with the tiny model; asserts the exit code."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(REPO / "pretrain" / "run.py"),
           "--config", str(REPO / "pretrain" / "configs" / config), "--run-dir", str(run_dir), *extra_args]
    cmd += ["--resume"] if resume else []
    cmd += TINY + [f"data.train_shards={data}/train", f"data.val_shards={data}/val", f"train.steps={steps}", *extra]
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def limit():  # a file-size limit makes writes past it fail like a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit_kb * 1024,) * 2)

    proc = run_group(cmd, cwd=REPO, env=env, timeout=900, preexec_fn=limit if file_size_limit_kb else None)
    assert proc.returncode == expect, f"deepspeed exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def complete_lines(path: Path) -> list[str]:
    """The lines of a file another process may be appending to, without a last line still being written
    (none while the file does not exist)."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[:text.rfind("\n") + 1].splitlines()


def metrics(run_dir):
    """The records of metrics.jsonl, without a last line that rank 0 may still be writing."""
    return [json.loads(line) for line in complete_lines(Path(run_dir) / "metrics.jsonl")]



def test_train_save_resume_continues_exactly(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch(full, data, 6, "train.eval_at_end=false")
    launch(cut, data, 6, "train.exit_interval=4", expect=3)  # saves at step 4 and exits 3: resume me
    assert (cut / "checkpoints" / "latest").read_text() == "global_step4"
    assert (cut / "checkpoints" / "global_step4" / "trainstate.json").exists()
    out = launch(cut, data, 6, resume=True)

    a, b = metrics(full), metrics(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # nothing repeated or lost
    for ra, rb in zip(a, b, strict=True):  # same data, RNG, optimizer and LR: the same losses step by step
        for key in ("loss", "vpc", "mtc", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert {"samples_per_s", "data_wait_s"} <= set(b[-1])
    assert (cut / "checkpoints" / "latest").read_text() == "global_step6"
    assert (cut / "config.yaml").exists() and any((cut / "tb").iterdir())
    result = json.loads((cut / "eval.json").read_text())
    assert result["num_videos"] == 8 and "paragraph->video" in out.stdout


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("stage1")
    launch(run, data, 2, "train.eval_at_end=false")
    return run


def test_stage2_trains_the_fusion_stack_over_the_frozen_stage1_model(data, stage1, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = launch(tmp_path, data, 2, f"model.init_from={stage1}/checkpoints", "model.fusion_layers=1",
                 config="demo_stage2.yaml")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all({"mlm", "vtm"} <= set(r) for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["mlm"] + 10 * rows[0]["vtm"], rel=1e-5)
    before = get_fp32_state_dict_from_zero_checkpoint(str(stage1 / "checkpoints"))
    after = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"))
    frozen = [k for k in before if k.startswith(("video.", "text.", "video_global", "text_global"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # stage 1 stays as it was
    assert any(k.startswith("fusion.") for k in after)
    assert "video-text matching accuracy" in out.stdout and (tmp_path / "eval_matching.json").exists()


def test_finetune_zero_shot_starts_from_the_deepspeed_checkpoint_folder(data, stage1, tmp_path, caplog):
    """`finetune/run.py --init RUN/checkpoints` (architecture from RUN/config.yaml, weights through
    zero_to_fp32) scores what a model with DeepSpeed's own consolidated weights, loaded strictly, scores."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from finetune.run import main as finetune_main
    from pretrain.config import load_config
    from pretrain.evaluate import evaluate_retrieval
    from pretrain.model import VideoTextModel

    shards = [f"data.train_shards={data}/train", f"data.val_shards={data}/val"]
    cfg = load_config(stage1 / "config.yaml", shards)
    model = VideoTextModel(cfg.model).eval()
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(stage1 / "checkpoints")), strict=True)
    expected = evaluate_retrieval(model, cfg)
    run_dir = tmp_path / "zs"
    caplog.set_level(logging.INFO, logger="pretrain")
    assert finetune_main(["--task", "zeroshot", "--config", str(REPO / "finetune" / "configs" / "zeroshot.yaml"),
                          "--init", str(stage1 / "checkpoints"), "--run-dir", str(run_dir), "task.query_words=12",
                          *[t for t in TINY if t.startswith("data.")], shards[1]]) == 0  # val only
    got = json.loads((run_dir / "results.json").read_text())["results"]["zero_shot"]
    for direction in ("paragraph_to_video", "video_to_paragraph"):
        assert got[direction] == pytest.approx(expected[direction])
    assert f"initialised from {stage1 / 'checkpoints'}" in caplog.text  # the weights came from the folder


def test_skipped_samples_reach_the_training_metrics(tmp_path):
    """One corrupt MP4 in the train shards: training goes on, and metrics.jsonl counts it (summed over ranks)."""
    import tarfile

    data = tmp_path / "synth"
    subprocess.run([sys.executable, "-m", "shards", "synth", "--out", str(data), "--videos", "16", "--val-videos", "8",
                    "--seed", "3", "--per-shard", "4", "--size", "32", "--event-seconds", "1.0"], check=True, cwd=REPO,
                   capture_output=True)
    shard = data / "train" / "synth-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".mp4"))
    with tarfile.open(shard, "w") as tar:  # same members and names; one video's bytes are garbage
        for m, payload in members:
            payload = b"\x00not an mp4" * 50 if m.name == victim else payload
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    run = tmp_path / "run"
    launch(run, data, 3, "train.eval_at_end=false")  # 3 steps x 4 per rank: every rank's epoch of 8 is read
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    skipped = rows[-1]["skipped"]  # counted each time an epoch reads it (the bad shard may come round again)
    assert set(skipped) == {"bad_video"} and skipped["bad_video"] >= 1, rows[-1]
    assert all(math.isfinite(r["loss"]) for r in rows)


def run_py(*args):
    """run.py without the launcher: these checks fail before any process group starts."""
    return subprocess.run([sys.executable, str(REPO / "pretrain" / "run.py"), "--config",
                           str(REPO / "pretrain/configs/demo.yaml"), *args], capture_output=True, text=True, timeout=120)


def test_fresh_run_refuses_a_run_dir_with_checkpoints(data, stage1):
    proc = run_py("--run-dir", str(stage1), *TINY, f"data.train_shards={data}/train", f"data.val_shards={data}/val")
    assert proc.returncode != 0 and "pass --resume" in proc.stderr


def test_missing_shards_are_a_clear_error(tmp_path):
    proc = run_py("--run-dir", str(tmp_path / "run"), f"data.train_shards={tmp_path}/nowhere")
    assert proc.returncode == 2 and "data error" in proc.stderr and "nowhere" in proc.stderr


def test_bad_config_key_fails_before_launching_ranks(tmp_path):
    proc = run_py("train.stpes=3")
    assert proc.returncode == 2 and "did you mean train.steps" in proc.stderr
