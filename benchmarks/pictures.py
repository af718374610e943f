"""Pictures of the model at work, as small PNGs for the README:

    python benchmarks/pictures.py [--runs runs/pictures_testa ...] [--out docs/figures] [--quick]

testa_merging.png    TESTA on a synthetic video: which frames merged, which patches merged
htwa_attention.png   LF-VILA's window attention of one query token, one row per stage
stgt_graph.png       STGT's spatio-temporal graph (adjacency) and graph attention of one query token
dast_attention.png   DAST's sparse pattern (frames t-w..t+w) and a query's attention over depth tokens
training_curves.png  loss terms, learning rate and zero-shot R@1 of each run in --runs

Each picture uses the first run in --runs whose preset matches (its latest checkpoint, through
DeepSpeed's zero_to_fp32), else the preset with random weights, which the title then says. Weights
are read from the modules' own q/k projections with forward hooks; the model code is not changed.
The video is the first held-out sample of synthetic shards (`--shards`, or written to a temp folder).

Letters: B batch, T frames, N tokens per frame, h x w patch grid, D width, H heads, S tokens = T*N.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pretrain.attention import (BandDepthAttention, GraphAttention, band_keys, similarity_graph,  # noqa: E402
                                split_heads)
from pretrain.blocks import DividedBlock  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.htwa import HTWAttention, relative_position_index, window_partition  # noqa: E402
from pretrain.token_merging import follow_sources, frame_merge_index, patch_merge_index  # noqa: E402
from pretrain.video_encoder import VideoEncoder, VideoEncoderConfig, preset_values  # noqa: E402

DPI = 80


# ---- model and data -------------------------------------------------------------------------------

def run_preset(run: Path) -> str:
    return load_config(run / "config.yaml").model.video.preset


def load_encoder(preset: str, runs: list[Path]) -> tuple[VideoEncoder, str]:
    """The video encoder of the first run with this preset (trained), else random weights; and a label."""
    torch.manual_seed(0)
    for run in runs:
        if (run / "config.yaml").exists() and run_preset(run) == preset:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            cfg = load_config(run / "config.yaml")
            enc = VideoEncoder(cfg.model.video)
            state = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"))
            enc.load_state_dict({k[len("video."):]: v for k, v in state.items() if k.startswith("video.")})
            step = (run / "checkpoints" / "latest").read_text().strip().replace("global_step", "")
            return enc.eval(), f"{preset}, trained {step} steps ({run.name})"
    return VideoEncoder(VideoEncoderConfig(**preset_values(preset))).eval(), f"{preset}, random weights (untrained)"


def read_sample(shards: Path) -> dict:
    """The first held-out sample, decoded as evaluation does: video (1, T, 3, S, S), depth (1, T, S, S)."""
    from shards.loader import build_eval_loader

    cfg = load_config(REPO / "pretrain/configs/demo.yaml", [f"data.val_shards={shards}/val", "data.num_workers=0",
                                                            "data.batch_size=1"])
    batch = next(iter(build_eval_loader(cfg.data, cfg.model.text.resolved_path(), 0, 1)))
    return {"video": batch["video"], "depth": batch["depth"].float(), "M": cfg.data.num_clips, "key": batch["key"][0]}


def frames_rgb(video: torch.Tensor) -> np.ndarray:
    return video[0].permute(0, 2, 3, 1).numpy()  # (T, S, S, 3) uint8


# ---- TESTA: which tokens merged --------------------------------------------------------------------

def trace_merges(enc: VideoEncoder, video: torch.Tensor, M: int) -> dict:
    """Run the encoder with hooks on each divided block's attentions (their keys are TESTA's metric)
    and replay the merges with the index functions. Returns sources (B, T0*N0): the flat index of the
    final token (T', N') holding each original patch token, frames (B, T0): the final frame of each
    original frame, and the final (T', N')."""
    keys: list[tuple[DividedBlock, str, torch.Tensor]] = []
    hooks = []
    for blk in enc.modules():
        if isinstance(blk, DividedBlock):
            for kind in ("temporal", "spatial"):
                hooks.append(getattr(blk, kind).register_forward_hook(
                    lambda mod, args, out, blk=blk, kind=kind: keys.append((blk, kind, out[1]))))
    try:
        with torch.no_grad():
            enc(video, M)
    finally:
        for h in hooks:
            h.remove()
    assert not any(enc.cfg.downsample), "tracing TESTA merges needs a video encoder without 2x2 downsampling"
    B, T = video.shape[:2]
    N = (video.shape[-2] // enc.cfg.patch_size) * (video.shape[-1] // enc.cfg.patch_size)
    sources = torch.arange(T * N).expand(B, -1)
    frames = torch.arange(T).expand(B, -1)
    for blk, kind, k in keys:
        if kind == "temporal" and blk.r_t:
            metric = k.view(B, N, T, -1).transpose(1, 2)  # (B, T, N, d)
            index = frame_merge_index(metric, blk.r_t)  # (B, T)
            sources, frames = follow_sources(sources, N, frames=index), index.gather(1, frames)
            T = T - min(blk.r_t, T // 2)
        if kind == "spatial" and blk.r_s:
            kept = N - min(blk.r_s, N // 2)
            sources = follow_sources(sources, N, patches=patch_merge_index(k.view(B, T, N, -1), blk.r_s), kept=kept)
            N = kept
    return {"sources": sources, "frames": frames, "T": T, "N": N}


def draw_testa(enc, label, sample, out: Path) -> None:
    video, rgb = sample["video"], frames_rgb(sample["video"])
    tr = trace_merges(enc, video, sample["M"])
    T0, S = rgb.shape[:2]
    p = enc.cfg.patch_size
    g = S // p
    src = tr["sources"][0].view(T0, g, g).numpy()
    final_frame = tr["frames"][0].numpy()
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(2, T0, figsize=(T0 * 0.95, 2.9), dpi=DPI)
    merged_frames = {f for f in final_frame if (final_frame == f).sum() > 1}
    strong = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")
    fcolour = {f: strong[i % len(strong)] for i, f in enumerate(sorted(merged_frames))}
    for t in range(T0):
        top, bot = axes[0, t], axes[1, t]
        top.imshow(rgb[t], interpolation="nearest")
        f = final_frame[t]
        top.set_title(f"t{t} > F{f}", fontsize=7, color=fcolour[f] if f in fcolour else "black",
                      fontweight="bold" if f in fcolour else "normal")
        if f in fcolour:
            for side in top.spines.values():
                side.set_edgecolor(fcolour[f])
                side.set_linewidth(3)
        # patches of this frame that share a final token with another patch of the same frame
        ids, counts = np.unique(src[t], return_counts=True)
        multi = ids[counts > 1]
        overlay = rgb[t].astype(float) / 255 * 0.55
        for k, token in enumerate(multi):
            colour = np.array(cmap(int(token) % 20)[:3])
            for i, j in zip(*np.nonzero(src[t] == token)):
                overlay[i * p:(i + 1) * p, j * p:(j + 1) * p] = 0.35 * overlay[i * p:(i + 1) * p, j * p:(j + 1) * p] \
                    + 0.65 * colour
        bot.imshow(overlay, interpolation="nearest")
        for i in range(g):  # white lines between patches held by different tokens
            for j in range(g):
                if j + 1 < g and src[t, i, j] != src[t, i, j + 1]:
                    bot.plot([(j + 1) * p - 0.5] * 2, [i * p - 0.5, (i + 1) * p - 0.5], color="white", lw=0.4)
                if i + 1 < g and src[t, i, j] != src[t, i + 1, j]:
                    bot.plot([j * p - 0.5, (j + 1) * p - 0.5], [(i + 1) * p - 0.5] * 2, color="white", lw=0.4)
        bot.set_xlabel(f"{len(np.unique(src[t]))} tokens", fontsize=6, labelpad=1)
        for ax in (top, bot):
            ax.set_xticks([])
            ax.set_yticks([])
    r_t, r_s = max(enc.cfg.merge_frames), max(enc.cfg.merge_patches)
    fig.suptitle(f"TESTA merging ({label}; r_t={r_t}, r_s={r_s} per block): {T0} frames -> {tr['T']}, "
                 f"{g * g} patches/frame -> {tr['N']}.\nTop: frames; 'tX > FY': frame X ends in merged frame Y, "
                 f"frames of one colour merged. Bottom: patches merged into one token share a colour", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.86), h_pad=0.6, w_pad=0.2)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


# ---- HTWA: window attention of a query token ---------------------------------------------------------

def window_attention_weights(attn, xw: torch.Tensor, window, mask) -> torch.Tensor:
    """What WindowAttention3D.forward computes before multiplying by v: (Bw, H, Nw, Nw)."""
    Bw, Nw, D = xw.shape
    H = attn.heads
    q, k, _ = attn.qkv(xw).view(Bw, Nw, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (Bw, H, Nw, Dh)
    idx = relative_position_index(window, attn.window)
    bias = attn.bias_table[idx.flatten()].view(Nw, Nw, H).permute(2, 0, 1).unsqueeze(0)  # (1, H, Nw, Nw)
    if mask is not None:
        bias = (bias + mask.unsqueeze(1)).repeat(Bw // mask.shape[0], 1, 1, 1)
    return (q @ k.transpose(-1, -2) / math.sqrt(D // H) + bias).softmax(dim=-1)


def htwa_maps(enc: VideoEncoder, video, M: int, query) -> list[dict]:
    """Per HTWA layer: the attention of the token at `query(T, h, w)` over the whole (T, h, w) grid
    (zero outside its window), averaged over heads, for the first video of the batch."""
    calls = []
    hooks = []
    for mod in enc.modules():
        if isinstance(mod, HTWAttention):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args: calls.append({"mod": m, "shape": args[0].shape})))
            hooks.append(mod.attn.register_forward_pre_hook(lambda m, args: calls[-1].update(args=args)))
    try:
        with torch.no_grad():
            enc(video, M)
            maps = []
            for c in calls:
                m, (_, T, h, w, _) = c["mod"], c["shape"]
                xw, win, mask = c["args"]
                a = window_attention_weights(m.attn, xw, win, mask).mean(1)  # (Bw, Nw, Nw)
                shift = (0, 0, 0) if mask is None else (0, win[1] // 2, win[2] // 2)
                grid = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(h), torch.arange(w), indexing="ij"), -1)
                grid = torch.roll(grid[None].float(), shifts=(-shift[1], -shift[2]), dims=(2, 3))
                coords = window_partition(grid, win).long()  # (windows, Nw, 3)
                tq, iq, jq = query(T, h, w)
                wi, slot = (coords == torch.tensor([tq, iq, jq])).all(-1).nonzero()[0].tolist()
                full = torch.zeros(T, h, w)
                c_w = coords[wi]
                full[c_w[:, 0], c_w[:, 1], c_w[:, 2]] = a[wi, slot]  # batch index 0: windows of video 0 first
                maps.append({"map": full, "query": (tq, iq, jq), "window": win})
    finally:
        for hk in hooks:
            hk.remove()
    return maps


def shape_query(rgb: np.ndarray):
    """A query on the moving shape: the patch that differs most from the frame's median colour, middle frame."""
    def query(T, h, w):
        t = T // 2
        f = rgb[t].astype(float)
        diff = np.abs(f - np.median(f.reshape(-1, 3), axis=0)).sum(-1)  # (S, S)
        S = f.shape[0]
        cells = diff.reshape(h, S // h, w, S // w).mean(axis=(1, 3))
        i, j = np.unravel_index(cells.argmax(), cells.shape)
        return t, int(i), int(j)
    return query


def heat(ax, frame: np.ndarray, weights: np.ndarray | None, vmax: float, dim: bool = False) -> None:
    ax.imshow(frame if not dim else (frame * 0.25).astype(np.uint8), interpolation="nearest")
    if weights is not None:
        S = frame.shape[0]
        up = np.kron(weights, np.ones((S // weights.shape[0], S // weights.shape[1])))
        ax.imshow(up, cmap="inferno", alpha=0.65, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def mark(ax, i, j, cell, colour="cyan") -> None:
    ax.add_patch(plt.Rectangle((j * cell - 0.5, i * cell - 0.5), cell, cell, fill=False, ec=colour, lw=1.5))


def draw_htwa(enc, label, sample, out: Path) -> None:
    rgb = frames_rgb(sample["video"])
    maps = htwa_maps(enc, sample["video"], sample["M"], shape_query(rgb))
    T = rgb.shape[0]
    fig, axes = plt.subplots(len(maps), T, figsize=(T * 0.8, len(maps) * 0.95 + 0.5), dpi=DPI, squeeze=False)
    for r, m in enumerate(maps):
        a = m["map"].numpy()
        tq, iq, jq = m["query"]
        covered = a.reshape(T, -1).sum(1) > 0
        for t in range(T):
            ax = axes[r, t]
            heat(ax, rgb[t], a[t] if covered[t] else None, a.max(), dim=not covered[t])
            if t == tq:
                mark(ax, iq, jq, rgb.shape[1] // a.shape[1])
            if r == 0:
                ax.set_title(f"t{t}", fontsize=7)
        axes[r, 0].set_ylabel(f"layer {r}\nwin {m['window'][0]}x{m['window'][1]}x{m['window'][2]}", fontsize=7)
    fig.suptitle(f"HTWA attention of one query token (cyan box, frame {maps[0]['query'][0]}) over its 3D window, "
                 f"mean over heads ({label}); dark frames are outside the window", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93), h_pad=0.2, w_pad=0.2)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


# ---- STGT: graph and graph attention -----------------------------------------------------------------

def graph_maps(enc: VideoEncoder, video, M: int) -> dict:
    """The first graph layer: its graph (S, S) and attention (S, S), mean over heads, video 0."""
    got = {}
    mod = next(m for m in enc.modules() if isinstance(m, GraphAttention))
    hook = mod.register_forward_pre_hook(lambda m, args: got.setdefault("args", args))
    try:
        with torch.no_grad():
            enc(video, M)
            x, T = got["args"]
            graph = similarity_graph(x, T, mod.threshold)  # (B, S, S)
            q, k, _ = (split_heads(t, mod.heads) for t in mod.qkv(x).chunk(3, dim=-1))  # (B, H, S, Dh)
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            g = graph.unsqueeze(1)
            attn = (logits * g).masked_fill(g == 0, float("-inf")).softmax(-1).mean(1)  # (B, S, S)
    finally:
        hook.remove()
    return {"graph": graph[0], "attn": attn[0], "T": T}


def draw_stgt(enc, label, sample, out: Path) -> None:
    rgb = frames_rgb(sample["video"])
    m = graph_maps(enc, sample["video"], sample["M"])
    T, S = m["T"], m["graph"].shape[0]
    N = S // T
    h = int(math.isqrt(N))
    tq, iq, jq = shape_query(rgb)(T, h, h)
    qi = tq * N + iq * h + jq
    fig = plt.figure(figsize=(10, 4.2), dpi=DPI)
    gs = fig.add_gridspec(2, 5, width_ratios=[2.6, 1, 1, 1, 0.1])
    ax = fig.add_subplot(gs[:, 0])
    im = ax.imshow(m["graph"].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"graph G over {T} frames x {N} tokens\n(+-1-frame band x cosine >= {enc.cfg.graph_threshold})",
                 fontsize=8)
    ax.set_xlabel("key token (frame-major)", fontsize=7)
    ax.set_ylabel("query token", fontsize=7)
    ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=ax, fraction=0.04)
    for r, (name, mat) in enumerate((("edge weight", m["graph"]), ("attention", m["attn"]))):
        row = mat[qi].view(T, h, h).numpy()
        vmax = row.max()
        for c, t in enumerate((tq - 1, tq, tq + 1)):
            a = fig.add_subplot(gs[r, c + 1])
            heat(a, rgb[t], row[t], vmax)
            if t == tq:
                mark(a, iq, jq, rgb.shape[1] // h)
            a.set_title(f"{name}, t{t}", fontsize=7)
    fig.suptitle(f"STGT graph attention ({label}); right: the row of one query token (cyan), frames t-1..t+1 "
                 f"(no edges elsewhere)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


# ---- DAST: depth-aware sparse attention ------------------------------------------------------------

def depth_maps(enc: VideoEncoder, video, depth, M: int) -> dict:
    """The first depth layer: attention (T, N, K) of RGB queries over their band of depth tokens, mean
    over heads, video 0; the validity of each slot (T, K) and the band half-width w."""
    got = {}
    mod = next(m for m in enc.modules() if isinstance(m, BandDepthAttention))
    hook = mod.register_forward_pre_hook(lambda m, args: got.setdefault("args", args))
    try:
        with torch.no_grad():
            enc(video, M, depth)
            x, z = got["args"]
            B, T, N, D = x.shape
            keys, valid = band_keys(z, mod.window)  # (B, T, K, Cd), (T, K)
            K = keys.shape[2]
            q = split_heads(mod.q(x).reshape(B * T, N, D), mod.heads)  # (B*T, H, N, Dh)
            k = split_heads(mod.kv(keys).chunk(2, dim=-1)[0].reshape(B * T, K, D), mod.heads)
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B*T, H, N, K)
            logits = logits.masked_fill(~valid.repeat(B, 1)[:, None, None], float("-inf"))
            attn = logits.softmax(-1).mean(1).view(B, T, N, K)[0]
    finally:
        hook.remove()
    return {"attn": attn, "valid": valid, "w": mod.window, "Nd": z.shape[2]}


def draw_dast(enc, label, sample, out: Path) -> None:
    rgb, dep = frames_rgb(sample["video"]), sample["depth"][0].numpy()
    m = depth_maps(enc, sample["video"], sample["depth"], sample["M"])
    T, N, K = m["attn"].shape
    w, Nd = m["w"], m["Nd"]
    h, gd = int(math.isqrt(N)), int(math.isqrt(Nd))
    tq, iq, jq = shape_query(rgb)(T, h, h)
    row = m["attn"][tq, iq * h + jq].view(2 * w + 1, gd, gd).numpy()
    valid = m["valid"].view(T, 2 * w + 1, Nd)[tq, :, 0].numpy()
    fig = plt.figure(figsize=(2 * w + 1, 3.0), dpi=DPI)
    gs = fig.add_gridspec(2, 2 * w + 1, height_ratios=[1.5, 1])
    ax = fig.add_subplot(gs[0, :4])
    band = (np.abs(np.arange(T)[:, None] - np.arange(T)[None, :]) <= w).astype(float)
    ax.imshow(band, cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest")
    ax.set_title(f"which frames' depth each frame sees\n(|t - t'| <= {w}; {int(band.sum())} of {T * T})", fontsize=7)
    ax.set_xlabel("depth frame t'", fontsize=7)
    ax.set_ylabel("RGB frame t", fontsize=7)
    ax.tick_params(labelsize=6)
    a = fig.add_subplot(gs[0, 4:6])
    heat(a, rgb[tq], None, 1)
    mark(a, iq, jq, rgb.shape[1] // h)
    a.set_title(f"query, t{tq}", fontsize=7)
    vmax = row.max()
    for s in range(2 * w + 1):
        t = tq - w + s
        a = fig.add_subplot(gs[1, s])
        if valid[s]:
            d = np.repeat((dep[t] * 255).clip(0, 255).astype(np.uint8)[..., None], 3, -1)
            heat(a, d, row[s], vmax)
            a.set_title(f"t{t}", fontsize=7)
        else:
            a.axis("off")
    fig.suptitle(f"DAST depth-aware sparse attention ({label}): an RGB query attends to {Nd} depth tokens "
                 f"of each frame t-{w}..t+{w} (bottom: depth maps, attention mean over heads)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


# ---- training curves -----------------------------------------------------------------------------------

LOSSES = ("loss", "vpc", "mtc", "ssl", "mlm", "vtm")


def read_scalars(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        ev = acc.Scalars(tag)
        out[tag.split("/", 1)[-1]] = (np.array([e.step for e in ev]), np.array([e.value for e in ev]))
    return out


def draw_curves(runs: list[Path], out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1), dpi=DPI)
    for run in runs:
        sc = read_scalars(run)
        preset = run_preset(run) if (run / "config.yaml").exists() else ""
        for name in LOSSES:
            if name in sc and (name != "loss" or sum(n in sc for n in LOSSES) > 2):
                axes[0].plot(*sc[name], label=f"{run.name}: {name}", lw=1.2)
            elif name == "loss" and name in sc and not any(n in sc for n in LOSSES[1:]):
                axes[0].plot(*sc[name], label=f"{run.name}: loss", lw=1.2)
        if "lr" in sc:
            axes[1].plot(*sc["lr"], label=run.name)
        ev = run / "eval.json"
        if ev.exists():
            e = json.loads(ev.read_text())
            r1, chance = e["paragraph_to_video"]["R1"], e["chance"]["R1"]
            bars = axes[2].bar([f"{run.name}\n{preset}", "chance"], [r1, chance], color=["tab:blue", "tab:grey"])
            axes[2].bar_label(bars, fmt="%.1f", fontsize=7)
            axes[2].set_title(f"zero-shot paragraph->video R@1, {e['num_videos']} held-out videos", fontsize=8)
    if not axes[2].patches:
        axes[2].text(0.5, 0.5, "no eval.json in the run", ha="center", transform=axes[2].transAxes)
        axes[2].set_title("zero-shot R@1", fontsize=8)
    axes[0].set_title("loss terms", fontsize=8)
    axes[1].set_title("learning rate (video encoder, heads)", fontsize=8)
    for ax in axes[:2]:
        ax.set_xlabel("step", fontsize=7)
        ax.legend(fontsize=6)
    for ax in axes:
        ax.tick_params(labelsize=6)
    fig.suptitle("Training: " + ", ".join(f"{r.name} ({run_preset(r) if (r / 'config.yaml').exists() else '?'})"
                                          for r in runs), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


# ---- command ---------------------------------------------------------------------------------------------

def make_shards(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "shards", "synth", "--out", str(folder), "--videos", "2",
                    "--val-videos", "2", "--seed", "0"], cwd=REPO, check=True, capture_output=True)
    return folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Draw TESTA merging, attention and graph maps, training curves as PNG.")
    p.add_argument("--out", default=str(REPO / "docs" / "figures"), help="folder for the PNGs")
    p.add_argument("--runs", nargs="*", default=[], help="run folders: trained weights by preset, and curves")
    p.add_argument("--shards", default="", help="synthetic shards folder (with val/); default: written to a temp dir")
    p.add_argument("--quick", action="store_true", help="random weights only (ignore checkpoints); for the smoke test")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r).resolve() for r in args.runs]
    weights = [] if args.quick else runs
    torch.set_num_threads(1 if args.quick else 2)
    with tempfile.TemporaryDirectory() as tmp:
        sample = read_sample(Path(args.shards) if args.shards else make_shards(Path(tmp) / "synth"))
    written = []
    for preset, draw, name in (("testa_small", draw_testa, "testa_merging.png"),
                               ("lfvila_small", draw_htwa, "htwa_attention.png"),
                               ("stgt_small", draw_stgt, "stgt_graph.png"),
                               ("dast_small", draw_dast, "dast_attention.png")):
        enc, label = load_encoder(preset, weights)
        draw(enc, label, sample, out / name)
        written.append(out / name)
    if runs:
        draw_curves(runs, out / "training_curves.png")
        written.append(out / "training_curves.png")
    for path in written:
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")
    print(f"{len(written)} pictures in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
