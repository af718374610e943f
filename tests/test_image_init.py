"""model.video.init_image: tiny randomly initialised `transformers` image models of every family, saved to a
temporary folder, loaded into the video encoder. The contract: a video whose frames are all one image gives,
right after loading, the image model's own tokens at the end of every htwa / divided / spatial / full stage."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.image_init import ImageInitError, family_keys, load_image, read_image_model
from pretrain.video_encoder import VideoEncoder, VideoEncoderConfig

transformers = pytest.importorskip("transformers")

IMAGE = 32  # pixels
FRAMES = 4


def vit_family(name: str, folder, layers: int = 3):
    """A tiny ViT-family image model (4x4 patches of 8 pixels, 32 wide, MLP ratio 2) saved to `folder`."""
    kw = dict(image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
              intermediate_size=64)
    classes = {"vit": ("ViTModel", "ViTConfig"), "clip": ("CLIPVisionModel", "CLIPVisionConfig"),
               "blip": ("BlipVisionModel", "BlipVisionConfig"), "blip2": ("Blip2VisionModel", "Blip2VisionConfig")}
    model_cls, config_cls = (getattr(transformers, n) for n in classes[name])
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw)).eval()
    _perturb(model)
    model.save_pretrained(folder)
    return model


def swin(folder):
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[2, 4], num_heads=[2, 4],
                                  window_size=4)
    model = transformers.SwinModel(cfg).eval()
    _perturb(model)
    model.save_pretrained(folder)
    return model


def _perturb(model):
    """Random init leaves LayerNorms at 1/0 and biases at 0: make every tensor matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def encoder(folder, **kw) -> VideoEncoder:
    base = dict(max_frames=8, temporal_windows=[1] * len(kw["dims"]), downsample=[False] * len(kw["dims"]),
                merge_frames=[0] * len(kw["dims"]), merge_patches=[0] * len(kw["dims"]), clip_features="final",
                local_stage=len(kw["dims"]) - 1)
    cfg = VideoEncoderConfig(**{**base, **kw, **family_keys(read_image_model(folder))})
    torch.manual_seed(1)
    enc = VideoEncoder(cfg).eval()
    report = load_image(enc, folder)
    return enc, report


def stage_outputs(enc: VideoEncoder, video: torch.Tensor, depth=None) -> list:
    outs = []
    hooks = [s.register_forward_hook(lambda m, i, o: outs.append(o)) for s in enc.stages]
    with torch.no_grad():
        enc(video, num_clips=1, depth=depth)
    for h in hooks:
        h.remove()
    return outs


def image_and_video():
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (1, 3, IMAGE, IMAGE), generator=g).float()
    return image, image[:, None].expand(1, FRAMES, 3, IMAGE, IMAGE).contiguous()


def pixels(image, enc):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (enc.cfg.pixel_mean, enc.cfg.pixel_std))
    return (image / 255 - mean) / std


def video_tokens(t) -> torch.Tensor:
    """(FRAMES, [1 +] N, D): every frame's tokens, the [CLS] in front when there is one."""
    x = t.x[0]
    return torch.cat([t.cls[0].expand(x.shape[0], 1, -1), x], dim=1) if t.cls is not None else x


def assert_every_frame(t, reference: torch.Tensor, what: str):
    got = video_tokens(t)
    assert got.shape[0] == FRAMES
    err = (got - reference[0]).abs().max().item()
    assert err < 1e-5, f"{what}: max abs difference {err}"


LAYOUTS = {  # attention -> stages (dims, depths, heads) taking the image model's 3 layers
    "divided": dict(dims=[32, 32], depths=[1, 2], heads=[2, 2], attention=["divided", "divided"]),
    "spatial": dict(dims=[32], depths=[3], heads=[2], attention=["spatial"]),
    "full": dict(dims=[32, 32], depths=[2, 1], heads=[2, 2], attention=["full", "full"]),
}


