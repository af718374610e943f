"""TESTA's temporal-spatial token aggregation: bipartite soft matching with size-weighted averages.

Letters: B batch, T frames, N tokens per frame, D width, d metric width, G groups, n items to match.
Items (frames or patches) alternate into two sets, A (even) and B (odd); each A item finds its most
similar B item; the r A items with the highest similarity are added into their B partner, weighted by
the number of original tokens each stands for (`size`). Output order: [unmerged A (in order); B].
No proportional attention (TESTA ships it disabled).

Source tracking (for pictures and tests; nothing runs during training): `patch_merge_index` and
`frame_merge_index` give, from the same metric, where each item lands in the merged output, and
`follow_sources` composes them into "which merged token holds each original patch token".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def match_plan(node_max: torch.Tensor, node_idx: torch.Tensor, r: int):
    """The r A items with the most similar partner merge away: src (G, r) those A items, unm (G, nA - r)
    the kept A items in order, dst (G, r) the B partner of each src item."""
    order = node_max.argsort(dim=-1, descending=True)  # (G, nA)
    src, unm = order[:, :r], order[:, r:].sort(dim=-1).values  # (G, r), (G, nA - r)
    return src, unm, node_idx.gather(1, src)


def merged_index(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """(G, n): the position in `merge_matched`'s output (n - r items) that each of the n input items
    went into. Output order is [unmerged A; B], so B item j is at (nA - r) + j, and so is every A item
    merged into it."""
    src, unm, dst = match_plan(node_max, node_idx, r)
    G, kept = unm.shape
    a = torch.empty_like(node_idx)  # (G, nA)
    a.scatter_(1, unm, torch.arange(kept, device=a.device).expand(G, -1))
    a.scatter_(1, src, kept + dst)
    index = torch.empty(G, n, dtype=a.dtype, device=a.device)
    index[:, ::2], index[:, 1::2] = a, kept + torch.arange(n // 2, device=a.device).expand(G, -1)
    return index


def merge_matched(x: torch.Tensor, size: torch.Tensor, node_max: torch.Tensor, node_idx: torch.Tensor, r: int):
    """x (G, n, C) features, size (G, n, Cs) sizes (C a multiple of Cs, each size covering C/Cs
    features), node_max / node_idx (G, nA) the best B partner of each A item and its similarity.
    Returns (x', size') with n - r items, x' the size-weighted mean of what merged."""
    G, n, C = x.shape
    Cs = size.shape[-1]
    per = C // Cs
    src, unm, dst = match_plan(node_max, node_idx, r)
    weighted = (x.view(G, n, Cs, per) * size.unsqueeze(-1)).view(G, n, C)
    xa, xb, sa, sb = weighted[:, ::2], weighted[:, 1::2], size[:, ::2], size[:, 1::2]

    def take(t, idx):
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    xb = xb.scatter_add(1, dst[..., None].expand(-1, -1, C), take(xa, src))
    sb = sb.scatter_add(1, dst[..., None].expand(-1, -1, Cs), take(sa, src))
    x_out, s_out = torch.cat([take(xa, unm), xb], dim=1), torch.cat([take(sa, unm), sb], dim=1)
    x_out = (x_out.view(G, -1, Cs, per) / s_out.unsqueeze(-1)).view(G, -1, C)
    return x_out, s_out


def merge_patches(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int):
    """Per frame, merge r of its N tokens. x (B, T, N, D), size (B, T, N, 1), metric (B, T, N, d)."""
    B, T, N, D = x.shape
    r = min(r, N // 2)
    if r <= 0:
        return x, size
    node_max, node_idx = patch_matches(metric)  # (B*T, nA)
    x, size = merge_matched(x.reshape(B * T, N, D), size.reshape(B * T, N, 1), node_max, node_idx, r)
    return x.view(B, T, N - r, D), size.view(B, T, N - r, 1)


def merge_frames(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int):
    """Merge r whole frames. x (B, T, N, D), size (B, T, N, 1), metric (B, T, N, d).

    Each patch position votes for the partner frame (the mode over patches, as TESTA does); a frame's
    score is the mean over patches of its similarity to the voted partner (TESTA takes a mode of the
    per-patch maxima, which for distinct floats picks an arbitrary one of them)."""
    B, T, N, D = x.shape
    r = min(r, T // 2)
    if r <= 0:
        return x, size
    node_max, node_idx = frame_matches(metric)  # (B, tA)
    x, size = merge_matched(x.reshape(B, T, N * D), size.reshape(B, T, N), node_max, node_idx, r)
    return x.view(B, T - r, N, D), size.view(B, T - r, N, 1)


def patch_matches(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """metric (B, T, N, d) -> per frame, each A patch's best B partner's similarity and index (B*T, nA)."""
    B, T, N, _ = metric.shape
    m = F.normalize(metric.reshape(B * T, N, -1), dim=-1)
    return (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)


def frame_matches(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """metric (B, T, N, d) -> each A frame's voted B partner's mean similarity and index (B, tA)."""
    m = F.normalize(metric.permute(0, 2, 1, 3), dim=-1)  # (B, N, T, d)
    sim = m[:, :, ::2] @ m[:, :, 1::2].transpose(-1, -2)  # (B, N, tA, tB)
    node_idx = sim.argmax(dim=-1).mode(dim=1).values  # (B, tA) the voted partner
    node_max = sim.mean(dim=1).gather(-1, node_idx[..., None]).squeeze(-1)  # (B, tA)
    return node_max, node_idx


def patch_merge_index(metric: torch.Tensor, r: int) -> torch.Tensor:
    """(B, T, N): the position, within its frame, of the token each patch token went into when
    `merge_patches(x, size, metric, r)` ran."""
    B, T, N, _ = metric.shape
    r = min(r, N // 2)
    if r <= 0:
        return torch.arange(N, device=metric.device).expand(B, T, N)
    return merged_index(*patch_matches(metric), r, N).view(B, T, N)


def frame_merge_index(metric: torch.Tensor, r: int) -> torch.Tensor:
    """(B, T): the frame each frame went into when `merge_frames(x, size, metric, r)` ran."""
    B, T = metric.shape[:2]
    r = min(r, T // 2)
    if r <= 0:
        return torch.arange(T, device=metric.device).expand(B, T)
    return merged_index(*frame_matches(metric), r, T)


def follow_sources(sources: torch.Tensor, N: int, frames: torch.Tensor | None = None,
                   patches: torch.Tensor | None = None, kept: int = 0) -> torch.Tensor:
    """sources (B, S0): for each original patch token, the flat index t * N + n of the current token
    (of B, T, N) that holds it; start from arange(T0 * N0). After a frame merge (frames (B, T) from
    `frame_merge_index`) or a patch merge (patches (B, T, N) from `patch_merge_index`, `kept` tokens
    per frame after it), the same for the merged tokens."""
    t, n = sources // N, sources % N
    if frames is not None:
        return frames.gather(1, t) * N + n
    assert patches is not None and kept > 0, "follow_sources needs frames, or patches and kept"
    return t * kept + patches.flatten(1).gather(1, sources)
