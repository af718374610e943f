"""The all-gather with gradients: 2 gloo processes give the gradient of the loss on the global batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.distributed import gather_with_grad
from pretrain.losses import vpc_loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_and_data():
    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 4)
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    return proj, x, y


def loss_fn(proj, x, y, gather):
    return vpc_loss(gather(F.normalize(proj(x), dim=-1)), gather(F.normalize(proj(y), dim=-1)), temperature=0.1)


def worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    proj, x, y = model_and_data()
    part = slice(rank * 4, rank * 4 + 4)
    loss = loss_fn(proj, x[part], y[part], gather_with_grad)
    loss.backward()
    grads = [p.grad.clone() for p in proj.parameters()]
    for g in grads:  # what DeepSpeed does with gradients: average over ranks
        dist.all_reduce(g)
        g /= world
    queue.put((rank, float(loss), [g.numpy() for g in grads]))
    dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_global_batch():
    proj, x, y = model_and_data()
    ref_loss = loss_fn(proj, x, y, lambda t: t)
    ref_loss.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, loss, grads in results:
        assert abs(loss - float(ref_loss)) < 1e-5
        for g, p in zip(grads, proj.parameters(), strict=True):
            torch.testing.assert_close(torch.from_numpy(g), p.grad, atol=1e-6, rtol=1e-5)
