"""Session set-up: refuse to start without the disk space the suite needs, and clear what killed DeepSpeed
launches of earlier runs left on this machine (stale JIT build locks that would make every launch wait forever,
and shared-memory all-reduce buffers that fill RAM)."""
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parent.parent
# The suite's peak on disk under the temporary folder, with room to spare: 14.8 GiB, measured over a whole
# run of issue 16's code (the full-width paper recipes' image checkpoints and DeepSpeed checkpoints; pytest.ini
# deletes a passing test's folder when it ends).
NEED_GIB = float(os.environ.get("LONGVL_TEST_DISK_GIB", 20))


def pytest_sessionstart(session):
    from pretrain import ops

    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    if free < NEED_GIB:  # a full disk fails dozens of checkpoint saves half an hour in: say so now instead
        pytest.exit(f"only {free:.1f} GiB free under {tempfile.gettempdir()}; the suite needs about {NEED_GIB:g} GiB "
                    "there (set TMPDIR to a roomier folder, or clear old pytest-of-* folders)", returncode=3)
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
