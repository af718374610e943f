"""A PROJECTION, not a measurement: time per epoch of each paper recipe (pretrain/configs/) on one node of
8 GPUs, from counted FLOPs and stated utilisation assumptions.

    python benchmarks/projection.py [--recipes lfvila_stage1 testa ...] [--gpu A100|H100] [--mfu 0.3 0.5]
                                    [--out runs/bench/projection.json]
    python benchmarks/projection.py --quick     # lfvila_stage1 with the small preset at 64x64 (a smoke test)

Inputs, per recipe (docs: seed-methods.md; each recipe's comments):
- data: the recipe's frames (data.num_clips x data.frames_per_clip), frame size, sentences and tokens, and
  the paper's corpus for an epoch (EPOCH_SAMPLES);
- video encoder: the recipe's (preset and overrides, with the [CLS] token its ViT-family image model brings);
  forward GFLOPs counted with torch.utils.flop_counter on the meta device (`pretrain.flops.measure`);
- text encoder: BERT-large (LF-VILA) or BERT-base (the others), the recipe's sentence + paragraph layers; FLOPs
  analytic (the text checkpoints are not on this machine): per layer 2 x tokens x 12 d^2 (QKV, output,
  FFN) + 4 x seq^2 x d (QK^T and AV) per sequence; LF-VILA stage 2 adds its fusion stack (the same layer
  count over paragraph + frame tokens) and the MLM logits over the vocabulary for half the batch;
- training = forward of the frozen parts (`model.freeze`: STGT's ViT-g, LF-VILA stage 2's encoders) + 3 x
  forward of the trained parts (backward = 2 x forward); loss, projection heads, optimizer and
  communication FLOPs are left out (each under 1% here);
- time = FLOPs / (GPUs x peak dense bf16 TFLOP/s x MFU), for the MFU range given.
Not modelled: data loading and decoding (must deliver the samples/s printed), ZeRO communication, the
papers' fp16 instead of bf16, and what the recipes leave out of the papers (momentum encoders, ITM/LM losses).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from common import REPO, default_out, describe, load, machine, markdown, write_json  # noqa: E402

from pretrain.config import load_config  # noqa: E402
from pretrain.flops import measure  # noqa: E402

GPUS = {"A100": 312.0, "H100": 989.0}  # peak dense bf16 TFLOP/s (SXM, no sparsity), vendor data sheets
NUM_GPUS = 8
# recipe -> (samples in one epoch of its corpus, the corpus); seed-methods sections in brackets
EPOCH_SAMPLES = {
    "lfvila_stage1": (8_523_237, "LF-VILA-8M [§1.3]"),
    "lfvila_stage2": (8_523_237, "LF-VILA-8M [§1.3]"),
    "testa": (2_500_000, "WebVid-2.5M [§2.3; its CC3M image half not counted]"),
    "stgt": (14_000_000, "WebVid-10M + VIDAL-4M, ~14M [§3.1, from the names]"),
    "dast": (8_523_237, "LF-VILA-8M [our recipe]"),
}
TEXT_DIM = {"lfvila_stage1": 1024, "lfvila_stage2": 1024, "testa": 768, "stgt": 768, "dast": 768}  # BERT-L / -B
VOCAB = 30522  # BERT's, for LF-VILA stage 2's MLM logits
VIT_FAMILY = ("testa", "stgt", "dast")  # image models with a [CLS] token: one more token per frame
QUICK = ["model.video.preset=lfvila_small", "data.size=64", "data.frames_per_clip=4"]  # 16 x 64 x 64


def bert_gflops(dim: int, layers: int, seqs: int, seq: int) -> float:
    """Forward GFLOPs of `layers` BERT layers over `seqs` sequences of `seq` tokens (multiply-add = 2 FLOPs)."""
    return layers * seqs * (2 * seq * 12 * dim * dim + 4 * seq * seq * dim) / 1e9


def first_stages(video, n: int):
    """The video encoder config cut to its first n stages (the frozen backbone of a recipe)."""
    lists = ("dims", "depths", "heads", "attention", "temporal_windows", "downsample", "merge_frames", "merge_patches")
    return replace(video, **{k: getattr(video, k)[:n] for k in lists}, clip_features="final", local_stage=n - 1)


def recipe_config(name: str, quick: bool):
    """The recipe resolved without its image checkpoint (not needed to count FLOPs)."""
    extra = [("model.video.init_image", "")] + (QUICK if quick else [])
    extra += ["model.video.cls_token=true"] if name in VIT_FAMILY else []
    return load_config(REPO / "pretrain" / "configs" / f"{name}.yaml", extra)


def count(name: str, quick: bool = False) -> dict:
    """GFLOPs of one training sample of recipe `name`: forward of the frozen parts + 3 x forward of the rest."""
    cfg = recipe_config(name, quick)
    v, d, t = cfg.model.video, cfg.data, cfg.model.text
    frames, size = d.num_clips * d.frames_per_clip, d.hw
    frozen = cfg.model.freeze
    video, tokens = measure(v, frames, size, clips=d.num_clips)
    frozen_stages = 0  # leading stages a freeze prefix covers (STGT: its ViT-g, stage 0)
    while frozen_stages < len(v.dims) and any(f"video.stages.{frozen_stages}.".startswith(p) for p in frozen):
        frozen_stages += 1
    video_frozen = video if "video." in frozen else (
        measure(first_stages(v, frozen_stages), frames, size, clips=d.num_clips)[0] if frozen_stages else 0.0)
    dim = 384 if quick else TEXT_DIM[name]
    paragraph = t.paragraph_layers or 4
    text = (bert_gflops(dim, t.sentence_layers, d.num_clips, d.max_words)
            + bert_gflops(dim, paragraph, 1, d.num_clips * d.max_words + 1))
    text_frozen = text if "text." in frozen else 0.0
    fusion = 0.0
    if cfg.model.fusion_layers:  # over [paragraph ; one token per remaining frame], MLM logits on the matched half
        fusion = (bert_gflops(dim, cfg.model.fusion_layers, 1, 1 + d.num_clips * d.max_words + frames)
                  + 0.5 * 2 * d.num_clips * d.max_words * dim * VOCAB / 1e9)
    trained = (video - video_frozen) + (text - text_frozen) + fusion
    samples, corpus = EPOCH_SAMPLES[name]
    return {"recipe": name, "frames": frames, "size": list(size), "preset": v.preset, "tokens_per_stage": tokens,
            "video_gflops": video, "text_gflops": text, "fusion_gflops": fusion,
            "frozen_gflops": video_frozen + text_frozen, "trained_gflops": trained,
            "train_gflops_per_sample": (video_frozen + text_frozen) + 3 * trained,
            "epoch_samples": samples, "corpus": corpus, "steps": cfg.train.steps,
            "global_batch_8_gpus": d.batch_size * cfg.train.grad_accum * NUM_GPUS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="lfvila_stage1 with lfvila_small at 16x64x64 (smoke test)")
    parser.add_argument("--recipes", nargs="+", default=list(EPOCH_SAMPLES), choices=list(EPOCH_SAMPLES))
    parser.add_argument("--gpu", nargs="+", default=list(GPUS), choices=list(GPUS))
    parser.add_argument("--num-gpus", type=int, default=NUM_GPUS)
    parser.add_argument("--mfu", type=float, nargs=2, default=[0.3, 0.5], metavar=("LOW", "HIGH"),
                        help="model FLOPs utilisation range")
    parser.add_argument("--samples", type=int, default=None, help="samples per epoch for every recipe "
                        "(default: each recipe's corpus)")
    parser.add_argument("--out", default=None, help="JSON results (default runs/bench/projection[_quick].json)")
    args = parser.parse_args(argv)
    info, before = machine(), load()
    t0 = time.perf_counter()
    recipes = ["lfvila_stage1"] if args.quick else args.recipes
    inputs, rows, results = {}, [], []
    for name in recipes:
        c = count(name, args.quick)
        if args.samples:
            c["epoch_samples"] = args.samples
        inputs[name] = c
        per_sample = c["train_gflops_per_sample"]
        for gpu in args.gpu:
            for mfu in args.mfu:
                rate = args.num_gpus * GPUS[gpu] * 1e3 * mfu  # GFLOP/s of the node
                seconds = per_sample * c["epoch_samples"] / rate
                run_hours = per_sample * c["steps"] * c["global_batch_8_gpus"] / rate / 3600
                results.append({"recipe": name, "gpu": gpu, "peak_tflops": GPUS[gpu], "mfu": mfu,
                                "epoch_hours": seconds / 3600, "recipe_hours": run_hours,
                                "samples_per_s": rate / per_sample})
                rows.append([name, f"{c['frames']}x{c['size'][0]}x{c['size'][1]}", f"{per_sample:,.0f}",
                             f"{args.num_gpus} x {gpu}", f"{mfu:.0%}", f"**{seconds / 3600:.1f} h**",
                             f"{run_hours / 24:.1f} d", f"{rate / per_sample / args.num_gpus:,.0f}"])
    assumptions = [f"PROJECTION (not measured on a GPU): one epoch of each recipe's corpus on {args.num_gpus} GPUs; "
                   "peak dense bf16 TFLOP/s x MFU; data loading, communication and optimizer time assumed hidden."]
    for name, c in inputs.items():
        assumptions.append(
            f"{name}: `{c['preset']}`, {c['frames']}x{c['size'][0]}x{c['size'][1]}; video {c['video_gflops']:.1f} "
            f"GFLOPs forward (counted), text {c['text_gflops']:.1f} (analytic)"
            + (f", fusion + MLM {c['fusion_gflops']:.1f}" if c["fusion_gflops"] else "")
            + (f"; frozen (forward only) {c['frozen_gflops']:.1f}" if c["frozen_gflops"] else "")
            + f"; training {c['train_gflops_per_sample']:.1f} GFLOPs per sample; epoch = {c['epoch_samples']:,} "
            f"samples ({c['corpus']}); the whole recipe = {c['steps']:,} steps x {c['global_batch_8_gpus']}.")
    if args.quick:
        assumptions.insert(0, "QUICK MODE: a small preset at 64x64 and a narrow text encoder; not LF-VILA's numbers.")
    table = markdown(["recipe", "frames x H x W", "train GFLOPs / sample", "node", "MFU", "time per epoch",
                      "whole recipe", "samples/s per GPU"], rows)
    text_out = "\n".join(["\n".join(f"- {a}" for a in assumptions), "", table, "",
                          describe(info, before, load()) + " (the FLOP count runs on this machine)"])
    out = args.out or default_out("projection_quick" if args.quick else "projection")
    write_json(out, {"benchmark": "projection", "kind": "projection, not a measurement", "quick": args.quick,
                     "machine": info, "load_start": before, "seconds": round(time.perf_counter() - t0, 1),
                     "assumptions": assumptions, "num_gpus": args.num_gpus, "recipes": inputs, "results": results})
    print(text_out)
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
