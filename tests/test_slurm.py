"""launchers/slurm: task.sh's rank layout and the exit codes of task.sh and job.sh without any SLURM (stand-in
`scontrol`/`srun`/`getent` on the PATH), then against a real two-node SLURM that the project's own
launchers/slurm/local-cluster.sh brings up (root; installs the Debian packages when missing; two slurmd on this
host): the rank wiring of task.sh under srun, sbatch accepting the scripts, and pretrain.sbatch jobs on one node
(2 ranks) and on two nodes (a rank each) that get the time-limit signal, save a checkpoint, requeue themselves
and resume to the end.

The cluster fixture starts the cluster when it is not running and stops it at the end if it started it
(LONGVL_SLURM_KEEP=1 keeps it up). It skips, saying why, only where the cluster cannot exist: not root, or
neither SLURM nor apt-get on the machine. Any other failure to start is an error."""
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from test_pretrain_e2e import complete_lines

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "launchers" / "slurm"
CLUSTER = SLURM / "local-cluster.sh"
NAME = "longvl-test-slurm"  # every job this file submits
TINY = [
    "data.batch_size=4", "data.num_workers=1", "data.size=32", "data.frames_per_clip=2", "data.max_words=12",
    "model.video.preset=debug", "model.video.local_stage=0", "model.text.sentence_layers=4", "model.embed_dim=32",
    "train.warmup_steps=2", "train.log_every=1", "train.save_every=2", "train.steps=8",
]
# 2 ranks on one node, or a rank on each of two; the command line overrides the scripts' 2 x 8 GPU defaults
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
LAYOUTS = {"1-node": ONE_NODE, "2-nodes": TWO_NODES}


def job_env(slurm_conf: str | None = None) -> dict:
    """What a user exports before sbatch; the torch.distributed variables must come from task.sh. The SLURM
    commands find the test cluster through SLURM_CONF, passed explicitly to every call."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "LONGVL_MASTER_PORT", "LONGVL_ROOT") and not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    return env


def run(cmd, timeout=60, **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def wait_for(what, check, timeout, every=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------------------------------- no cluster --
# Stand-ins for the two SLURM commands the scripts call outside the ranks, so that the layout and the
# exit codes are tested on any machine. Each records its arguments, one call a line, in $FAKE_LOG. And a
# resolver that knows only the names in $FAKE_HOSTS.
FAKE_SCONTROL = r"""import os, re, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("scontrol " + " ".join(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if args[:2] == ["show", "node"]:  # NodeAddr from $FAKE_NODE_ADDRS ("name=addr ...")
    addrs = dict(pair.split("=") for pair in os.environ.get("FAKE_NODE_ADDRS", "").split())
    if args[2] in addrs:
        print(f"NodeName={args[2]} Arch=x86_64 CoresPerSocket=1\n   NodeAddr={addrs[args[2]]} "
              f"NodeHostName={args[2]} Version=22.05.8")
    sys.exit(0 if args[2] in addrs else 1)
if args[:2] == ["show", "hostnames"]:  # SLURM's hostlist expansion, for one bracket group per host
    for host in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args[2]):
        m = re.fullmatch(r"(.*)\[(.*)\]", host)
        if not m:
            print(host)
            continue
        for part in m[2].split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                print(f"{m[1]}{i:0{len(lo)}d}")
    sys.exit(0)
sys.exit(int(os.environ.get("FAKE_SCONTROL_RC", "0")))  # e.g. requeue
"""
FAKE_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >>"$FAKE_LOG"
for rank in $FAKE_SRUN_STOPPED; do : >"$LONGVL_STOPPED_DIR/rank$rank"; done  # what task.sh does on exit 3
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_GETENT = r"""#!/usr/bin/env bash
[ "$1" = hosts ] && [[ " $FAKE_HOSTS " == *" $2 "* ]] && { echo "10.9.9.9 $2"; exit 0; }
exit 2
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with the stand-in scontrol, srun and getent first, and the file they log their calls to."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", f"#!{sys.executable}\n{FAKE_SCONTROL}"), ("srun", FAKE_SRUN),
                       ("getent", FAKE_GETENT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "fake-calls.log"
    log.touch()
    env = dict(job_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))
    return env, log


