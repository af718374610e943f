"""Config loading: one loader and one saver for pretraining and finetuning; precedence, base chains,
errors that name the key, keys a command does not use, every shipped config loads."""

import dataclasses

import pytest
import yaml

from finetune.config import FinetuneConfig
from pretrain.backends import build_ds_config
from pretrain.config import REPO_ROOT, Config, ConfigError, load_config, pretrained_config_path, save_config

CONFIGS = sorted((REPO_ROOT / "pretrain" / "configs").glob("*.yaml"))
DEMO = REPO_ROOT / "pretrain" / "configs" / "demo.yaml"
FINETUNE_CONFIGS = sorted((REPO_ROOT / "finetune" / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """The papers' recipes name an image checkpoint the user downloads (a placeholder folder here): they load
    without it (tests/test_paper_recipes.py loads them with full-size checkpoints of the right shapes)."""
    assert isinstance(load_config(path, ["model.video.init_image=''"]), Config)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_gets_batch_sizes_filled_in(path):
    cfg = load_config(DEMO, ["data.batch_size=3", "train.grad_accum=2"])
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
    with pytest.raises(ConfigError, match=r"bad value for model\.video\.clip_features: expected one of \['local', 'final'\]"):
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
    for name in small:  # the papers' widths at their sizes: tests/test_nonsquare.py (lfvila at [192, 320])
        load_config("pretrain/configs/demo.yaml", [f"model.video.preset={name}", "model.loss.mtc_weight=0"])


# ---- one config system: finetuning extends pretraining's config ----------------------------------------


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_finetune_config_loads_through_the_one_loader(path):
    cfg = load_config(path, cls=FinetuneConfig)
    assert isinstance(cfg, FinetuneConfig) and isinstance(cfg, Config)


def test_finetune_config_extends_the_pretraining_config():
    assert issubclass(FinetuneConfig, Config)
    own = {f.name for f in dataclasses.fields(Config)}
    assert own < {f.name for f in dataclasses.fields(FinetuneConfig)} and "task" not in own


@pytest.mark.parametrize("override, key", [
    ("model.video.temporal_windows=[3,4,8,16]", r"model.video.temporal_windows\[0\] / spatial_window"),
    ("model.video.spatial_window=[3,3]", r"model.video.temporal_windows\[0\] / spatial_window"),
    ("data.size=60", "data.size"),
    ("data.frames_per_clip=32", r"data.num_clips \* data.frames_per_clip"),
    ("model.video.downsample=[true,true,true,true]", r"model.video.downsample\[\d\]"),
    ("model.video.graph_threshold=2.0", "model.video.graph_threshold"),
    ("model.text.max_sentences=2", "data.num_clips"),
    ("model.text.sentence_layers=0", "model.text.sentence_layers"),
    ("data.num_workers=-1", "data.num_workers"),
])
def test_finetuning_runs_the_cross_field_checks_of_what_it_builds(override, key):
    for cls in (Config, FinetuneConfig):
        path = DEMO if cls is Config else REPO_ROOT / "finetune" / "configs" / "anet_retrieval_debug.yaml"
        with pytest.raises(ConfigError, match=f"bad value for {key}: expected"):
            load_config(path, [override], cls)


def test_finetuning_skips_pretrainings_loss_checks():
    """TESTA has no clip features, so pretraining rejects its default MTC weight; finetuning runs no MTC."""
    with pytest.raises(ConfigError, match="model.loss.mtc_weight"):
        load_config(None, ["model.video.preset=testa_small"])
    load_config(None, ["model.video.preset=testa_small", "task.query=clips"], FinetuneConfig)


@pytest.mark.parametrize("override", ["model.loss.mtc_weight=0.5", "model.loss.num_key=1", "model.loss.vtm_weight=1",
                                      "model.loss={mlm_weight: 1.0}", "model.loss.ssl_detach_targets=false"])
def test_finetuning_rejects_the_loss_keys_it_does_not_use(override, tmp_path):
    key = override.split("=")[0] if "{" not in override else "model.loss.mlm_weight"
    message = f"unused config key {key}: finetuning does not use it"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override], FinetuneConfig)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"model": {"loss": {key.rsplit(".", 1)[1]: 1}}}))
    with pytest.raises(ConfigError, match="finetuning does not use it"):  # in a file too
        load_config(f, cls=FinetuneConfig)
    assert load_config(None, ["model.loss.temperature=0.07"], FinetuneConfig).model.loss.temperature == 0.07
    load_config(None, [override, "model.fusion_layers=1"])  # pretraining reads them


@pytest.mark.parametrize("cls", [Config, FinetuneConfig])
def test_schedule_keys_of_the_other_schedule_are_rejected(cls):
    """One schedule for both commands (the training core's): keys of the schedule not chosen are errors."""
    with pytest.raises(ConfigError, match=r"unused config key train\.decay_every: .*train\.schedule=cosine"):
        load_config(None, ["train.decay_every=10"], cls)
    with pytest.raises(ConfigError, match=r"unused config key train\.min_lr_ratio: .*train\.schedule=step"):
        load_config(None, ["train.schedule=step", "train.min_lr_ratio=0.1"], cls)
    cfg = load_config(None, ["train.schedule=step", "train.decay_every=10"], cls)
    assert cfg.train.decay_every == 10


