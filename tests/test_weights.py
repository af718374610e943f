"""Strict weight loading (pretrain/weights.py): a renamed, missing or reshaped tensor stops the load and is
named; modules the config creates new are expected only when the weights hold none of them."""
import logging

import pytest
import torch
import torch.nn as nn

from pretrain.weights import WeightsError, check_source, load_weights


class Stage1(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.video = nn.Linear(width, width)
        self.text = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))


class Stage2(Stage1):
    def __init__(self, width: int = 4):
        super().__init__(width)
        self.fusion = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 2))


def saved(tmp_path, model: nn.Module, name="w.pt", wrap=False, edit=None) -> str:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if edit:
        edit(state)
    path = tmp_path / name
    torch.save({"module": state} if wrap else state, path)
    return str(path)


def same(a: nn.Module, b: nn.Module, prefix: str = "") -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items() if k.startswith(prefix) and k in sb)


def test_an_exact_state_dict_loads_and_the_report_says_so(tmp_path):
    torch.manual_seed(0)
    src = Stage1()
    dst = Stage1()
    report = load_weights(dst, saved(tmp_path, src, wrap=True))
    assert same(src, dst) and report["loaded"] == sorted(src.state_dict())
    assert report["new"] == report["missing"] == report["unexpected"] == report["mismatched"] == []


def test_a_renamed_tensor_stops_the_load_and_is_named(tmp_path):
    def rename(state):
        state["video.weights"] = state.pop("video.weight")

    path = saved(tmp_path, Stage1(), edit=rename)
    dst = Stage1()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(WeightsError) as e:
        load_weights(dst, path)
    message = str(e.value)
    assert "1 missing from the weights: video.weight" in message
    assert "1 unexpected (not in the model): video.weights" in message
    assert "model.init_partial=true" in message and "\n" not in message
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_a_shape_mismatch_is_named_with_both_shapes(tmp_path):
    path = saved(tmp_path, Stage1(width=3))
    with pytest.raises(WeightsError, match=r"with another shape: video.weight \(3, 3\) vs the model's \(4, 4\)"):
        load_weights(Stage1(width=4), path)


def test_a_stage1_checkpoint_loads_into_a_model_with_a_new_fusion_stack(tmp_path, caplog):
    torch.manual_seed(0)
    src = Stage1()
    dst = Stage2()
    fusion_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("fusion.")}
    with pytest.raises(WeightsError, match=r"4 missing from the weights: fusion.0.weight"):
        load_weights(dst, saved(tmp_path, src))  # not declared new: an error
    caplog.set_level(logging.INFO, logger="pretrain")
    report = load_weights(dst, saved(tmp_path, src), new_prefixes=("fusion.",))
    assert sorted(report["new"]) == sorted(fusion_before) and report["missing"] == []
    assert same(src, dst) and all(torch.equal(v, dst.state_dict()[k]) for k, v in fusion_before.items())
    assert "new" in caplog.text and "fusion." in caplog.text


def test_a_new_prefix_the_weights_do_hold_must_be_complete(tmp_path):
    """A stage-2 checkpoint with a fusion stack missing one tensor: that is damage, not a new module."""
    def drop(state):
        del state["fusion.1.bias"]

    with pytest.raises(WeightsError, match=r"1 missing from the weights: fusion.1.bias"):
        load_weights(Stage2(), saved(tmp_path, Stage2(), edit=drop), new_prefixes=("fusion.",))
    load_weights(Stage2(), saved(tmp_path, Stage2()), new_prefixes=("fusion.",))  # complete: fine


def test_partial_loads_the_matching_tensors_and_warns(tmp_path, caplog):
    torch.manual_seed(0)
    src = Stage1()

    def damage(state):
        state["video.weights"] = state.pop("video.weight")
        state["extra.bias"] = torch.zeros(2)

    dst = Stage1()
    kept = dst.video.weight.detach().clone()
    report = load_weights(dst, saved(tmp_path, src, edit=damage), partial=True)
    assert report["missing"] == ["video.weight"] and sorted(report["unexpected"]) == ["extra.bias", "video.weights"]
    assert torch.equal(dst.video.weight, kept)  # left as initialised
    assert same(src, dst, "text.") and torch.equal(dst.video.bias, src.video.bias)  # the rest loaded
    assert "video.weight" in caplog.text and "init_partial" in caplog.text


def test_sources_that_are_not_weights_are_one_line_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist|do not exist"):
        check_source(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="folder without a checkpoint"):
        check_source(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="not a readable state dict"):
        load_weights(Stage1(), tmp_path / "junk.pt")
    run = tmp_path / "run"
    (run / "checkpoints" / "global_step3").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("global_step3")
    check_source(run)  # a run folder
    check_source(run / "checkpoints")  # its checkpoint folder


def test_a_run_folder_is_read_through_its_deepspeed_checkpoint(tmp_path, monkeypatch):
    import deepspeed.utils.zero_to_fp32 as z

    torch.manual_seed(0)
    src = Stage1()
    run = tmp_path / "run"
    (run / "checkpoints" / "global_step3").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("global_step3")
    asked = []
    monkeypatch.setattr(z, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda folder, **kw: asked.append(folder) or dict(src.state_dict()))
    dst = Stage1()
    load_weights(dst, run)
    assert asked == [str(run / "checkpoints")] and same(src, dst)


class Task(nn.Module):
    """A finetuning run's model: the backbone and a task head (finetune.heads.TaskModel's names)."""

    def __init__(self):
        super().__init__()
        self.backbone = Stage2()
        self.head = nn.Linear(4, 1)


def test_a_finetuning_run_gives_its_backbone_without_the_head(tmp_path):
    """finetune/run.py without DeepSpeed saves accelerate's pytorch_model.bin of the task model: --init RUN
    (or RUN/checkpoints) loads its backbone.* tensors strictly; head.* are left out."""
    torch.manual_seed(0)
    task = Task()
    tag = tmp_path / "run" / "checkpoints" / "global_step5"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("global_step5")
    torch.save(task.state_dict(), tag / "pytorch_model.bin")
    for source in (tmp_path / "run", tag.parent):
        dst = Stage2()
        report = load_weights(dst, source)
        assert same(task.backbone, dst) and report["loaded"] == sorted(dst.state_dict()) and report["unexpected"] == []
    # a task model's file with anything beside backbone.* and head.* is refused, naming the key
    state = dict(task.state_dict(), **{"stray.weight": torch.zeros(1)})
    torch.save(state, tag / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="stray.weight"):
        load_weights(Stage2(), tmp_path / "run")
