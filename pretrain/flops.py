"""GFLOPs and tokens per stage of each video-encoder preset, next to the same widths with full
space-time attention (and no token merging).

    python -m pretrain.flops [--presets lfvila testa ...] [--frames 32 64 96] [--markdown]

Counted with torch.utils.flop_counter on the meta device (shapes only: nothing is allocated, so the
papers' widths at 96 frames count in seconds). One video, forward pass, multiply-adds counted as 2.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.video_encoder import PRESETS, VideoEncoder, VideoEncoderConfig, preset_values

# Input size of each preset (height, width): the papers' resolutions; the small presets run at 64x64.
INPUT_SIZE = {"lfvila": (192, 320), "testa": (224, 224), "testa_96f": (224, 224), "stgt": (224, 224),
              "dast": (224, 224)}


def full_attention(cfg: VideoEncoderConfig) -> VideoEncoderConfig:
    n = len(cfg.dims)
    return replace(cfg, preset="", attention=["full"] * n, merge_frames=[0] * n, merge_patches=[0] * n,
                   clip_features="final", local_stage=n - 1)


def measure(cfg: VideoEncoderConfig, frames: int, size: tuple[int, int], clips: int = 4) -> tuple[float, list[int]]:
    """(GFLOPs of one forward pass, tokens entering each stage and leaving the last) for one video."""
    cfg = replace(cfg, max_frames=max(cfg.max_frames, frames))
    tokens: list[int] = []
    with torch.device("meta"):
        enc = VideoEncoder(cfg)
        video = torch.empty(1, frames, 3, *size)
        depth = torch.empty(1, frames, *size) if enc.uses_depth else None
    hooks = [s.register_forward_pre_hook(lambda m, args: tokens.append(args[0].x.shape[1] * args[0].x.shape[2]))
             for s in enc.stages]
    hooks.append(enc.stages[-1].register_forward_hook(lambda m, i, out: tokens.append(out.x.shape[1] * out.x.shape[2])))
    with FlopCounterMode(display=False) as counter:
        enc(video, num_clips=clips, depth=depth)
    for h in hooks:
        h.remove()
    return counter.get_total_flops() / 1e9, tokens


def table(presets: list[str], frames: list[int]) -> list[dict]:
    rows = []
    for name in presets:
        cfg = VideoEncoderConfig(**preset_values(name))
        size = INPUT_SIZE.get(name, (64, 64))
        for t in frames:
            gflops, tokens = measure(cfg, t, size)
            full_gflops, full_tokens = measure(full_attention(cfg), t, size)
            rows.append({"preset": name, "input": f"{t}x{size[0]}x{size[1]}", "gflops": gflops,
                         "full_gflops": full_gflops, "ratio": gflops / full_gflops,
                         "tokens": tokens, "full_tokens": full_tokens})
    return rows


def tokens_cell(tokens: list[int]) -> str:
    return "/".join(map(str, tokens[:-1])) + f" -> {tokens[-1]}"


def format_rows(rows: list[dict], markdown: bool) -> str:
    head = ["preset", "frames x H x W", "GFLOPs", "full-attn GFLOPs", "ratio", "tokens per stage", "full-attn tokens"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["preset"], r["input"], f"{r['gflops']:.1f}", f"{r['full_gflops']:.1f}", f"{r['ratio']:.2f}",
                 tokens_cell(r["tokens"]), tokens_cell(r["full_tokens"])]
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:>16}" for c in cells))
    if not markdown:
        lines.insert(0, "  ".join(f"{h:>16}" for h in head))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=[n for n in PRESETS if n != "debug"], choices=list(PRESETS))
    p.add_argument("--frames", nargs="+", type=int, default=[32, 64, 96])
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    print(format_rows(table(args.presets, args.frames), args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