@pytest.mark.parametrize("family", ["vit", "clip", "blip", "blip2"])
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_vit_families_start_where_the_image_model_is(tmp_path, family, kind):
    model = vit_family(family, tmp_path)
    enc, report = encoder(tmp_path, patch_size=8, **LAYOUTS[kind])
    image, video = image_and_video()
    with torch.no_grad():
        hidden = model(pixel_values=pixels(image, enc), output_hidden_states=True).hidden_states
    outs = stage_outputs(enc, video)
    ends = torch.tensor(LAYOUTS[kind]["depths"]).cumsum(0).tolist()
    for i, end in enumerate(ends):
        assert_every_frame(outs[i], hidden[end], f"{family} {kind} stage {i}")
    with torch.no_grad():  # the final norm: ViT's layernorm, BLIP's post_layernorm; CLIP's on its pooled [CLS]
        out = model(pixel_values=pixels(image, enc))
        final = enc.norm(video_tokens(outs[-1]))
    if family == "clip":
        assert (final[:, 0] - out.pooler_output).abs().max() < 1e-5
    else:
        assert (final - out.last_hidden_state[0]).abs().max() < 1e-5
    assert report.family == family
    assert not [k for k in report.new if not k.startswith(("time_pos", "clip_norm", "patch_embed.bias")) and
                "temporal.proj" not in k]
    if kind == "divided":  # the temporal branch is a copy of the spatial one with a zero output projection
        blk = enc.stages[0][0]
        assert torch.equal(blk.temporal.qkv.weight, blk.spatial.qkv.weight)
        assert blk.temporal.proj.weight.abs().sum() == 0


