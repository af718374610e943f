"""The training core in one process, on its plain-PyTorch backend (what the benchmarks' baselines use):
a stop signal saves and stops after the step it arrives in, and a resume from that checkpoint logs the
losses of an uninterrupted run; the TrainState round-trips; signal handlers are put back."""
import json
import signal
from pathlib import Path

import pytest
import torch

from pretrain.backends import TorchBackend
from pretrain.checkpoint import TrainState
from pretrain.config import load_config
from pretrain.model import VideoTextModel
from pretrain.train import build_optimizer
from pretrain.trainer import StopSignal, build_scheduler, fit, step_generator
from test_finetune_e2e import synth

REPO = Path(__file__).resolve().parent.parent
TINY = ["data.batch_size=2", "data.num_workers=1", "data.size=32", "data.frames_per_clip=2", "data.max_words=12",
        "model.video.preset=debug", "model.video.local_stage=0", "model.text.sentence_layers=2", "model.embed_dim=16",
        "train.warmup_steps=1", "train.log_every=1", "train.save_every=100", "train.steps=4", "train.eval_at_end=false"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    data = synth(tmp_path_factory.mktemp("synth"), videos=8, val=2, per_shard=4)
    return load_config(REPO / "pretrain" / "configs" / "demo.yaml",
                       TINY + [f"data.train_shards={data}/train", f"data.val_shards={data}/val"])


def run(cfg, run_dir: Path, resume=False, stop=None):
    torch.manual_seed(cfg.train.seed)
    model = VideoTextModel(cfg.model)
    optimizer = build_optimizer(model, cfg)
    backend = TorchBackend(model, optimizer, build_scheduler(optimizer, cfg.train), cfg.train.grad_clip)

    def forward(batch, step, micro):
        return model(batch, generator=step_generator(cfg.train.seed, step))

    return fit(backend, forward, cfg, run_dir, resume, "test", stop=stop)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_a_stop_saves_after_its_step_and_the_resume_matches_an_uninterrupted_run(cfg, tmp_path):
    state, finished = run(cfg, tmp_path / "full")
    assert finished and state.step == 4 and state.samples_seen == 8

    stop = StopSignal()
    stop.received = "SIGUSR1"  # as if it came while the model was being built
    state, finished = run(cfg, tmp_path / "cut", stop=stop)
    assert not finished and state.step == 1
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "global_step1"
    saved = TrainState()
    saved.load_state_dict(torch.load(tmp_path / "cut" / "checkpoints" / "global_step1" / "trainstate.pt",
                                     weights_only=False))
    assert (saved.step, saved.samples_seen, saved.world_size, len(saved.ranks)) == (1, 2, 1, 1)
    assert {"rng", "data"} <= set(saved.ranks[0])
    again = TrainState()
    again.load_state_dict(saved.state_dict())
    assert again.counters() == saved.counters() and again.ranks[0]["data"] == saved.ranks[0]["data"]

    state, finished = run(cfg, tmp_path / "cut", resume=True)
    assert finished and state.step == 4 and state.samples_seen == 8
    got, want = losses(tmp_path / "cut"), losses(tmp_path / "full")
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-6), step


def test_stop_signal_catches_sigusr1_and_puts_the_old_handler_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        signal.raise_signal(signal.SIGUSR1)
        assert stop.received == "SIGUSR1" and stop.any_rank()
    assert signal.getsignal(signal.SIGUSR1) is before
