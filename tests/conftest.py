"""Session set-up: clear what killed DeepSpeed launches of earlier runs left on this machine (stale JIT build
locks that would make every launch wait forever, and shared-memory all-reduce buffers that fill RAM)."""
import logging
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_sessionstart(session):
    from pretrain import ops

    logging.basicConfig(level=logging.WARNING)
    ops.clear_stale_locks()
    ops.clear_stale_shm()
