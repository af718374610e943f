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
    negs = torch.stack([picked.roll(s, dims=0) for s in range(1, num_neg + 1)], dim=1) if num_neg > 0 \
        else picked.new_zeros(B, 0, D)  # (B, N, D): videos b-s; none when the batch holds one video
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


def self_similarity_loss(video: torch.Tensor, text: torch.Tensor, temperature: float = 0.07,
                         target_temperature: float = 5.0, threshold: float = 0.05,
                         label_smoothing: float = 0.01, detach_targets: bool = True) -> torch.Tensor:
    """STGT's self-similarity alignment loss on (B, D) video and text embeddings.

    Soft targets: P = relu(V V^T) * relu(T T^T), entries below `threshold` set to -100, then
    softmax(target_temperature * P) per row, detached (STGT's code lets gradients flow through the
    targets; detaching is the standard choice and the default here). The loss is the mean of the
    video->text and text->video cross-entropies against those targets, with label smoothing."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_targets):
        p = (video @ video.t()).clamp(min=0) * (text @ text.t()).clamp(min=0)  # (B, B)
        p = p.masked_fill(p < threshold, -100.0)
        target = (target_temperature * p).softmax(dim=1)
    logits = video @ text.t() / temperature  # (B, B) video -> text
    v2t = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    t2v = F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)  # P is symmetric
    return (v2t + t2v) / 2


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int, vocab_size: int,
                special_ids: list[int], probability: float = 0.15, generator: torch.Generator | None = None):
    """BERT masking: `probability` of the real, non-special tokens are chosen; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with -100 where not chosen)."""
    ids = input_ids.clone()
    can = attention_mask.bool() & ~torch.isin(ids, torch.tensor(special_ids, device=ids.device))
    rand = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = can & (rand < probability)
    labels = input_ids.masked_fill(~chosen, -100)
    how = torch.rand(ids.shape, generator=generator).to(ids.device)
    ids[chosen & (how < 0.8)] = mask_id
    swap = chosen & (how >= 0.8) & (how < 0.9)
    ids[swap] = torch.randint(vocab_size, (int(swap.sum()),), generator=generator).to(ids.device)
    return ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, S, V) logits, (B, S) labels with -100 ignored; 0 (with a graph) when nothing is masked."""
    if (labels == -100).all():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def vtm_labels(batch: int) -> torch.Tensor:
    """LF-VILA's video-text matching: the first half of the batch gets its videos rolled by one
    (negatives, 0), the rest keep their own (positives, 1)."""
    labels = torch.ones(batch, dtype=torch.long)
    labels[: batch // 2] = 0
    return labels


def vtm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)
