"""model.loss.vpc_warmup_steps: VPC alone for the first N optimizer steps, then the self-similarity loss alone
(our STGT-from-scratch schedule), on a tiny model."""
import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.model import LossConfig, ModelConfig, VideoTextModel
from pretrain.text_encoder import TextEncoderConfig
from pretrain.video_encoder import VideoEncoderConfig


def test_weights_hand_over_from_vpc_to_ssl_at_the_warmup_step():
    c = LossConfig(vpc_weight=1.0, mtc_weight=0.0, ssl_weight=2.0, vpc_warmup_steps=3)
    assert [(c.weights(s)["vpc"], c.weights(s)["ssl"]) for s in range(5)] == [(1, 0)] * 3 + [(0, 2)] * 2
    plain = LossConfig(vpc_weight=1.0, mtc_weight=0.25, ssl_weight=0.5)
    assert plain.weights() == plain.weights(10**6) == {"vpc": 1.0, "mtc": 0.25, "ssl": 0.5, "mlm": 0.0, "vtm": 0.0}
    with pytest.raises(ValueError, match="needs the optimizer step"):
        c.weights(None)


@pytest.mark.parametrize("override", ["model.loss.vpc_weight=0", "model.loss.ssl_weight=0", "model.loss.vpc_warmup_steps=-1"])
def test_a_schedule_without_both_losses_is_a_config_error(override):
    keys = ["model.loss.vpc_weight=1", "model.loss.ssl_weight=1", "model.loss.vpc_warmup_steps=4", override]
    if override.endswith("=-1"):
        keys.remove("model.loss.vpc_warmup_steps=4")
    with pytest.raises(ConfigError, match="model.loss.vpc_warmup_steps"):
        load_config(None, keys)


def tiny_model(**loss) -> VideoTextModel:
    torch.manual_seed(0)
    video = VideoEncoderConfig(patch_size=8, dims=[16, 16], depths=[1, 1], heads=[2, 2], attention=["full", "graph"],
                               temporal_windows=[1, 1], downsample=[False, False], merge_frames=[0, 0],
                               merge_patches=[0, 0], max_frames=8, clip_features="final", local_stage=1)
    return VideoTextModel(ModelConfig(video=video, text=TextEncoderConfig(sentence_layers=2), embed_dim=16,
                                      loss=LossConfig(mtc_weight=0.0, **loss)))


def batch(B=4, M=2, L=6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (B, M, L), generator=g)
    ids[..., 0], ids[..., -1] = 101, 102
    return {"video": torch.randint(0, 256, (B, 8, 3, 16, 16), dtype=torch.uint8, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def test_forward_trains_vpc_before_the_step_and_ssl_from_it():
    model = tiny_model(vpc_weight=1.0, ssl_weight=1.0, vpc_warmup_steps=2)
    b = batch()
    for step, trained, reported in ((1, "vpc", "ssl"), (2, "ssl", "vpc")):
        out = model(b, step=step)
        assert set(out) == {"vpc", "ssl", "loss"}
        torch.testing.assert_close(out["loss"], out[trained])
        assert out[trained].requires_grad and not out[reported].requires_grad  # reported, not trained
    # the same losses as a model configured with that one loss alone, from the same weights
    alone = tiny_model(vpc_weight=0.0, ssl_weight=1.0)
    alone.load_state_dict(model.state_dict())
    torch.testing.assert_close(alone(b)["loss"], model(b, step=2)["loss"])
    with pytest.raises(ValueError, match="needs the optimizer step"):
        model(b)
