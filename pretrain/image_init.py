"""Start the video encoder from an image model: `model.video.init_image: FOLDER`.

FOLDER is what `transformers` writes with `save_pretrained`, or a downloaded hub snapshot (config.json,
model.safetensors / pytorch_model.bin, sharded or not; preprocessor_config.json if present). Families:

    swin                          -> 'htwa' stages (LF-VILA): the 2D patch embedding inflated over time and
                                     tiled to the video patch, each relative-position-bias table resized
                                     (bicubic) to the spatial window and repeated over the temporal offsets,
                                     Swin's blocks onto the video stages in order, patch merging, final norm
    vit, clip, blip, blip-2 vision -> 'divided' (TESTA: temporal attention a copy of the spatial one with a
                                     zero output projection, so it starts as the identity), 'spatial' and
                                     'full' stages; [CLS], position table (interpolated to the input grid
                                     at run time), pre-norm (CLIP), final norm
    'graph' and 'depth' blocks have no image counterpart: they start as the identity (zero output
    projections of the attention and of the MLP). The time embedding starts at zero.

Letters: D width, p image patch, P video patch, W image window, (Wt, Wh, Ww) video window, H heads.
Contract (tests/test_image_init.py): with TESTA merging off and the image model's own window and patch
size, a video whose frames are all one image gives, right after loading, the image model's tokens for
that image at the end of every htwa / divided / spatial / full stage.

The config side (`family_keys`, called by the config loader): what the family has, the encoder gets:
pixel mean and std, [CLS], position table, pre-norm, activation and LayerNorm epsilon are set from the
checkpoint (a different value given in the config is an error); widths, heads, MLP ratio and patch size
must agree with it. The weights side (`load_image`) returns a report of every checkpoint tensor (used,
or unused with the reason) and every encoder parameter (loaded from what, or new with the reason); a
tensor neither used nor expected to be unused, or a parameter neither loaded nor expected to be new,
stops the run with ImageInitError naming them.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("pretrain")

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # Swin's (timm / transformers' image processor)
OPENAI_CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])  # CLIP, BLIP, BLIP-2
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # google/vit-*

# model_type in config.json -> (family, the nested vision config's key in a full multimodal config, or None)
MODEL_TYPES = {"swin": ("swin", None), "vit": ("vit", None), "clip_vision_model": ("clip", None),
               "clip": ("clip", "vision_config"), "blip_vision_model": ("blip", None), "blip": ("blip", "vision_config"),
               "blip_2_vision_model": ("blip2", None), "blip-2": ("blip2", "vision_config")}
# the key of the patch embedding without prefix; the prefix before it is where the vision tensors are
PATCH_KEY = {"swin": "embeddings.patch_embeddings.projection.weight", "vit": "embeddings.patch_embeddings.projection.weight",
             "clip": "embeddings.patch_embedding.weight", "blip": "embeddings.patch_embedding.weight",
             "blip2": "embeddings.patch_embedding.weight"}
# checkpoint tensors a video encoder never uses, by design
EXPECTED_UNUSED = [(r"(^|\.)pooler\.", "the image model's pooler head"),
                   (r"(^|\.)relative_position_index$", "a buffer the encoder computes itself"),
                   (r"(^|\.)mask_token$", "masked-image-modelling token"),
                   (r"(^|\.)position_ids$", "a buffer")]
IMAGE_KINDS = ("htwa", "divided", "spatial", "full")  # stages whose blocks take image layers
NEW_KINDS = ("graph", "depth")  # blocks with no image counterpart: the identity at the start


class ImageInitError(ValueError):
    """The image checkpoint is missing, unreadable, of an unknown family or does not fit the encoder; one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class ImageModel:
    folder: Path
    family: str  # swin | vit | clip | blip | blip2
    config: dict  # the vision config (config.json, or its vision_config)
    preprocessor: dict  # preprocessor_config.json, or {}

    @property
    def depths(self) -> list[int]:
        """Blocks per stage: Swin's stages, or one stage for the ViT families."""
        c = self.config
        return list(c["depths"]) if self.family == "swin" else [c["num_hidden_layers"]]

    def width(self, stage: int = 0) -> int:
        c = self.config
        return c["embed_dim"] * 2 ** stage if self.family == "swin" else c["hidden_size"]

    def heads(self, stage: int = 0) -> int:
        c = self.config
        return c["num_heads"][stage] if self.family == "swin" else c["num_attention_heads"]

    def mlp_ratio(self) -> float:
        c = self.config
        return float(c.get("mlp_ratio", 4.0)) if self.family == "swin" else c["intermediate_size"] / c["hidden_size"]

    def grid(self) -> tuple[int, int]:
        size, p = self.config["image_size"], self.config["patch_size"]
        h, w = (size, size) if isinstance(size, int) else size
        return h // p, w // p


