"""Config loading: precedence, errors that name the key, every shipped config loads."""

import pytest

from pretrain.config import REPO_ROOT, Config, ConfigError, load_config
from pretrain.train import build_ds_config

CONFIGS = sorted((REPO_ROOT / "pretrain" / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_gets_batch_sizes_filled_in(path):
    cfg = load_config(CONFIGS[0], ["data.batch_size=3", "train.grad_accum=2"])
    ds = build_ds_config(cfg, world_size=4, path=str(path))
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 24)


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\n  lr: 0.1\n")
    cfg = load_config(f, ["train.lr=0.5", "model.video.dims=[8,16,16,16]"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.5 and cfg.model.video.dims == [8, 16, 16, 16]
    assert cfg.train.warmup_steps == Config().train.warmup_steps
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads this as a string


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key train\.stpes .*did you mean train\.steps"):
        load_config(None, ["train.stpes=3"])


def test_wrong_type_and_literal_values_are_rejected():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"model\.video\.clip_features.*allowed values: \['local', 'final'\]"):
        load_config(None, ["model.video.clip_features=middle"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=0"])


def test_cross_field_check_names_the_fields():
    with pytest.raises(ConfigError, match="data.size"):
        load_config(None, ["data.size=60"])


def test_ds_config_disagreeing_with_run_config_is_rejected(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"train_micro_batch_size_per_gpu": 5, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=5 disagrees"):
        build_ds_config(load_config(None, ["data.batch_size=4"]), 2, str(p))


@pytest.mark.parametrize("override, key", [
    ("model.loss.num_key=5", "model.loss.num_key"),  # more anchors than data.num_clips
    ("model.loss.num_value=0", "model.loss.num_value"),
    ("model.loss.num_neg=-1", "model.loss.num_neg"),
    ("model.loss.mlm_probability=1.5", "model.loss.mlm_probability"),
    ("model.video.graph_threshold=2.0", "model.video.graph_threshold"),
    ("model.video.depth_window=-1", "model.video.depth_window"),
    ("model.video.temporal_windows=[3,4,8,16]", r"model.video.temporal_windows\[0\] / spatial_window"),
    ("model.video.spatial_window=[3,3]", r"model.video.temporal_windows\[0\] / spatial_window"),
])
def test_out_of_range_model_values_are_rejected_before_launch_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"bad value for {key}: expected"):
        load_config("pretrain/configs/demo.yaml", [override])


def test_every_cpu_preset_passes_the_checks_at_the_demo_size():
    from pretrain.video_encoder import PRESETS

    small = [name for name in PRESETS if name.endswith("_small") or name == "debug"]
    assert len(small) >= 5
    for name in small:  # the papers' widths tile 192x320 or 224x224 frames, which data.size (square) can't say
        load_config("pretrain/configs/demo.yaml", [f"model.video.preset={name}", "model.loss.mtc_weight=0"])