def test_base_chains_merge_key_by_key_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("train:\n  steps: 7\n  lr: 0.1\nmodel:\n  video:\n    preset: debug\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\ntrain:\n  lr: 0.2\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: mid.yaml\ntrain:\n  warmup_steps: 1\n")
    for cls in (Config, FinetuneConfig):
        cfg = load_config(tmp_path / "sub" / "top.yaml", ["train.steps=9"], cls)
        assert (cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps) == (9, 0.2, 1)
        assert cfg.model.video.preset == "debug" and cfg.model.video.dims == [16, 32]  # the preset applied
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"base file .*gone\.yaml \(named by .*orphan\.yaml\) does not exist"):
        load_config(tmp_path / "orphan.yaml")


def test_save_config_round_trips_for_both_commands(tmp_path):
    for cls, path in ((Config, DEMO), (FinetuneConfig, FINETUNE_CONFIGS[0])):
        cfg = load_config(path, ["train.steps=11"], cls)
        save_config(cfg, tmp_path / "config.yaml")
        saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
        assert ("mtc_weight" in saved["model"]["loss"]) == (cls is Config)  # not written where not used
        assert load_config(tmp_path / "config.yaml", cls=cls) == cfg


def test_finetuning_inherits_the_pretrained_architecture(tmp_path):
    pre = load_config(DEMO, ["model.video.preset=debug", "model.video.local_stage=0", "model.embed_dim=32",
                                   "model.fusion_layers=1", "model.loss.mlm_weight=1", "data.frames_per_clip=2"])
    save_config(pre, tmp_path / "model.yaml")
    (tmp_path / "model.pt").write_bytes(b"")
    assert pretrained_config_path(tmp_path / "model.pt") == tmp_path / "model.yaml"
    recipe = REPO_ROOT / "finetune" / "configs" / "anet_retrieval_debug.yaml"
    cfg = load_config(recipe, ["data.frames_per_clip=2", ("model.init_from", str(tmp_path / "model.pt"))], FinetuneConfig)
    assert (cfg.model.video, cfg.model.text, cfg.model.embed_dim, cfg.model.fusion_layers) == \
        (pre.model.video, pre.model.text, 32, 1)
    assert cfg.model.init_from == str(tmp_path / "model.pt")
    # overrides still win over the inherited architecture; pretraining inherits nothing
    assert load_config(recipe, ["data.frames_per_clip=2", f"model.init_from={tmp_path / 'model.pt'}",
                                "model.embed_dim=64"], FinetuneConfig).model.embed_dim == 64
    assert load_config(DEMO, [f"model.init_from={tmp_path / 'model.pt'}"]).model.embed_dim == 256


def test_init_partial_is_a_model_key_off_by_default_and_only_with_init_from():
    assert load_config(None).model.init_partial is False
    cfg = load_config(None, ["model.init_partial=true", "model.init_from=x.pt"], FinetuneConfig)
    assert cfg.model.init_partial is True
    with pytest.raises(ConfigError, match="bad value for model.init_partial: expected true or false"):
        load_config(None, ["model.init_partial=maybe", "model.init_from=x.pt"])
    for cls in (Config, FinetuneConfig):
        with pytest.raises(ConfigError, match=r"unused config key model\.init_partial: .*without model\.init_from"):
            load_config(None, ["model.init_partial=true"], cls)


