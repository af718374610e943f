"""Model shapes and equivalences on tiny tensors."""
import itertools
import math

import pytest
import torch

from pretrain.model import ModelConfig, VideoTextModel
from pretrain.text_encoder import HierarchicalTextEncoder, TextEncoderConfig
from pretrain.htwa import HTWAttention
from pretrain.video_encoder import VideoEncoder, VideoEncoderConfig


def reference_full_attention(block: HTWAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention with a single window over the whole (T, h, w) input, written out token by token."""
    B, T, h, w, D = x.shape
    attn, H = block.attn, block.attn.heads
    y = x.reshape(B, T * h * w, D)
    q, k, v = attn.qkv(y).chunk(3, dim=-1)
    coords = list(itertools.product(range(T), range(h), range(w)))
    wt, wh, ww = attn.window
    bias = torch.empty(H, len(coords), len(coords))
    for i, (ti, hi, wi) in enumerate(coords):
        for j, (tj, hj, wj) in enumerate(coords):
            flat = ((ti - tj + wt - 1) * (2 * wh - 1) + (hi - hj + wh - 1)) * (2 * ww - 1) + (wi - wj + ww - 1)
            bias[:, i, j] = attn.bias_table[flat]
    Dh = D // H
    outs = []
    for head in range(H):
        s = slice(head * Dh, (head + 1) * Dh)
        logits = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(Dh) + bias[head]
        outs.append(logits.softmax(-1) @ v[..., s])
    return attn.proj(torch.cat(outs, dim=-1)).reshape(B, T, h, w, D)


def test_htwa_window_covering_the_input_equals_full_attention():
    torch.manual_seed(0)
    block = HTWAttention(dim=16, heads=2, window=(4, 3, 3), shift=False)
    torch.nn.init.normal_(block.attn.bias_table, std=1.0)  # make the bias matter
    x = torch.randn(2, 4, 3, 3, 16)
    torch.testing.assert_close(block(x), reference_full_attention(block, x), atol=1e-5, rtol=1e-5)
    # a window larger than the input is clipped to it, giving the same full attention
    big = HTWAttention(dim=16, heads=2, window=(8, 6, 6), shift=False)
    big.load_state_dict({k: v for k, v in block.state_dict().items() if k != "attn.bias_table"}, strict=False)
    torch.nn.init.normal_(big.attn.bias_table, std=1.0)
    torch.testing.assert_close(big(x), reference_full_attention(big, x), atol=1e-5, rtol=1e-5)


def test_htwa_windows_do_not_mix_tokens_across_windows():
    torch.manual_seed(0)
    block = HTWAttention(dim=8, heads=2, window=(2, 2, 2), shift=False)
    x = torch.randn(1, 4, 4, 4, 8)
    x2 = x.clone()
    x2[:, 2:, 2:, 2:] += torch.randn(2, 2, 2, 8)  # change only the last window in time and space
    diff = (block(x) - block(x2)).abs().sum(-1)[0]  # (T, h, w)
    assert torch.all(diff[:2] == 0) and torch.all(diff[:, :2] == 0) and torch.all(diff[2:, 2:, 2:] > 0)
    # the same attention over the whole input mixes everything
    whole = HTWAttention(dim=8, heads=2, window=(4, 4, 4), shift=False)
    whole.load_state_dict({k: v for k, v in block.state_dict().items() if "bias_table" not in k}, strict=False)
    assert torch.all((whole(x) - whole(x2)).abs().sum(-1)[0, :2] > 0)


def test_shifted_block_mixes_neighbouring_windows_in_space_only():
    torch.manual_seed(0)
    block = HTWAttention(dim=8, heads=2, window=(2, 2, 2), shift=True)
    x = torch.randn(1, 4, 4, 4, 8)
    x2 = x.clone()
    x2[:, 0, 1, 1] += torch.randn(8)
    diff = (block(x) - block(x2)).abs().sum(-1)[0]
    assert torch.all(diff[2:] == 0)  # no temporal shift: other temporal windows untouched
    assert diff[0, 2, 2] > 0  # the shifted window joins patches (1, 1) and (2, 2)


def tiny_video_cfg(**kw):
    base = dict(patch_size=8, dims=[16, 32, 32], depths=[1, 2, 1], heads=[2, 2, 2], temporal_windows=[2, 4, 8],
                downsample=[True, False, False], spatial_window=[2, 2], max_frames=16, attention=["htwa"] * 3,
                merge_frames=[0, 0, 0], merge_patches=[0, 0, 0])
    base.update(kw)
    return VideoEncoderConfig(**base)


@pytest.mark.parametrize("clip_features", ["local", "final"])
def test_video_encoder_shapes_and_local_clip_features_stay_within_clips(clip_features):
    torch.manual_seed(0)
    enc = VideoEncoder(tiny_video_cfg(clip_features=clip_features, local_stage=1)).eval()
    video = torch.randint(0, 256, (2, 8, 3, 32, 32), dtype=torch.uint8)
    clips, whole = enc(video, num_clips=2)
    assert clips.shape == (2, 2, 32) and whole.shape == (2, 32)
    video2 = video.clone()
    video2[:, 4:] = 255 - video2[:, 4:]  # change the second clip only
    clips2, _ = enc(video2, num_clips=2)
    first_clip_same = torch.allclose(clips[:, 0], clips2[:, 0], atol=1e-6)
    assert first_clip_same == (clip_features == "local")


def test_bad_video_config_is_rejected_with_the_key():
    with pytest.raises(ValueError, match="model.video.dims"):
        VideoEncoderConfig(dims=[16, 32], depths=[1], heads=[2, 2], temporal_windows=[2, 4], downsample=[True, False])
    with pytest.raises(ValueError, match="downsample"):
        VideoEncoderConfig(dims=[16, 32], depths=[1, 1], heads=[2, 2], temporal_windows=[2, 4],
                           downsample=[False, False], attention=["htwa"] * 2, merge_frames=[0, 0], merge_patches=[0, 0])


def test_text_encoder_sentence_stage_equals_the_pretrained_layers():
    from transformers import AutoModel, AutoTokenizer

    cfg = TextEncoderConfig(sentence_layers=4, sentence_pooling="cls")
    enc = HierarchicalTextEncoder(cfg).eval()
    tok = AutoTokenizer.from_pretrained(cfg.resolved_path())
    sents = ["a red circle moves left in front of a blue square", "a green triangle moves up behind a cyan circle"]
    t = tok(sents, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ids, mask = t["input_ids"].view(1, 2, 16), t["attention_mask"].view(1, 2, 16)
    sentences, paragraph = enc(ids, mask)
    bert = AutoModel.from_pretrained(cfg.resolved_path()).eval()
    with torch.no_grad():
        ref = bert(**t, output_hidden_states=True).hidden_states[4][:, 0]  # (2, D) [CLS] after 4 layers
    torch.testing.assert_close(sentences[0], ref, atol=1e-5, rtol=1e-5)
    assert paragraph.shape == (1, bert.config.hidden_size)
    # padding tokens of a sentence do not change the paragraph feature
    ids2 = ids.clone()
    ids2[mask == 0] = 1037
    torch.testing.assert_close(enc(ids2, mask)[1], paragraph, atol=1e-5, rtol=1e-5)
    # mean pooling: the masked mean of the same hidden states
    enc.pooling = "mean"
    m = t["attention_mask"][..., None].float()
    hidden = bert(**t, output_hidden_states=True).hidden_states[4]
    torch.testing.assert_close(enc(ids, mask)[0][0], (hidden * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_a_gradient_and_losses_are_finite():
    torch.manual_seed(0)
    cfg = ModelConfig(video=tiny_video_cfg(), text=TextEncoderConfig(sentence_layers=3), embed_dim=32)
    model = VideoTextModel(cfg)
    B, M, L = 4, 2, 8
    video = torch.randint(0, 256, (B, 8, 3, 32, 32), dtype=torch.uint8)
    ids = torch.randint(1000, 2000, (B, M, L))
    ids[..., 0] = 101
    mask = torch.ones(B, M, L, dtype=torch.long)
    out = model({"video": video, "input_ids": ids, "attention_mask": mask}, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"vpc", "mtc", "loss"} and all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["vpc"] + 0.25 * out["mtc"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_stage2_trains_only_the_fusion_stack_with_mlm_and_vtm():
    from pretrain.model import LossConfig

    torch.manual_seed(0)
    cfg = ModelConfig(video=tiny_video_cfg(), text=TextEncoderConfig(sentence_layers=3), embed_dim=32,
                      fusion_layers=1, loss=LossConfig(vpc_weight=0, mtc_weight=0, mlm_weight=1, vtm_weight=10))
    model = VideoTextModel(cfg)
    model.freeze(["video.", "text.", "video_local", "video_global", "text_local", "text_global"])
    B, M, L = 4, 2, 8
    ids = torch.randint(1000, 2000, (B, M, L))
    ids[..., 0], ids[..., -1] = 101, 102
    batch = {"video": torch.randint(0, 256, (B, 8, 3, 32, 32), dtype=torch.uint8), "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}
    out = model(batch)
    assert set(out) == {"vtm", "mlm", "loss"}
    torch.testing.assert_close(out["loss"], out["mlm"] + 10 * out["vtm"])
    out["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fusion.") for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_lfvila_text_split_leaves_the_later_layers_to_the_fusion_stack():
    """LF-VILA from BERT-large: 8 layers per sentence, 4 over the paragraph, layers 12-23 start the stage-2 fusion
    stack. Here from the packaged 6-layer model: 2 + 2, and the fusion stack's 2 layers are layers 4 and 5."""
    from transformers import AutoModel

    from pretrain.text_encoder import default_text_model

    bert = AutoModel.from_pretrained(default_text_model(), local_files_only=True)
    model = VideoTextModel(ModelConfig(video=tiny_video_cfg(), text=TextEncoderConfig(sentence_layers=2, paragraph_layers=2),
                                       fusion_layers=2, loss=dict_loss()))
    assert len(model.text.sentence_layers) == 2 and len(model.text.paragraph_layers) == 2
    for i, layer in enumerate(model.fusion.layers):
        ours, theirs = layer.state_dict(), bert.encoder.layer[4 + i].state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.text.spare_layers == []  # not kept alive beside the fusion copies
    with pytest.raises(ValueError, match="bad value for model.text.paragraph_layers: expected at most 2"):
        HierarchicalTextEncoder(TextEncoderConfig(sentence_layers=4, paragraph_layers=3))


def dict_loss():
    from pretrain.model import LossConfig

    return LossConfig(mlm_weight=1.0, vtm_weight=1.0)
