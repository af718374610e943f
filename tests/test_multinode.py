"""Two nodes on this machine: pretraining launched on each "node" as a cluster user launches it without ssh
(`deepspeed --hostfile H --no_ssh --node_rank I --master_addr NODE0 ...`, one rank per node, gloo over a veth
pair), against the same run as 2 ranks on one node.

Each node is a network namespace with its own address and a mount namespace with its own empty /dev/shm
(`launchers/netns-nodes.sh`), so a node-local shortcut taken across nodes (DeepSpeed's shared-memory
all-reduce, which waits for its peers' /dev/shm files) hangs or fails here as on two machines, instead of
silently working. The run folder is on the host's file system, which both nodes see, like shared storage.

One scenario serves every test (each launch costs tens of seconds on 2 busy cores): the two-node run is
started, node 1 is lost after step 3 (its link cut, so node 0 hears nothing, then its processes SIGKILLed),
node 0 must stop with an error within train.dist_timeout_s (meanwhile, the one-node reference runs), and
the run resumes on both nodes from the checkpoint both wrote at step 2, to step 6. Needs root and iproute2;
skipped otherwise.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pretrain_e2e import REPO, TINY, free_port, metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NODES = REPO / "launchers" / "netns-nodes.sh"
IFACE = "lveth"  # the nodes' interface (netns-nodes.sh): GLOO_SOCKET_IFNAME
STEPS = 6
TIMEOUT_S = 30  # train.dist_timeout_s of every run here (a rank stalled this long on 2 busy cores would fail it)
RUN = [f"train.steps={STEPS}", "train.eval_at_end=false", f"train.dist_timeout_s={TIMEOUT_S}"]  # + TINY: save_every=2
LAUNCH_S = 300  # bound on one launch (start-up, 6 steps, saves) on 2 busy cores
STOP_GRACE_S = 40  # the survivor's exit after its collective times out: traceback, launcher and runner exit
PLACEMENT = re.compile(r"rank (\d+) of (\d+), local rank (\d+) of (\d+) on node (\d+) \(host (\S+)\); "
                       r"DeepSpeed's shared-memory all-reduce (on|off)")


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "two nodes on one machine need root (network and mount namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"two nodes on one machine need `{tool}` (iproute2, util-linux)"
    return None


class Nodes:
    """The two nodes of launchers/netns-nodes.sh NAME, and the launches in them (killed by process group
    at the end; `down` then kills whatever is left in the namespaces)."""

    def __init__(self, name: str, tmp: Path):
        self.name, self.tmp, self.procs = name, tmp, []
        self.hostfile = tmp / "hostfile"
        self.hostfile.write_text(f"{name}-0 slots=1\n{name}-1 slots=1\n")  # what a cluster's hostfile holds

    def script(self, *args, timeout=60) -> str:
        proc = subprocess.run([str(NODES), *map(str, args)], capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"netns-nodes.sh {' '.join(map(str, args))}: {proc.stderr}"
        return proc.stdout.strip()

    def addr(self, i: int) -> str:
        return self.script("addr", self.name, i)

    def start(self, i: int, run_dir: Path, data: Path, port: int, log: Path, *extra, resume=False) -> subprocess.Popen:
        """pretrain/run.py on node i under DeepSpeed's multi-node launch without ssh; output to `log`."""
        deepspeed = Path(sys.executable).parent / "deepspeed"
        cmd = [str(NODES), "exec", self.name, str(i), str(deepspeed), "--hostfile", str(self.hostfile), "--no_ssh",
               "--node_rank", str(i), "--master_addr", self.addr(0), "--master_port", str(port),
               str(REPO / "pretrain" / "run.py"), "--config", str(REPO / "pretrain" / "configs" / "demo.yaml"),
               "--run-dir", str(run_dir), *(["--resume"] if resume else []), *TINY,
               f"data.train_shards={data}/train", f"data.val_shards={data}/val", *RUN, *extra]
        env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   GLOO_SOCKET_IFNAME=IFACE, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def kill_all(self) -> None:
        for proc in self.procs:
            self.kill(proc)


def tail(log: Path, n: int = 6000) -> str:
    return f"--- {log.name} ---\n{log.read_text()[-n:] if log.exists() else '(no log)'}"


