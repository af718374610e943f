"""Probes of what a trained model knows beyond retrieval, on the held-out split of the synthetic corpus.

- temporal order: the true paragraph must score above the same sentences in a shuffled order,
  (a) by video-paragraph similarity ("order") and (b) by the summed clip-sentence similarity of the
  aligned clips ("order_clips", needs clip embeddings);
- geometry: a sentence with one relation reversed (in front of <-> behind, left of <-> right of,
  `shards.synth.flip_relation`) must score below the true one, (a) per event by the similarity of that
  event's clip to the sentence ("depth_clip", "plane_clip") and (b) by video-paragraph similarity with
  one sentence of the paragraph flipped ("depth_para", "plane_para").
Every probe is a pairwise comparison (chance 50%); an exact tie counts one half, so a model that cannot
tell the two apart (an order-invariant paragraph encoder) scores chance, not 0 or 100. Shuffles and the
flipped event are drawn from a generator seeded by the video's key: every model sees the same probes.
The same pass gives paragraph-to-video R@1 over the split.

Letters: N videos, M sentences (= clips) per video, K shuffled orders, L tokens, E embedding width.
"""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import torch

from pretrain.metrics import retrieval_metrics
from shards.loader import build_eval_loader, get_tokenizer
from shards.synth import FLIPS, flip_relation

SHUFFLES = 3  # K shuffled orders per video
PROBES = ("order", "order_clips", "depth_clip", "plane_clip", "depth_para", "plane_para")


def probe_rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def shuffled_orders(M: int, K: int, rng: np.random.Generator) -> list[list[int]]:
    """K distinct permutations of range(M), none of them the identity (all M! - 1 if fewer)."""
    if M < 2:
        return []
    if M <= 5:  # few permutations: choose among all of them
        others = [list(p) for p in itertools.permutations(range(M)) if list(p) != list(range(M))]
        return [others[i] for i in rng.permutation(len(others))[:K]]
    out: list[list[int]] = []
    while len(out) < K:
        p = rng.permutation(M).tolist()
        if p != list(range(M)) and p not in out:
            out.append(p)
    return out


def pairwise_wins(true: torch.Tensor, other: torch.Tensor) -> tuple[float, int]:
    """(wins, comparisons) of true scores against their alternatives (same shape); a tie is half a win."""
    wins = (true > other).double() + 0.5 * (true == other).double()
    return float(wins.sum()), true.numel()


