"""The four papers' mechanisms: equivalences and invariants on tiny tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.attention import (BandDepthAttention, band_keys, frame_band, graph_attention, similarity_graph,
                                split_heads)
from pretrain.config import ConfigError, load_config
from pretrain.token_merging import merge_frames, merge_matched, merge_patches
from pretrain.video_encoder import PRESETS, VideoEncoder, VideoEncoderConfig, preset_values

SMALL = [name for name in PRESETS if name.endswith("_small") or name == "debug"]


# ---- TESTA ------------------------------------------------------------------------------------------

def test_merging_with_r0_is_the_identity():
    x, size, metric = torch.randn(2, 6, 8, 4), torch.ones(2, 6, 8, 1), torch.randn(2, 6, 8, 3)
    for fn in (merge_frames, merge_patches):
        y, s = fn(x, size, metric, 0)
        assert torch.equal(y, x) and torch.equal(s, size)


@pytest.mark.parametrize("r_t,r_s", [(1, 3), (3, 4), (9, 9)])
def test_merged_sizes_always_sum_to_the_original_token_count(r_t, r_s):
    torch.manual_seed(r_t)
    x, size = torch.randn(2, 7, 9, 4), torch.ones(2, 7, 9, 1)
    y, s = merge_frames(x, size, torch.randn(2, 7, 9, 3), r_t)
    assert y.shape[1] == 7 - min(r_t, 3) and torch.allclose(s.sum(dim=(1, 2, 3)), torch.full((2,), 63.0))
    y, s = merge_patches(y, s, torch.randn(*y.shape[:3], 3), r_s)
    assert y.shape[2] == 9 - min(r_s, 4) and torch.allclose(s.sum(dim=(1, 2, 3)), torch.full((2,), 63.0))


def test_merge_is_a_size_weighted_average_into_the_best_partner():
    # items: A = [a0, a1] (even), B = [b0, b1] (odd); a1 matches b0 best and merges (r=1)
    x = torch.tensor([[[1.0], [10.0], [3.0], [20.0]]])  # a0, b0, a1, b1
    size = torch.tensor([[[1.0], [2.0], [3.0], [1.0]]])
    node_max, node_idx = torch.tensor([[0.1, 0.9]]), torch.tensor([[1, 0]])
    y, s = merge_matched(x, size, node_max, node_idx, r=1)
    # unmerged a0 first, then b0 (with a1 added), then b1
    assert s.flatten().tolist() == [1.0, 5.0, 1.0]
    assert y.flatten().tolist() == pytest.approx([1.0, (10 * 2 + 3 * 3) / 5, 20.0])


def test_frame_merging_merges_the_most_similar_frames():
    x = torch.randn(1, 4, 3, 2)
    metric = torch.randn(1, 4, 3, 5)
    metric[:, 2] = metric[:, 3] * 2.0  # frame 2 (set A) points exactly like frame 3 (set B)
    y, s = merge_frames(x, torch.ones(1, 4, 3, 1), metric, 1)
    assert y.shape == (1, 3, 3, 2)
    assert torch.allclose(s[0, :, 0, 0], torch.tensor([1.0, 1.0, 2.0]))  # [a0, b(1), b(3) with a(2)]
    torch.testing.assert_close(y[0, 2], (x[0, 2] + x[0, 3]) / 2)


# ---- STGT -------------------------------------------------------------------------------------------

def test_graph_attention_with_an_all_ones_graph_is_plain_attention():
    q, k, v = torch.randn(3, 2, 2, 10, 4).unbind(0)
    got = graph_attention(q, k, v, torch.ones(2, 10, 10))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v))


def test_graph_weights_scale_logits_and_missing_edges_get_no_attention():
    q, k, v = torch.randn(3, 1, 1, 3, 4).unbind(0)
    graph = torch.tensor([[[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    got = graph_attention(q, k, v, graph)
    logits = q @ k.transpose(-1, -2) / 2.0 * graph
    ref = torch.stack([
        (logits[0, 0, 0, :2].softmax(-1) @ v[0, 0, :2]),
        (logits[0, 0, 1, :2].softmax(-1) @ v[0, 0, :2]),
        v[0, 0, 2],
    ])
    torch.testing.assert_close(got[0, 0], ref)


def test_similarity_graph_is_banded_and_thresholded():
    T, N = 4, 3
    x = torch.randn(1, T * N, 8)
    g = similarity_graph(x, T, threshold=0.2)[0]
    frame = torch.arange(T).repeat_interleave(N)
    far = (frame[:, None] - frame[None, :]).abs() > 1
    assert torch.all(g[far] == 0) and torch.all(torch.diagonal(g) > 0.99)
    near = ~far
    xn = F.normalize(x[0], dim=-1)
    sim = xn @ xn.t()
    torch.testing.assert_close(g[near], torch.where(sim >= 0.2, sim, torch.zeros_like(sim))[near])
    assert frame_band(T, N).sum() == N * N * (3 * T - 2)


# ---- DAST -------------------------------------------------------------------------------------------

def test_banded_depth_attention_equals_full_attention_masked_to_the_band():
    torch.manual_seed(0)
    B, T, N, Nd, D, w = 2, 7, 3, 2, 8, 2
    attn = BandDepthAttention(D, 6, heads=2, window=w)
    x, depth = torch.randn(B, T, N, D), torch.randn(B, T, Nd, 6)
    got = attn(x, depth)
    # dense reference: every RGB token against every depth token of every frame, masked to |t - t'| <= w
    q = split_heads(attn.q(x).reshape(B, T * N, D), 2)
    k, v = (split_heads(z.reshape(B, T * Nd, D), 2) for z in attn.kv(depth).chunk(2, dim=-1))
    tq, tk = torch.arange(T).repeat_interleave(N), torch.arange(T).repeat_interleave(Nd)
    band = (tq[:, None] - tk[None, :]).abs() <= w  # (T*N, T*Nd)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(D // 2)).masked_fill(~band, float("-inf"))
    ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T * N, D)).view(B, T, N, D)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_band_keys_memory_is_linear_in_frames():
    keys, valid = band_keys(torch.randn(1, 50, 2, 4), w=3)
    assert keys.shape == (1, 50, 7 * 2, 4) and valid.shape == (50, 14)
    assert valid[0].sum() == 4 * 2 and valid[25].all()  # frame 0 sees frames 0..3; the middle sees all 7


def test_depth_attention_mask_is_right_for_every_video_of_a_batch():
    """The seed code's mask broke for batch > 1: each video must equal its own batch-of-one result."""
    torch.manual_seed(1)
    attn = BandDepthAttention(8, 8, heads=2, window=1)
    x, depth = torch.randn(3, 5, 2, 8), torch.randn(3, 5, 1, 8)
    full = attn(x, depth)
    for b in range(3):
        torch.testing.assert_close(full[b:b + 1], attn(x[b:b + 1], depth[b:b + 1]), atol=1e-6, rtol=1e-5)


