"""launchers/slurm against a real single-node SLURM (../shared/tools/slurm-local-up.sh, run as root):
the rank wiring of task.sh, and a pretrain.sbatch job that gets the time-limit signal, saves a
checkpoint, requeues itself and resumes to the end. Skips only where SLURM cannot start."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "launchers" / "slurm"
UP = Path(os.environ.get("SLURM_LOCAL_UP", REPO.parent / "shared" / "tools" / "slurm-local-up.sh"))
NAME = "longvl-test-slurm"  # every job this file submits
TINY = [
    "data.batch_size=4", "data.num_workers=1", "data.size=32", "data.frames_per_clip=2", "data.max_words=12",
    "model.video.preset=debug", "model.video.local_stage=0", "model.text.sentence_layers=4", "model.embed_dim=32",
    "train.warmup_steps=2", "train.log_every=1", "train.save_every=2", "train.steps=8",
]
# 2 ranks on the one node; the command line overrides the scripts' 2 x 8 GPU defaults
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def job_env() -> dict:
    """What a user exports before sbatch; the torch.distributed variables must come from task.sh."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "LONGVL_MASTER_PORT", "LONGVL_ROOT") and not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    return dict(env, PYTHON=sys.executable, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run(cmd, timeout=60, **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(what, check, timeout, every=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def slurm():
    """A running SLURM; yields the list that tests append their job ids to (cancelled at the end)."""
    if not UP.exists():
        pytest.skip(f"SLURM cannot start: {UP} not found")
    try:
        proc = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.skip(f"SLURM cannot start: {UP} timed out after 300s:\n{e.stdout}\n{e.stderr}")
    if proc.returncode != 0:
        pytest.skip(f"SLURM cannot start ({UP} exited {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    jobs: list[str] = []
    yield jobs
    if jobs:  # only ours, by id
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    run([sys.executable, "-m", "shards", "synth", "--out", str(out), "--videos", "16", "--val-videos", "8",
         "--seed", "3", "--per-shard", "4", "--size", "32", "--event-seconds", "1.0"],
        timeout=300, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out


WIRING_PROBE = """
import json, os, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")  # what deepspeed.init_distributed() does on CPU
total = torch.tensor([dist.get_rank() + 1])
dist.all_reduce(total)
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "SLURM_JOB_ID", "SLURM_JOB_NODELIST"]
print("WIRING " + json.dumps({**{k: os.environ[k] for k in keys}, "sum": int(total)}), flush=True)
dist.destroy_process_group()
"""


def test_task_wiring_connects_two_ranks(slurm):
    out = run(["srun", "-J", NAME, "-N1", "-n2", "--cpus-per-task=1", "--kill-on-bad-exit=1",
               str(SLURM / "task.sh"), sys.executable, "-c", WIRING_PROBE], timeout=120, env=job_env())
    ranks = sorted((json.loads(line[len("WIRING "):]) for line in out.splitlines() if line.startswith("WIRING ")),
                   key=lambda r: int(r["RANK"]))
    assert [r["RANK"] for r in ranks] == ["0", "1"], out
    job = ranks[0]["SLURM_JOB_ID"]
    first_host = run(["scontrol", "show", "hostnames", ranks[0]["SLURM_JOB_NODELIST"]]).split()[0]
    for r in ranks:
        assert r["WORLD_SIZE"] == "2" and r["LOCAL_WORLD_SIZE"] == "2"
        assert r["LOCAL_RANK"] == r["RANK"]  # one node: local rank = global rank
        assert r["MASTER_ADDR"] == first_host
        assert r["MASTER_PORT"] == str(15000 + int(job) % 15000)  # from the job id
        assert r["sum"] == 3  # the process group formed: 1 + 2 across both ranks


@pytest.mark.parametrize("node, local_size", [(0, "3"), (2, "3"), (3, "2")])
def test_task_wiring_multi_node_layout(slurm, node, local_size):
    """Rank 10 of 11 on 4 nodes with 3+3+3+2 tasks, as SLURM would describe it to task.sh."""
    env = dict(job_env(), SLURM_PROCID="10", SLURM_NTASKS="11", SLURM_LOCALID="1", SLURM_NODEID=str(node),
               SLURM_STEP_TASKS_PER_NODE="3(x3),2", SLURM_STEP_NODELIST="gpu[07-09,12]", SLURM_JOB_ID="123456")
    out = run([str(SLURM / "task.sh"), "env"], env=env)
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == ("10", "11", "1")
    assert got["LOCAL_WORLD_SIZE"] == local_size
    assert got["MASTER_ADDR"] == "gpu07"
    assert got["MASTER_PORT"] == str(15000 + 123456 % 15000)


def test_task_exit_code_3_is_success_for_srun_under_job_sh(slurm, tmp_path):
    """A rank that stopped with a checkpoint (3) must not trip --kill-on-bad-exit, and leaves a marker."""
    env = dict(job_env(), SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", SLURM_NODEID="0",
               SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="n1", SLURM_JOB_ID="7")
    stop = [str(SLURM / "task.sh"), "bash", "-c", "exit 3"]
    assert subprocess.run(stop, env=env, capture_output=True, timeout=30).returncode == 3  # plain srun use
    assert subprocess.run(stop, env=dict(env, LONGVL_STOPPED_DIR=str(tmp_path)), timeout=30).returncode == 0
    assert (tmp_path / "rank1").exists()
    crash = [str(SLURM / "task.sh"), "bash", "-c", "exit 1"]
    assert subprocess.run(crash, env=dict(env, LONGVL_STOPPED_DIR=str(tmp_path)), timeout=30).returncode == 1


@pytest.mark.parametrize("script", ["pretrain.sbatch", "finetune.sbatch"])
def test_sbatch_scripts_parse_and_are_accepted(slurm, script, tmp_path):
    for f in (script, "job.sh", "task.sh"):
        run(["bash", "-n", str(SLURM / f)])
    # sbatch reads the #SBATCH lines and checks them against the cluster without submitting
    proc = subprocess.run(["sbatch", "--test-only", "-J", NAME, *ONE_NODE, str(SLURM / script)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, env=job_env())
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


def test_pretrain_job_saves_requeues_and_resumes_at_the_time_limit(slurm, data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    cmd = ["sbatch", "--parsable", "-J", NAME, *ONE_NODE, "-o", str(log), str(SLURM / "pretrain.sbatch"),
           "--config", "pretrain/configs/demo.yaml", "--run-dir", str(run_dir), *TINY,
           f"data.train_shards={data}/train", f"data.val_shards={data}/val"]
    # submitted from outside the checkout: the job finds it from the script's own path
    job = run(cmd, cwd=tmp_path, env=job_env()).strip().split(";")[0]
    slurm.append(job)
    metrics = run_dir / "metrics.jsonl"

    def steps():
        return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []

    def ended(info):
        return info.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "COMPLETING")

    try:
        def started_training():
            info = job_info(job)
            assert not ended(info), f"job ended before training: {info.get('JobState')}"
            return len(steps()) >= 2

        wait_for("the first run to log 2 steps", started_training, timeout=150, every=0.2)
        # what SLURM does --signal=B:USR1@300 before the time limit: signal the batch shell only
        run(["scancel", "--signal=USR1", "--batch", job])

        def requeued():
            info = job_info(job)
            assert not (ended(info) and info.get("Restarts") == "0"), "the job ended without requeueing itself"
            return info.get("Restarts") == "1" and info.get("JobState") == "PENDING"

        wait_for("the job to requeue itself", requeued, timeout=90)
        # SLURM holds a requeued job for ~2 minutes (BeginTime) so that the old run's revoked credential
        # cannot be confused with the new one; those are compared to the second, so a few seconds are enough
        run(["scontrol", "update", f"jobid={job}", "StartTime=now+4"])
        info = wait_for("the second run to finish", lambda: ended(i := job_info(job)) and i, timeout=180)
        text = log.read_text(errors="replace")  # two ranks interleave progress bars

        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
        assert info["Restarts"] == "1"
        runs = re.findall(rf"^==== longvl job {job} run (\d+) ", text, re.M)
        assert runs == ["1", "2"]  # one log for the job, appended to by both runs
        first, second = text.split(f"==== longvl job {job} run 2 ")
        assert "SIGUSR1 (time limit near)" in first  # the batch shell's trap ran
        stops = [(m[0], int(m[1])) for m in re.findall(r"signal (SIGUSR1|on another rank): stopping at step (\d+)",
                                                       first)]
        assert len(stops) == 2 and {s for _, s in stops} == {stops[0][1]}, stops  # both ranks, the same step
        assert "SIGUSR1" in {why for why, _ in stops}  # the forwarded signal reached the python ranks
        stopped_at = stops[0][1]
        assert 2 <= stopped_at < 8
        # requeued because srun saw every rank stop with 3 (task.sh's markers), not merely because of the signal
        assert "the ranks stopped early with a checkpoint (exit code 3); requeueing" in first
        assert "loaded checkpoint" not in first
        assert re.search(rf"loaded checkpoint \S+/global_step{stopped_at} \(step {stopped_at},", second)
        assert "training finished" in second
        assert steps() == list(range(1, 9))  # every step logged exactly once across the two runs
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step8"
    except BaseException:
        print(f"---- scontrol show job {job}\n" + subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                                                                  text=True, timeout=30).stdout)
        print(f"---- {log}\n" + (log.read_text(errors="replace")[-12000:] if log.exists() else "(no log)"))
        for daemon_log in sorted(Path("/var/log/slurm-local").glob("slurm*.log")):  # slurm-local-up.sh's
            lines = [line for line in daemon_log.read_text(errors="replace").splitlines()
                     if re.search(rf"\b(JobId={job}|job {job}|StepId={job}\.|\[{job}\.)", line)]
            print(f"---- {daemon_log} (job {job})\n" + "\n".join(lines[-30:]))
        raise
