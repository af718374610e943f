"""The training system under the real `deepspeed` launcher on 2 CPU ranks: every ZeRO stage gives the
same losses, a kill -9 resumes exactly, a world-size change resumes through a universal checkpoint,
faults stop with clear errors, and the outputs load in plain PyTorch and TensorBoard."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_pretrain_e2e import REPO, TINY, free_port, launch, metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")



@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted ZeRO-2 run on 2 ranks."""
    run = tmp_path_factory.mktemp("reference")
    launch(run, data, 8, "train.eval_at_end=false")
    return run


def same_losses(a, b, steps, rel=1e-4):
    """Rows of runs a and b agree at every step in `steps`, and both logged each of those steps."""
    by_step_a, by_step_b = {r["step"]: r for r in a}, {r["step"]: r for r in b}
    missing = [s for s in steps if s not in by_step_a or s not in by_step_b]
    assert not missing, f"steps {missing} not logged by both runs"
    for step in steps:
        for key in ("loss", "vpc", "mtc", "lr"):
            assert by_step_b[step][key] == pytest.approx(by_step_a[step][key], rel=rel, abs=1e-6), (step, key)


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
    deadline = time.monotonic() + 300
    while not any(r["step"] >= 5 for r in metrics(tmp_path)):  # step 5 logged: past the checkpoint at step 4
        if time.monotonic() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"step 5 not logged within 300 s (launcher exit code {proc.returncode})")
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
    deadline = time.monotonic() + 3  # at once: orphans would go on training (3 more steps and 2 saves)
    while any(alive(p) for p in ranks):
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)  # do not leave them training beside the next tests
            raise AssertionError("ranks outlived the kill by 3 s")
        time.sleep(0.05)
    assert (tmp_path / "checkpoints" / "latest").read_text() in ("global_step4", "global_step6", "global_step8")
    launch(tmp_path, data, 8, "train.eval_at_end=false", resume=True)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    same_losses(metrics(reference), rows, steps=range(1, 9), rel=1e-5)