def wait_all(procs: dict, nodes: Nodes, timeout: float) -> dict:
    """Wait for every launch {log: proc}; at the deadline kill them all and fail with their logs."""
    deadline = time.monotonic() + timeout
    for log, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            nodes.kill_all()
            raise AssertionError(f"launch not done within {timeout}s\n" + "\n".join(map(tail, procs))) from None
    return {log: proc.returncode for log, proc in procs.items()}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(why)
    name = f"lvt{os.getpid()}"
    up = subprocess.run([str(NODES), "up", name], capture_output=True, text=True, timeout=60)
    try:
        if up.returncode != 0:
            pytest.skip(f"cannot make network namespaces here: {up.stderr.strip()}")
        probe = subprocess.run([str(NODES), "exec", name, "0", "true"], capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            pytest.skip(f"cannot give a node its own mount namespace and /dev/shm here: {probe.stderr.strip()}")
        n = Nodes(name, tmp_path_factory.mktemp("nodes"))
        try:
            yield n
        finally:
            n.kill_all()
    finally:  # pass or fail: processes, namespaces, veths, mounts and /etc/netns entries gone
        down = subprocess.run([str(NODES), "down", name], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, f"netns-nodes.sh down {name}: {down.stderr}"
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert f"{name}-" not in left, left


def start_one_node(nodes: Nodes, run_dir: Path, data: Path, log: Path) -> subprocess.Popen:
    """The same run as 2 ranks on one node (`deepspeed --num_gpus 2`, in this machine's own namespaces, as
    test_pretrain_e2e.launch starts it): the reference."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "pretrain" / "run.py"),
           "--config", str(REPO / "pretrain" / "configs" / "demo.yaml"), "--run-dir", str(run_dir), *TINY,
           f"data.train_shards={data}/train", f"data.val_shards={data}/val", *RUN]
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    nodes.procs.append(proc)
    return proc


@pytest.fixture(scope="module")
def two_nodes(nodes, data, tmp_path_factory):
    """The two-node run: node 1 lost after step 3, then resumed on both nodes to the end; and the one-node
    reference, run while node 0 waits for its lost peer (it then needs no CPU)."""
    run, single = tmp_path_factory.mktemp("two_nodes"), tmp_path_factory.mktemp("one_node")
    logs = {k: nodes.tmp / f"{k}.log" for k in ("first0", "first1", "resumed0", "resumed1", "single")}
    port = free_port()
    node0 = nodes.start(0, run, data, port, logs["first0"])
    node1 = nodes.start(1, run, data, port, logs["first1"])
    deadline = time.monotonic() + LAUNCH_S
    while not any(r["step"] >= 3 for r in metrics(run)):  # step 3 logged: past the checkpoint of step 2
        if time.monotonic() > deadline or node0.poll() is not None or node1.poll() is not None:
            codes = (node0.poll(), node1.poll())
            nodes.kill_all()
            raise AssertionError(f"step 3 not logged within {LAUNCH_S}s (exit codes {codes})\n"
                                 f"{tail(logs['first0'])}\n{tail(logs['first1'])}")
        time.sleep(0.05)
    # node 1 is lost: its link goes down first, so node 0 hears no closed connection, only silence
    nodes.script("cut", nodes.name, 1)
    lost = time.monotonic()
    nodes.kill(node1)
    nodes.script("kill", nodes.name, 1)  # and whatever else ran in that namespace
    reference = start_one_node(nodes, single, data, logs["single"])
    try:
        code = node0.wait(timeout=TIMEOUT_S + STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        nodes.kill_all()
        raise AssertionError(f"node 0 still running {TIMEOUT_S + STOP_GRACE_S}s after node 1 was lost "
                             f"(train.dist_timeout_s={TIMEOUT_S})\n{tail(logs['first0'])}") from None
    stopped_after = time.monotonic() - lost
    nodes.script("join", nodes.name, 1)
    resumed_from = (run / "checkpoints" / "latest").read_text()  # global_step2, unless step 4 was quicker than the cut
    codes = wait_all({logs["single"]: reference}, nodes, LAUNCH_S)
    assert codes == {logs["single"]: 0}, f"the one-node run exited {codes}\n{tail(logs['single'])}"

    port = free_port()
    procs = {logs["resumed0"]: nodes.start(0, run, data, port, logs["resumed0"], resume=True),
             logs["resumed1"]: nodes.start(1, run, data, port, logs["resumed1"], resume=True)}
    codes = wait_all(procs, nodes, LAUNCH_S)
    assert set(codes.values()) == {0}, f"resumed launches exited {codes}\n" + "\n".join(map(tail, procs))
    return {"run": run, "logs": {k: v.read_text() for k, v in logs.items()}, "lost_code": code,
            "stopped_after": stopped_after, "name": nodes.name, "resumed_from": resumed_from, "single": single}


def placements(text: str) -> list[tuple]:
    return [m.groups() for m in PLACEMENT.finditer(text)]


def test_second_node_has_global_rank_1_and_local_rank_0(two_nodes):
    name = two_nodes["name"]
    for run in ("first", "resumed"):
        # rank, world size, local rank, ranks on the node, node, host; shared-memory all-reduce
        assert placements(two_nodes["logs"][f"{run}0"]) == [("0", "2", "0", "1", "0", f"{name}-0", "off")]
        assert placements(two_nodes["logs"][f"{run}1"]) == [("1", "2", "0", "1", "1", f"{name}-1", "off")]


def test_no_shared_memory_all_reduce_across_nodes(two_nodes):
    """DeepSpeed's CPU accelerator maps its peers' /dev/shm buffers only when LOCAL_SIZE (ranks on this node,
    set by its launcher) equals the world size. Across nodes it is off on every rank (had it been on, each rank
    would have waited forever for its peer's file in a /dev/shm the peer cannot see); on one node it is on,
    so the log line can tell."""
    for run in ("first0", "first1", "resumed0", "resumed1"):
        assert [p[-1] for p in placements(two_nodes["logs"][run])] == ["off"], run
    assert sorted((p[0], p[-1]) for p in placements(two_nodes["logs"]["single"])) == [("0", "on"), ("1", "on")]


def trainstate(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"global_step{step}" / "trainstate.json").read_text())


def test_shards_are_split_over_global_ranks_none_read_twice(two_nodes, data):
    """Each rank's data position in the checkpoints records the rank its loader was built for: global ranks 0
    and 1 of 2 (split by local rank, both nodes would have read rank 0's part), at the positions of the one-node
    run. After step 2 (2 batches of 4 per rank) the two ranks together have consumed the 16 samples of the
    split's first epoch, each rank its quota of 16 // 2 = 8: every sample once."""
    total = json.loads((data / "train" / "index.json").read_text())
    for step in (2, 4, 6):
        got, ref = trainstate(two_nodes["run"], step), trainstate(two_nodes["single"], step)
        assert got["world_size"] == 2 and [d["rank"] for d in got["data"]] == [0, 1]
        assert [d["world_size"] for d in got["data"]] == [2, 2]
        assert got["data"] == ref["data"], step  # the same epochs and raw samples consumed by every worker
    first = trainstate(two_nodes["run"], 2)["data"]
    consumed = [sum(c for e, c in d["epoch_pos"].values() if int(e) == 0) for d in first]
    assert consumed == [8, 8], first
    assert sum(consumed) == 16 == total["num_samples"]


def test_checkpoint_written_by_both_nodes_resumes_on_both(two_nodes):
    run, logs, tag = two_nodes["run"], two_nodes["logs"], two_nodes["resumed_from"]
    files = os.listdir(run / "checkpoints" / tag)
    for rank in (0, 1):  # each rank's ZeRO shard of the optimizer state, written by the node it ran on
        assert any(re.search(rf"zero_pp_rank_{rank}_mp_rank_\d+_optim_states\.pt$", f) for f in files), files
    assert tag in ("global_step2", "global_step4") and trainstate(run, int(tag[len("global_step"):]))["world_size"] == 2
    for i in (0, 1):  # both nodes load it
        assert re.search(rf"loaded checkpoint \S+{tag} \(step \d+,", logs[f"resumed{i}"]), logs[f"resumed{i}"][-3000:]
    assert (run / "checkpoints" / "latest").read_text() == f"global_step{STEPS}"
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))


# Per-step tolerance against the one-node run, relative. Measured over 6 steps (with the lost node and the
# resume): losses within 6.7e-7, the gradient norm (a sum over every parameter) within 2.2e-6; step 1 exact.
LOSS_REL, GRAD_NORM_REL = 1e-5, 2e-5


def test_losses_match_a_single_node_run(two_nodes):
    """Per step, the two-node run (lost node and resume included) logs the one-node run's losses. Same ranks,
    data and math; what differs is the route of the all-reduce (gloo over the veth against loopback) and the
    torch threads per rank (2 against 1), which reorder float sums."""
    a, b = {r["step"]: r for r in metrics(two_nodes["single"])}, {r["step"]: r for r in metrics(two_nodes["run"])}
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step]["lr"] == a[step]["lr"], step
        for key in ("loss", "vpc", "mtc", "grad_norm"):
            rel = GRAD_NORM_REL if key == "grad_norm" else LOSS_REL
            assert b[step][key] == pytest.approx(a[step][key], rel=rel), (step, key)


def test_lost_node_stops_the_other_within_train_dist_timeout_s(two_nodes):
    log = two_nodes["logs"]["first0"]
    assert two_nodes["lost_code"] != 0, log[-3000:]
    print(f"node 0 stopped {two_nodes['stopped_after']:.1f}s after node 1 was lost (train.dist_timeout_s={TIMEOUT_S})")
    assert two_nodes["stopped_after"] <= TIMEOUT_S + STOP_GRACE_S
    # the log names the failure: gloo's "Timed out waiting 20000ms for send (or recv) operation to complete"
    assert re.search(rf"Timed out waiting {TIMEOUT_S * 1000}ms", log), log[-3000:]