def test_swin_into_htwa_stages_split_like_lfvila(tmp_path):
    """Swin depths [2, 4] onto video stages [2 | 2, 2] (LF-VILA splits Swin-B's 18 blocks into 14 + 2 + 2);
    temporal windows 2 and 4 over 4 identical frames, the image model's 4x4 window and patch 4."""
    model = swin(tmp_path)
    enc, report = encoder(tmp_path, patch_size=4, dims=[16, 32, 32], depths=[2, 2, 2], heads=[2, 4, 4],
                          attention=["htwa"] * 3, temporal_windows=[2, 4, 4], spatial_window=[4, 4],
                          downsample=[True, False, False])
    image, video = image_and_video()
    blocks = []  # every Swin block's output tokens, in order
    hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.encoder.layers for b in layer.blocks]
    with torch.no_grad():
        hidden = model(pixel_values=pixels(image, enc), output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    assert len(blocks) == 6
    outs = stage_outputs(enc, video)
    assert_every_frame(outs[0], hidden[1], "stage 0 (after patch merging)")  # Swin stage 0 + its merge
    assert_every_frame(outs[1], blocks[3], "stage 1 (Swin stage 1, block 1)")
    assert_every_frame(outs[2], blocks[5], "stage 2 (Swin stage 1, block 3)")
    assert report.departures == []
    assert set(report.new) == {"time_pos", "clip_norm.weight", "clip_norm.bias"}
    # the inflated bias table: every temporal offset holds the 2D table
    table = enc.stages[0][0].attn.attn.bias_table.view(3, 49, 2)
    assert torch.equal(table[0], table[2])


def test_swin_tiled_patch_and_resized_window(tmp_path):
    """LF-VILA's case: patch 8 from Swin's 4 (tiled, divided by 4), window 2x4 from 4x4 (bicubic): loads and runs."""
    swin(tmp_path)
    enc, report = encoder(tmp_path, patch_size=8, dims=[16, 32], depths=[2, 4], heads=[2, 4], attention=["htwa"] * 2,
                          temporal_windows=[2, 4], spatial_window=[2, 4], downsample=[True, False])
    w = enc.patch_embed.weight  # (16, 3, 1, 8, 8): each 4x4 tile is the image kernel / 4
    assert torch.allclose(w[..., :4, :4], w[..., 4:, 4:]) and torch.allclose(w[..., :4, :4], w[..., 4:, :4])
    table = enc.stages[0][0].attn.attn.bias_table.view(3, 3, 7, 2)  # (temporal, h, w offsets, heads)
    image = load_file(tmp_path / "model.safetensors")["encoder.layers.0.blocks.0.attention.self.relative_position_bias_table"]
    expected = torch.nn.functional.interpolate(image.T.reshape(1, 2, 7, 7), size=(3, 7), mode="bicubic",
                                               align_corners=False)[0].permute(1, 2, 0)  # (3, 7, heads)
    assert all(torch.allclose(table[t], expected, atol=1e-6) for t in range(3))
    assert any("patch 8" in d for d in report.departures)
    _, video = image_and_video()
    with torch.no_grad():
        clips, feat = enc(video, num_clips=1)
    assert torch.isfinite(feat).all()


@pytest.mark.parametrize("kind", ["graph", "depth"])
def test_graph_and_depth_blocks_start_as_the_identity(tmp_path, kind):
    vit_family("blip2", tmp_path)
    enc, report = encoder(tmp_path, patch_size=8, dims=[32, 32], depths=[3, 1], heads=[2, 2],
                          attention=["spatial", kind])
    _, video = image_and_video()
    depth = torch.rand(1, FRAMES, IMAGE, IMAGE) if kind == "depth" else None
    outs = stage_outputs(enc, video, depth)
    assert torch.allclose(outs[1].x, outs[0].x, atol=1e-6) and torch.allclose(outs[1].cls, outs[0].cls, atol=1e-6)
    assert all(k in report.new for k in ("stages.1.0.attn.proj.weight", "stages.1.0.mlp.2.weight"))


def test_a_renamed_tensor_stops_the_load_and_is_named(tmp_path):
    vit_family("vit", tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    state["encoder.layer.1.attention.attention.kee.weight"] = state.pop("encoder.layer.1.attention.attention.key.weight")
    save_file(state, path)
    with pytest.raises(ImageInitError) as e:
        encoder(tmp_path, patch_size=8, **LAYOUTS["spatial"])
    text = str(e.value)
    assert "encoder.layer.1.attention.attention.key.weight" in text and "kee.weight" in text


def test_unused_layers_and_pooler_are_listed(tmp_path):
    vit_family("vit", tmp_path, layers=3)
    enc, report = encoder(tmp_path, patch_size=8, dims=[32], depths=[2], heads=[2], attention=["spatial"])
    assert report.unused["pooler.dense.weight"].startswith("the image model's pooler")
    assert "beyond" in report.unused["encoder.layer.2.output.dense.weight"]
    assert any("first 2 of the image model's 3" in d for d in report.departures)
    json.dumps(report.to_dict())


SMALL = {  # the CPU presets, each from a tiny image model of its paper's family, sized to fit it
    "lfvila_small": ("SwinModel", "SwinConfig", dict(image_size=64, patch_size=4, embed_dim=64, depths=[1, 3],
                                                     num_heads=[2, 4], window_size=4)),
    "testa_small": ("BlipVisionModel", "BlipVisionConfig", dict(image_size=64, patch_size=8, hidden_size=96,
                                                                num_hidden_layers=4, num_attention_heads=4,
                                                                intermediate_size=384)),
    "stgt_small": ("Blip2VisionModel", "Blip2VisionConfig", dict(image_size=64, patch_size=8, hidden_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=2,
                                                                 intermediate_size=256)),
    # any ViT family fits a ViT-family preset: CLIP into TESTA's, a plain ViT into STGT's
    "testa_small/clip": ("CLIPVisionModel", "CLIPVisionConfig", dict(image_size=64, patch_size=8, hidden_size=96,
                                                                     num_hidden_layers=4, num_attention_heads=4,
                                                                     intermediate_size=384)),
    "stgt_small/vit": ("ViTModel", "ViTConfig", dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=256)),
}


@pytest.mark.parametrize("preset", SMALL)
def test_the_small_presets_load_a_tiny_image_model_of_their_family(tmp_path, preset):
    """dast_small cannot: its divided stage is 128 wide after a downsampling, no single-width ViT fits it (the
    DAST recipe runs at one width)."""
    from pretrain.video_encoder import preset_values

    model_cls, config_cls, kw = SMALL[preset]
    torch.manual_seed(0)
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).save_pretrained(tmp_path)
    cfg = VideoEncoderConfig(**{**preset_values(preset.split("/")[0]), **family_keys(read_image_model(tmp_path))})
    enc = VideoEncoder(cfg)
    report = load_image(enc, tmp_path)
    expected = ("beyond", "pooler", "final width differs")
    assert report.loaded and not [k for k, why in report.unused.items() if not any(e in why for e in expected)]
    with torch.no_grad():
        clips, feat = enc(torch.randint(0, 256, (1, 8, 3, 64, 64)).float(), num_clips=2)
    assert torch.isfinite(feat).all()


