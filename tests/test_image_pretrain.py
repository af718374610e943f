"""benchmarks/image_pretrain.py at tiny size: a few steps on a corpus written here, saved as a transformers
folder, reused on a second call, and loaded through model.video.init_image with nothing left unexplained."""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from image_pretrain import DONE, ImagePretrainConfig, ensure_image_encoder  # noqa: E402


def corpus(out: Path) -> Path:
    from shards.synth import SynthSettings, write_split

    settings = SynthSettings(events=4, size=32, fps=4.0, event_seconds=2.0, per_shard=4, relations="depth+plane")
    for split, n in (("train", 4), ("val", 4)):
        write_split(str(out / split), split, n, seed=0, settings=settings, workers=1)
    return out


def test_pretrained_vit_is_reused_and_loads_into_the_video_encoder(tmp_path):
    from safetensors.torch import load_file

    from pretrain.config import load_config
    from pretrain.train import build_model

    data = corpus(tmp_path / "data")
    cfg = ImagePretrainConfig(width=16, layers=2, heads=2, embed_dim=16, steps=3, batch_size=2, warmup_steps=1)
    folder = ensure_image_encoder(data, tmp_path / "vit", cfg)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", DONE):
        assert (folder / name).is_file(), name
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_image_encoder(data, folder, cfg) == folder  # finished with these settings: reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    # a full stage takes ViT layer 0, the graph stage starts as the identity: the ablation's STGT layout
    run = load_config(REPO / "benchmarks/configs/ablation.yaml", [
        f"data.train_shards={data}/train", f"data.val_shards={data}/val", "model.video.dims=[16,16]",
        "model.video.depths=[1,1]", "model.video.heads=[2,2]", "model.video.attention=[full,graph]",
        "model.video.temporal_windows=[1,1]", "model.video.downsample=[false,false]", "model.video.merge_frames=[0,0]",
        "model.video.merge_patches=[0,0]", "model.video.local_stage=1", f"model.video.init_image={folder}"])
    assert run.model.video.cls_token and run.model.video.pos_grid == [4, 4]  # what the ViT has, the encoder gets
    model = build_model(run)
    report = model.image_report
    assert set(report.unused.values()) <= {"image layer beyond the encoder's 1"}  # ViT layer 1 only
    assert all(k.startswith("encoder.layer.1.") for k in report.unused)
    assert all(n == "time_pos" or n.startswith(("stages.1.", "clip_norm.")) for n in report.new), report.new
    vit = load_file(folder / "model.safetensors")
    a = "encoder.layer.0.attention.attention."
    torch.testing.assert_close(model.video.stages[0][0].attn.qkv.weight.detach(),
                               torch.cat([vit[a + "query.weight"], vit[a + "key.weight"], vit[a + "value.weight"]]))
    torch.testing.assert_close(model.video.norm.weight.detach(), vit["layernorm.weight"])