@pytest.mark.parametrize("node, local_size", [(0, "3"), (2, "3"), (3, "2")])
def test_task_wiring_multi_node_layout(fake_slurm, node, local_size):
    """Rank 10 of 11 on 4 nodes with 3+3+3+2 tasks, as SLURM would describe it to task.sh."""
    env, log = fake_slurm
    env = dict(env, SLURM_PROCID="10", SLURM_NTASKS="11", SLURM_LOCALID="1", SLURM_NODEID=str(node),
               SLURM_STEP_TASKS_PER_NODE="3(x3),2", SLURM_STEP_NODELIST="gpu[07-09,12]", SLURM_JOB_ID="123456",
               FAKE_HOSTS="gpu07 gpu08 gpu09 gpu12")
    out = run([str(SLURM / "task.sh"), "env"], env=env)
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == ("10", "11", "1")
    assert got["LOCAL_WORLD_SIZE"] == got["LOCAL_SIZE"] == local_size
    assert got["MASTER_ADDR"] == "gpu07"
    assert got["MASTER_PORT"] == str(15000 + 123456 % 15000)
    assert log.read_text().splitlines() == ["scontrol show hostnames gpu[07-09,12]"]  # the step's node list


@pytest.mark.parametrize("addrs, want", [("n1=10.0.0.7 n2=10.0.0.8", "10.0.0.7"), ("", "n1")])
def test_task_master_addr_of_a_node_name_that_is_no_host_name(fake_slurm, addrs, want):
    """NodeName=n1 NodeAddr=10.0.0.7 (local-cluster.sh's nodes): the ranks meet at the first node's NodeAddr;
    when SLURM knows none either, at its name."""
    env, log = fake_slurm
    env = dict(env, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NODEID="1",
               SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_NODELIST="n[1-2]", SLURM_JOB_ID="9",
               FAKE_HOSTS="", FAKE_NODE_ADDRS=addrs)
    proc = subprocess.run([str(SLURM / "task.sh"), "env"], env=env, capture_output=True, text=True, timeout=30)
    got = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert proc.returncode == 0 and got["MASTER_ADDR"] == want, proc.stdout + proc.stderr
    assert log.read_text().splitlines() == ["scontrol show hostnames n[1-2]", "scontrol show node n1"]
    assert "task.sh: node ? (1 of ?, host " in proc.stderr  # LOCAL_RANK 0 says where it runs


