"""train.activation_checkpointing: the video encoder's units (patch embedding, blocks, 2x2 merges) and the text
encoder's BERT layers are recomputed in the backward pass, with the gradients of a run that keeps every
activation; nothing is recomputed in eval or under no_grad; pretraining on every ZeRO stage and finetuning
train with it and log the losses of the same run without it."""
import copy
import json

import pytest
import torch

import pretrain.video_encoder as video_encoder
from pretrain.config import ConfigError, load_config
from pretrain.text_encoder import HierarchicalTextEncoder, TextEncoderConfig
from pretrain.video_encoder import PRESETS, VideoEncoder, VideoEncoderConfig, preset_values
from test_pretrain_e2e import REPO, launch, metrics

SMALL = [name for name in PRESETS if name.endswith("_small") or name == "debug"]


def count_calls(modules) -> list[int]:
    """A counter per module, incremented by each call of its forward (a recomputation is a second call)."""
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)


# ---- the video encoder ------------------------------------------------------------------------------


def video_step(enc: VideoEncoder, every: int, **kw) -> dict[str, torch.Tensor]:
    """One forward and backward of `enc` on a fixed batch, `every`-th unit checkpointed -> the gradients."""
    torch.manual_seed(1)
    video = torch.randint(0, 256, (2, 8, 3, 64, 64), dtype=torch.uint8)
    depth = torch.rand(2, 8, 64, 64) if enc.uses_depth else None
    weights = torch.randn(enc.cfg.dims[-1])
    enc.set_activation_checkpointing(every)
    enc.zero_grad(set_to_none=True)
    clips, whole = enc(video, num_clips=4, depth=depth, **kw)
    loss = (whole * weights).sum() + (clips.square().sum() if clips is not None else 0)
    loss.backward()
    return grads(enc)


@pytest.mark.parametrize("name", SMALL)
def test_video_encoder_gradients_with_checkpointing_equal_those_without(name):
    """Every unit recomputed (every=1): each block and the patch embedding run twice, the gradients are the
    same (TESTA's merging changes shapes inside a block, DAST's blocks read the depth tokens)."""
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**preset_values(name))).train()
    units = [enc.patch_embed] + [block for stage in enc.stages for block in stage]
    calls = count_calls(units)
    reference = video_step(enc, 0)
    assert calls == [1] * len(units)
    got = video_step(enc, 1)
    assert calls == [3] * len(units)  # once more in the forward, once in the recomputation
    assert_same_grads(reference, got)


def test_every_kth_unit_is_recomputed_counting_the_patch_embedding_first():
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**preset_values("lfvila_small"))).train()  # 4 blocks and a 2x2 merge
    units = [enc.patch_embed] + [block for stage in enc.stages for block in stage]
    assert len(units) == 6
    calls = count_calls(units)
    reference = video_step(enc, 0)
    got = video_step(enc, 2)
    assert [c - 1 for c in calls] == [2, 1, 2, 1, 2, 1]  # units 0, 2, 4: embedding, the merge, the 3rd block
    assert_same_grads(reference, got)


def test_token_dropping_draws_the_same_tokens_when_the_embedding_is_recomputed():
    """The embedding draws token dropping's blocks from the trainer's generator: the recomputation must draw
    what the forward pass drew, and leave the generator where the forward pass left it (MTC draws next)."""
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**{**preset_values("full_small"), "drop_ratio": 0.5})).train()
    generators = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    reference = video_step(enc, 0, generator=generators[0])
    got = video_step(enc, 1, generator=generators[1])
    assert_same_grads(reference, got)
    assert torch.equal(generators[0].get_state(), generators[1].get_state())


