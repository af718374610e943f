"""Process-group helpers: starting the group with a timeout, rank info, and an all-gather that carries gradients."""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def timeout(seconds: float) -> datetime.timedelta:
    """train.dist_timeout_s as init_process_group's `timeout`: how long a collective (and the start-up
    rendezvous) waits for the other ranks before it raises. torch's default for gloo is 30 min."""
    return datetime.timedelta(seconds=seconds)


def start_process_group(timeout_s: float) -> bool:
    """The default process group with a collective timeout, when a launcher started several processes
    (WORLD_SIZE > 1, rendezvous through MASTER_ADDR / MASTER_PORT) and no group is started yet: gloo on
    CPUs, nccl on GPUs. For entry points whose group another library would start with its own timeout
    (accelerate reuses a started group). Returns whether it started one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_dist():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout(timeout_s))
    return True


def placement() -> str:
    """Where this process sits, for the log: global rank and world size, rank and process count on its node
    (LOCAL_RANK, LOCAL_WORLD_SIZE or DeepSpeed's LOCAL_SIZE), the node's index (DeepSpeed's CROSS_RANK,
    torchrun's GROUP_RANK or SLURM_NODEID) and host name. On a multi-node run the global rank of every
    node but the first differs from its local rank."""
    env = os.environ
    local_size = env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", "?"))
    node = env.get("CROSS_RANK", env.get("GROUP_RANK", env.get("SLURM_NODEID", "?")))
    return (f"rank {rank()} of {world_size()}, local rank {env.get('LOCAL_RANK', '?')} of {local_size} "
            f"on node {node} (host {socket.gethostname()})")


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concatenate x from every rank. Backward: sum the gradients of all ranks' (identical)
    losses and keep this rank's slice, so that after DeepSpeed averages gradients over ranks they equal
    the gradient of the loss on the global batch (LF-VILA's SyncFunction)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.n
        return grad[start:start + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each rank -> (world_size * b, ...), rank-major; identity without a process group."""
    if not is_dist() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_objects(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (one small all-reduce)."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def exit_with_launcher() -> bool:
    """Under DeepSpeed's per-node launcher (deepspeed.launcher.launch), have the kernel kill this rank
    when the launcher dies. A kill -9 of the launcher otherwise leaves its ranks training on as orphans,
    beside the run that resumes them. Returns whether the watch was set (Linux, under that launcher)."""
    import ctypes
    import os
    import signal

    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            if b"deepspeed.launcher.launch" not in f.read():
                return False  # started by hand, srun or another launcher: leave the process alone
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except OSError:
        return False
    if os.getppid() != parent:  # the launcher died before the watch was set
        os._exit(1)
    return True
