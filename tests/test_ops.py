"""DeepSpeed's JIT ops and shared memory: stale build locks and leaked all-reduce buffers are removed, live ones kept."""
import json
import os
import subprocess
import sys
import time

import pytest

from pretrain import ops
from test_pretrain_e2e import REPO, free_port, run_group


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    paths = ops.lock_paths()
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return paths


def test_a_lock_no_process_holds_is_removed(extensions):
    for path in extensions:  # what a builder killed mid-build leaves: the file, no open descriptor
        open(path, "w").close()
    assert sorted(ops.clear_stale_locks()) == sorted(extensions)
    assert not any(os.path.exists(p) for p in extensions)
    assert ops.clear_stale_locks() == []  # nothing left to remove


def test_a_lock_a_live_builder_holds_is_kept(extensions):
    path = extensions[0]
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                               f"fd = os.open({path!r}, os.O_CREAT | os.O_EXCL)\nprint('held', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert ops.held_open(path)
        assert path not in ops.clear_stale_locks()
        assert os.path.exists(path)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10  # the kernel closes the descriptor when the holder dies
    while ops.held_open(path):
        assert time.monotonic() < deadline, f"{path} still held open 10 s after its holder was killed"
        time.sleep(0.05)
    assert ops.clear_stale_locks() == [path]


def test_unknown_op_names_fail_clearly():
    with pytest.raises(ValueError, match="no op builder 'NoSuchBuilder'"):
        ops.builders(["NoSuchBuilder"])


def test_stale_shm_buffers_are_removed_and_live_or_young_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "SHM_DIR", str(tmp_path))
    name = lambda port, rank: tmp_path / f"{ops.SHM_PREFIX}_{os.getuid()}_127.0.0.1_{port}_{rank}"
    old, young, mapped, other_user = name(1, 0), name(2, 0), name(3, 0), tmp_path / f"{ops.SHM_PREFIX}_99999_x_1_0"
    for path in (old, young, mapped, other_user):
        path.write_bytes(b"\0" * 4096)
    for path in (old, mapped, other_user):
        os.utime(path, (time.time() - 3600,) * 2)
    holder = subprocess.Popen([sys.executable, "-c", "import mmap, sys, time\n"
                               f"f = open({str(mapped)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 4096); f.close()\n"
                               "print('mapped', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert ops.clear_stale_shm() == [str(old)]
    finally:
        holder.kill()
        holder.wait()
    assert not old.exists() and young.exists() and mapped.exists() and other_user.exists()


def test_a_real_two_rank_launch_leaves_no_shm_buffer_behind(tmp_path):
    """DeepSpeed's CPU backend, 2 ranks: after release_shm_names() the buffers have no names left, and
    the all-reduce through the (still mapped) shared memory keeps working.

    Each rank writes its result to a file of its own (result.RANK.json, renamed into place once complete)
    instead of printing it: the launcher merges both ranks' stdout into one pipe, where lines of the two
    ranks can interleave, so reading results from there was not deterministic."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys, torch, deepspeed, torch.distributed as dist\n"
        "from pretrain.ops import release_shm_names, shm_name\n"
        "deepspeed.init_distributed(dist_backend='gloo')\n"
        "dist.barrier()\n"
        "rank = dist.get_rank()\n"
        "me = shm_name(rank, os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'])\n"
        "had = os.path.exists(me)\n"
        "released = release_shm_names()\n"
        "dist.barrier()\n"
        "x = torch.full((8,), float(rank + 1))\n"
        "deepspeed.comm.inference_all_reduce(x)\n"
        "out = os.path.join(sys.argv[-1], f'result.{rank}.json')  # the launcher adds --local_rank before it\n"
        "with open(out + '.tmp', 'w') as f:\n"
        "    json.dump({'rank': rank, 'world': dist.get_world_size(), 'had': had, 'released': released,\n"
        "               'exists_after': os.path.exists(me), 'sum': x.tolist()}, f)\n"
        "os.replace(out + '.tmp', out)\n")
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO),
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    proc = run_group([os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
                      str(free_port()), str(script), str(results_dir)], cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in results_dir.iterdir())
    assert files == ["result.0.json", "result.1.json"], (files, proc.stdout[-3000:] + proc.stderr[-3000:])
    for rank in (0, 1):
        got = json.loads((results_dir / f"result.{rank}.json").read_text())
        assert (got["rank"], got["world"]) == (rank, 2)
        assert got["had"] is True, got  # the buffer existed before release_shm_names()
        assert got["released"] is True, got  # ... it unlinked it
        assert got["exists_after"] is False, got  # ... and the name is gone
        assert got["sum"] == [3.0] * 8, got  # the all-reduce still works: 1 + 2 summed