def test_a_sharded_multimodal_checkpoint_reads_only_its_vision_tensors(tmp_path):
    """A hub-style CLIPModel (text and vision towers, `vision_model.` prefix) in many safetensors shards with an
    index, and its image processor's statistics inside processor_config.json (transformers 5's layout)."""
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=dict(**kw, vocab_size=99),
                                                          vision_config=dict(**kw, image_size=IMAGE, patch_size=8)))
    _perturb(clip)
    clip.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 3
    stats = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": stats}))
    enc, report = encoder(tmp_path, patch_size=8, **LAYOUTS["spatial"])
    assert (enc.cfg.pixel_mean, enc.cfg.pixel_std) == (stats["image_mean"], stats["image_std"])
    assert all(k.startswith(("embeddings.", "encoder.", "pre_layrnorm", "post_layernorm")) for k in report.unused)
    image, video = image_and_video()
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=pixels(image, enc), output_hidden_states=True).hidden_states
    assert_every_frame(stage_outputs(enc, video)[0], hidden[3], "sharded CLIP")


def test_no_qkv_bias_starts_at_zero(tmp_path):
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                                         num_attention_heads=2, intermediate_size=64, qkv_bias=False)).eval()
    _perturb(model)
    model.save_pretrained(tmp_path)
    enc, report = encoder(tmp_path, patch_size=8, **LAYOUTS["spatial"])
    assert "stages.0.0.attn.qkv.bias" in report.new and enc.stages[0][0].attn.qkv.bias.abs().sum() == 0
    image, video = image_and_video()
    with torch.no_grad():
        hidden = model(pixel_values=pixels(image, enc), output_hidden_states=True).hidden_states
    assert_every_frame(stage_outputs(enc, video)[0], hidden[3], "ViT without qkv bias")


def test_the_weights_side_refuses_keys_that_disagree_with_the_family(tmp_path):
    from pretrain.image_init import check_fit

    vit_family("clip", tmp_path)
    good = VideoEncoderConfig(patch_size=8, temporal_windows=[1], downsample=[False], merge_frames=[0], merge_patches=[0],
                              clip_features="final", local_stage=0, **LAYOUTS["spatial"],
                              **family_keys(read_image_model(tmp_path)))
    check_fit(good, read_image_model(tmp_path))
    for key, value in (("activation", "gelu"), ("norm_eps", 1e-3), ("cls_token", False)):
        with pytest.raises(ImageInitError, match=f"bad value for model.video.{key}: expected"):
            check_fit(dataclasses.replace(good, **{key: value}), read_image_model(tmp_path))


def test_wrong_width_is_refused_before_loading(tmp_path):
    vit_family("clip", tmp_path)
    with pytest.raises(ImageInitError, match=r"model.video.dims\[0\] / heads\[0\]: expected 32 wide"):
        encoder(tmp_path, patch_size=8, dims=[64], depths=[3], heads=[2], attention=["spatial"])


# ---- through the config, the pre-launch check and a real 2-rank run -------------------------------------


def tiny_swin(folder):
    """A Swin that fits the `debug` preset: patch 4 (the video's 8 tiles it), 16 -> 32 wide, 2 heads, window 2."""
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                  window_size=2, mlp_ratio=2.0)
    model = transformers.SwinModel(cfg)
    _perturb(model)
    model.save_pretrained(folder)
    return model


DEBUG = ["model.video.preset=debug", "model.video.local_stage=0", "data.size=32", "data.frames_per_clip=2"]