# ---- presets and the encoder --------------------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_every_small_preset_runs_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    cfg = VideoEncoderConfig(**preset_values(name))
    enc = VideoEncoder(cfg)
    video = torch.randint(0, 256, (2, 16, 3, 64, 64), dtype=torch.uint8)
    depth = torch.rand(2, 16, 64, 64) if enc.uses_depth else None
    clips, whole = enc(video, num_clips=4, depth=depth)
    assert whole.shape == (2, cfg.dims[-1])
    assert (clips is None) == (cfg.clip_stage() is None)
    if clips is not None:
        assert clips.shape == (2, 4, enc.clip_dim)
    (whole.sum() + (clips.sum() if clips is not None else 0)).backward()
    unused = [n for n, p in enc.named_parameters() if p.grad is None and not n.startswith("clip_norm")]
    assert not unused, unused


def test_paper_presets_build_and_reject_bad_combinations():
    for name in PRESETS:
        VideoEncoderConfig(**preset_values(name))
    with pytest.raises(ValueError, match="TESTA merging needs attention 'divided'"):
        VideoEncoderConfig(**{**preset_values("lfvila_small"), "merge_frames": [1, 0, 0, 0]})
    with pytest.raises(ValueError, match="unknown model.video.preset"):
        preset_values("lfvila_huge")


