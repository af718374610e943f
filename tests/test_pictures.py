"""benchmarks/pictures.py: TESTA source tracking is exact, the attention read-outs match the modules,
and the command writes small valid PNGs."""
import struct
import subprocess
import sys
from pathlib import Path

import torch

from pretrain.htwa import HTWAttention
from pretrain.token_merging import (follow_sources, frame_merge_index, merge_frames, merge_patches,
                                    patch_merge_index)
from pretrain.video_encoder import VideoEncoder, VideoEncoderConfig, preset_values

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import pictures  # noqa: E402


def grouped_mean(x, size, index, n_out):
    """Size-weighted mean of the rows of x (G, n, C) that `index` (G, n) sends to each of n_out outputs."""
    G, n, C = x.shape
    num = torch.zeros(G, n_out, C, dtype=torch.float64).scatter_add_(1, index[..., None].expand(-1, -1, C),
                                                                     (x * size).double())
    den = torch.zeros(G, n_out, 1, dtype=torch.float64).scatter_add_(1, index[..., None], size.double())
    return num / den, den


def test_patch_index_says_where_every_token_went():
    torch.manual_seed(0)
    B, T, N, D, r = 2, 3, 11, 4, 4
    x, size, metric = torch.randn(B, T, N, D), torch.rand(B, T, N, 1) + 0.5, torch.randn(B, T, N, 6)
    y, s = merge_patches(x, size, metric, r)
    index = patch_merge_index(metric, r)  # (B, T, N)
    assert index.min() >= 0 and index.max() == N - r - 1
    counts = torch.zeros(B * T, N - r).scatter_add_(1, index.reshape(B * T, N), torch.ones(B * T, N))
    assert (counts >= 1).all() and (counts.sum(-1) == N).all()  # each token in exactly one output, none empty
    mean, den = grouped_mean(x.reshape(B * T, N, D), size.reshape(B * T, N, 1), index.reshape(B * T, N), N - r)
    torch.testing.assert_close(y.reshape(B * T, N - r, D).double(), mean)
    torch.testing.assert_close(s.reshape(B * T, N - r, 1).double(), den)


def test_frame_index_says_where_every_frame_went():
    torch.manual_seed(1)
    B, T, N, D, r = 2, 9, 5, 3, 3
    x, size, metric = torch.randn(B, T, N, D), torch.rand(B, T, N, 1) + 0.5, torch.randn(B, T, N, 6)
    y, s = merge_frames(x, size, metric, r)
    index = frame_merge_index(metric, r)  # (B, T)
    for b in range(B):  # sizes differ per patch position: check position by position
        for n in range(N):
            m, d = grouped_mean(x[b:b + 1, :, n], size[b:b + 1, :, n], index[b:b + 1], T - r)
            torch.testing.assert_close(y[b:b + 1, :, n].double(), m)
            torch.testing.assert_close(s[b:b + 1, :, n].double(), d)


def test_two_identical_tokens_merge_into_one():
    metric = torch.randn(1, 1, 6, 4)
    metric[0, 0, 2] = metric[0, 0, 5]  # patch 2 (set A) is patch 5 (set B)
    index = patch_merge_index(metric, 1)[0, 0]
    assert index[2] == index[5] and len(set(index.tolist())) == 5


def test_sources_follow_frame_then_patch_merges():
    torch.manual_seed(2)
    B, T, N = 1, 4, 6
    sources = torch.arange(T * N).expand(B, -1)
    fm = torch.randn(B, T, N, 3)
    fm[:, 2] = fm[:, 3]  # frames 2 and 3 merge
    frames = frame_merge_index(fm, 1)
    sources = follow_sources(sources, N, frames=frames)
    assert torch.equal(sources.view(T, N)[2], sources.view(T, N)[3])  # same tokens, patch by patch
    pm = torch.randn(B, T - 1, N, 3)
    sources = follow_sources(sources, N, patches=patch_merge_index(pm, 2), kept=N - 2)
    assert sources.max() < (T - 1) * (N - 2) and len(sources.unique()) == (T - 1) * (N - 2)


def test_tracing_testa_leaves_the_encoder_output_unchanged():
    enc = VideoEncoder(VideoEncoderConfig(**preset_values("testa_small"))).eval()
    video = torch.randint(0, 256, (1, 8, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        before = enc(video, 2)[1]
    tr = pictures.trace_merges(enc, video, 2)
    with torch.no_grad():
        after = enc(video, 2)[1]
    assert torch.equal(before, after)
    assert (tr["T"], tr["N"]) == (8 - 3, 16 - 3 * 4)
    assert tr["sources"].shape == (1, 8 * 16) and len(tr["sources"].unique()) == tr["T"] * tr["N"]


def test_window_attention_read_out_reproduces_the_module():
    torch.manual_seed(3)
    mod = HTWAttention(8, 2, (2, 2, 2), shift=True)
    x = torch.randn(1, 4, 4, 4, 8)
    got = {}
    mod.attn.register_forward_pre_hook(lambda m, args: got.setdefault("args", args))
    mod.attn.register_forward_hook(lambda m, args, out: got.setdefault("out", out))
    with torch.no_grad():
        mod(x)
        xw, win, mask = got["args"]
        a = pictures.window_attention_weights(mod.attn, xw, win, mask)  # (Bw, H, Nw, Nw)
        Bw, Nw, D = xw.shape
        v = mod.attn.qkv(xw).view(Bw, Nw, 3, 2, D // 2).permute(2, 0, 3, 1, 4)[2]
        out = mod.attn.proj((a @ v).transpose(1, 2).reshape(Bw, Nw, D))
    torch.testing.assert_close(out, got["out"])
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]))


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_command_writes_small_pngs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    with SummaryWriter(str(run / "tb")) as tb:
        for step in range(1, 6):
            tb.add_scalar("train/loss", 5.0 / step, step)
            tb.add_scalar("train/vpc", 4.0 / step, step)
            tb.add_scalar("train/lr", 1e-4 * step, step)
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/pictures.py"), "--quick", "--out", str(out),
                           "--runs", str(run)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {"testa_merging.png": (1216, 232), "htwa_attention.png": (1024, 344), "stgt_graph.png": (800, 336),
                "dast_attention.png": (1200, 240), "training_curves.png": (880, 248)}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, size in expected.items():
        assert png_size(out / name) == size, name
        assert (out / name).stat().st_size < 150_000, name
