"""Contrastive losses as plain functions of L2-normalised embeddings.

Letters: B batch (global, after the all-gather, which happens outside these functions),
M clips or sentences per video, D width, K anchors, V candidate values per video.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def vpc_loss(video: torch.Tensor, paragraph: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """LF-VILA's video-paragraph contrastive loss: InfoNCE in both directions, summed. (B, D), (B, D)."""
    logits = video @ paragraph.t() / temperature  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)


def sample_mtc_indices(batch: int, clips: int, num_key: int = 2, num_value: int = 2,
                       generator: torch.Generator | None = None):
    """Per video: K anchor positions, V candidate positions (independent draws) and one negative position.

    Returns key_idx (B, K), val_idx (B, V), neg_idx (B,). Pass the same seeded generator on every rank,
    so that every rank computes the same loss on the gathered batch.
    """
    assert num_key <= clips and num_value <= clips, "num_key and num_value must be <= clips"
    key = torch.stack([torch.randperm(clips, generator=generator)[:num_key] for _ in range(batch)])
    val = torch.stack([torch.randperm(clips, generator=generator)[:num_value] for _ in range(batch)])
    neg = torch.randint(clips, (batch,), generator=generator)
    return key, val, neg


def mtc_labels(key_idx: torch.Tensor, val_idx: torch.Tensor) -> torch.Tensor:
    """Index of the temporally nearest value for each anchor, -100 where two values tie. (B, K)"""
    dist = (key_idx[:, :, None] - val_idx[:, None, :]).abs()  # (B, K, V)
    nearest = dist.min(dim=-1, keepdim=True).values
    ties = (dist == nearest).sum(dim=-1) > 1  # (B, K)
    return dist.argmin(dim=-1).masked_fill(ties, -100)


def _mtc_direction(anchors, values, key_idx, val_idx, neg_idx, labels, temperature, num_neg):
    B, M, D = anchors.shape
    rows = torch.arange(B, device=anchors.device)
    a = anchors[rows[:, None], key_idx]  # (B, K, D)
    v = values[rows[:, None], val_idx]  # (B, V, D)
    picked = values[rows, neg_idx]  # (B, D): the negative position of each video
    negs = torch.stack([picked.roll(s, dims=0) for s in range(1, num_neg + 1)], dim=1)  # (B, N, D): videos b-s
    cand = torch.cat([v, negs], dim=1)  # (B, V+N, D)
    logits = torch.einsum("bkd,bcd->bkc", a, cand) / temperature  # (B, K, V+N)
    flat = labels.reshape(-1)
    if (flat == -100).all():
        return logits.sum() * 0.0  # keep the graph, no NaN
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=-100)


def mtc_loss(clips: torch.Tensor, sentences: torch.Tensor, key_idx: torch.Tensor, val_idx: torch.Tensor,
             neg_idx: torch.Tensor, temperature: float = 0.05, num_neg: int = 3) -> torch.Tensor:
    """LF-VILA's multimodal temporal contrastive loss, both directions summed. clips, sentences: (B, M, D).

    An anchor sentence must score its temporally nearest candidate clip (of the same video) above the
    other candidates and above `num_neg` clips of the videos b-1, ..., b-num_neg (cyclic over the batch; fewer when the batch is smaller);
    and the same with clips as anchors and sentences as candidates.
    """
    num_neg = min(num_neg, clips.shape[0] - 1)  # a negative never comes from the video itself
    labels = mtc_labels(key_idx, val_idx)
    t2v = _mtc_direction(sentences, clips, key_idx, val_idx, neg_idx, labels, temperature, num_neg)
    v2t = _mtc_direction(clips, sentences, key_idx, val_idx, neg_idx, labels, temperature, num_neg)
    return t2v + v2t