def read_image_model(folder: str | Path) -> ImageModel:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ImageInitError(f"model.video.init_image: {folder} is not a transformers model folder (no config.json)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ImageInitError(f"model.video.init_image: {folder}/config.json is not readable JSON ({e})") from None
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ImageInitError(f"model.video.init_image: {folder} holds a {model_type!r} model; supported: "
                             f"{', '.join(MODEL_TYPES)}")
    family, nested = MODEL_TYPES[model_type]
    vision = config.get(nested, {}) if nested else config
    defaults = {"clip": dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, image_size=224, patch_size=32),
                "blip": dict(hidden_act="gelu", layer_norm_eps=1e-5, image_size=384, patch_size=16),
                "blip2": dict(hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14, qkv_bias=True)}
    vision = {**defaults.get(family, {}), **vision}  # a nested config saved with defaults left out
    preprocessor = {}  # the image processor's settings: its own file, or (transformers 5) inside the processor's
    if (folder / "preprocessor_config.json").is_file():
        preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    elif (folder / "processor_config.json").is_file():
        preprocessor = json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
    if family == "swin" and vision.get("use_absolute_embeddings"):
        raise ImageInitError(f"model.video.init_image: {folder} is a Swin with absolute position embeddings, "
                             "which the htwa encoder does not have")
    return ImageModel(folder, family, vision, preprocessor)


# ---- the config side --------------------------------------------------------------------------


def family_keys(img: ImageModel) -> dict:
    """model.video.* values the image family fixes."""
    c, fam = img.config, img.family
    mean, std = {"swin": IMAGENET, "vit": HALF}.get(fam, OPENAI_CLIP)
    mean, std = img.preprocessor.get("image_mean", mean), img.preprocessor.get("image_std", std)
    vit = fam != "swin"
    return {"pixel_mean": [float(v) for v in mean], "pixel_std": [float(v) for v in std], "cls_token": vit,
            "pos_grid": list(img.grid()) if vit else [], "embed_norm": fam in ("swin", "clip"),
            "activation": "quick_gelu" if c.get("hidden_act") == "quick_gelu" else "gelu",
            "norm_eps": float(c.get("layer_norm_eps", 1e-5)), "mlp_ratio": img.mlp_ratio()}


