"""Retrieval metrics against hand-computed values."""
import math
from collections import Counter

import pytest
import torch

from pretrain.metrics import chance_metrics, retrieval_metrics, retrieval_ranks


def test_ranks_by_hand_with_ties():
    s = torch.tensor([[0.9, 0.1, 0.2, 0.0],   # gt best -> rank 1
                      [0.5, 0.4, 0.6, 0.1],   # two above -> rank 3
                      [0.3, 0.3, 0.3, 0.3],   # tied with 3 others -> rank 1 + 3/2 in expectation
                      [0.8, 0.7, 0.9, 0.1]])  # three above -> rank 4
    assert retrieval_ranks(s).tolist() == [1, 3, 2.5, 4]
    assert retrieval_ranks(s, chunk=3).tolist() == [1, 3, 2.5, 4]  # chunking changes nothing
    m = retrieval_metrics(s)
    assert m["R1"] == pytest.approx((1 + 0 + 1 / 4 + 0) / 4 * 100)  # the tied row is first 1 time in 4
    assert m["R5"] == pytest.approx(100.0)
    assert m["MedR"] == pytest.approx(2.75) and m["MeanR"] == pytest.approx(2.625)


def test_a_collapsed_or_diverged_model_scores_chance_or_worse_not_perfect():
    constant = retrieval_metrics(torch.zeros(10, 10))  # every score equal: a collapsed model
    assert constant == pytest.approx(chance_metrics(10))
    nan = retrieval_metrics(torch.full((10, 10), float("nan")))  # a diverged model
    assert nan["R1"] == 0.0 and nan["R5"] == 0.0 and nan["MeanR"] == 10.0
    s = torch.eye(4)
    s[2, 2] = float("nan")  # one NaN ground truth ranks last; a NaN elsewhere ranks below everything
    s[0, 3] = float("nan")
    assert retrieval_ranks(s).tolist() == [1, 1, 4, 1]


def test_perfect_and_chance():
    assert retrieval_metrics(torch.eye(20))["R1"] == 100.0
    c = chance_metrics(50)
    assert c["R1"] == pytest.approx(2.0) and c["R10"] == pytest.approx(20.0) and c["MedR"] == pytest.approx(25.5)


def test_random_similarity_scores_near_chance():
    g = torch.Generator().manual_seed(0)
    m = retrieval_metrics(torch.randn(2000, 2000, generator=g), chunk=256)
    assert abs(m["R10"] - 0.5) < 0.5 and abs(m["MedR"] - 1000) < 100


# ---- ranks: the other direction, chunking at scale, against a brute-force reference ---------------

from pretrain.metrics import accuracy, caption_metrics, format_table, recall_curve  # noqa: E402


def reference_ranks(s: torch.Tensor) -> list[float]:
    """SciPy's average rank of the ground truth among all scores of its row (descending)."""
    from scipy.stats import rankdata
    return [float(rankdata(-s[i].numpy(), method="average")[i]) for i in range(s.shape[0])]


def monte_carlo_recall(s: torch.Tensor, k: int, trials: int = 4000) -> float:
    """R@k with ties broken by a fresh random order in every trial, CLIP4Clip-style (argsort the row)."""
    g = torch.Generator().manual_seed(3)
    hits = 0.0
    for _ in range(trials):
        order = torch.argsort(s + 1e-6 * torch.rand(s.shape, generator=g), dim=1, descending=True)
        hits += (order[:, :k] == torch.arange(s.shape[0])[:, None]).any(dim=1).double().mean().item()
    return 100.0 * hits / trials


def test_ranks_match_scipy_and_recalls_match_random_tie_breaking_both_directions():
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 4, (60, 60), generator=g).float()  # 4 distinct values: ties everywhere
    assert retrieval_ranks(s, chunk=7).tolist() == pytest.approx(reference_ranks(s))
    assert retrieval_ranks(s.t(), chunk=7).tolist() == pytest.approx(reference_ranks(s.t()))  # video -> text
    small = torch.randint(0, 3, (12, 12), generator=g).float()
    m = retrieval_metrics(small)
    for k in (1, 5, 10):
        assert m[f"R{k}"] == pytest.approx(monte_carlo_recall(small, k), abs=1.5)


def test_5000_by_5000_in_chunks_equals_one_chunk():
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(5000, 5000, generator=g) * 4).round()  # ties included
    s.diagonal().add_(3.0)  # some signal, so ranks spread over the whole range
    small = retrieval_ranks(s, chunk=256)  # at most 256 x 5000 compared at a time
    assert torch.equal(small, retrieval_ranks(s, chunk=5000))
    m = retrieval_metrics(s, chunk=256)
    assert m == retrieval_metrics(s, chunk=5000)
    assert m["MeanR"] == pytest.approx(small.double().mean().item())


