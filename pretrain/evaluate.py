"""Zero-shot paragraph-to-video retrieval on a held-out split, across all ranks."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pretrain.metrics import chance_metrics, format_table, retrieval_metrics
from pretrain import distributed as dist_utils
from pretrain.config import Config, REPO_ROOT
from pretrain.model import VideoTextModel, is_image_batch
from shards.loader import build_eval_loader

log = logging.getLogger("pretrain")


@torch.no_grad()
def embed_split(model: VideoTextModel, cfg: Config) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Keys, video embeddings (N, E) and paragraph embeddings (N, E) of every val sample, on every rank."""
    loader = build_eval_loader(cfg.data, cfg.model.text.resolved_path(), dist_utils.rank(),
                               dist_utils.world_size(), root=str(REPO_ROOT))
    was_training = model.training
    model.eval()
    keys, videos, paragraphs = [], [], []
    for batch in loader:
        _, v = model.encode_video(batch["video"], batch["input_ids"].shape[1], batch.get("depth"), image=is_image_batch(batch))  # (b, E)
        _, p = model.encode_text(batch["input_ids"], batch["attention_mask"])  # (b, E)
        keys += batch["key"]
        videos.append(v.float())
        paragraphs.append(p.float())
    model.train(was_training)
    local = (keys, torch.cat(videos) if videos else None, torch.cat(paragraphs) if paragraphs else None)
    merged = {}
    for ks, vs, ps in dist_utils.all_gather_objects(local):
        for i, k in enumerate(ks):
            merged[k] = (vs[i], ps[i])
    order = sorted(merged)
    if not order:
        raise RuntimeError("the evaluation split yielded no samples")
    return order, torch.stack([merged[k][0] for k in order]), torch.stack([merged[k][1] for k in order])


def evaluate_retrieval(model: VideoTextModel, cfg: Config, run_dir: Path | None = None) -> dict:
    keys, video, paragraph = embed_split(model, cfg)
    similarity = paragraph @ video.t()  # (N queries, N videos)
    result = {"num_videos": len(keys), "paragraph_to_video": retrieval_metrics(similarity),
              "video_to_paragraph": retrieval_metrics(similarity.t()), "chance": chance_metrics(len(keys))}
    if dist_utils.rank() == 0:
        table = format_table({"paragraph->video": result["paragraph_to_video"],
                              "video->paragraph": result["video_to_paragraph"],
                              "chance": result["chance"]})
        print(f"\nZero-shot retrieval on {cfg.data.val_shards} ({len(keys)} videos)\n{table}\n", flush=True)
        if run_dir is not None:
            (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result


@torch.no_grad()
def evaluate_matching(model: VideoTextModel, cfg: Config, run_dir: Path | None = None) -> dict:
    """Stage-2 heads on the held-out split: video-text matching accuracy (each batch's first half with
    rolled videos as negatives, as in training) and masked-token accuracy, summed over all ranks."""
    loader = build_eval_loader(cfg.data, cfg.model.text.resolved_path(), dist_utils.rank(),
                               dist_utils.world_size(), root=str(REPO_ROOT))
    was_training = model.training
    model.eval()
    counts = torch.zeros(4)  # vtm correct, vtm total, mlm correct, mlm total
    gen = torch.Generator().manual_seed(0)
    for batch in loader:
        if batch["input_ids"].shape[0] < 4:
            continue
        counts += model.matching_counts(batch, gen)
    model.train(was_training)
    counts = sum(dist_utils.all_gather_objects(counts))
    result = {"vtm_accuracy": 100.0 * float(counts[0] / counts[1].clamp(min=1)),
              "mlm_accuracy": 100.0 * float(counts[2] / counts[3].clamp(min=1)), "vtm_pairs": int(counts[1])}
    if dist_utils.rank() == 0:
        print(f"Stage-2 heads on {cfg.data.val_shards}: video-text matching accuracy {result['vtm_accuracy']:.2f}% "
              f"(chance 50%) over {result['vtm_pairs']} pairs, masked-token accuracy {result['mlm_accuracy']:.2f}%",
              flush=True)
        if run_dir is not None:
            (run_dir / "eval_matching.json").write_text(json.dumps(result, indent=1))
    return result


def check_learned(eval_json: Path, min_over_chance: float = 5.0) -> str:
    """Raise SystemExit unless paragraph-to-video R@1 in `eval_json` is at least `min_over_chance` times
    chance; else return a one-line summary. `make demo` ends with this, so a run that learned nothing fails."""
    result = json.loads(Path(eval_json).read_text())
    r1, chance = result["paragraph_to_video"]["R1"], result["chance"]["R1"]
    line = f"paragraph-to-video R@1 {r1:.2f}% against chance {chance:.2f}% ({result['num_videos']} videos)"
    if r1 < min_over_chance * chance:
        raise SystemExit(f"the model did not learn: {line}, below {min_over_chance:g}x chance")
    return line


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Fail unless a run's zero-shot retrieval is well above chance.")
    p.add_argument("eval_json", type=Path, help="RUN_DIR/eval.json, written at the end of pretraining")
    p.add_argument("--min-over-chance", type=float, default=5.0, help="required R@1 / chance R@1")
    args = p.parse_args()
    print("learned:", check_learned(args.eval_json, args.min_over_chance))
