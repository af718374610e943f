"""train.precision: bf16 trains and tracks fp32 (pretraining on DeepSpeed's bf16 engine, finetuning under
accelerate's bf16 autocast), `auto` resolves as documented, and fp16 is refused with one line wherever it
could come in (the key, a DeepSpeed JSON, `accelerate launch --mixed_precision fp16`)."""
import json
import math
import subprocess
import sys

import pytest
import torch

from pretrain.backends import build_ds_config, cpu_has_bf16, resolve_precision
from pretrain.config import ConfigError, load_config
from test_pretrain_e2e import REPO, launch, metrics



def is_bf16(value: float) -> bool:
    return float(torch.tensor(value).bfloat16()) == value


def rel_diffs(got: list[float], want: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(got, want, strict=True)]


def test_pretraining_in_bf16_tracks_fp32(data, tmp_path):
    """2 ranks, ZeRO-2, 6 steps, seed 0, bf16 (DeepSpeed's bf16 engine: bf16 weights and activations, fp32 master
    weights and optimizer) against fp32. Every loss is finite and a bf16 number (the engine really ran in bf16),
    and tracks fp32's within 5% at every step.

    Why 5%: bf16 keeps 8 significant bits (a rounding of up to 0.4% per operation; the logged loss, a bf16 value
    near 6, moves in steps of 0.03, 0.5%) and the runs drift apart as the updates compound (LR 5e-4, clipped
    gradients of norm ~80). Measured, max relative difference of the loss over the 6 steps: 2.35% at seed 0
    (this test; vpc 2.5%, mtc 1.3%), 4.1% at seed 1, 0.9% at seed 2; fp32 itself falls 18% over these steps."""
    common = ["train.eval_at_end=false", "train.save_every=0"]
    launch(tmp_path / "fp32", data, 6, *common, "train.precision=fp32")
    launch(tmp_path / "bf16", data, 6, *common, "train.precision=bf16")
    fp32, bf16 = metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16")
    assert [r["step"] for r in fp32] == [r["step"] for r in bf16] == [1, 2, 3, 4, 5, 6]
    losses = [r["loss"] for r in bf16]
    assert all(math.isfinite(v) and is_bf16(v) for v in losses), losses
    diffs = rel_diffs(losses, [r["loss"] for r in fp32])
    print("pretraining bf16 vs fp32, relative loss differences per step:", [f"{d:.4f}" for d in diffs])
    assert max(diffs) < 0.05 and max(diffs) > 0, diffs


def test_finetuning_in_bf16_tracks_fp32(tmp_path):
    """Finetuning's plain-PyTorch path (one process, accelerate's bf16 autocast), 6 steps of retrieval, against
    fp32: finite losses within 3% at every step.

    Why 3%: autocast runs the matmuls in bf16 (0.4% rounding each) and keeps the weights and the loss in fp32, so
    the drift is smaller than pretraining's. Measured max relative difference of the loss over the 6 steps:
    0.51% (this test: seed 0, the fp32 run in this process); with both runs as processes of their own 0.84%,
    0.59% and 0.96% at seeds 0, 1 and 2."""
    from finetune.run import main
    from test_finetune_e2e import ENV, args, losses, synth

    data = synth(tmp_path / "synth", 16, 8, 2)
    common = ["train.steps=6", "task.eval_before=false", "train.eval_at_end=false", "train.save_every=0"]
    assert main(args("anet_retrieval_debug.yaml", tmp_path / "fp32", data, *common, "train.precision=fp32")) == 0
    bf16_run = [sys.executable, str(REPO / "finetune" / "run.py"),  # a process of its own: accelerate's state is
                *args("anet_retrieval_debug.yaml", tmp_path / "bf16", data, *common, "train.precision=bf16")]  # global
    rc = subprocess.run(bf16_run, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert [s for s, _ in fp32] == [s for s, _ in bf16] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for _, v in bf16)
    diffs = rel_diffs([v for _, v in bf16], [v for _, v in fp32])
    print("finetuning bf16 vs fp32, relative loss differences per step:", [f"{d:.4f}" for d in diffs])
    assert max(diffs) < 0.03 and max(diffs) > 0, diffs


