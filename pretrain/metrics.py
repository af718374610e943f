"""Evaluation metrics: retrieval ranks and recalls, QA accuracy, caption BLEU-4 and CIDEr."""
from __future__ import annotations

import re

import torch

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation (as the COCO caption evaluation's PTB tokenizer leaves them)."""
    return WORD.findall(text.lower())



def rank_counts(similarity: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For query i (row) and its ground truth video i (column): how many other videos score strictly
    higher, and how many tie with it. Computed `chunk` rows at a time, so a 5,000 x 5,000 evaluation never
    needs a sorted copy. A NaN ground-truth score ranks last; other NaN scores rank below everything."""
    n_q, n_v = similarity.shape
    assert n_q <= n_v, f"query i's ground truth is video i: need num_queries <= num_videos, got {n_q} > {n_v}"
    above, tied = [], []
    for start in range(0, n_q, chunk):
        rows = similarity[start:start + chunk].float()  # (c, n_v)
        r = torch.arange(rows.shape[0])
        gt = rows[r, r + start]  # (c,)
        others = rows.nan_to_num(nan=float("-inf"))
        others[r, r + start] = float("nan")  # the ground truth never counts against itself
        a = (others > gt[:, None]).sum(dim=1)
        t = (others == gt[:, None]).sum(dim=1)
        lost = gt.isnan()
        above.append(torch.where(lost, n_v - 1, a))
        tied.append(torch.where(lost, 0, t))
    return torch.cat(above), torch.cat(tied)


def retrieval_ranks(similarity: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """1-based rank of each query's ground truth, ties broken at random, in expectation: 1 + above +
    tied / 2. A collapsed model (all scores equal) gets the chance rank (n + 1) / 2, not rank 1."""
    return _expected_rank(*rank_counts(similarity, chunk))


def _expected_rank(above: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
    return 1.0 + above.double() + tied.double() / 2


def _expected_recall(above: torch.Tensor, tied: torch.Tensor, k: int) -> float:
    """Percent of queries whose ground truth is in the top k under a random order of ties: the truth is
    equally likely at each of ranks above+1 .. above+tied+1."""
    return 100.0 * ((k - above.double()) / (tied.double() + 1)).clamp(0, 1).mean().item()


def retrieval_metrics(similarity: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """R@1/5/10 in percent, median and mean rank, for queries (rows) against videos (columns); ties
    between the ground truth and other videos are broken at random, in expectation."""
    above, tied = rank_counts(similarity, chunk)
    ranks = _expected_rank(above, tied)
    out = {f"R{k}": _expected_recall(above, tied, k) for k in (1, 5, 10)}
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


def recall_curve(similarity: torch.Tensor, max_k: int | None = None, chunk: int = 1024) -> list[float]:
    """R@K in percent for K = 1..max_k (default: every video), ties broken as in retrieval_metrics."""
    above, tied = rank_counts(similarity, chunk)
    n = similarity.shape[1] if max_k is None else max_k
    return [_expected_recall(above, tied, k) for k in range(1, n + 1)]


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

    keys = sorted(predictions)
    assert keys and set(keys) == set(references), "predictions and references must cover the same videos"
    res = {k: [" ".join(words(predictions[k]))] for k in keys}
    gts = {k: [" ".join(words(r)) for r in references[k]] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU4": 100.0 * float(bleu[3]), "CIDEr": 100.0 * float(cider)}
