"""The task heads on tiny tensors: beam search against brute force, masked losses, the optimizer groups."""
import itertools

import pytest
import torch

from finetune.decoder import CaptionDecoder
from finetune.heads import masked_cross_entropy

PAD, BOS, EOS = 0, 1, 2


def tiny_decoder(max_words=3, vocab=5, use_depth=True):
    torch.manual_seed(0)
    d = CaptionDecoder(vocab, video_dim=8, dim=16, layers=2, heads=2, max_words=max_words, max_frames=8,
                       depth_patch=4, use_depth=use_depth, pad=PAD, bos=BOS, eos=EOS).eval()
    for p in d.parameters():  # larger weights than the initialisation: peaked, distinct distributions
        p.data.mul_(3.0)
    return d


def sequence_score(d, video, depth, seq):
    """Mean log-probability per token of `seq` (without <bos>), the quantity beam search ranks by."""
    tokens = torch.tensor([[BOS] + seq])
    logp = d.logits(tokens[:, :-1], video, depth).log_softmax(-1)[0]  # (W, V)
    return sum(logp[i, t].item() for i, t in enumerate(seq)) / len(seq)


def test_beam_search_finds_the_best_sequence_and_greedy_follows_the_argmax():
    d = tiny_decoder()
    words = [3, 4]  # what can be generated besides <eos>
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        video, depth = torch.randn(1, 4, 16, generator=g), torch.randn(1, 8, 16, generator=g)
        candidates = [list(p) + [EOS] for n in range(3) for p in itertools.product(words, repeat=n)]
        candidates += [list(p) for p in itertools.product(words, repeat=3)]  # stopped by max_words
        best = max(candidates, key=lambda s: sequence_score(d, video, depth, s))
        (found,) = d.generate(video, depth, beam=len(candidates))
        assert found == best, (found, best)
        # greedy: at each step the argmax of the next-token distribution (never <pad> or <bos>)
        seq = []
        while len(seq) < 3 and (not seq or seq[-1] != EOS):
            logits = d.logits(torch.tensor([[BOS] + seq]), video, depth)[0, -1]
            logits[[PAD, BOS]] = float("-inf")
            seq.append(int(logits.argmax()))
        assert d.generate(video, depth, beam=1) == [seq]


def test_generate_in_a_batch_equals_one_by_one():
    d = tiny_decoder(max_words=5, vocab=9, use_depth=False)
    video = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(5))
    together = d.generate(video, None, beam=3)
    assert together == [d.generate(video[i:i + 1], None, beam=3)[0] for i in range(3)]


def test_masked_cross_entropy():
    logits = torch.randn(3, 4, requires_grad=True)
    assert masked_cross_entropy(logits, torch.tensor([-100, -100, -100])).item() == 0.0
    labels = torch.tensor([1, -100, 2])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert masked_cross_entropy(logits, labels).item() == pytest.approx(expected.item())