def check_fit(video, img: ImageModel) -> None:
    """The encoder config `video` (VideoEncoderConfig) can take the image model's weights: ImageInitError if not."""
    where = f"model.video.init_image ({img.family} at {img.folder})"
    for key, value in family_keys(img).items():
        if getattr(video, key) != value:
            raise ImageInitError(f"bad value for model.video.{key}: expected {value!r}, what {where} has "
                                 f"(got {getattr(video, key)!r})")
    if video.patch_size % img.config["patch_size"]:
        raise ImageInitError(f"bad value for model.video.patch_size: expected a multiple of the image model's patch "
                             f"size {img.config['patch_size']} for {where} (got {video.patch_size})")
    kinds = set(video.attention) - set(NEW_KINDS)
    allowed = {"htwa"} if img.family == "swin" else {"divided", "spatial", "full"}
    if not kinds <= allowed:
        raise ImageInitError(f"bad value for model.video.attention: expected only {sorted(allowed)} (and graph, depth) "
                             f"stages for {where} (got {sorted(kinds)})")
    slots = block_slots(video)
    if len(slots) > sum(img.depths):
        raise ImageInitError(f"bad value for model.video.depths: {where} has {sum(img.depths)} blocks, the "
                             f"encoder's {'/'.join(sorted(allowed))} stages need {len(slots)}")
    for (i, j), (s, _) in zip(slots, image_blocks(img)):
        if video.dims[i] != img.width(s) or video.heads[i] != img.heads(s):
            raise ImageInitError(f"bad value for model.video.dims[{i}] / heads[{i}]: expected {img.width(s)} wide "
                                 f"with {img.heads(s)} heads, as the image block it starts from ({where}); got "
                                 f"{video.dims[i]} wide with {video.heads[i]} heads")
    if img.family == "swin":
        if sum(video.downsample) != len(img.depths) - 1:
            raise ImageInitError(f"bad value for model.video.downsample: {where} merges patches "
                                 f"{len(img.depths) - 1} times, the encoder {sum(video.downsample)} times")
        stage_of = dict(zip(slots, (s for s, _ in image_blocks(img))))
        for i, down in enumerate(video.downsample):
            last = stage_of.get((i, video.depths[i] - 1))
            if down and (last is None or last + 1 >= len(img.depths) or
                         (i + 1 < len(video.dims) and stage_of.get((i + 1, 0)) != last + 1)):
                raise ImageInitError(f"bad value for model.video.downsample[{i}]: the image model's patch merging "
                                     f"comes after its stages' ends, {where}")


def block_slots(video) -> list[tuple[int, int]]:
    """(stage, block) of every video block that takes an image block, in order."""
    return [(i, j) for i, kind in enumerate(video.attention) if kind in IMAGE_KINDS for j in range(video.depths[i])]


def image_blocks(img: ImageModel) -> list[tuple[int, int]]:
    """(stage, block) of every image block, in order."""
    return [(s, j) for s, d in enumerate(img.depths) for j in range(d)]


# ---- the weights side ------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: those its index lists (sharded), or the one weights file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ImageInitError(f"model.video.init_image: {folder / index} is not a readable index ({e})") from None
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise ImageInitError(f"model.video.init_image: {folder} has no weights (model.safetensors, pytorch_model.bin or "
                         "a sharded index of them)")


def read_tensors(img: ImageModel, meta: bool = False) -> dict[str, torch.Tensor]:
    """The vision tensors, prefix stripped ("swin.", "vit.", "vision_model.", ... before `embeddings.`: one prefix
    for the whole checkpoint, found from the patch embedding's key over all its files); `meta`: their shapes
    only (tensors on the meta device; nothing is read but the headers)."""
    patch = PATCH_KEY[img.family]
    opened = []  # (path, keys, get(key) -> tensor)
    try:
        for path in weight_files(img.folder):
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                f = safe_open(str(path), framework="pt")
                get = (lambda k, f=f: torch.empty(f.get_slice(k).get_shape(), device="meta")) if meta else f.get_tensor
                opened.append((path, list(f.keys()), get))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                opened.append((path, list(state), lambda k, state=state: state[k].to("meta") if meta else state[k]))
    except ImageInitError:
        raise
    except Exception as e:  # a missing shard, a truncated or foreign file
        raise ImageInitError(f"model.video.init_image: {path} is not readable ({type(e).__name__}: {e})") from None
    found = {k[: -len(patch)] for _, keys, _ in opened for k in keys if k.endswith(patch)}
    if not found:
        raise ImageInitError(f"model.video.init_image: {img.folder} holds no {patch} (under any prefix): not the "
                             f"{img.family} weights its config.json describes")
    prefix = min(found, key=len)
    return {k[len(prefix):]: get(k) for _, keys, get in opened for k in keys if k.startswith(prefix)}


