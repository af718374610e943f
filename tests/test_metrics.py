"""Retrieval metrics against hand-computed values."""
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
