"""The training core's step without launching DeepSpeed: non-finite losses (which micro-batches are dropped,
when the optimizer steps, when the run stops), gradient accumulation on the plain-PyTorch backend, and
checkpoint retention.

A stand-in engine behind the real DeepSpeedBackend records what the loop asks of DeepSpeed; the real
engine runs the same path in test_training_system.py (with gradient accumulation) and test_pretrain_e2e.py.
"""
import math

import pytest
import torch

from pretrain.backends import DeepSpeedBackend, TorchBackend
from pretrain.trainer import NonfiniteGuard, step_taken, train_step, zero_loss


class FakeEngine:
    """Returns the next scripted loss per forward; records backward losses and step calls."""

    def __init__(self, losses):
        self.module = torch.nn.Linear(3, 2)
        self.losses, self.backward_losses, self.steps = list(losses), [], 0

    def __call__(self, batch, gather=None, generator=None):
        w = self.module.weight.sum()
        return {"loss": w * 0 + self.losses.pop(0), "vpc": torch.tensor(1.0)}

    def backward(self, loss):
        loss.backward()
        self.backward_losses.append(float(loss.detach()))

    def step(self):
        self.steps += 1


def step_with(engine, grad_accum):
    backend = DeepSpeedBackend(engine, scheduler=None)
    return train_step(backend, lambda batch, step, micro: engine(batch), iter([{}] * grad_accum), grad_accum, step=0)


def test_one_micro_batch_non_finite_skips_the_step_without_backward():
    engine = FakeEngine([math.nan])
    losses, _, finite = step_with(engine, 1)
    assert finite == [False] and not step_taken(finite)
    assert engine.backward_losses == [] and engine.steps == 0 and math.isnan(losses["loss"])


def test_with_accumulation_a_bad_micro_batch_adds_a_zero_gradient_and_the_step_is_taken():
    engine = FakeEngine([1.5, math.inf, 2.0])
    _, _, finite = step_with(engine, 3)
    assert finite == [True, False, True] and step_taken(finite)
    assert engine.backward_losses == [1.5, 0.0, 2.0] and engine.steps == 3  # DeepSpeed counts every micro-step


def test_torch_backend_accumulates_skips_a_bad_micro_batch_and_steps_once():
    """Plain-PyTorch backend, 3 micro-batches with a NaN in the middle: one SGD step on the sum of the two
    finite micro-batches' gradients (computed here by hand), one LR-schedule step, gradients cleared."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    xs = [torch.randn(2, 3) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    backend = TorchBackend(model, opt, sched, grad_clip=0.0)

    def forward(x, step, micro):
        loss = model(x).pow(2).mean()
        return {"loss": loss + math.nan if micro == 1 else loss}

    _, _, finite = train_step(backend, forward, iter(xs), 3, step=0)
    assert finite == [True, False, True]
    grad = sum(2 * (x @ w0.T * x).mean(0, keepdim=True) for x in (xs[0], xs[2]))  # d/dw mean((x w)^2)
    assert torch.allclose(model.weight, w0 - 0.1 * grad, atol=1e-6)
    assert sched.last_epoch == 1 and model.weight.grad is None


def test_zero_loss_gives_every_trainable_parameter_a_zero_gradient():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    m[1].bias.requires_grad_(False)
    zero_loss(m).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m.parameters() if p.requires_grad)
    assert m[1].bias.grad is None


def test_guard_counts_runs_across_steps_and_stops_with_advice():
    guard = NonfiniteGuard(3, total=5, advice=lambda: "the last checkpoint is global_step8")
    guard.update([True, False], step=1, losses={})
    guard.update([False, True], step=2, losses={})  # a finite micro-batch ends the run of bad ones
    assert guard.total == 7 and guard.in_a_row == 0
    guard.update([True, False], step=3, losses={})
    with pytest.raises(RuntimeError, match=r"3 consecutive micro-batches .*max_nonfinite_steps=3.*global_step8"):
        guard.update([False, False], step=4, losses={"loss": math.nan})
    assert guard.total == 10


# ---- checkpoint retention ------------------------------------------------------------------------

from pretrain.checkpoint import LATEST, prune  # noqa: E402


def folders(ckpt_dir):
    return sorted(int(p.name[len("global_step"):]) for p in ckpt_dir.glob("global_step*"))


def test_retention_keeps_the_last_k_every_nth_and_always_latest(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"global_step{step}").mkdir()
    (tmp_path / "universal").mkdir()
    (tmp_path / LATEST).write_text("global_step10")
    prune(tmp_path, keep_last=2, keep_every=4)
    assert folders(tmp_path) == [4, 8, 10] and (tmp_path / "universal").exists()
    # A crash left unfinished saves at 12 and 14; `latest` still names 10, which must survive.
    (tmp_path / "global_step12").mkdir()
    (tmp_path / "global_step14").mkdir()
    prune(tmp_path, keep_last=1, keep_every=0)
    assert folders(tmp_path) == [10, 14]


# ---- the LR schedule -------------------------------------------------------------------------------

from pretrain.config import load_config  # noqa: E402
from pretrain.trainer import build_scheduler  # noqa: E402


@pytest.mark.parametrize("schedule, want", [
    (["train.min_lr_ratio=0.1"], {0: 0.5, 1: 1.0, 6: 0.1 + 0.9 * 0.5, 10: 0.1, 12: 0.1}),  # cosine over steps 2..10
    (["train.schedule=linear", "train.min_lr_ratio=0.2"], {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.8, 6: 0.6, 10: 0.2, 12: 0.2}),
    (["train.schedule=step", "train.decay_every=3", "train.decay_factor=0.5"], {0: 0.5, 1: 1.0, 2: 1.0, 3: 0.5, 8: 0.25}),
])
def test_lr_schedule_warms_up_then_decays_by_cosine_linearly_or_by_steps(schedule, want):
    cfg = load_config(None, ["train.steps=10", "train.warmup_steps=2", "train.lr=1.0", *schedule])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.train)
    got = {}
    for step in range(13):
        got[step] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
    for step, factor in want.items():
        assert got[step] == pytest.approx(factor), step


def test_param_groups_split_by_lr_and_decay_in_the_order_of_their_first_parameter():
    from pretrain.trainer import param_groups

    m = torch.nn.ModuleDict({"video": torch.nn.Linear(3, 4), "text": torch.nn.Linear(4, 2)})
    m["text"].bias.requires_grad_(False)
    groups = param_groups(m, lambda name: 0.1 if name.startswith("text.") else 1.0, weight_decay=0.05)
    got = [(g["lr"], g["weight_decay"], [p.shape for p in g["params"]]) for g in groups]
    assert got == [(1.0, 0.05, [(4, 3)]), (1.0, 0.0, [(4,)]), (0.1, 0.05, [(2, 4)])]  # frozen bias left out
