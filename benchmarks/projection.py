"""A PROJECTION, not a measurement: time per epoch of LF-VILA stage-1 pretraining on LF-VILA-8M on one
node of 8 GPUs, from counted FLOPs and stated utilisation assumptions.

    python benchmarks/projection.py [--gpu A100|H100] [--mfu 0.3 0.5] [--out runs/bench/projection.json]
    python benchmarks/projection.py --quick     # the small preset at 64x64 (a smoke test, not LF-VILA)

Inputs (docs: seed-methods.md, section 1):
- data: 8,523,237 video-paragraph samples; each 4 clips x 8 frames = 32 frames at 192x320, and 4
  sentences of at most 50 tokens;
- video encoder: the `lfvila` preset (Swin-B inflated, patch 8, temporal windows 2-4-8-16-16-32); its
  forward GFLOPs are counted with torch.utils.flop_counter on the meta device (`pretrain.flops.measure`);
- text encoder: LF-VILA stage 1 runs 12 BERT-large layers (1024 wide, FFN 4096): 8 per sentence, 4 over
  the paragraph of 4 x 50 tokens + 1. Its FLOPs are analytic (the text model here is a different,
  packaged one): per layer 2 x tokens x 12 d^2 (QKV, output, FFN) + 4 x seq^2 x d (QK^T and AV) per sequence;
- training = 3 x forward (backward = 2 x forward); loss, projection heads, optimizer and
  communication FLOPs are left out (each under 1% here);
- time = FLOPs / (GPUs x peak dense bf16 TFLOP/s x MFU), for the MFU range given.
Not modelled: data loading and decoding (must deliver the samples/s printed), ZeRO communication, and
the released code's fp16 instead of bf16.
"""
from __future__ import annotations

import argparse
import sys
import time

from common import default_out, describe, load, machine, markdown, write_json  # noqa: E402

from pretrain.flops import INPUT_SIZE, measure  # noqa: E402
from pretrain.video_encoder import VideoEncoderConfig, preset_values  # noqa: E402

GPUS = {"A100": 312.0, "H100": 989.0}  # peak dense bf16 TFLOP/s (SXM, no sparsity), vendor data sheets
LFVILA_8M = 8_523_237  # samples in LF-VILA-8M (len_lmdb_train_data)
BERT_LARGE = dict(dim=1024, sentence_layers=8, paragraph_layers=4, sentences=4, tokens=50)


def text_gflops(dim: int, sentence_layers: int, paragraph_layers: int, sentences: int, tokens: int) -> float:
    """Forward GFLOPs of LF-VILA's stage-1 text encoder for one paragraph (multiply-add = 2 FLOPs)."""
    def layers(n: int, seqs: int, seq: int) -> float:
        return n * seqs * (2 * seq * 12 * dim * dim + 4 * seq * seq * dim)
    return (layers(sentence_layers, sentences, tokens) + layers(paragraph_layers, 1, sentences * tokens + 1)) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="count lfvila_small at 16x64x64 instead (smoke test)")
    parser.add_argument("--gpu", nargs="+", default=list(GPUS), choices=list(GPUS))
    parser.add_argument("--num-gpus", type=int, default=8)
    parser.add_argument("--mfu", type=float, nargs=2, default=[0.3, 0.5], metavar=("LOW", "HIGH"),
                        help="model FLOPs utilisation range")
    parser.add_argument("--samples", type=int, default=LFVILA_8M)
    parser.add_argument("--out", default=None, help="JSON results (default runs/bench/projection[_quick].json)")
    args = parser.parse_args(argv)
    info, before = machine(), load()
    preset, frames, size = ("lfvila_small", 16, (64, 64)) if args.quick else ("lfvila", 32, INPUT_SIZE["lfvila"])
    text_cfg = dict(BERT_LARGE, dim=384) if args.quick else BERT_LARGE
    t0 = time.perf_counter()
    video, tokens = measure(VideoEncoderConfig(**preset_values(preset)), frames, size, clips=4)
    text = text_gflops(**text_cfg)
    per_sample = 3 * (video + text)  # GFLOPs of one training sample: forward + backward (2 x forward)
    epoch_pflops = per_sample * args.samples / 1e6
    rows, results = [], []
    for gpu in args.gpu:
        for mfu in args.mfu:
            rate = args.num_gpus * GPUS[gpu] * 1e3 * mfu  # GFLOP/s of the node
            seconds = per_sample * args.samples / rate
            results.append({"gpu": gpu, "peak_tflops": GPUS[gpu], "mfu": mfu, "epoch_hours": seconds / 3600,
                            "samples_per_s": rate / per_sample, "ten_epochs_days": 10 * seconds / 86400})
            rows.append([f"{args.num_gpus} x {gpu} ({GPUS[gpu]:g} TFLOP/s bf16)", f"{mfu:.0%}",
                         f"**{seconds / 3600:.1f} h**", f"{10 * seconds / 86400:.1f} d", f"{rate / per_sample:,.0f}",
                         f"{rate / per_sample / args.num_gpus:,.0f}"])
    assumptions = [
        f"PROJECTION (not measured on a GPU): LF-VILA stage 1 (VPC + MTC), one epoch of {args.samples:,} samples.",
        f"Video encoder `{preset}`, {frames}x{size[0]}x{size[1]}: {video:.1f} GFLOPs forward (counted, meta device); "
        f"tokens per stage {'/'.join(map(str, tokens))}.",
        f"Text encoder, stage-1 BERT layers ({text_cfg['sentence_layers']} per sentence + "
        f"{text_cfg['paragraph_layers']} over the paragraph, {text_cfg['dim']} wide, {text_cfg['sentences']} x "
        f"{text_cfg['tokens']} tokens): {text:.1f} GFLOPs forward (analytic).",
        f"Training = 3 x forward: {per_sample:.1f} GFLOPs per sample, {epoch_pflops:,.0f} PFLOPs per epoch.",
        "Node throughput = GPUs x peak dense bf16 TFLOP/s x MFU; data loading, communication and optimizer time "
        "assumed hidden; LF-VILA trained 10 epochs per stage.",
    ]
    if args.quick:
        assumptions.insert(0, "QUICK MODE: a small preset and a narrow text encoder; the numbers are not LF-VILA's.")
    table = markdown(["node", "MFU", "time per epoch", "10 epochs", "samples/s (node)", "samples/s per GPU"], rows)
    text_out = "\n".join(["\n".join(f"- {a}" for a in assumptions), "", table, "",
                          describe(info, before, load()) + " (the FLOP count runs on this machine)"])
    out = args.out or default_out("projection_quick" if args.quick else "projection")
    write_json(out, {"benchmark": "projection", "kind": "projection, not a measurement", "quick": args.quick,
                     "machine": info, "load_start": before, "seconds": round(time.perf_counter() - t0, 1),
                     "assumptions": assumptions, "inputs": {"preset": preset, "frames": frames, "size": size,
                     "video_gflops": video, "text_gflops": text, "train_gflops_per_sample": per_sample,
                     "samples": args.samples, "num_gpus": args.num_gpus, "text": text_cfg}, "results": results})
    print(text_out)
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