def test_depth_preset_without_depth_maps_says_so():
    enc = VideoEncoder(VideoEncoderConfig(**preset_values("dast_small")))
    with pytest.raises(AssertionError, match="needs 'depth' maps"):
        enc(torch.zeros(1, 16, 3, 64, 64, dtype=torch.uint8), num_clips=4)


def test_preset_values_sit_under_explicit_keys_and_bad_combos_name_the_key():
    cfg = load_config(None, ["model.video.preset=stgt_small", "model.video.graph_threshold=0.3",
                             "model.video.clip_features=final"])
    assert cfg.model.video.attention == ["spatial", "graph"] and cfg.model.video.graph_threshold == 0.3
    with pytest.raises(ConfigError, match="model.loss.mtc_weight"):
        load_config(None, ["model.video.preset=testa_small"])  # TESTA merges frames: no clip features
    load_config(None, ["model.video.preset=testa_small", "model.loss.mtc_weight=0"])
    with pytest.raises(ConfigError, match="known presets"):
        load_config(None, ["model.video.preset=nope"])


def test_lfvila_maxpool_pooling_matches_a_hand_computation():
    cfg = VideoEncoderConfig(**{**preset_values("debug"), "pooling": "maxpool"})
    enc = VideoEncoder(cfg).eval()
    from pretrain.blocks import Tokens

    x = torch.randn(1, 2, 6, 4)  # grid 2 x 3: one (2, 3) window per frame
    pooled, size = enc.pool(x, Tokens(x=x, grid=(2, 3), size=torch.ones(1, 2, 6, 1)))
    assert pooled.shape == (1, 2, 1, 4) and torch.equal(pooled[0, :, 0], x[0].max(dim=1).values)
    assert size.shape == (1, 2, 1, 1)
    mean_enc = VideoEncoder(VideoEncoderConfig(**preset_values("debug")))
    mean_enc.load_state_dict(enc.state_dict())
    video = torch.randint(0, 256, (1, 8, 3, 32, 32), dtype=torch.uint8)
    assert not torch.allclose(enc(video, 4)[1], mean_enc(video, 4)[1])


@pytest.mark.parametrize("B,T,N,D,H,threshold", [(2, 5, 6, 16, 2, 0.0), (1, 7, 3, 24, 3, 0.3), (3, 1, 4, 8, 2, -1.0),
                                                 (2, 2, 9, 12, 4, 0.6)])
def test_banded_graph_attention_equals_the_dense_one(B, T, N, D, H, threshold):
    """STGT's graph only links frames t-1..t+1: computed per frame band it gives the dense (T*N)^2 result,
    forward and backward."""
    from pretrain.attention import GraphAttention

    torch.manual_seed(T * N)
    band = GraphAttention(D, H, threshold, banded=True)
    dense = GraphAttention(D, H, threshold, banded=False)
    dense.load_state_dict(band.state_dict())
    x = torch.randn(B, T * N, D)
    x = (x + 2 * x.mean(1, keepdim=True)).requires_grad_()  # similar tokens: many edges pass the threshold
    out_band = band(x, T)
    grad_band, = torch.autograd.grad(out_band.square().sum(), x)
    out_dense = dense(x, T)
    grad_dense, = torch.autograd.grad(out_dense.square().sum(), x)
    assert torch.allclose(out_band, out_dense, atol=1e-5) and torch.allclose(grad_band, grad_dense, atol=1e-5)