# ---- auto, and fp16 refused ----------------------------------------------------------------------------


def test_auto_is_bf16_on_a_gpu_or_cpu_that_has_it_else_fp32(monkeypatch):
    cfg = load_config(None)
    assert cfg.train.precision == "auto"
    want_here = "bf16" if (torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_bf16()) else "fp32"
    assert resolve_precision("auto") == want_here
    assert build_ds_config(cfg, 1)["bf16"] == {"enabled": want_here == "bf16"}
    for amx, avx512_bf16, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert cpu_has_bf16() == (want == "bf16") and resolve_precision("auto") == want
        assert build_ds_config(cfg, 1)["bf16"] == {"enabled": want == "bf16"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU decides by itself, whatever the CPU has
    for supported, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: supported)
        assert resolve_precision("auto") == want
        assert build_ds_config(cfg, 1)["bf16"] == {"enabled": want == "bf16"}
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"  # never overridden


def test_fp16_as_the_key_is_refused():
    with pytest.raises(ConfigError, match=r"^bad value for train\.precision: expected one of \['auto', 'fp32', "
                                          r"'bf16'\], got 'fp16'$"):
        load_config(None, ["train.precision=fp16"])


@pytest.mark.parametrize("key, section", [("fp16", {"enabled": True}), ("fp16", {"enabled": True, "loss_scale": 0}),
                                          ("fp16", {"enabled": "auto"}), ("fp16", True), ("amp", {"enabled": True})])
def test_fp16_in_a_deepspeed_json_is_refused_before_launch_in_one_line(key, section, tmp_path, capsys):
    """fp16 (or DeepSpeed's apex AMP, fp16 too) in the JSON: build_ds_config refuses it, and pretrain/run.py stops
    before launching with that one line on stderr and exit code 2. Present but disabled, it is accepted."""
    from pretrain.run import main

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, key: section}))
    refused = rf"ds\.json: {key} is not supported; use bf16 \(GPU\) or fp32 \(train\.precision\)"
    with pytest.raises(ConfigError, match=refused):
        build_ds_config(load_config(None), 2, str(path))
    assert main(["--config", str(REPO / "pretrain" / "configs" / "demo.yaml"), "--ds-config", str(path),
                 "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: ") and f"{key} is not supported" in err[0], err
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, key: {"enabled": False}}))
    build_ds_config(load_config(None), 2, str(path))  # present but disabled: accepted


@pytest.mark.parametrize("precision, want", [("fp32", "no"), ("bf16", "bf16")])
def test_accelerate_launch_mixed_precision_fp16_never_reaches_finetuning(precision, want, monkeypatch):
    """`accelerate launch --mixed_precision fp16` (ACCELERATE_MIXED_PRECISION) would make accelerate's DeepSpeed
    plugin add fp16.enabled to the JSON; the Accelerator is given train.precision instead, on both paths."""
    import accelerate

    from finetune.config import FinetuneConfig
    from finetune.train import build_accelerator

    got = []
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: got.append(kw))
    for name, value in (("ACCELERATE_MIXED_PRECISION", "fp16"), ("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999"), ("ACCELERATE_USE_DEEPSPEED", "false")):
        monkeypatch.setenv(name, value)
    cfg = load_config(REPO / "finetune" / "configs" / "anet_retrieval_debug.yaml", [f"train.precision={precision}"],
                      cls=FinetuneConfig)
    build_accelerator(cfg, None)  # plain PyTorch
    build_accelerator(cfg, str(REPO / "ds_configs" / "zero2.json"))  # DeepSpeed through accelerate's plugin
    assert [kw["mixed_precision"] for kw in got] == [want, want]
    ds = got[1]["deepspeed_plugin"].deepspeed_config
    assert not ds.get("fp16", {}).get("enabled") and ds["bf16"]["enabled"] == (precision == "bf16")
