"""TESTA's temporal-spatial token aggregation: bipartite soft matching with size-weighted averages.

Letters: B batch, T frames, N tokens per frame, D width, d metric width, G groups, n items to match.
Items (frames or patches) alternate into two sets, A (even) and B (odd); each A item finds its most
similar B item; the r A items with the highest similarity are added into their B partner, weighted by
the number of original tokens each stands for (`size`). Output order: [unmerged A (in order); B].
No proportional attention (TESTA ships it disabled).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_matched(x: torch.Tensor, size: torch.Tensor, node_max: torch.Tensor, node_idx: torch.Tensor, r: int):
    """x (G, n, C) features, size (G, n, Cs) sizes (C a multiple of Cs, each size covering C/Cs
    features), node_max / node_idx (G, nA) the best B partner of each A item and its similarity.
    Returns (x', size') with n - r items, x' the size-weighted mean of what merged."""
    G, n, C = x.shape
    Cs = size.shape[-1]
    per = C // Cs
    order = node_max.argsort(dim=-1, descending=True)  # (G, nA)
    src, unm = order[:, :r], order[:, r:].sort(dim=-1).values  # (G, r), (G, nA - r)
    dst = node_idx.gather(1, src)  # (G, r)
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
    m = F.normalize(metric.reshape(B * T, N, -1), dim=-1)
    node_max, node_idx = (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)  # (B*T, nA)
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
    m = F.normalize(metric.permute(0, 2, 1, 3), dim=-1)  # (B, N, T, d)
    sim = m[:, :, ::2] @ m[:, :, 1::2].transpose(-1, -2)  # (B, N, tA, tB)
    node_idx = sim.argmax(dim=-1).mode(dim=1).values  # (B, tA) the voted partner
    node_max = sim.mean(dim=1).gather(-1, node_idx[..., None]).squeeze(-1)  # (B, tA)
    x, size = merge_matched(x.reshape(B, T, N * D), size.reshape(B, T, N), node_max, node_idx, r)
    return x.view(B, T - r, N, D), size.view(B, T - r, N, 1)
