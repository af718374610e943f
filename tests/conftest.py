"""Session set-up: clear what killed DeepSpeed launches of earlier runs left on this machine (stale JIT build
locks that would make every launch wait forever, and shared-memory all-reduce buffers that fill RAM)."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session):
    from pretrain import ops

    logging.basicConfig(level=logging.WARNING)
    ops.clear_stale_locks()
    ops.clear_stale_shm()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The tiny synthetic corpus the 2-rank end-to-end tests train on (16 train and 8 val videos at 32x32, 4 per
    shard), written once per session; tests only read it."""
    out = tmp_path_factory.mktemp("synth")
    subprocess.run([sys.executable, "-m", "shards", "synth", "--out", str(out), "--videos", "16", "--val-videos", "8",
                    "--seed", "3", "--per-shard", "4", "--size", "32", "--event-seconds", "1.0"], check=True, cwd=REPO,
                   capture_output=True, timeout=300)
    return out