def universal_states(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A universal checkpoint (DeepSpeed's ds_to_universal output, TAG/zero/PARAM/STATE.pt): for every
    parameter the optimizer holds, its fp32 weight and Adam moments, and the optimizer's step if saved."""
    out = {}
    for param_dir in sorted(p for p in (folder / "zero").iterdir() if p.is_dir()):
        states = {}
        for state in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            if (param_dir / f"{state}.pt").exists():
                value = torch.load(param_dir / f"{state}.pt", map_location="cpu", weights_only=False)
                value = value["param"] if isinstance(value, dict) else value  # step.pt is a bare tensor
                states[state] = value.detach().double()
        out[param_dir.name] = states
    assert out, f"no parameters in {folder}/zero"
    return out


def to_universal(ckpt_dir: Path, tag: str, out: Path) -> Path:
    """DeepSpeed's own converter, run on one checkpoint folder."""
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(ckpt_dir / tag), "--output_folder", str(out), "--num_extract_workers", "1",
                           "--num_merge_workers", "1"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def consolidated(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO checkpoint, gathered from every rank's shards by DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.detach().double() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag).items()}


def assert_one_adamw_step_apart(run_dir: Path, before: dict, after: dict, weights_before: dict,
                                weights_after: dict, step: int):
    """`after` (universal states and consolidated weights saved at `step`) is exactly one AdamW step from
    `before` (saved at step - 1). For every parameter p, whatever the unknown gradient g of that step was,

        exp_avg'    = b1 exp_avg + (1 - b1) g                 -> g = (exp_avg' - b1 exp_avg) / (1 - b1)
        exp_avg_sq' = b2 exp_avg_sq + (1 - b2) g^2            (checked with that g)
        p'          = p - lr (wd p + u),  u = (exp_avg' / (1 - b1^t)) / (sqrt(exp_avg_sq' / (1 - b2^t)) + eps)

    with t = step, wd = train.weight_decay for matrices and 0 for 1-D parameters. lr is fitted per parameter
    (least squares, so the test does not depend on how the run orders its parameter groups) and must be one
    rate for the text encoder and one for the rest, in the ratio train.text_lr : train.lr, the latter the
    `lr` the run logged after step - 1 (the rate of step t; a wrong t would scale it). Parameters without
    moments (frozen) must not change. Moments reset to zero at the resume, or weights re-initialised, break
    these equations; the last assertions check that the data can tell (the check has teeth)."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    b1, b2, eps = cfg["beta1"], cfg["beta2"], 1e-8
    logged_lr = {r["step"]: r for r in metrics(run_dir)}[step - 1]["lr"]
    assert sorted(before) == sorted(after)
    assert set(before) <= set(weights_before) and set(after) <= set(weights_after)
    lrs = {True: [], False: []}  # text encoder or not -> fitted rates
    moved, zero_moments_would_fit, moments_before = 0.0, True, 0.0
    for name in sorted(after):
        w0, w1 = before[name]["fp32"], after[name]["fp32"]
        # the universal conversion and DeepSpeed's consolidation agree on the weights of both checkpoints
        torch.testing.assert_close(w0, weights_before[name].reshape(w0.shape), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(w1, weights_after[name].reshape(w1.shape), rtol=0, atol=0, msg=name)
        if "exp_avg" not in after[name]:  # frozen: the optimizer does not hold it
            assert "exp_avg" not in before[name] and torch.equal(w0, w1), name
            continue
        if "step" in after[name]:
            assert int(after[name]["step"]) == step, (name, after[name]["step"])
        m0, v0, m1, v1 = before[name]["exp_avg"], before[name]["exp_avg_sq"], after[name]["exp_avg"], after[name]["exp_avg_sq"]
        g = (m1 - b1 * m0) / (1 - b1)
        scale = float(v1.abs().max()) or 1.0
        torch.testing.assert_close(v1, b2 * v0 + (1 - b2) * g * g, rtol=1e-4, atol=1e-6 * scale,
                                   msg=lambda m, name=name: f"{name}: exp_avg_sq did not carry over: {m}")
        u = (m1 / (1 - b1 ** step)) / ((v1 / (1 - b2 ** step)).sqrt() + eps)
        x = (cfg["weight_decay"] if w0.ndim > 1 else 0.0) * w0 + u
        if float((x * x).sum()) == 0:  # no gradient ever, no decay: nothing may change
            assert torch.equal(w0, w1), name
            continue
        lr = float(((w0 - w1) * x).sum() / (x * x).sum())
        torch.testing.assert_close(w1, w0 - lr * x, rtol=1e-6, atol=2e-7,  # float32 weights
                                   msg=lambda m, name=name: f"{name}: the weights did not carry over: {m}")
        lrs[name.startswith("text.")].append(lr)
        moved = max(moved, float((w1 - w0).abs().max()))
        # what a resume that zeroed the moments would have left: m' = (1 - b1) g', v' = (1 - b2) g'^2
        g_reset = m1 / (1 - b1)
        if not torch.allclose(v1, (1 - b2) * g_reset * g_reset, rtol=1e-3, atol=1e-6 * scale):
            zero_moments_would_fit = False
        moments_before = max(moments_before, float(m0.abs().max()), float(v0.abs().max()))
    assert lrs[True] and lrs[False], "expected parameters of the text encoder and of the rest"
    text_lr, other_lr = lrs[True][0], lrs[False][0]
    assert lrs[True] == pytest.approx([text_lr] * len(lrs[True]), rel=1e-3), "the text encoder's rates differ"
    assert lrs[False] == pytest.approx([other_lr] * len(lrs[False]), rel=1e-3), "the other rates differ"
    assert text_lr / other_lr == pytest.approx(cfg["text_lr"] / cfg["lr"], rel=1e-3)
    assert logged_lr == pytest.approx(other_lr, rel=1e-3), (logged_lr, text_lr, other_lr)  # metrics log train.lr
    assert moved > 100 * 2e-7, f"step {step} hardly moved the weights ({moved}): the weight check has no teeth"
    assert moments_before > 0, f"all Adam moments are zero at step {step - 1}"
    assert not zero_moments_would_fit, f"the moments at step {step} also fit moments reset to zero"


def test_world_size_change_resumes_through_a_universal_checkpoint(data, reference, tmp_path):
    """2 ranks -> 1 -> 2 through universal checkpoints. The LR schedule, steps and samples continue, and the
    weights and Adam moments carry over in both directions. No run can save the state it has just loaded
    (a save follows an optimizer step), so the state after the first step of each resumed run is checked:
    it must be exactly one AdamW step from the checkpoint the run resumed from (see
    assert_one_adamw_step_apart). That checkpoint is read as the run itself loaded it, from the universal
    folder it converted (RUN/checkpoints/universal/TAG) and checked against DeepSpeed's consolidated weights;
    the first step's state is read from the checkpoint saved after it (train.save_every=1), converted with
    DeepSpeed's ds_to_universal and consolidated with zero_to_fp32."""
    ckpt = tmp_path / "checkpoints"
    keep = ["train.save_every=1", "train.keep_last=10"]
    launch(tmp_path, data, 8, "train.exit_interval=2", "train.eval_at_end=false", expect=3)
    out = launch(tmp_path, data, 8, "train.exit_interval=4", "train.eval_at_end=false", *keep, resume=True,
                 expect=3, nproc=1)
    assert re.search(r"written by 2 ranks into 1\b", out.stdout + out.stderr)
    assert (ckpt / "universal" / "latest_universal").read_text() == "global_step2"
    assert_one_adamw_step_apart(tmp_path, universal_states(ckpt / "universal" / "global_step2"),
                                universal_states(to_universal(ckpt, "global_step3", tmp_path / "u3")),
                                consolidated(ckpt, "global_step2"), consolidated(ckpt, "global_step3"), step=3)

    out = launch(tmp_path, data, 8, "train.exit_interval=5", "train.eval_at_end=false", *keep, resume=True,
                 expect=3)  # and back to 2, for the one step the check needs
    assert re.search(r"written by 1 ranks into 2\b", out.stdout + out.stderr)
    assert (ckpt / "universal" / "latest_universal").read_text() == "global_step4"
    assert_one_adamw_step_apart(tmp_path, universal_states(ckpt / "universal" / "global_step4"),
                                universal_states(to_universal(ckpt, "global_step5", tmp_path / "u5")),
                                consolidated(ckpt, "global_step4"), consolidated(ckpt, "global_step5"), step=5)

    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
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