# A source: the checkpoint keys read, and how to make the target tensor from them (and the target's shape).
Make = Callable[[list[torch.Tensor], tuple[int, ...]], torch.Tensor]


@dataclass
class Report:
    image: str
    family: str
    loaded: dict[str, list[str]] = field(default_factory=dict)  # encoder parameter -> checkpoint tensors
    new: dict[str, str] = field(default_factory=dict)  # encoder parameter -> why it has no image counterpart
    unused: dict[str, str] = field(default_factory=dict)  # checkpoint tensor -> why the encoder does not use it
    departures: list[str] = field(default_factory=list)  # where the video encoder differs from the image model

    def summary(self) -> str:
        return (f"video encoder from {self.family} at {self.image}: {len(self.loaded)} parameters loaded, "
                f"{len(self.new)} new, {len(self.unused)} checkpoint tensors unused")

    def to_dict(self) -> dict:
        return {"image": self.image, "family": self.family, "loaded": self.loaded, "new": self.new,
                "unused": self.unused, "departures": self.departures}


def _take(sources: list[torch.Tensor], shape) -> torch.Tensor:
    return sources[0].reshape(shape)


def _cat(sources: list[torch.Tensor], shape) -> torch.Tensor:
    return torch.cat(sources, dim=0).reshape(shape)


def _patch(sources: list[torch.Tensor], shape) -> torch.Tensor:
    """(D, 3, p, p) image kernel -> (D, 3, Pt, P, P): repeated over time / Pt, tiled to P / (P/p)^2."""
    w = sources[0]
    _, _, kt, P, _ = shape
    tiles = P // w.shape[-1]
    w = w.repeat(1, 1, tiles, tiles) / tiles ** 2
    return (w[:, :, None] / kt).repeat(1, 1, kt, 1, 1)


def _swin_merge(sources: list[torch.Tensor], shape) -> torch.Tensor:
    """Swin concatenates the 2x2 neighbours as (0,0), (1,0), (0,1), (1,1) (row, column); PatchMerging as
    (0,0), (0,1), (1,0), (1,1): swap the middle quarters of the 4D axis (the last one)."""
    t = sources[0]
    q = t.shape[-1] // 4
    return torch.cat([t[..., :q], t[..., 2 * q:3 * q], t[..., q:2 * q], t[..., 3 * q:]], dim=-1).reshape(shape)


class Plan:
    """Which checkpoint tensors make which encoder parameter; `run` checks and copies."""

    def __init__(self, encoder, tensors: dict[str, torch.Tensor], report: Report):
        self.encoder, self.tensors, self.report = encoder, tensors, report
        self.params = dict(encoder.named_parameters())
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self.values: dict[str, torch.Tensor] = {}

    def load(self, target: str, keys: list[str], make: Make = _take) -> None:
        if not keys:  # the image model has no such tensor by its config (no query/key/value bias)
            return self.new(target, "the image model has none (its config says so): zero", zero=True)
        absent = [k for k in keys if k not in self.tensors]
        if absent:
            self.missing += absent
            return
        self.used.update(keys)
        shape = tuple(self.params[target].shape)
        try:
            value = make([self.tensors[k].float() for k in keys], shape)
        except RuntimeError:
            value = None
        if value is None or tuple(value.shape) != shape:
            got = [tuple(self.tensors[k].shape) for k in keys]
            self.mismatched.append(f"{target} {shape} from {', '.join(keys)} {got}")
            return
        self.values[target] = value
        self.report.loaded[target] = keys

    def new(self, target: str, reason: str, zero: bool = False) -> None:
        if zero:
            self.values[target] = torch.zeros(self.params[target].shape)
        self.report.new[target] = reason