@pytest.mark.parametrize("override, message", [
    ("data.num_clips=0", r"bad value for data\.num_clips: expected an integer >= 1 \(got 0\)"),
    ("data.crop_scale=2", r"bad value for data\.crop_scale: expected a number in \(0, 1\] \(got 2\.0\)"),
    ("model.video.heads=[3,4,4,4]", r"bad value for model\.video\.dims\[0\]: expected divisible by model\.video\.heads\[0\] = 3 \(got 64\)"),
    ("model.video.local_stage=9", r"bad value for model\.video\.local_stage: expected an integer in \[0, 3\]"),
    ("model.loss.temperature=0", r"bad value for model\.loss\.\*temperature: expected numbers > 0"),
    ("model.video.preset=nope", r"bad value for model\.video\.preset: expected one of the known presets"),
    ("data=3", r"bad value for data: expected a mapping"),
    ("train", r"override 'train' is not of the form dotted.key=value"),
])
def test_errors_of_every_section_have_one_style(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_finetuning_does_not_inherit_token_dropping_or_the_image_folder(tmp_path):
    """Token dropping is pretraining's speed-up (a finetune recipe sets its own), and the inherited weights come
    from the checkpoint, not again from the image model."""
    pre = load_config(DEMO, ["model.video.preset=full_small", "model.video.drop_ratio=0.5", "model.embed_dim=32"])
    save_config(pre, tmp_path / "model.yaml")
    text = (tmp_path / "model.yaml").read_text().replace("init_image: ''", f"init_image: {tmp_path / 'gone'}")
    (tmp_path / "model.yaml").write_text(text)
    (tmp_path / "model.pt").write_bytes(b"")
    recipe = REPO_ROOT / "finetune" / "configs" / "anet_retrieval_debug.yaml"
    cfg = load_config(recipe, [("model.init_from", str(tmp_path / "model.pt"))], FinetuneConfig)
    assert cfg.model.video.dims == pre.model.video.dims and cfg.model.embed_dim == 32
    assert cfg.model.video.drop_ratio == 0 and cfg.model.video.init_image == ""
    again = load_config(recipe, [("model.init_from", str(tmp_path / "model.pt")), "model.video.drop_ratio=0.25"],
                        FinetuneConfig)
    assert again.model.video.drop_ratio == 0.25


# ---- data.train_shards as a mixture of sources ----------------------------------------------------------

MIX = "data.train_shards=[{name: webvid, path: data/webvid/train, weight: 2.5}, "


@pytest.mark.parametrize("source, message", [
    ("{name: cc3m, path: data/cc3m/train, wieght: 3}",
     r"unknown config key data\.train_shards\[1\]\.wieght \(did you mean data\.train_shards\[1\]\.weight\?\); "
     r"allowed keys here: name, path, weight, media"),
    ("{name: cc3m, path: data/cc3m/train, weight: lots}",
     r"bad value for data\.train_shards\[1\]\.weight: expected float, got 'lots'"),
    ("{name: cc3m, path: data/cc3m/train, weight: -3}",
     r"data\.train_shards\[1\]\.weight: expected a finite number > 0"),
    ("data/cc3m/train", r"bad value for data\.train_shards\[1\]: expected a mapping of keys, got 'data/cc3m/train'"),
])
def test_a_bad_mixture_source_is_named_by_its_index_and_key(source, message):
    """A value of the list's shape is the list gone wrong inside: the error names the source and the key, not
    "expected str or list" of the whole union."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [MIX + source + "]"])


def test_a_bad_mixture_source_in_yaml_and_a_value_of_neither_shape(tmp_path):
    f = tmp_path / "mix.yaml"
    f.write_text("data:\n  train_shards:\n    - {name: webvid, path: data/webvid/train}\n"
                 "    - {name: cc3m, pth: data/cc3m/train, media: image}\n")
    with pytest.raises(ConfigError, match=r"unknown config key data\.train_shards\[1\]\.pth \(did you mean "
                                          r"data\.train_shards\[1\]\.path\?\)"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"bad value for data\.train_shards: expected str or list of "
                                          r"\{name, path, weight, media\}, got 5"):
        load_config(None, ["data.train_shards=5"])
    with pytest.raises(ConfigError, match=r"bad value for data\.size\[1\]: expected int, got 'wide'"):
        load_config(None, ["data.size=[32, wide]"])


IMAGE_SOURCE = "{name: cc3m, path: data/cc3m/train, weight: 3, media: image}]"


def test_image_losses_empty_is_refused_with_an_image_source_in_the_config():
    with pytest.raises(ConfigError, match=r"bad value for model\.loss\.image_losses: expected a non-empty list .*"
                                          r"data\.train_shards has image sources \(cc3m: media: image\)"):
        load_config(None, [MIX + IMAGE_SOURCE, "model.loss.image_losses=[]"])
    assert load_config(None, [MIX + IMAGE_SOURCE]).model.loss.image_losses == ["vpc", "ssl", "mlm", "vtm"]
    video_only = load_config(None, [MIX + "{name: hdvila, path: data/hdvila/train}]", "model.loss.image_losses=[]"])
    assert video_only.model.loss.image_losses == []


def test_image_losses_empty_is_refused_before_launch_when_an_index_says_image(tmp_path):
    """media left to the set's index.json: the config cannot know, the pre-launch check reads it."""
    from pretrain.prelaunch import check_inputs
    from shards.format import write_index, write_tar

    for name, media in (("videos", "video"), ("images", "image")):
        (tmp_path / name).mkdir()
        write_tar(str(tmp_path / name / "s-000000.tar"), {})
        write_index(str(tmp_path / name), {"format": 1, "media": media, "shards": ["s-000000.tar"], "counts": [0],
                                           "num_samples": 0})
    mix = f"data.train_shards=[{{name: wv, path: {tmp_path / 'videos'}}}, {{name: cc, path: {tmp_path / 'images'}}}]"
    cfg = load_config(None, [mix, "model.loss.image_losses=[]"])  # loads: the config does not say image
    with pytest.raises(ConfigError, match=r"model\.loss\.image_losses: .*data\.train_shards has image sources "
                                          r"\(cc: index\.json says media image\)"):
        check_inputs(cfg, None, ["data.train_shards"])
    check_inputs(load_config(None, [mix]), None, ["data.train_shards"])  # the default image_losses: fine
