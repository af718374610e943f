"""The losses against references written directly from the equations, with loops."""
import math

import torch
import torch.nn.functional as F

from pretrain.losses import mtc_labels, mtc_loss, sample_mtc_indices, vpc_loss


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_vpc_loss_matches_both_direction_infonce():
    v, p = unit(5, 8, seed=1), unit(5, 8, seed=2)
    tau = 0.05
    ref = 0.0
    for i in range(5):
        row = [float(v[i] @ p[j]) / tau for j in range(5)]
        col = [float(v[j] @ p[i]) / tau for j in range(5)]
        ref += -(row[i] - math.log(sum(math.exp(x) for x in row))) / 5
        ref += -(col[i] - math.log(sum(math.exp(x) for x in col))) / 5
    assert math.isclose(float(vpc_loss(v, p, tau)), ref, rel_tol=1e-9)


def test_vpc_loss_is_low_for_aligned_and_high_for_shuffled():
    v = unit(6, 16, seed=3)
    assert vpc_loss(v, v) < 0.01
    assert vpc_loss(v, v.roll(1, dims=0)) > 10


def reference_mtc(clips, sents, key, val, neg, tau, num_neg):
    """LF-VILA MTC, one anchor at a time: label = nearest value in time (ties ignored); extra negatives are
    the neg_idx item of videos b-1..b-num_neg. Mean over kept anchors per direction, directions summed."""
    B = clips.shape[0]
    total = 0.0
    for anchors, values in ((sents, clips), (clips, sents)):
        terms = []
        for b in range(B):
            for i in key[b].tolist():
                d = [abs(i - j) for j in val[b].tolist()]
                if d.count(min(d)) > 1:
                    continue
                label = d.index(min(d))
                cands = [values[b, j] for j in val[b].tolist()]
                cands += [values[(b - s) % B, int(neg[(b - s) % B])] for s in range(1, num_neg + 1)]
                logits = [float(anchors[b, i] @ c) / tau for c in cands]
                terms.append(-(logits[label] - math.log(sum(math.exp(x) for x in logits))))
        total += sum(terms) / len(terms) if terms else 0.0
    return total


def test_mtc_labels_nearest_and_ties():
    key = torch.tensor([[0, 3], [1, 2]])
    val = torch.tensor([[1, 3], [0, 2]])
    # anchor 0: |0-1|=1, |0-3|=3 -> 0; anchor 3: 2, 0 -> 1; anchor 1: 1, 1 -> tie; anchor 2: 2, 0 -> 1
    assert mtc_labels(key, val).tolist() == [[0, 1], [-100, 1]]


def test_mtc_loss_matches_reference_with_ties():
    B, M, D = 5, 4, 8
    clips, sents = unit(B, M, D, seed=4), unit(B, M, D, seed=5)
    key = torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1], [1, 0]])
    val = torch.tensor([[1, 3], [0, 2], [1, 3], [2, 0], [0, 2]])  # row 1 anchor 1 and row 4 anchor 1 tie
    neg = torch.tensor([3, 0, 1, 2, 2])
    got = mtc_loss(clips, sents, key, val, neg, temperature=0.07, num_neg=3)
    ref = reference_mtc(clips, sents, key, val, neg, 0.07, 3)
    assert math.isclose(float(got), ref, rel_tol=1e-9)


def test_mtc_negatives_never_come_from_the_same_video():
    B, M, D = 4, 4, 6
    clips, sents = unit(B, M, D, seed=6), unit(B, M, D, seed=7)
    key, val, neg = sample_mtc_indices(B, M, generator=torch.Generator().manual_seed(0))
    base = mtc_loss(clips, sents, key, val, neg, num_neg=3)
    # with num_neg = B - 1 every other video contributes one negative, the video itself none
    ref = reference_mtc(clips, sents, key, val, neg, 0.05, 3)
    assert math.isclose(float(base), ref, rel_tol=1e-9)
    # num_neg larger than the batch allows is capped at B - 1 instead of wrapping onto b itself.
    assert math.isclose(float(mtc_loss(clips, sents, key, val, neg, num_neg=10)), ref, rel_tol=1e-9)


def test_mtc_all_ignored_is_zero_not_nan_and_has_a_graph():
    clips = unit(3, 4, 8, seed=8).requires_grad_()
    sents = unit(3, 4, 8, seed=9)
    key = torch.tensor([[1], [1], [2]])
    val = torch.tensor([[0, 2], [2, 0], [1, 3]])  # every anchor is equidistant from both values
    loss = mtc_loss(clips, sents, key, val, torch.zeros(3, dtype=torch.long))
    assert float(loss) == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert clips.grad is not None and torch.all(clips.grad == 0)


def test_sample_mtc_indices_shapes_ranges_and_determinism():
    k, v, n = sample_mtc_indices(7, 4, 2, 3, generator=torch.Generator().manual_seed(1))
    assert k.shape == (7, 2) and v.shape == (7, 3) and n.shape == (7,)
    assert all(len(set(r)) == 2 for r in k.tolist()) and all(len(set(r)) == 3 for r in v.tolist())
    assert k.max() < 4 and v.max() < 4 and n.max() < 4 and min(k.min(), v.min(), n.min()) >= 0
    again = sample_mtc_indices(7, 4, 2, 3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((k, v, n), again))
