"""The video-language model: hierarchical encoders, projection heads, fusion stack and objectives.

Letters: B batch, M clips = sentences per video, L tokens per sentence, E embedding width.
M and the frame count T are read from each batch, never from the data config.
Which objectives run, and their weights, is `model.loss`: stage 1 is contrastive (VPC + MTC, or
STGT's self-similarity loss), stage 2 is MLM + VTM over a frozen stage-1 model (`model.freeze`,
`model.init_from`). The model knows nothing of DeepSpeed or process groups: the caller passes
`gather`, which concatenates a tensor over ranks with gradients, and seeded generators.

Image batches (`batch["media"] == "image"`; video batches say "video" or have no "media"): "video" (B, 1, 3, H, W),
"input_ids" / "attention_mask" (B, 1, L), the caption as a one-sentence paragraph, usually no "depth". They run
through the same encoders as a one-frame video with one clip (pretrain/video_encoder.py says what each
attention kind does with one frame) and compute only the losses named in `model.loss.image_losses` (VPC with
the caption as the paragraph, the self-similarity loss, MLM and VTM); MTC, which orders M > 1 clips of a video,
is never computed on them, and a loss not computed is absent from the batch's loss dict (not logged as 0).
The batch must be all images or all videos on every rank at a step (the loader's mixture draws one source per
step for every rank): the losses all-gather over ranks, and MTC's gathers run on video steps only.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain import losses
from pretrain.fusion import FusionEncoder
from pretrain.text_encoder import HierarchicalTextEncoder, TextEncoderConfig
from pretrain.video_encoder import VideoEncoder, VideoEncoderConfig


LOSSES = ("vpc", "mtc", "ssl", "mlm", "vtm")
IMAGE_LOSSES = ("vpc", "ssl", "mlm", "vtm")  # the losses an image batch (one frame, one caption) can give


@dataclass
class LossConfig:
    vpc_weight: float = 1.0  # video-paragraph contrastive (LF-VILA)
    mtc_weight: float = 0.25  # multimodal temporal contrastive (LF-VILA)
    ssl_weight: float = 0.0  # self-similarity alignment (STGT), an alternative to VPC
    mlm_weight: float = 0.0  # masked language modelling through the fusion stack (LF-VILA stage 2: 1)
    vtm_weight: float = 0.0  # video-text matching through the fusion stack (LF-VILA stage 2: 10)
    temperature: float = 0.05  # VPC, fixed
    mtc_temperature: float = 0.05
    num_key: int = 2
    num_value: int = 2
    num_neg: int = 3
    ssl_temperature: float = 0.07
    ssl_target_temperature: float = 5.0
    ssl_threshold: float = 0.05
    ssl_label_smoothing: float = 0.01
    ssl_detach_targets: bool = True  # STGT's code lets gradients flow through its soft targets
    # Our own STGT-from-scratch schedule (not in the paper): the first N optimizer steps train VPC alone
    # (ssl at weight 0), then the self-similarity loss takes over (vpc at weight 0), so SSL's soft targets
    # come from features VPC has made distinct. 0: no hand-over, every loss at its weight throughout.
    # Needs vpc_weight > 0 and ssl_weight > 0, and the step passed to VideoTextModel.forward.
    vpc_warmup_steps: int = 0
    mlm_probability: float = 0.15
    # Image batches (batch["media"] == "image": one frame, the caption as the paragraph, M = 1): the losses computed
    # on them, among vpc, ssl, mlm, vtm, each only when its weight is > 0 (as on videos); the rest are not computed
    # and absent from the batch's loss dict. mtc is never allowed (it orders M > 1 clips of one video). [] refuses
    # image batches with an error. A non-empty list must hold a loss with weight > 0 at every step of the schedule.
    image_losses: list[str] = field(default_factory=lambda: list(IMAGE_LOSSES))

    def __post_init__(self):
        weights = [self.vpc_weight, self.mtc_weight, self.ssl_weight, self.mlm_weight, self.vtm_weight]
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError("bad value for model.loss.*_weight: expected numbers >= 0, at least one > 0")
        if min(self.temperature, self.mtc_temperature, self.ssl_temperature) <= 0:
            raise ValueError("bad value for model.loss.*temperature: expected numbers > 0")
        if self.vpc_warmup_steps < 0 or (self.vpc_warmup_steps and not (self.vpc_weight > 0 and self.ssl_weight > 0)):
            raise ValueError("bad value for model.loss.vpc_warmup_steps: expected 0, or an integer > 0 with "
                             "model.loss.vpc_weight > 0 and ssl_weight > 0 (VPC alone before it, SSL alone from it; "
                             f"got {self.vpc_warmup_steps} with vpc_weight {self.vpc_weight}, ssl_weight {self.ssl_weight})")
        self.check_image_losses()

    def check_image_losses(self) -> None:
        """image_losses: distinct names of IMAGE_LOSSES, and, unless [], one with weight > 0 at every step."""
        names = self.image_losses
        is_list = isinstance(names, (list, tuple))
        if not is_list or any(n not in IMAGE_LOSSES for n in names) or len(set(names)) < len(names):
            why = " (mtc orders M > 1 clips of one video; an image batch has one)" if is_list and "mtc" in names else ""
            raise ValueError(f"bad value for model.loss.image_losses: expected a list of distinct names among "
                             f"{', '.join(IMAGE_LOSSES)}, or [] to refuse image batches{why} (got {names!r})")
        phases = [0] + ([self.vpc_warmup_steps] if self.vpc_warmup_steps else [])  # the schedule's weight sets
        for step in phases if names else []:
            w = self.weights(step)
            if not any(w[n] > 0 for n in names):
                when = f" from step {step} (model.loss.vpc_warmup_steps)" if step else ""
                raise ValueError(f"bad value for model.loss.image_losses: expected at least one loss with weight > 0"
                                 f"{when}, or [] when the run has no image batches (got {list(names)}, and the "
                                 f"weights are {', '.join(f'{k} {v:g}' for k, v in w.items())})")

    def weights(self, step: int | None = None) -> dict[str, float]:
        """Each loss term's weight at optimizer step `step` (0-based): the *_weight fields, with VPC handing
        over to SSL at vpc_warmup_steps. The step is needed only when vpc_warmup_steps > 0."""
        w = {name: getattr(self, f"{name}_weight") for name in LOSSES}
        if self.vpc_warmup_steps:
            if step is None:
                raise ValueError("model.loss.vpc_warmup_steps > 0 needs the optimizer step: call the model with "
                                 "step=... (the training loop's forward passes it)")
            warm = step < self.vpc_warmup_steps
            w["vpc"], w["ssl"] = (w["vpc"], 0.0) if warm else (0.0, w["ssl"])
        return w

    def uses_fusion(self) -> bool:
        return self.mlm_weight > 0 or self.vtm_weight > 0

    def computed(self, image: bool) -> set[str]:
        """The terms a batch computes: those with a configured weight > 0, and on an image batch only those
        of image_losses."""
        names = {n for n in LOSSES if getattr(self, f"{n}_weight") > 0}
        return names & set(self.image_losses) if image else names


@dataclass
class ModelConfig:
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 256  # width of the joint embedding space
    fusion_layers: int = 0  # cross-modal layers for MLM/VTM (0: no fusion stack)
    loss: LossConfig = field(default_factory=LossConfig)
    init_from: str = ""  # weights to start from: a DeepSpeed checkpoint folder or a consolidated .pt file
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept fixed, e.g. ["video.", "text."]

    def __post_init__(self):
        if self.loss.uses_fusion() and self.fusion_layers < 1:
            raise ValueError("bad value for model.fusion_layers: expected >= 1 when model.loss.mlm_weight or vtm_weight > 0")


# ---- an exported folder (`python -m pretrain.export`) -------------------------------------------------

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
# model.* keys of a run's config that say how its weights started, not what the model is: dropped on load
RUN_ONLY_KEYS = ("init_from", "init_partial", "freeze")


class PretrainedError(ValueError):
    """An exported folder is missing, unreadable or does not match its model; str() is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def pretrained_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig in FOLDER/config.json (a run config's `model` section), with its run-only keys
    dropped and model.text.path (relative: the folder's own text/) resolved against the folder."""
    path = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{folder} is not an exported model: {path} is not readable "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("text", {}), dict):
        raise PretrainedError(f"{path}: expected a mapping of model.* keys with a 'text' mapping")
    data = {k: v for k, v in data.items() if k not in RUN_ONLY_KEYS}
    text = dict(data.get("text", {}))
    if text.get("path") and not Path(text["path"]).is_absolute():
        text["path"] = str(Path(folder).resolve() / text["path"])
    return config_from_dict(ModelConfig, {**data, "text": text}, f"{path}: model.")


def config_from_dict(cls, data: dict, where: str):
    """Dataclass `cls` from a nested dict of its fields (a dataclass field from a nested dict), whatever
    fields `cls` has; an unknown key or a value its __post_init__ rejects is a PretrainedError naming it."""
    if not isinstance(data, dict):
        raise PretrainedError(f"{where.rstrip('.')}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise PretrainedError(f"unknown key {where}{unknown[0]}; allowed keys here: {', '.join(names)}")
    kwargs = {k: config_from_dict(hints[k], v, f"{where}{k}.") if dataclasses.is_dataclass(hints[k]) else v
              for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"{where.rstrip('.')}: {e}") from None


def _no_gather(x: torch.Tensor) -> torch.Tensor:
    return x


def is_image_batch(batch: dict) -> bool:
    """Whether `batch` is an image batch (media "image"), checking its shapes: one frame and one caption."""
    media = batch.get("media", "video")
    if media not in ("image", "video"):
        raise ValueError(f"batch['media'] must be 'image' or 'video' (or absent: video), got {media!r}")
    if media == "video":
        return False
    T, M = batch["video"].shape[1], batch["input_ids"].shape[1]
    if T != 1 or M != 1:
        raise ValueError(f"an image batch (source {batch.get('source', '?')!r}) must hold one frame and one caption: "
                         f"video (B, 1, 3, H, W) and input_ids (B, 1, L); got {T} frames and {M} sentences")
    return True


class VideoTextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, pretrained_text: bool = True):
        """pretrained_text=False: the text encoder is built from its folder's config without reading its
        weights (`from_pretrained`, which loads every trained tensor over it)."""
        super().__init__()
        self.cfg = cfg
        self.video = VideoEncoder(cfg.video)
        self.text = HierarchicalTextEncoder(cfg.text, pretrained=pretrained_text)
        E, Dt = cfg.embed_dim, self.text.dim
        self.video_local = nn.Linear(self.video.clip_dim, E) if self.video.clip_dim else None
        self.video_global = nn.Linear(cfg.video.dims[-1], E)
        self.text_local = nn.Linear(Dt, E)
        self.text_global = nn.Linear(Dt, E)
        self.fusion = (FusionEncoder(self.text.bert_config, cfg.video.dims[-1], cfg.fusion_layers, cfg.video.max_frames)
                       if cfg.fusion_layers else None)
        if self.fusion is not None:  # LF-VILA: the text checkpoint's layers after the paragraph layers, in order
            for layer, spare in zip(self.fusion.layers, self.text.spare_layers):
                layer.load_state_dict(spare.state_dict())
        self.text.spare_layers = []

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "VideoTextModel":
        """The model in a folder written by `python -m pretrain.export` (model.safetensors, config.json,
        text/), in eval mode, without unpickling anything. Every tensor of the model must be in
        model.safetensors with its shape, and nothing else: otherwise PretrainedError naming the keys."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        model = cls(pretrained_config(folder), pretrained_text=False)
        try:
            state = load_file(folder / WEIGHTS_FILE)
        except (OSError, SafetensorError) as e:
            raise PretrainedError(f"{folder / WEIGHTS_FILE} is not readable ({type(e).__name__}: {e})") from None
        own = model.state_dict()
        problems = [f"{what}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}" for what, keys in (
            ("missing", [k for k in own if k not in state]),
            ("unexpected", [k for k in state if k not in own]),
            ("with another shape", [f"{k} {tuple(state[k].shape)} vs the model's {tuple(v.shape)}"
                                    for k, v in own.items() if k in state and state[k].shape != v.shape]),
        ) if keys]
        if problems:
            raise PretrainedError(f"{folder / WEIGHTS_FILE} does not match the model of {folder / CONFIG_FILE}: "
                                  + "; ".join(problems))
        model.load_state_dict(state, strict=True)
        return model.eval()

    def set_activation_checkpointing(self, every: int) -> None:
        """train.activation_checkpointing: recompute the activations of every `every`-th block of the video
        encoder (the patch embedding first) and of the text encoder's BERT layers in the backward pass instead
        of keeping them (0: keep all). Training with gradients only; the fusion stack and heads keep theirs."""
        self.video.set_activation_checkpointing(every)
        self.text.set_activation_checkpointing(every)

    def freeze(self, prefixes: list[str]) -> None:
        for name, p in self.named_parameters():
            if any(name.startswith(pre) for pre in prefixes):
                p.requires_grad_(False)

    def encode_video(self, video: torch.Tensor, num_clips: int, depth: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, image: bool = False):
        """-> clip embeddings (B, M, E) (None if the encoder merges frames first), video embedding (B, E).
        `generator`: token dropping's draws in training (model.video.drop_ratio), else the global RNG.
        image=True: images (B, 1, 3, H, W), num_clips 1 (the encoder's one-frame path)."""
        clips, whole = self.video(video, num_clips, depth, generator=generator, image=image)  # (B, M, Dc), (B, Dv)
        clips = F.normalize(self.video_local(clips), dim=-1) if clips is not None else None
        return clips, F.normalize(self.video_global(whole), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """-> sentence embeddings (B, M, E), paragraph embedding (B, E)."""
        sentences, paragraph = self.text(input_ids, attention_mask)  # (B, M, Dt), (B, Dt)
        return F.normalize(self.text_local(sentences), dim=-1), F.normalize(self.text_global(paragraph), dim=-1)

    def forward(self, batch: dict, gather: Callable[[torch.Tensor], torch.Tensor] = _no_gather,
                generator: torch.Generator | None = None, step: int | None = None) -> dict[str, torch.Tensor]:
        """Losses with weight > 0 on a batch (video, input_ids, attention_mask[, depth][, media, source]): each
        term unweighted, and the weighted total as "loss". `step` (0-based optimizer step): the loss schedule's
        (model.loss.vpc_warmup_steps); a term whose weight is 0 at this step is reported, detached. An image
        batch computes only model.loss.image_losses; the other terms are absent from its dict."""
        c = self.cfg.loss
        image = is_image_batch(batch)
        if image and not c.image_losses:
            raise ValueError(f"an image batch (source {batch.get('source', '?')!r}), and model.loss.image_losses is "
                             f"[]: this run takes no images; list the losses to compute on them "
                             f"({', '.join(IMAGE_LOSSES)})")
        weights = c.weights(step)
        names = c.computed(image)
        out = {}
        if names & {"vpc", "mtc", "ssl"}:
            out.update(self.contrastive_losses(batch, gather, generator, names, image))
        if names & {"mlm", "vtm"}:
            out.update({k: v for k, v in self.fusion_losses(batch, image).items() if k in names})
        out = {name: value if weights[name] else value.detach() for name, value in out.items()}
        out["loss"] = sum(weights[name] * value for name, value in out.items() if weights[name])
        return out

    def contrastive_losses(self, batch, gather, generator, names: set[str] | None = None,
                           image: bool = False) -> dict[str, torch.Tensor]:
        """The terms of `names` among vpc, ssl, mtc (default: those with weight > 0); image: an image batch."""
        c = self.cfg.loss
        names = c.computed(image) if names is None else names
        M = batch["input_ids"].shape[1]  # an image batch: 1
        # token dropping draws from this rank's own RNG (seeded per rank, saved in checkpoints), not from
        # `generator`, which is the same on every rank (MTC's positions must be)
        clip_emb, video_emb = self.encode_video(batch["video"], M, batch.get("depth"), image=image)  # (B, M, E), (B, E)
        sent_emb, para_emb = self.encode_text(batch["input_ids"], batch["attention_mask"])  # (B, M, E), (B, E)
        video_emb, para_emb = gather(video_emb), gather(para_emb)  # (B_global, E)
        out = {}
        if "vpc" in names:
            out["vpc"] = losses.vpc_loss(video_emb, para_emb, c.temperature)
        if "ssl" in names:
            out["ssl"] = losses.self_similarity_loss(video_emb, para_emb, c.ssl_temperature, c.ssl_target_temperature,
                                                     c.ssl_threshold, c.ssl_label_smoothing, c.ssl_detach_targets)
        if "mtc" in names:
            clip_emb, sent_emb = gather(clip_emb), gather(sent_emb)  # (B_global, M, E)
            idx = losses.sample_mtc_indices(clip_emb.shape[0], M, c.num_key, c.num_value, generator)
            idx = [i.to(clip_emb.device) for i in idx]
            out["mtc"] = losses.mtc_loss(clip_emb, sent_emb, *idx, temperature=c.mtc_temperature, num_neg=c.num_neg)
        return out

    def fusion_outputs(self, batch, generator: torch.Generator | None = None, image: bool = False):
        """LF-VILA stage 2 on the local batch: masked text and video through the fusion stack, with the
        first half's videos rolled by one (negatives). -> VTM logits (B, 2) and labels (B,), MLM logits
        (B - B//2, M*L, V) and labels for the second (matched) half."""
        c, text = self.cfg.loss, self.text
        ids, mask = batch["input_ids"], batch["attention_mask"]
        B, M, L = ids.shape
        assert B >= 4, "video-text matching needs a per-rank batch of at least 4 (2 negatives, 2 positives)"
        masked, labels = losses.mask_tokens(ids, mask, text.mask_token_id, text.bert_config.vocab_size,
                                            text.special_ids, c.mlm_probability, generator)
        _, _, states, text_mask = self.text(masked, mask, return_states=True)  # (B, 1+M*L, Dt)
        _, _, frames = self.video(batch["video"], M, batch.get("depth"), return_frames=True, image=image)  # (B, T', Dv)
        half = B // 2
        frames = torch.cat([frames[:half].roll(1, dims=0), frames[half:]])  # negatives first, positives after
        fused = self.fusion(states, text_mask, frames)  # (B, S + T', Dt)
        S = states.shape[1]
        mlm_logits = self.fusion.mlm_logits(fused[half:, 1:S], text.embeddings.word_embeddings.weight)
        vtm_labels = losses.vtm_labels(B).to(fused.device)
        return self.fusion.vtm_logits(fused), vtm_labels, mlm_logits, labels[half:].reshape(B - half, M * L)

    def fusion_losses(self, batch, image: bool = False) -> dict[str, torch.Tensor]:
        # the masks come from this rank's RNG
        vtm_logits, vtm_labels, mlm_logits, mlm_labels = self.fusion_outputs(batch, image=image)
        return {"vtm": losses.vtm_loss(vtm_logits, vtm_labels), "mlm": losses.mlm_loss(mlm_logits, mlm_labels)}

    @torch.no_grad()
    def matching_counts(self, batch, generator: torch.Generator) -> torch.Tensor:
        """(VTM correct, VTM total, MLM correct, MLM total) on a batch, for evaluation."""
        vtm_logits, vtm_labels, mlm_logits, mlm_labels = self.fusion_outputs(batch, generator)
        chosen = mlm_labels != -100
        return torch.tensor([(vtm_logits.argmax(-1) == vtm_labels).sum().item(), len(vtm_labels),
                             (mlm_logits.argmax(-1)[chosen] == mlm_labels[chosen]).sum().item(), chosen.sum().item()],
                            dtype=torch.float)