def test_task_layout_rejects_a_node_outside_the_task_counts(fake_slurm):
    env, _ = fake_slurm
    env = dict(env, SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_LOCALID="0", SLURM_NODEID="2",
               SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_STEP_NODELIST="n[1-2]", SLURM_JOB_ID="5")
    proc = subprocess.run([str(SLURM / "task.sh"), "true"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "node 2 not in SLURM_STEP_TASKS_PER_NODE=2(x2)" in proc.stderr


def test_task_exit_code_3_is_success_for_srun_under_job_sh(fake_slurm, tmp_path):
    """A rank that stopped with a checkpoint (3) must not trip --kill-on-bad-exit, and leaves a marker."""
    env, _ = fake_slurm
    env = dict(env, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", SLURM_NODEID="0",
               SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="n1", SLURM_JOB_ID="7")
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    stop = [str(SLURM / "task.sh"), "bash", "-c", "exit 3"]
    assert subprocess.run(stop, env=env, capture_output=True, timeout=30).returncode == 3  # plain srun use
    assert not any(stopped.iterdir())
    assert subprocess.run(stop, env=dict(env, LONGVL_STOPPED_DIR=str(stopped)), capture_output=True,
                          timeout=30).returncode == 0
    assert sorted(p.name for p in stopped.iterdir()) == ["rank1"]
    crash = [str(SLURM / "task.sh"), "bash", "-c", "exit 1"]
    assert subprocess.run(crash, env=dict(env, LONGVL_STOPPED_DIR=str(stopped)), capture_output=True,
                          timeout=30).returncode == 1


@pytest.mark.parametrize("srun_rc, stopped_ranks, scontrol_rc, want_rc, want_requeue, want_line", [
    (0, "", 0, 0, False, "training finished"),
    (0, "0 1", 0, 0, True, "the ranks stopped early with a checkpoint (exit code 3); requeueing"),
    (0, "0 1", 1, 3, True, "scontrol requeue failed"),
    (1, "", 0, 1, False, "srun failed with status 1; not requeueing"),
])
def test_job_sh_exit_codes_and_requeue(fake_slurm, tmp_path, srun_rc, stopped_ranks, scontrol_rc, want_rc,
                                       want_requeue, want_line):
    """job.sh's decision after srun returns: done, requeue (ranks left stop markers), or fail."""
    env, log = fake_slurm
    env = dict(env, SLURM_JOB_ID="42", SLURM_JOB_NODELIST="n1", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="3",
               TMPDIR=str(tmp_path), FAKE_SRUN_RC=str(srun_rc), FAKE_SRUN_STOPPED=stopped_ranks,
               FAKE_SCONTROL_RC=str(scontrol_rc))
    proc = subprocess.run([str(SLURM / "job.sh"), "pretrain/run.py", "--config", "c.yaml"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == want_rc, proc.stdout + proc.stderr
    assert want_line in proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == (f"srun --kill-on-bad-exit=1 --cpus-per-task=3 {SLURM / 'task.sh'} {sys.executable} "
                        "pretrain/run.py --resume --config c.yaml")
    assert calls[1:] == (["scontrol requeue 42"] if want_requeue else [])
    assert not list(tmp_path.glob("longvl-42.*"))  # the marker folder is removed


def test_launcher_scripts_parse():
    for script in sorted(SLURM.iterdir()):
        if script.suffix in (".sh", ".sbatch"):
            run(["bash", "-n", str(script)])
            assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


# ------------------------------------------------------------------------------------------ cluster --
@dataclass
class Cluster:
    conf: str  # its slurm.conf, for SLURM_CONF
    log_dir: Path  # the daemons' logs
    jobs: list[str] = field(default_factory=list)  # what the tests submitted (cancelled at the end, by id)

    def env(self) -> dict:
        return job_env(self.conf)

    def job_info(self, job: str) -> dict:
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30,
                             env=self.env()).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def nodes(self, node_list: str) -> list[str]:
        """SLURM's node list ("vm-[1-2]") as names, in order."""
        return run(["scontrol", "show", "hostnames", node_list], env=self.env()).split()

    def address(self, node: str) -> str:
        """Where a node is reached: its name where that resolves, else its NodeAddr (local-cluster.sh's nodes)."""
        try:
            socket.getaddrinfo(node, None)
            return node
        except socket.gaierror:
            return re.search(r"NodeAddr=(\S+)", run(["scontrol", "show", "node", node], env=self.env()))[1]


@pytest.fixture(scope="module")
def slurm():
    """The project's two-node SLURM (launchers/slurm/local-cluster.sh), started unless it runs already."""
    if os.geteuid() != 0:
        pytest.skip("SLURM cannot start: launchers/slurm/local-cluster.sh must run as root (slurmd starts the jobs)")
    if not (shutil.which("slurmctld") and shutil.which("sbatch")) and not shutil.which("apt-get"):
        pytest.skip("SLURM cannot start: its commands are not installed and there is no apt-get to install them")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    was_up = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True, timeout=60,
                            env=env).returncode == 0
    t0 = time.monotonic()
    try:  # the first time on a machine, apt-get installs the packages
        proc = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{CLUSTER} up timed out after 900s:\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"{CLUSTER} up exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    confs = re.findall(r"^SLURM_CONF=(.+)$", proc.stdout, re.M)
    assert len(confs) == 1, proc.stdout
    print(f"SLURM up in {time.monotonic() - t0:.1f}s ({confs[0]})")
    cluster = Cluster(conf=confs[0], log_dir=Path(confs[0]).parent / "log")
    nodes = set(run(["sinfo", "-h", "-N", "-o", "%N"], env=cluster.env()).split())
    if len(nodes) >= 2:
        yield cluster
    if cluster.jobs:  # only ours, by id
        subprocess.run(["scancel", *cluster.jobs], capture_output=True, timeout=30, env=cluster.env())
    if not was_up and os.environ.get("LONGVL_SLURM_KEEP") != "1":
        down = subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True, timeout=300, env=env)
        assert down.returncode == 0, f"{CLUSTER} down exited {down.returncode}:\n{down.stdout}\n{down.stderr}"
    if len(nodes) < 2:  # LONGVL_SLURM_NODES names one node
        pytest.fail(f"the cluster has nodes {sorted(nodes)}; the two-node tests need two")


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
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODEID", "SLURMD_NODENAME"]
print("WIRING " + json.dumps({**{k: os.environ[k] for k in keys}, "sum": int(total)}), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("nodes", [1, 2])
def test_task_wiring_connects_two_ranks(slurm, nodes):
    out = run(["srun", "-J", NAME, f"-N{nodes}", "-n2", "--cpus-per-task=1", "--kill-on-bad-exit=1",
               str(SLURM / "task.sh"), sys.executable, "-c", WIRING_PROBE], timeout=120, env=slurm.env())
    ranks = sorted((json.loads(line[len("WIRING "):]) for line in out.splitlines() if line.startswith("WIRING ")),
                   key=lambda r: int(r["RANK"]))
    assert [r["RANK"] for r in ranks] == ["0", "1"], out
    job = ranks[0]["SLURM_JOB_ID"]
    job_nodes = slurm.nodes(ranks[0]["SLURM_JOB_NODELIST"])
    assert len(job_nodes) == nodes
    for r in ranks:
        node = 0 if nodes == 1 else int(r["RANK"])  # two nodes: rank 0 on the first, rank 1 on the second
        assert (r["SLURM_NODEID"], r["SLURMD_NODENAME"]) == (str(node), job_nodes[node])
        assert r["WORLD_SIZE"] == "2" and r["LOCAL_WORLD_SIZE"] == r["LOCAL_SIZE"] == str(2 // nodes)
        assert r["LOCAL_RANK"] == (r["RANK"] if nodes == 1 else "0")  # local rank = global rank on one node only
        assert r["MASTER_ADDR"] == slurm.address(job_nodes[0])  # where rank 0 runs
        assert r["MASTER_PORT"] == str(15000 + int(job) % 15000)  # from the job id
        assert r["sum"] == 3  # the process group formed: 1 + 2 across both ranks


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("script", ["pretrain.sbatch", "finetune.sbatch"])
def test_sbatch_accepts_the_scripts(slurm, script, layout, tmp_path):
    # sbatch reads the #SBATCH lines and checks them against the cluster without submitting
    proc = subprocess.run(["sbatch", "--test-only", "-J", NAME, *LAYOUTS[layout], str(SLURM / script)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, env=slurm.env())
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


# task.sh's line from LOCAL_RANK 0 of each node: node name, SLURM_NODEID, nodes, host, first global rank, ranks
# on the node, all ranks
TASK_LINE = re.compile(
    r"^task\.sh: node (\S+) \((\d+) of (\d+), host (\S+)\): ranks (\d+)\.\. \((\d+) here\) of (\d+),", re.M)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pretrain_job_saves_requeues_and_resumes_at_the_time_limit(slurm, data, tmp_path, layout):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    cmd = ["sbatch", "--parsable", "-J", NAME, *LAYOUTS[layout], "-o", str(log), str(SLURM / "pretrain.sbatch"),
           "--config", "pretrain/configs/demo.yaml", "--run-dir", str(run_dir), *TINY,
           f"data.train_shards={data}/train", f"data.val_shards={data}/val"]
    # submitted from outside the checkout: the job finds it from the script's own path
    job = run(cmd, cwd=tmp_path, env=slurm.env()).strip().split(";")[0]
    slurm.jobs.append(job)
    metrics = run_dir / "metrics.jsonl"

    def steps():  # rank 0 may be appending a line right now: only complete lines
        return [json.loads(line)["step"] for line in complete_lines(metrics)]

    def ended(info):
        return info.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "COMPLETING")

    try:
        def started_training():
            info = slurm.job_info(job)
            assert not ended(info), f"job ended before training: {info.get('JobState')}"
            return len(steps()) >= 2

        wait_for("the first run to log 2 steps", started_training, timeout=240, every=0.2)
        # what SLURM does --signal=B:USR1@300 before the time limit: signal the batch shell only
        run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env())

        def requeued():
            info = slurm.job_info(job)
            assert not (ended(info) and info.get("Restarts") == "0"), "the job ended without requeueing itself"
            return info.get("Restarts") == "1" and info.get("JobState") == "PENDING"

        wait_for("the job to requeue itself", requeued, timeout=90)
        # SLURM holds a requeued job for ~2 minutes (BeginTime) so that the old run's revoked credential
        # cannot be confused with the new one; those are compared to the second, so a few seconds are enough
        run(["scontrol", "update", f"jobid={job}", "StartTime=now+4"], env=slurm.env())
        # (a loaded 2-core machine takes up to 2 minutes to start the ranks)
        info = wait_for("the second run to finish", lambda: ended(i := slurm.job_info(job)) and i, timeout=300)
        text = log.read_text(errors="replace")  # two ranks interleave progress bars

        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
        assert info["Restarts"] == "1"
        runs = re.findall(rf"^==== longvl job {job} run (\d+) on (\S+), 2 ranks", text, re.M)
        assert [n for n, _ in runs] == ["1", "2"], runs  # one log for the job, appended to by both runs
        first, second = text.split(f"==== longvl job {job} run 2 ")
        nodes = 1 if layout == "1-node" else 2
        per_node = 2 // nodes
        for (_, node_list), part in zip(runs, (first, second)):  # where each run's ranks ran, by their task.sh
            job_nodes = slurm.nodes(node_list)
            lines = sorted(TASK_LINE.findall(part), key=lambda m: int(m[1]))
            placed = [(name, int(i), int(n), int(r0), int(here), int(world))
                      for name, i, n, _host, r0, here, world in lines]
            # one line per node, from its LOCAL_RANK 0: on two nodes, global rank 1 is local rank 0 of the second
            want = [(job_nodes[i], i, nodes, i * per_node, per_node, 2) for i in range(nodes)]
            assert len(set(job_nodes)) == nodes and placed == want, (node_list, lines)
            print(f"run on {node_list}: " + "; ".join(f"ranks {m[4]}.. on node {m[1]} {m[0]} (host {m[3]})"
                                                      for m in lines))
        # DeepSpeed's shared-memory all-reduce on one node (task.sh's LOCAL_SIZE = WORLD_SIZE), never across two
        shm = re.findall(r"DeepSpeed's shared-memory all-reduce (on \(all ranks on this node\)|off)", text)
        assert shm == ["on (all ranks on this node)" if nodes == 1 else "off"] * 4, shm  # 2 ranks x 2 runs
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
                                                                  text=True, timeout=30, env=slurm.env()).stdout)
        print(f"---- {log}\n" + (log.read_text(errors="replace")[-12000:] if log.exists() else "(no log)"))
        for daemon_log in sorted(slurm.log_dir.glob("slurm*.log")):  # local-cluster.sh's daemon logs
            lines = [line for line in daemon_log.read_text(errors="replace").splitlines()
                     if re.search(rf"\b(JobId={job}|job {job}|StepId={job}\.|\[{job}\.)", line)]
            print(f"---- {daemon_log} (job {job})\n" + "\n".join(lines[-30:]))
        subprocess.run(["scancel", job], capture_output=True, timeout=30, env=slurm.env())  # free its nodes now
        raise
