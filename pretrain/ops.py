"""DeepSpeed's JIT-compiled ops: build them once up front, and clear build locks left by killed processes.

    python -m pretrain.ops            # build the ops this accelerator uses (about a minute the first time)

On the CPU accelerator every process that starts DeepSpeed's communication backend compiles (or loads)
the shared-memory all-reduce op, and the CPU Adam of ZeRO-Offload is compiled on first use. The build is
guarded by torch's `FileBaton`: a `lock` file in the build folder that other processes wait on, with no
timeout. A process killed in the middle of a build (a test timeout, `scancel`, the OOM killer) leaves
that file behind, and every later launch waits on it forever. `clear_stale_locks()` removes a lock only
when no live process holds it open, so it is safe to call while another rank is building.
`make setup` builds the ops in one process, so parallel launches later only load them.

The shared-memory all-reduce also leaks: each rank creates a 69 MB POSIX shared-memory file
(/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>) and never unlinks it, so every launch
leaves 69 MB per rank in RAM until reboot (a few hundred test or requeued launches fill memory).
`release_shm_names()`, called once every rank has opened its peers' buffers, unlinks this rank's name
(the mappings stay valid), and `clear_stale_shm()` removes the names of launches that are gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger(__name__)

CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")  # the ops DeepSpeed's CPU accelerator compiles
SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer"


def builders(names=None):
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if names is None:
        names = CPU_OPS if accelerator.device_name() == "cpu" else ()
    found = []
    for name in names:
        builder = accelerator.create_op_builder(name)
        if builder is None or type(builder).__name__ == "NotImplementedBuilder":
            raise ValueError(f"accelerator {accelerator.device_name()!r} has no op builder {name!r}")
        found.append(builder)
    return found


def lock_paths(names=None) -> list[str]:
    from torch.utils.cpp_extension import _get_build_directory

    return [os.path.join(_get_build_directory(b.NAME, verbose=False), "lock") for b in builders(names)]


def _pids():
    return [pid for pid in os.listdir("/proc") if pid.isdigit()]


def mapped_files() -> set[str]:
    """Paths that some live process has mapped into memory."""
    found = set()
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/maps") as f:
                found.update(line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line)
        except (OSError, IndexError):
            continue
    return found


def shm_name(rank: int, addr: str, port: str) -> str:
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_names() -> bool:
    """Unlink this rank's all-reduce buffer name. Call after a barrier that follows the process group's
    start: by then every rank has mapped its peers' buffers, and a mapping outlives its name."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return False
    path = shm_name(dist.get_rank(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
    try:
        os.remove(path)
    except FileNotFoundError:  # this launch does not use the shared-memory all-reduce
        return False
    return True


def clear_stale_shm(min_age_s: float = 120.0) -> list[str]:
    """Remove this user's all-reduce buffers that no live process maps (launches killed before releasing
    them, or DeepSpeed versions that never do). Young files are left alone: their creator may not have
    mapped them yet."""
    if not os.path.isdir(SHM_DIR) or not os.path.isdir("/proc"):
        return []
    mine = f"{SHM_PREFIX}_{os.getuid()}_"
    candidates = [os.path.join(SHM_DIR, n) for n in os.listdir(SHM_DIR) if n.startswith(mine)]
    if not candidates:
        return []
    mapped, now, removed = mapped_files(), time.time(), []
    for path in candidates:
        try:
            if path in mapped or now - os.stat(path).st_mtime < min_age_s:
                continue
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        log.warning("removed %d stale DeepSpeed shared-memory buffers (%d MB) left by earlier launches",
                    len(removed), 69 * len(removed))
    return removed


def held_open(path: str) -> bool:
    """Whether a live process has `path` open (FileBaton keeps its lock's descriptor open while building)."""
    target = os.path.realpath(path)
    for pid in _pids():
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


def clean_node() -> None:
    """Before a launch starts its process group, on one process per node: stale locks and buffers."""
    clear_stale_locks()
    clear_stale_shm()


def clear_stale_locks(names=None) -> list[str]:
    """Remove build locks that no process holds; returns the paths removed."""
    if not os.path.isdir("/proc"):
        return []
    removed = []
    for path in lock_paths(names):
        if os.path.exists(path) and not held_open(path):
            try:
                os.remove(path)
            except FileNotFoundError:  # its owner finished in the meantime
                continue
            log.warning("removed a stale DeepSpeed op build lock %s (left by a killed process)", path)
            removed.append(path)
    return removed


def build(names=None) -> list[str]:
    """Compile (or load from the cache) every op this accelerator uses; returns their names."""
    clear_stale_locks(names)
    built = []
    clear_stale_shm()
    for builder in builders(names):
        start = time.monotonic()
        builder.load(verbose=False)
        log.info("op %s ready in %.1fs", builder.NAME, time.monotonic() - start)
        built.append(builder.NAME)
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="*", default=None, help=f"op builder names (default on CPU: {' '.join(CPU_OPS)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = build(args.ops)
    print(f"DeepSpeed ops ready: {', '.join(names) or 'none needed for this accelerator'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