def order_scores(video: torch.Tensor, paragraphs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """video (N, E), paragraphs (N, 1+K, E) with the true order first -> true (N, K), shuffled (N, K)."""
    s = torch.einsum("ne,nke->nk", video, paragraphs)  # (N, 1+K)
    return s[:, :1].expand(-1, s.shape[1] - 1), s[:, 1:]


def alignment_scores(clips: torch.Tensor, sentences: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """clips (N, M, E), sentences (N, M, E) in true order, orders (N, K, M) -> true (N, K) and shuffled
    (N, K) alignment scores: the sum over m of <clip_m, sentence_order[m]>."""
    s = torch.einsum("nme,npe->nmp", clips, sentences)  # (N, M clips, M sentences)
    true = s.diagonal(dim1=1, dim2=2).sum(-1)  # (N,)
    N, K, M = orders.shape
    picked = s[torch.arange(N)[:, None, None], torch.arange(M)[None, None, :], orders]  # (N, K, M)
    shuffled = picked.sum(-1)  # (N, K)
    return true[:, None].expand_as(shuffled), shuffled


def relation_scores(clips: torch.Tensor, sentences: torch.Tensor, flipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """clips, sentences, flipped: (N, M, E) -> <clip_m, sentence_m> and <clip_m, flipped_m>, (N, M) each."""
    return (clips * sentences).sum(-1), (clips * flipped).sum(-1)


class ProbeTexts:
    """The probe paragraphs of one video: K shuffled orders, and per relation kind the paragraph with
    every sentence flipped (for the clip probes) and with one random sentence flipped (paragraph probe)."""

    def __init__(self, key: str, sentences: list[str], kinds: list[str], shuffles: int = SHUFFLES):
        rng = probe_rng(key)
        M = len(sentences)
        self.orders = shuffled_orders(M, shuffles, rng)
        self.all_flipped = {k: [flip_relation(s, k) for s in sentences] for k in kinds}
        self.one_flipped = {}
        for k in kinds:
            m = int(rng.integers(M))
            self.one_flipped[k] = sentences[:m] + [flip_relation(sentences[m], k)] + sentences[m + 1:]


def relation_kinds(sentences: list[str]) -> list[str]:
    """The relation kinds ("depth", "plane") that every sentence states exactly once."""
    kinds = []
    for kind in FLIPS:
        try:
            [flip_relation(s, kind) for s in sentences]
        except ValueError:
            continue
        kinds.append(kind)
    return kinds


@torch.no_grad()
def evaluate_probes(model, cfg, shuffles: int = SHUFFLES) -> dict:
    """One pass over cfg.data.val_shards in this process: R@1 and every probe's accuracy in percent,
    with its number of comparisons; None where a probe does not apply (no clip embeddings: TESTA's
    frame merging; no relation of that kind in the corpus)."""
    from pretrain.config import REPO_ROOT

    tok_path = cfg.model.text.resolved_path()
    tokenize = get_tokenizer(tok_path)
    L = cfg.data.max_words
    loader = build_eval_loader(cfg.data, tok_path, 0, 1, root=str(REPO_ROOT))
    was_training = model.training
    model.eval()
    videos, paragraphs, sums = [], [], {}

    def add(name: str, true: torch.Tensor, other: torch.Tensor) -> None:
        w, n = pairwise_wins(true.float(), other.float())
        sums[name] = (sums.get(name, (0.0, 0))[0] + w, sums.get(name, (0.0, 0))[1] + n)

    def encode(texts: list[list[str]]):  # B paragraphs of M sentences -> (B, M, E), (B, E)
        t = tokenize([s for p in texts for s in p], padding="max_length", truncation=True, max_length=L,
                     return_tensors="pt")
        B, M = len(texts), len(texts[0])
        return model.encode_text(t["input_ids"].view(B, M, L), t["attention_mask"].view(B, M, L))

    for batch in loader:
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, M, L)
        B, M, _ = ids.shape
        clips, video = model.encode_video(batch["video"], M, batch.get("depth"))  # (B, M, E) or None, (B, E)
        sents, para = model.encode_text(ids, mask)  # (B, M, E), (B, E)
        videos.append(video.float())
        paragraphs.append(para.float())
        texts = [[s["text"] for s in meta["sentences"]][:M] for meta in batch["meta"]]  # eval: the first M
        probes = [ProbeTexts(key, t, relation_kinds(t), shuffles) for key, t in zip(batch["key"], texts)]
        K = min(len(p.orders) for p in probes)
        if K:
            orders = torch.tensor([p.orders[:K] for p in probes])  # (B, K, M)
            rows = torch.arange(B)[:, None, None]
            shuffled_ids, shuffled_mask = ids[rows, orders], mask[rows, orders]  # (B, K, M, L)
            _, shuffled = model.encode_text(shuffled_ids.flatten(0, 1), shuffled_mask.flatten(0, 1))  # (B*K, E)
            add("order", *order_scores(video, torch.cat([para[:, None], shuffled.view(B, K, -1)], 1)))
            if clips is not None:
                add("order_clips", *alignment_scores(clips, sents, orders))
        for kind in FLIPS:
            if not all(kind in p.all_flipped for p in probes):
                continue
            flipped_sents, _ = encode([p.all_flipped[kind] for p in probes])  # (B, M, E)
            if clips is not None:
                add(f"{kind}_clip", *relation_scores(clips, sents, flipped_sents))
            _, one = encode([p.one_flipped[kind] for p in probes])  # (B, E)
            add(f"{kind}_para", (video * para).sum(-1), (video * one).sum(-1))
    model.train(was_training)
    if not videos:
        raise RuntimeError(f"{cfg.data.val_shards} yielded no samples")
    similarity = torch.cat(paragraphs) @ torch.cat(videos).t()  # (N paragraphs, N videos)
    out = {"num_videos": similarity.shape[0], "R1": retrieval_metrics(similarity)["R1"]}
    for name in PROBES:
        w, n = sums.get(name, (0.0, 0))
        out[name] = 100.0 * w / n if n else None
        out[f"{name}_n"] = n
    return out
