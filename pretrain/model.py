"""The video-language model: hierarchical encoders, projection heads and the stage-1 objective.

Letters: B batch, M clips = sentences per video, E embedding width.
The model knows nothing of DeepSpeed or of process groups: the caller passes `gather`, a function
that concatenates a tensor over all ranks (with gradients), and a seeded generator for MTC sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain import losses
from pretrain.text_encoder import HierarchicalTextEncoder, TextEncoderConfig
from pretrain.video_encoder import VideoEncoder, VideoEncoderConfig


@dataclass
class LossConfig:
    vpc_weight: float = 1.0  # video-paragraph contrastive (LF-VILA)
    mtc_weight: float = 0.25  # multimodal temporal contrastive (LF-VILA)
    temperature: float = 0.05  # VPC temperature, fixed
    mtc_temperature: float = 0.05
    num_key: int = 2
    num_value: int = 2
    num_neg: int = 3

    def __post_init__(self):
        if self.vpc_weight < 0 or self.mtc_weight < 0:
            raise ValueError("model.loss.vpc_weight and mtc_weight must be >= 0")
        if self.temperature <= 0 or self.mtc_temperature <= 0:
            raise ValueError("model.loss.temperature and mtc_temperature must be > 0")


@dataclass
class ModelConfig:
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 256  # width of the joint embedding space
    loss: LossConfig = field(default_factory=LossConfig)


def _no_gather(x: torch.Tensor) -> torch.Tensor:
    return x


class VideoTextModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.video = VideoEncoder(cfg.video)
        self.text = HierarchicalTextEncoder(cfg.text)
        E, Dt = cfg.embed_dim, self.text.dim
        self.video_local = nn.Linear(self.video.clip_dim, E)
        self.video_global = nn.Linear(cfg.video.dims[-1], E)
        self.text_local = nn.Linear(Dt, E)
        self.text_global = nn.Linear(Dt, E)

    def encode_video(self, video: torch.Tensor, num_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
        clips, whole = self.video(video, num_clips)  # (B, M, Dc), (B, Dv)
        return F.normalize(self.video_local(clips), dim=-1), F.normalize(self.video_global(whole), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sentences, paragraph = self.text(input_ids, attention_mask)  # (B, M, Dt), (B, Dt)
        return F.normalize(self.text_local(sentences), dim=-1), F.normalize(self.text_global(paragraph), dim=-1)

    def forward(self, video: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                gather: Callable[[torch.Tensor], torch.Tensor] = _no_gather,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Stage-1 losses on a batch; returns the weighted total as "loss" and each term unweighted."""
        c = self.cfg.loss
        M = input_ids.shape[1]
        clip_emb, video_emb = self.encode_video(video, M)  # (B, M, E), (B, E)
        sent_emb, para_emb = self.encode_text(input_ids, attention_mask)  # (B, M, E), (B, E)
        clip_emb, video_emb, sent_emb, para_emb = map(gather, (clip_emb, video_emb, sent_emb, para_emb))
        out = {"vpc": losses.vpc_loss(video_emb, para_emb, c.temperature)}
        if c.mtc_weight > 0:
            idx = losses.sample_mtc_indices(clip_emb.shape[0], M, c.num_key, c.num_value, generator)
            idx = [i.to(clip_emb.device) for i in idx]
            out["mtc"] = losses.mtc_loss(clip_emb, sent_emb, *idx, temperature=c.mtc_temperature, num_neg=c.num_neg)
        out["loss"] = c.vpc_weight * out["vpc"] + c.mtc_weight * out.get("mtc", 0.0)
        return out
