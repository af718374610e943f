"""The losses against references written directly from the equations, with loops."""
import math

import torch
import torch.nn.functional as F

from pretrain.losses import (mask_tokens, mlm_loss, mtc_labels, mtc_loss, sample_mtc_indices, self_similarity_loss,
                             vpc_loss, vtm_labels)


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


def test_mtc_with_one_video_uses_its_own_candidates_only():
    clips, sents = unit(1, 4, 8, seed=10), unit(1, 4, 8, seed=11)
    key, val, neg = torch.tensor([[0, 3]]), torch.tensor([[1, 2]]), torch.tensor([0])
    got = mtc_loss(clips, sents, key, val, neg, num_neg=3)  # a global batch of 1: no other video to draw from
    assert math.isclose(float(got), reference_mtc(clips, sents, key, val, neg, 0.05, 0), rel_tol=1e-9)


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
    assert all(torch.equal(a, b) for a, b in zip((k, v, n), again, strict=True))


def reference_ssl(v, t, tau, target_tau, threshold, ls):
    """STGT's soft-target loss, entry by entry."""
    B = v.shape[0]
    total = 0.0
    for logits_of in (lambda i, j: float(v[i] @ t[j]) / tau, lambda i, j: float(t[i] @ v[j]) / tau):
        for i in range(B):
            p = []
            for j in range(B):
                x = max(float(v[i] @ v[j]), 0.0) * max(float(t[i] @ t[j]), 0.0)
                p.append(-100.0 if x < threshold else x)
            z = sum(math.exp(target_tau * x) for x in p)
            target = [math.exp(target_tau * x) / z for x in p]
            target = [(1 - ls) * y + ls / B for y in target]
            logits = [logits_of(i, j) for j in range(B)]
            lse = math.log(sum(math.exp(x) for x in logits))
            total += -sum(y * (x - lse) for y, x in zip(target, logits, strict=True)) / B
    return total / 2


def test_self_similarity_loss_matches_reference():
    v, t = unit(6, 8, seed=10), unit(6, 8, seed=11)
    t[3] = v[3]  # make some pairs similar so soft targets are not one-hot
    t = F.normalize(t, dim=-1)
    got = self_similarity_loss(v, t, temperature=0.07, target_temperature=5.0, threshold=0.05, label_smoothing=0.01)
    assert math.isclose(float(got), reference_ssl(v, t, 0.07, 5.0, 0.05, 0.01), rel_tol=1e-9)


def test_self_similarity_targets_are_detached():
    v, t = unit(4, 8, seed=12).requires_grad_(), unit(4, 8, seed=13)
    self_similarity_loss(v, t).backward()
    g_with = v.grad.clone()
    # the same loss with targets computed from constants gives the same gradient
    v2 = v.detach().clone().requires_grad_()
    with torch.no_grad():
        p = (v @ v.t()).clamp(min=0) * (t @ t.t()).clamp(min=0)
        target = (5.0 * p.masked_fill(p < 0.05, -100.0)).softmax(1)
    logits = v2 @ t.t() / 0.07
    ((F.cross_entropy(logits, target, label_smoothing=0.01) + F.cross_entropy(logits.t(), target, label_smoothing=0.01)) / 2).backward()
    torch.testing.assert_close(g_with, v2.grad)


def test_mask_tokens_masks_only_real_tokens_at_the_rate_asked():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (64, 4, 16), generator=g)
    ids[..., 0], ids[..., 10] = 101, 102
    mask = torch.ones_like(ids)
    mask[..., 11:] = 0
    ids[..., 11:] = 0
    masked, labels = mask_tokens(ids, mask, mask_id=103, vocab_size=30522, special_ids=[0, 101, 102], probability=0.15,
                                 generator=g)
    chosen = labels != -100
    assert not chosen[..., 0].any() and not chosen[..., 10:].any()  # specials and padding never chosen
    assert abs(chosen.float().sum() / (64 * 4 * 9) - 0.15) < 0.02
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert abs((masked[chosen] == 103).float().mean() - 0.8) < 0.05


def test_vtm_labels_and_all_ignored_mlm():
    assert vtm_labels(5).tolist() == [0, 0, 1, 1, 1]
    logits = torch.randn(2, 3, 10, requires_grad=True)
    assert float(mlm_loss(logits, torch.full((2, 3), -100))) == 0.0
    labels = torch.tensor([[1, -100, 2], [-100, -100, 3]])
    ref = F.cross_entropy(logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(mlm_loss(logits, labels), ref)


def test_self_similarity_targets_can_carry_gradients_as_in_stgt_code():
    v, t = unit(4, 8, seed=14).requires_grad_(), unit(4, 8, seed=15)
    self_similarity_loss(v, t).backward()
    detached = v.grad.clone()
    v.grad = None
    self_similarity_loss(v, t, detach_targets=False).backward()
    assert not torch.allclose(detached, v.grad)
