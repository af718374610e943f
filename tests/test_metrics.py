"""Retrieval metrics against hand-computed values."""
import math
from collections import Counter

import pytest
import torch

from finetune.metrics import chance_metrics, retrieval_metrics, retrieval_ranks


def test_ranks_by_hand_with_ties():
    s = torch.tensor([[0.9, 0.1, 0.2, 0.0],   # gt best -> rank 1
                      [0.5, 0.4, 0.6, 0.1],   # two above -> rank 3
                      [0.3, 0.3, 0.3, 0.3],   # all tied -> rank 1 (ties favour the query)
                      [0.8, 0.7, 0.9, 0.1]])  # three above -> rank 4
    assert retrieval_ranks(s).tolist() == [1, 3, 1, 4]
    assert retrieval_ranks(s, chunk=3).tolist() == [1, 3, 1, 4]  # chunking changes nothing
    m = retrieval_metrics(s)
    assert m["R1"] == pytest.approx(50.0) and m["R5"] == pytest.approx(100.0)
    assert m["MedR"] == pytest.approx(2.0) and m["MeanR"] == pytest.approx(2.25)


def test_perfect_and_chance():
    assert retrieval_metrics(torch.eye(20))["R1"] == 100.0
    c = chance_metrics(50)
    assert c["R1"] == pytest.approx(2.0) and c["R10"] == pytest.approx(20.0) and c["MedR"] == pytest.approx(25.5)


def test_random_similarity_scores_near_chance():
    g = torch.Generator().manual_seed(0)
    m = retrieval_metrics(torch.randn(2000, 2000, generator=g), chunk=256)
    assert abs(m["R10"] - 0.5) < 0.5 and abs(m["MedR"] - 1000) < 100


# ---- ranks: the other direction, chunking at scale, against a brute-force reference ---------------

from finetune.metrics import accuracy, caption_metrics, format_table, recall_curve  # noqa: E402


def brute_force_ranks(s: torch.Tensor) -> list[int]:
    """1 + the number of candidates strictly more similar than the ground truth, one query at a time."""
    return [1 + sum(1 for j in range(s.shape[1]) if s[i, j] > s[i, i]) for i in range(s.shape[0])]


def test_ranks_match_brute_force_with_many_ties_both_directions():
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 4, (60, 60), generator=g).float()  # 4 distinct values: ties everywhere
    assert retrieval_ranks(s, chunk=7).tolist() == brute_force_ranks(s)
    assert retrieval_ranks(s.t(), chunk=7).tolist() == brute_force_ranks(s.t())  # video -> text


def test_5000_by_5000_in_chunks_equals_one_chunk():
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(5000, 5000, generator=g) * 4).round()  # ties included
    s.diagonal().add_(3.0)  # some signal, so ranks spread over the whole range
    small = retrieval_ranks(s, chunk=256)  # at most 256 x 5000 compared at a time
    assert torch.equal(small, retrieval_ranks(s, chunk=5000))
    m = retrieval_metrics(s, chunk=256)
    assert m["R1"] == pytest.approx(100.0 * (small == 1).double().mean().item())
    assert m["MeanR"] == pytest.approx(small.double().mean().item())


def test_recall_curve_and_accuracy_by_hand():
    assert recall_curve(torch.tensor([1, 3, 1, 4])) == pytest.approx([50.0, 50.0, 75.0, 100.0])
    assert recall_curve(torch.tensor([1, 3, 1, 4]), max_k=2) == pytest.approx([50.0, 50.0])
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
