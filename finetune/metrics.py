"""Evaluation metrics."""
from __future__ import annotations

import torch


def retrieval_ranks(similarity: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """1-based rank of the ground truth (column i for query i) in each row, computed `chunk` rows at a
    time so a large matrix never needs a sorted copy. Ties count in the query's favour (a candidate
    ranks above the ground truth only if strictly more similar), as in CLIP4Clip and LF-VILA."""
    n_q, n_v = similarity.shape
    assert n_q <= n_v, f"query i's ground truth is video i: need num_queries <= num_videos, got {n_q} > {n_v}"
    ranks = []
    for start in range(0, n_q, chunk):
        rows = similarity[start:start + chunk].float()  # (c, n_v)
        idx = torch.arange(start, start + rows.shape[0])
        gt = rows[torch.arange(rows.shape[0]), idx]  # (c,)
        ranks.append((rows > gt[:, None]).sum(dim=1) + 1)
    return torch.cat(ranks)


def retrieval_metrics(similarity: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """R@1/5/10 in percent, median and mean rank, for queries (rows) against videos (columns)."""
    ranks = retrieval_ranks(similarity, chunk).double()
    out = {f"R{k}": 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    out["MedR"] = ranks.quantile(0.5).item()  # the mean of the two middle ranks when their number is even
    out["MeanR"] = ranks.mean().item()
    return out


def chance_metrics(num_videos: int) -> dict[str, float]:
    """What a random ranking scores in expectation."""
    out = {f"R{k}": 100.0 * min(k, num_videos) / num_videos for k in (1, 5, 10)}
    out["MedR"] = out["MeanR"] = (num_videos + 1) / 2
    return out


def format_table(rows: dict[str, dict[str, float]]) -> str:
    cols = ["R1", "R5", "R10", "MedR", "MeanR"]
    lines = [f"{'':<22}" + "".join(f"{c:>9}" for c in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<22}" + "".join(f"{m[c]:>9.2f}" for c in cols))
    return "\n".join(lines)