def test_recall_curve_and_accuracy_by_hand():
    s = torch.tensor([[0.9, 0.1, 0.2, 0.0], [0.5, 0.4, 0.6, 0.1], [0.3, 0.3, 0.3, 0.3], [0.8, 0.7, 0.9, 0.1]])
    assert recall_curve(s) == pytest.approx([31.25, 37.5, 68.75, 100.0])  # ranks 1, 3, 4; the tied row 1..4
    assert recall_curve(s, max_k=2) == pytest.approx([31.25, 37.5])
    assert recall_curve(s)[4 - 1] == retrieval_metrics(s)["R5"]
    assert accuracy([1, 2, 3, "a"], [1, 0, 3, "a"]) == pytest.approx(75.0)
    assert accuracy([], []) == 0.0


def test_format_table_leaves_missing_columns_blank():
    table = format_table({"finetuned": {"accuracy": 61.5}, "chance": {"accuracy": 25.0, "chance": 25.0}},
                         ["accuracy", "chance"])
    assert "61.50" in table and table.splitlines()[1].rstrip().endswith("-")


# ---- captions: BLEU-4 and CIDEr against values computed from the definitions ----------------------


def test_bleu4_by_hand():
    # precisions 4/5, 3/4, 2/3, 1/2 and no brevity penalty: BLEU = (0.2) ** (1/4)
    m = caption_metrics({"v": "a b c d e"}, {"v": ["a b c d f"]})
    assert m["BLEU4"] == pytest.approx(100 * 0.2 ** 0.25, abs=1e-4)
    # all precisions 1, hypothesis of 4 words against a reference of 8: brevity penalty exp(1 - 8/4)
    assert caption_metrics({"v": "a b c d"}, {"v": ["a b c d e f g h"]})["BLEU4"] == pytest.approx(
        100 * math.exp(-1), abs=1e-4)
    # clipping: "the" counts at most twice, no 3-gram matches -> BLEU 0
    assert caption_metrics({"v": "the the the the"}, {"v": ["the cat", "a the the"]})["BLEU4"] < 1e-3
    # case and punctuation do not matter
    assert caption_metrics({"v": "A, B c d!"}, {"v": ["a b C d"]})["BLEU4"] == pytest.approx(100.0)


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def cider_d(predictions: dict, references: dict, sigma: float = 6.0) -> float:
    """CIDEr-D from its definition (Vedantam et al. 2015, with the COCO evaluation's D changes): per n,
    tf-idf vectors with document frequencies over the videos' reference sets, the hypothesis clipped
    to each reference, cosine, a Gaussian penalty on the length difference, averaged over n = 1..4 and
    the references, times 10."""
    keys = sorted(predictions)
    log_n = math.log(len(keys))
    df = Counter(g for k in keys for n in range(1, 5) for g in set().union(*(ngrams(r.split(), n) for r in references[k])))

    def vec(sentence: str, n: int) -> dict:
        return {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in ngrams(sentence.split(), n).items()}

    total = 0.0
    for k in keys:
        hyp, score = predictions[k], 0.0
        for ref in references[k]:
            delta = (len(hyp.split()) - 1) - (len(ref.split()) - 1)  # lengths counted in bigrams, as the COCO code does
            per_n = []
            for n in range(1, 5):
                vh, vr = vec(hyp, n), vec(ref, n)
                nh, nr = math.sqrt(sum(v * v for v in vh.values())), math.sqrt(sum(v * v for v in vr.values()))
                dot = sum(min(vh[g], vr.get(g, 0.0)) * vr.get(g, 0.0) for g in vh)
                val = dot / (nh * nr) if nh and nr else 0.0
                per_n.append(val * math.exp(-delta ** 2 / (2 * sigma ** 2)))
            score += sum(per_n) / 4
        total += 10.0 * score / len(references[k])
    return total / len(keys)


def test_cider_against_the_definition():
    predictions = {"v1": "a red circle moves left", "v2": "a man is cooking food", "v3": "two dogs run on the grass"}
    references = {"v1": ["a red circle moves to the left", "a circle moves left"],
                  "v2": ["a man cooks food in a kitchen", "someone is cooking", "a man is cooking"],
                  "v3": ["dogs are running on grass", "two dogs play outside"]}
    got = caption_metrics(predictions, references)["CIDEr"]
    assert got == pytest.approx(100 * cider_d(predictions, references), rel=1e-6)
    assert got > 0
    # the same caption for every video scores lower than the right captions
    same = {k: "a man is cooking food" for k in predictions}
    assert caption_metrics(same, references)["CIDEr"] < got


def test_demo_fails_when_retrieval_is_not_well_above_chance(tmp_path):
    import json

    from pretrain.evaluate import check_learned

    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"num_videos": 64, "paragraph_to_video": {"R1": 7.0}, "chance": chance_metrics(64)}))
    with pytest.raises(SystemExit, match=r"did not learn: paragraph-to-video R@1 7.00% against chance 1.56%"):
        check_learned(path, 5.0)  # 7.0 < 5 x 1.5625
    assert "R@1 7.00%" in check_learned(path, 4.0)