def test_eval_and_no_grad_never_checkpoint(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint called outside training with gradients")

    monkeypatch.setattr(video_encoder, "checkpoint", refuse)
    enc = VideoEncoder(VideoEncoderConfig(**preset_values("debug")))
    enc.set_activation_checkpointing(1)
    video = torch.randint(0, 256, (1, 8, 3, 32, 32), dtype=torch.uint8)
    enc.eval()(video, num_clips=4)[1].sum().backward()  # eval, with gradients: kept as usual
    with torch.no_grad():
        enc.train()(video, num_clips=4)
    with pytest.raises(AssertionError, match="checkpoint called"):
        enc.train()(video, num_clips=4)


# ---- the text encoder -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_encoder():
    return HierarchicalTextEncoder(TextEncoderConfig(sentence_layers=4))  # MiniLM: 4 sentence + 2 paragraph layers


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_text_encoder_gradients_with_checkpointing_equal_those_without(text_encoder, dropout):
    """Every BERT layer recomputed, called one by one as _run does (outside BertModel, whose
    gradient_checkpointing_enable would not reach them): the same gradients, dropout off as asked and on
    (the recomputation replays the RNG)."""
    enc = copy.deepcopy(text_encoder).train()
    for m in enc.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    layers = list(enc.sentence_layers) + list(enc.paragraph_layers)
    calls = count_calls(layers)
    ids = torch.randint(1000, 2000, (2, 3, 8))
    mask = torch.ones_like(ids)
    mask[:, :, 6:] = 0

    def step(every):
        enc.set_activation_checkpointing(every)
        enc.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        sentences, paragraph = enc(ids, mask)
        (sentences.square().sum() + paragraph.sum()).backward()
        return grads(enc)

    reference = step(0)
    assert calls == [1] * 6
    assert_same_grads(reference, step(1))
    assert calls == [3] * 6
    assert_same_grads(reference, step(2))
    assert calls == [5, 4, 5, 4, 5, 4]  # each stack counted from its first layer: sentence 0, 2; paragraph 0


def test_the_key_reaches_both_encoders_and_is_validated():
    from pretrain.train import build_model

    cfg = load_config(REPO / "pretrain" / "configs" / "demo.yaml",
                      ["model.video.preset=debug", "model.video.local_stage=0", "train.activation_checkpointing=2"])
    model = build_model(cfg)
    assert model.video.checkpoint_every == model.text.checkpoint_every == 2
    assert load_config(None).train.activation_checkpointing == 0  # off by default
    for bad in ("-1", "true", "1.5"):
        with pytest.raises(ConfigError, match="train.activation_checkpointing"):
            load_config(None, [f"train.activation_checkpointing={bad}"])


# ---- training end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero1_without(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("zero1_without")
    launch(run, data, 2, "train.eval_at_end=false", "train.save_every=0",
           extra_args=["--ds-config", "ds_configs/zero1.json"])
    return metrics(run)


@pytest.mark.parametrize("ds", ["zero2.json", "zero3.json"])
def test_deepspeed_pretraining_with_checkpointing_logs_the_losses_of_zero1_without(ds, data, zero1_without, tmp_path):
    """2 ranks, every unit recomputed: ZeRO-2 and ZeRO-3 with checkpointing step and log the losses of ZeRO-1
    without it (the stages agree with each other to 1e-4: tests/test_training_system.py), at steps 1 and 2.
    With ZeRO-1 as the reference, every stage runs: 1 without checkpointing, 2 and 3 with it."""
    proc = launch(tmp_path, data, 2, "train.eval_at_end=false", "train.save_every=0",
                  "train.activation_checkpointing=1", extra_args=["--ds-config", f"ds_configs/{ds}"])
    assert "activation checkpointing: 1 in 1 blocks" in proc.stderr
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [r["step"] for r in zero1_without] == [1, 2]
    for got, want in zip(rows, zero1_without):
        for key in ("loss", "vpc", "mtc", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (ds, got["step"], key)


def test_finetuning_with_checkpointing_logs_the_losses_of_the_run_without(data, tmp_path, monkeypatch):
    """Finetuning's plain-PyTorch path (accelerate, one process): checkpointing is applied (the video encoder's
    units go through torch's checkpoint) and the per-step losses are those of the same run without it."""
    from finetune.run import main
    from test_finetune_e2e import args

    calls = []
    real = video_encoder.checkpoint
    monkeypatch.setattr(video_encoder, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    common = ["train.steps=2", "task.eval_before=false", "train.eval_at_end=false", "train.save_every=0"]
    assert main(args("anet_retrieval_debug.yaml", tmp_path / "with", data, *common,
                     "train.activation_checkpointing=1")) == 0
    assert calls  # 2 steps x (embedding + 3 units) of the debug encoder
    n = len(calls)
    assert main(args("anet_retrieval_debug.yaml", tmp_path / "without", data, *common)) == 0
    assert len(calls) == n

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    with_, without = losses(tmp_path / "with"), losses(tmp_path / "without")
    assert [s for s, _ in with_] == [s for s, _ in without] == [1, 2]
    for (_, a), (_, b) in zip(with_, without):
        assert a == pytest.approx(b, rel=1e-5)
