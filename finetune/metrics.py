"""Evaluation metrics: retrieval ranks and recalls, QA accuracy, caption BLEU-4 and CIDEr."""
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


def format_table(rows: dict[str, dict[str, float]], cols: list[str] | None = None) -> str:
    """Rows of metrics as a fixed-width table; columns default to the retrieval metrics ("-" where a row lacks one)."""
    cols = cols or ["R1", "R5", "R10", "MedR", "MeanR"]
    width = max([22] + [len(name) + 2 for name in rows])
    lines = [f"{'':<{width}}" + "".join(f"{c:>9}" for c in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{m[c]:>9.2f}" if c in m else f"{'-':>9}" for c in cols))
    return "\n".join(lines)


def recall_curve(ranks: torch.Tensor, max_k: int | None = None) -> list[float]:
    """R@K in percent for K = 1..max_k (default: every rank), from 1-based ranks."""
    n = int(ranks.max().item()) if max_k is None else max_k
    counts = torch.bincount(ranks.long().clamp(max=n + 1), minlength=n + 2)[1 : n + 1]  # queries at rank k
    return (100.0 * counts.cumsum(0).double() / len(ranks)).tolist()


def accuracy(predictions: list, targets: list) -> float:
    """Percent of predictions equal to their target (0 for no questions)."""
    assert len(predictions) == len(targets), f"{len(predictions)} predictions for {len(targets)} targets"
    return 100.0 * sum(p == t for p, t in zip(predictions, targets)) / max(1, len(targets))


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr (CIDEr-D as in the COCO caption evaluation), both x100, with pycocoevalcap's
    scorers. Texts are lower-cased and split into words without punctuation first (what the COCO
    evaluation's PTB tokenizer does, without its Java dependency). CIDEr's document frequencies come
    from the references of the evaluated set, so it needs at least two videos to be non-zero."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from finetune.labels import words

    keys = sorted(predictions)
    assert keys and set(keys) == set(references), "predictions and references must cover the same videos"
    res = {k: [" ".join(words(predictions[k]))] for k in keys}
    gts = {k: [" ".join(words(r)) for r in references[k]] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU4": 100.0 * float(bleu[3]), "CIDEr": 100.0 * float(cider)}
