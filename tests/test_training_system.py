"""The training system under the real `deepspeed` launcher on 2 CPU ranks: every ZeRO stage gives the
same losses, a kill -9 resumes exactly, a world-size change resumes through a universal checkpoint,
faults stop with clear errors, and the outputs load in plain PyTorch and TensorBoard."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_pretrain_e2e import REPO, TINY, free_port, launch, metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    subprocess.run([sys.executable, "-m", "shards", "synth", "--out", str(out), "--videos", "16", "--val-videos", "8",
                    "--seed", "3", "--per-shard", "4", "--size", "32", "--event-seconds", "1.0"], check=True, cwd=REPO,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted ZeRO-2 run on 2 ranks."""
    run = tmp_path_factory.mktemp("reference")
    launch(run, data, 8, "train.eval_at_end=false")
    return run


def same_losses(a, b, steps, rel=1e-4):
    by_step = {r["step"]: r for r in a}
    for r in b:
        if r["step"] in steps:
            for key in ("loss", "vpc", "mtc", "lr"):
                assert r[key] == pytest.approx(by_step[r["step"]][key], rel=rel, abs=1e-6), (r["step"], key)


@pytest.mark.parametrize("ds", ["zero1.json", "zero3.json", "zero3_offload.json"])
def test_every_zero_stage_trains_saves_resumes_and_matches_zero2(ds, data, reference, tmp_path):
    cfg = f"ds_configs/{ds}"
    launch(tmp_path, data, 8, "train.exit_interval=3", "train.eval_at_end=false", expect=3, extra_args=["--ds-config", cfg])
    launch(tmp_path, data, 8, "train.eval_at_end=false", resume=True, extra_args=["--ds-config", cfg])
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    same_losses(metrics(reference), rows, steps=range(1, 9))  # ZeRO partitioning does not change the math


def rank_pids(launcher_pid):
    """The rank processes under this launcher (its descendants running run.py), never another test's."""
    parent, cmd = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue

    def under_launcher(pid):
        while pid in parent and pid > 1:
            if parent[pid] == launcher_pid:
                return True
            pid = parent[pid]
        return False

    found = [p for p in cmd if b"--local_rank" in cmd[p] and under_launcher(p)]
    return [p for p in found if parent[p] not in found]  # not the ranks' forked data-loader workers


def launcher_pid(runner_pid):
    """DeepSpeed's per-node launcher (deepspeed.launcher.launch) under the `deepspeed` runner."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == runner_pid and b"deepspeed.launcher.launch" in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("victim", ["rank", "launcher"])
def test_kill_minus_nine_then_resume_continues_exactly(victim, data, reference, tmp_path):
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "pretrain" / "run.py"),
           "--config", str(REPO / "pretrain/configs/demo.yaml"), "--run-dir", str(tmp_path), *TINY,
           f"data.train_shards={data}/train", f"data.val_shards={data}/val", "train.steps=8",
           "train.eval_at_end=false"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until step 5 is logged, past the checkpoint at step 4
        if (tmp_path / "metrics.jsonl").exists() and any(r["step"] >= 5 for r in metrics(tmp_path)):
            break
        time.sleep(0.01)
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2, "no rank processes found"
    if victim == "rank":
        os.kill(ranks[-1], signal.SIGKILL)
    else:  # the node's launcher: its ranks must not train on as orphans beside the resumed run
        os.kill(launcher_pid(proc.pid), signal.SIGKILL)
    code = proc.wait(timeout=120)
    # The job fails. (DeepSpeed's runner exits 0 when its launcher dies of a signal: it checks returncode > 0.)
    assert code != 0 if victim == "rank" else code in (0, 1)
    deadline = time.time() + 3  # at once: orphans would go on training (3 more steps and 2 saves)
    while any(alive(p) for p in ranks) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in ranks), "ranks outlived the kill"
    assert (tmp_path / "checkpoints" / "latest").read_text() in ("global_step4", "global_step6", "global_step8")
    launch(tmp_path, data, 8, "train.eval_at_end=false", resume=True)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    same_losses(metrics(reference), rows, steps=range(1, 9), rel=1e-5)


def test_world_size_change_resumes_through_a_universal_checkpoint(data, reference, tmp_path):
    launch(tmp_path, data, 8, "train.exit_interval=2", "train.eval_at_end=false", expect=3)
    out = launch(tmp_path, data, 8, "train.exit_interval=4", "train.eval_at_end=false", resume=True, expect=3, nproc=1)
    assert "written by 2 ranks into 1 ranks" in out.stdout + out.stderr
    assert (tmp_path / "checkpoints" / "universal" / "latest_universal").read_text() == "global_step2"
    out = launch(tmp_path, data, 8, "train.eval_at_end=false", resume=True)  # and back to 2
    assert "written by 1 ranks into 2 ranks" in out.stdout + out.stderr
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    ref = {r["step"]: r for r in metrics(reference)}
    for r in rows:  # the LR schedule continues from the step; the weights keep learning from the checkpoint
        assert r["lr"] == pytest.approx(ref[r["step"]]["lr"], rel=1e-6)
    same_losses(metrics(reference), rows, steps=[1, 2])
    assert rows[2]["samples_seen"] == 3 * 8 - 4  # two 2-rank steps of 8 samples, then 1-rank steps of 4


def test_nonfinite_losses_are_dropped_then_stop_with_a_clear_error(data, tmp_path):
    # With accumulation: step 1 is finite and blows the weights up; both micro-batches of step 2 are dropped
    # (zero-gradient backward through the real DeepSpeed engine), which is 2 in a row.
    out = launch(tmp_path, data, 8, "train.lr=1e30", "train.text_lr=1e30", "train.warmup_steps=0",
                 "train.max_nonfinite_steps=2", "train.grad_clip=0.0", "train.grad_accum=2", expect=1)
    assert "step 2: non-finite loss" in out.stderr and "in 2 of 2 micro-batches" in out.stderr
    assert "non-finite loss in 2 consecutive micro-batches" in out.stdout + out.stderr


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(data, tmp_path):
    launch(tmp_path, data, 8, "train.exit_interval=2", "train.eval_at_end=false", expect=3)
    out = launch(tmp_path, data, 8, "train.eval_at_end=false", resume=True, expect=1, file_size_limit_kb=1024)
    assert "saving checkpoint" in out.stdout + out.stderr and "previous checkpoint global_step2 is intact" in out.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step2"
    assert not (tmp_path / "checkpoints" / "global_step4").exists()
    launch(tmp_path, data, 8, "train.eval_at_end=false", resume=True)  # the previous checkpoint still loads
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_export_loads_in_plain_pytorch_and_tensorboard_reads_the_events(data, reference, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.config import load_config
    from pretrain.model import VideoTextModel

    out = tmp_path / "model.pt"
    subprocess.run([sys.executable, "-m", "pretrain.export", str(reference), str(out)], check=True, cwd=REPO,
                   capture_output=True)
    state = torch.load(out, map_location="cpu", weights_only=True)
    model = VideoTextModel(load_config(reference / "config.yaml").model)
    model.load_state_dict(state, strict=True)
    assert (tmp_path / "model.yaml").exists()

    acc = EventAccumulator(str(reference / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss", "vpc", "mtc", "lr", "grad_norm", "samples_per_s", "clips_per_s", "data_wait_frac", "mem_gib"):
        assert f"train/{tag}" in tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6, 7, 8]