def _vit_block(img: ImageModel, tensors: dict, k: int) -> dict[str, tuple[list[str], Make]]:
    """Image layer k of a ViT family as {our name: (checkpoint keys, make)}: ln1, qkv, proj, ln2, fc1, fc2."""
    fam = img.family
    if fam == "vit":
        p = f"encoder.layer.{k}."
        a = p + "attention.attention."
        out = {"ln1": p + "layernorm_before", "proj": p + "attention.output.dense", "ln2": p + "layernorm_after",
               "fc1": p + "intermediate.dense", "fc2": p + "output.dense"}
        qkv = ([a + "query.weight", a + "key.weight", a + "value.weight"], [a + "query.bias", a + "key.bias", a + "value.bias"])
    else:
        p = f"encoder.layers.{k}."
        out = {"ln1": p + "layer_norm1", "ln2": p + "layer_norm2", "fc1": p + "mlp.fc1", "fc2": p + "mlp.fc2",
               "proj": p + ("self_attn.out_proj" if fam == "clip" else "self_attn.projection")}
        a = p + "self_attn."
        if fam == "clip":
            qkv = ([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                   [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"])
        else:
            qkv = ([a + "qkv.weight"], [a + "qkv.bias"])
    spec = {}
    for name, key in out.items():
        spec[f"{name}.weight"] = ([key + ".weight"], _take)
        spec[f"{name}.bias"] = ([key + ".bias"], _take)
    spec["qkv.weight"] = (qkv[0], _cat)
    if fam == "blip2" and qkv[1][0] not in tensors and a + "q_bias" in tensors:  # EVA: q and v biases, no k bias
        spec["qkv.bias"] = ([a + "q_bias", a + "v_bias"], lambda s, shape: torch.cat([s[0], torch.zeros_like(s[0]), s[1]]))
    elif not img.config.get("qkv_bias", True):
        spec["qkv.bias"] = ([], lambda s, shape: torch.zeros(shape))  # no query/key/value bias: zero
    else:
        spec["qkv.bias"] = (qkv[1], _cat)
    return spec


def _swin_block(s: int, j: int) -> dict[str, tuple[list[str], Make]]:
    p = f"encoder.layers.{s}.blocks.{j}."
    a = p + "attention.self."
    spec = {}
    for name, key in {"ln1": "layernorm_before", "proj": "attention.output.dense", "ln2": "layernorm_after",
                      "fc1": "intermediate.dense", "fc2": "output.dense"}.items():
        spec[f"{name}.weight"] = ([p + key + ".weight"], _take)
        spec[f"{name}.bias"] = ([p + key + ".bias"], _take)
    spec["qkv.weight"] = ([a + "query.weight", a + "key.weight", a + "value.weight"], _cat)
    spec["qkv.bias"] = ([a + "query.bias", a + "key.bias", a + "value.bias"], _cat)
    spec["bias_table"] = ([a + "relative_position_bias_table"], _take)  # inflated by the caller
    return spec


def inflate_bias_table(table: torch.Tensor, shape: tuple[int, int], window: tuple[int, int, int]) -> torch.Tensor:
    """(H, 2W-1, 2W-1) 2D table -> (size, H) 3D table for `window` (Wt, Wh, Ww): bicubic to (2Wh-1, 2Ww-1)
    when it differs, then the same for every temporal offset."""
    size, H = shape
    Wt, Wh, Ww = window
    target = (2 * Wh - 1, 2 * Ww - 1)
    if tuple(table.shape[1:]) != target:
        table = F.interpolate(table[None], size=target, mode="bicubic", align_corners=False)[0]
    table = table.permute(1, 2, 0).reshape(1, -1, H).expand(2 * Wt - 1, -1, -1)  # (2Wt-1, (2Wh-1)(2Ww-1), H)
    return table.reshape(size, H)


def load_image(encoder, folder: str | Path, dry_run: bool = False) -> Report:
    """Initialise `encoder` (pretrain.video_encoder.VideoEncoder) from the image model in `folder`; see the
    module docstring. Raises ImageInitError on anything unexpected, before any parameter is changed.
    `dry_run`: only the mapping and its checks, from the checkpoint's shapes (the encoder may be on the
    meta device): the pre-launch check."""
    img = read_image_model(folder)
    cfg = encoder.cfg
    check_fit(cfg, img)
    tensors = read_tensors(img, meta=dry_run)
    report = Report(str(folder), img.family)
    plan = Plan(encoder, tensors, report)
    fam = img.family
    # embeddings
    patch_key = PATCH_KEY[fam]
    plan.load("patch_embed.weight", [patch_key], _patch)
    bias_key = patch_key.replace(".weight", ".bias")
    if bias_key in tensors:
        plan.load("patch_embed.bias", [bias_key])
    else:
        plan.new("patch_embed.bias", f"{fam}'s patch embedding has no bias: zero", zero=True)
    if cfg.patch_size != img.config["patch_size"]:
        report.departures.append(f"patch {cfg.patch_size} from the image model's {img.config['patch_size']}: kernel "
                                 "tiled and divided by the number of tiles")
    plan.new("time_pos", "no image counterpart: zero (frames start alike)", zero=True)
    if fam == "swin":
        plan.load("embed_norm.weight", ["embeddings.norm.weight"])
        plan.load("embed_norm.bias", ["embeddings.norm.bias"])
        final_norm(plan, "layernorm", img.width(len(img.depths) - 1))
    else:
        cls_key = {"vit": "embeddings.cls_token"}.get(fam, "embeddings.class_embedding")
        pos_key = {"vit": "embeddings.position_embeddings", "clip": "embeddings.position_embedding.weight"}.get(
            fam, "embeddings.position_embedding")
        plan.load("cls", [cls_key])
        plan.load("cls_pos", [pos_key], lambda s, shape: s[0].reshape(-1, s[0].shape[-1])[:1].reshape(shape))
        plan.load("pos", [pos_key], lambda s, shape: s[0].reshape(-1, s[0].shape[-1])[1:])
        report.departures.append("the [CLS] token joins attention but not the pooling: video and clip features are "
                                 "the size-weighted means of the patch tokens")
        final = "layernorm" if fam == "vit" else "post_layernorm"
        final_norm(plan, final, img.width())
        if fam == "clip":
            plan.load("embed_norm.weight", ["pre_layrnorm.weight"])
            plan.load("embed_norm.bias", ["pre_layrnorm.bias"])
            report.departures.append("CLIP's post_layernorm (its pooled [CLS] only) becomes the encoder's final norm "
                                     "over every token")
        if fam == "blip2" and any(k.endswith("q_bias") for k in tensors):
            report.departures.append("EVA's attention has no key bias: the fused qkv's key bias starts at zero "
                                     "(a key bias does not change attention)")
    # blocks
    slots = block_slots(cfg)
    sources = image_blocks(img)
    for (i, j), (s, k) in zip(slots, sources):
        kind = cfg.attention[i]
        path = f"stages.{i}.{j}."
        if fam == "swin":
            spec = _swin_block(s, k)
            w2 = img.config["window_size"]
            if i == slots[0][0] and j == 0 and tuple(cfg.spatial_window) != (w2, w2):
                report.departures.append(f"relative-position bias tables resized (bicubic) from the image model's "
                                         f"{w2}x{w2} window to {cfg.spatial_window[0]}x{cfg.spatial_window[1]}")
            if (k % 2 == 1) != (j % 2 == 1):
                report.departures.append(f"stages.{i}.{j}: Swin block {s}.{k} is {'' if k % 2 else 'not '}shifted, the "
                                         "video block is the other way")
        else:
            index = sum(img.depths[:s]) + k
            spec = _vit_block(img, tensors, index)
        targets = {"htwa": {"ln1": "norm1", "qkv": "attn.attn.qkv", "proj": "attn.attn.proj", "ln2": "norm2",
                            "fc1": "mlp.0", "fc2": "mlp.2", "bias_table": "attn.attn.bias_table"},
                   "divided": {"ln1": "norm_s", "qkv": "spatial.qkv", "proj": "spatial.proj", "ln2": "norm2",
                               "fc1": "mlp.0", "fc2": "mlp.2"},
                   }.get(kind, {"ln1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "ln2": "norm2",
                               "fc1": "mlp.0", "fc2": "mlp.2"})
        for name, (keys, make) in spec.items():
            base, _, leaf = name.partition(".")
            target = path + targets[base] + (f".{leaf}" if leaf else "")
            if base == "bias_table":
                window = (cfg.temporal_windows[i], *cfg.spatial_window)
                w2 = img.config["window_size"]
                plan.load(target, keys, lambda src, shape, w=window, w2=w2: _inflate_swin(src, shape, w, w2))
            else:
                plan.load(target, keys, make)
        if kind == "divided":  # TESTA: the temporal branch a copy of the spatial one, its output projection zero
            for leaf in ("weight", "bias"):
                plan.load(f"{path}norm_t.{leaf}", spec[f"ln1.{leaf}"][0])
                plan.load(f"{path}temporal.qkv.{leaf}", spec[f"qkv.{leaf}"][0], spec[f"qkv.{leaf}"][1])
                plan.new(f"{path}temporal.proj.{leaf}", "temporal attention's output projection: zero, so the "
                         "temporal branch starts as the identity", zero=True)
    if len(sources) > len(slots):
        report.departures.append(f"the encoder takes the first {len(slots)} of the image model's {len(sources)} blocks")
    # patch merging (Swin): the k-th downsampling of the encoder takes Swin's k-th
    if fam == "swin":
        merges = [i for i, down in enumerate(cfg.downsample) if down]
        for s, i in enumerate(merges):
            last = cfg.depths[i]
            d = f"encoder.layers.{s}.downsample."
            plan.load(f"stages.{i}.{last}.norm.weight", [d + "norm.weight"], _swin_merge)
            plan.load(f"stages.{i}.{last}.norm.bias", [d + "norm.bias"], _swin_merge)
            plan.load(f"stages.{i}.{last}.reduce.weight", [d + "reduction.weight"], _swin_merge)
    else:  # a ViT has no patch merging: the encoder's 2x2 merges are new
        if any(cfg.downsample):
            report.departures.append("2x2 patch merging (new) after a ViT's blocks; the [CLS] token ends there")
        for i, down in enumerate(cfg.downsample):
            if down:
                for name, _ in encoder.stages[i][cfg.depths[i]].named_parameters():
                    plan.new(f"stages.{i}.{cfg.depths[i]}.{name}", f"2x2 patch merging: {fam} has none")
    # blocks with no image counterpart, and the other new modules
    for i, kind in enumerate(cfg.attention):
        if kind in NEW_KINDS:
            for j in range(cfg.depths[i]):
                for name, _ in encoder.stages[i][j].named_parameters():
                    target = f"stages.{i}.{j}.{name}"
                    zero = name.startswith(("attn.proj.", "mlp.2."))
                    plan.new(target, f"{kind} attention has no image counterpart" +
                             ("; zero, so the block starts as the identity" if zero else ""), zero=zero)
    for name in plan.params:
        if name.startswith(("clip_norm.", "depth_embed.")) and name not in report.loaded:
            plan.new(name, "clip-feature norm (no image counterpart)" if name.startswith("clip_norm.")
                     else "depth embedding (no image counterpart)")
    _finish(plan, tensors, len(slots), len(sources), img)
    if dry_run:
        return report
    with torch.no_grad():
        for name, value in plan.values.items():
            plan.params[name].copy_(value.to(plan.params[name].dtype))
    return report


def _inflate_swin(sources, shape, window, window_2d):
    table = sources[0]  # ((2W-1)^2, H)
    H, n = table.shape[1], 2 * window_2d - 1
    if table.shape[0] != n * n:
        return table  # reported as a shape mismatch
    return inflate_bias_table(table.T.reshape(H, n, n), shape, window)


def final_norm(plan: Plan, key: str, width: int) -> None:
    """The image model's final norm for the encoder's, when the widths agree (else new)."""
    if plan.encoder.cfg.dims[-1] == width:
        plan.load("norm.weight", [key + ".weight"])
        plan.load("norm.bias", [key + ".bias"])
        return
    for leaf in ("weight", "bias"):
        plan.new(f"norm.{leaf}", f"the encoder ends {plan.encoder.cfg.dims[-1]} wide, the image model's final norm is "
                                 f"{width} wide")
        plan.used.add(f"{key}.{leaf}")
        plan.report.unused[f"{key}.{leaf}"] = "the encoder's final width differs"


def _finish(plan: Plan, tensors: dict, taken: int, available: int, img: ImageModel) -> None:
    """Classify the unused tensors and the parameters nothing loaded; raise on anything unexpected."""
    report = plan.report
    if img.family == "swin":
        deeper = re.compile(r"encoder\.layers\.(\d+)\.(blocks\.(\d+)\.|downsample\.)")
        blocks = image_blocks(img)
        taken_blocks = set(blocks[:taken])
    else:
        deeper = re.compile(r"encoder\.layers?\.(\d+)\.")
    unexpected = []
    for key in tensors:
        if key in plan.used:
            continue
        reason = next((why for pattern, why in EXPECTED_UNUSED if re.search(pattern, key)), None)
        m = deeper.match(key)
        if reason is None and m is not None:
            if img.family == "swin" and m.group(3) is not None and (int(m.group(1)), int(m.group(3))) not in taken_blocks:
                reason = f"image block beyond the encoder's {taken}"
            elif img.family != "swin" and int(m.group(1)) >= taken:
                reason = f"image layer beyond the encoder's {taken}"
            elif img.family == "swin" and m.group(2) == "downsample." and int(m.group(1)) >= sum(
                    plan.encoder.cfg.downsample):
                reason = "patch merging beyond the encoder's"
        if reason is None:
            unexpected.append(key)
        else:
            report.unused[key] = reason
    not_loaded = [n for n in plan.params if n not in report.loaded and n not in report.new]
    problems = []
    if plan.missing:
        problems.append(f"{len(plan.missing)} expected tensors missing from the checkpoint: {', '.join(plan.missing[:10])}")
    if plan.mismatched:
        problems.append(f"{len(plan.mismatched)} with another shape: {'; '.join(plan.mismatched[:10])}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors the mapping does not know: {', '.join(unexpected[:10])}")
    if not_loaded:
        problems.append(f"{len(not_loaded)} encoder parameters nothing loads: {', '.join(not_loaded[:10])}")
    if problems:
        raise ImageInitError(f"model.video.init_image: {img.folder} ({img.family}) does not map onto the video "
                             f"encoder: {'; '.join(problems)}")


def init_from_image(encoder, folder: str | Path) -> Report:
    """`load_image`, logged: the summary, and every departure from the image model."""
    report = load_image(encoder, folder)
    log.info("%s", report.summary())
    for what, table in (("new", report.new), ("unused", report.unused)):
        by_reason: dict[str, list[str]] = {}
        for name, reason in table.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            more = f", ... ({len(names) - 3} more)" if len(names) > 3 else ""
            log.info("  %s (%s): %s%s", what, reason, ", ".join(names[:3]), more)
    for line in report.departures:
        log.info("  departs from the image model: %s", line)
    return report


def save_report(report: Report, path: str | Path) -> None:
    """The whole mapping (every tensor and parameter) as JSON, e.g. RUN/image_init.json."""
    Path(path).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
