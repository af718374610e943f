"""Every video-encoder preset builds under deepspeed.zero.Init (ZeRO-3 partitioning) on 2 gloo ranks."""
import os
import socket

import torch
import torch.multiprocessing as mp

from pretrain.video_encoder import PRESETS, VideoEncoder, VideoEncoderConfig, preset_values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    counts = {}
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    for name in PRESETS:
        with deepspeed.zero.Init(config_dict_or_path=ds):
            enc = VideoEncoder(VideoEncoderConfig(**preset_values(name)))
        params = list(enc.parameters())
        assert all(hasattr(p, "ds_id") for p in params), name  # every parameter is partitioned
        counts[name] = (sum(p.ds_numel for p in params), sum(p.numel() for p in params))
        del enc
    queue.put((rank, counts))


def test_every_preset_builds_under_zero3_init():
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for name in PRESETS:
        with torch.device("meta"):
            expected = sum(p.numel() for p in VideoEncoder(VideoEncoderConfig(**preset_values(name))).parameters())
        full, local = results[0][name]
        assert full == expected, name  # the partitioned model holds exactly the preset's parameters
        assert local < full, name  # and each rank keeps only its share