def test_the_config_takes_the_family_keys_and_refuses_others(tmp_path):
    from pretrain.config import ConfigError, load_config
    from pretrain.image_init import OPENAI_CLIP

    vit_family("clip", tmp_path / "clip")
    video = ["model.video.patch_size=8", "model.video.dims=[32]", "model.video.depths=[3]", "model.video.heads=[2]",
             "model.video.attention=[spatial]", "model.video.temporal_windows=[1]", "model.video.downsample=[false]",
             "model.video.merge_frames=[0]", "model.video.merge_patches=[0]", "model.video.clip_features=final",
             "model.video.local_stage=0", "data.size=32", f"model.video.init_image={tmp_path / 'clip'}"]
    v = load_config(None, video).model.video
    assert (v.activation, v.cls_token, v.pos_grid, v.embed_norm, v.norm_eps, v.mlp_ratio) == ("quick_gelu", True, [4, 4],
                                                                                              True, 1e-5, 2.0)
    assert (v.pixel_mean, v.pixel_std) == tuple(OPENAI_CLIP)
    with pytest.raises(ConfigError, match="bad value for model.video.activation: the image model .* fixes it to 'quick_gelu'"):
        load_config(None, video + ["model.video.activation=gelu"])
    with pytest.raises(ConfigError, match=r"model.video.dims\[0\] / heads\[0\]: expected 32 wide with 2 heads"):
        load_config(None, video + ["model.video.dims=[64]"])
    with pytest.raises(ConfigError, match="is not a transformers model folder"):
        load_config(None, video[:-1] + [f"model.video.init_image={tmp_path / 'nothing'}"])


def test_a_renamed_tensor_is_named_before_launch(tmp_path, capsys):
    from test_prelaunch import argv, fails, make_split

    tiny_swin(tmp_path / "swin")
    path = tmp_path / "swin" / "model.safetensors"
    state = load_file(path)
    state["encoder.layers.1.blocks.0.attention.self.query.weigth"] = state.pop(
        "encoder.layers.1.blocks.0.attention.self.query.weight")
    save_file(state, path)
    splits = make_split(tmp_path / "data" / "train"), make_split(tmp_path / "data" / "val")
    err = fails("pretrain", argv("pretrain", tmp_path, splits, *DEBUG, f"model.video.init_image={tmp_path / 'swin'}"),
                capsys)
    assert err.startswith("input error: model.video.init_image:")
    assert "encoder.layers.1.blocks.0.attention.self.query.weight" in err and "query.weigth" in err


def test_a_two_rank_run_starts_from_the_image_model_and_reports_the_mapping(tmp_path, data):
    """pretrain/run.py on 2 ranks from a tiny Swin: RUN/image_init.json lists the mapping, and after one step at a
    learning rate of 1e-9 the checkpoint's encoder weights are the inflated image weights."""
    from test_pretrain_e2e import launch

    from pretrain.weights import read_state_dict

    tiny_swin(tmp_path / "swin")
    run = tmp_path / "run"
    launch(run, data, 1, f"model.video.init_image={tmp_path / 'swin'}", "train.lr=1e-9", "train.text_lr=1e-9",
           "train.warmup_steps=0", "train.eval_at_end=false", "train.save_every=1")
    report = json.loads((run / "image_init.json").read_text())
    assert report["family"] == "swin" and set(report["new"]) == {"time_pos", "clip_norm.weight", "clip_norm.bias"}
    assert report["loaded"]["stages.0.0.attn.attn.qkv.weight"] == [
        f"encoder.layers.0.blocks.0.attention.self.{n}.weight" for n in ("query", "key", "value")]
    state = read_state_dict(run / "checkpoints")
    image = load_file(tmp_path / "swin" / "model.safetensors")
    q, k, v = (image[f"encoder.layers.1.blocks.0.attention.self.{n}.weight"] for n in ("query", "key", "value"))
    assert torch.allclose(state["video.stages.1.0.attn.attn.qkv.weight"], torch.cat([q, k, v]), atol=1e-6)
    assert torch.allclose(state["video.norm.weight"], image["layernorm.weight"], atol=1e-6)
    assert state["video.time_pos"].abs().max() < 1e-6
