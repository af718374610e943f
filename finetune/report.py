"""The run folder's results: results.json, results.txt (the printed table) and, for retrieval,
recall_at_k.png (R@K against K, before and after finetuning, next to chance)."""
from __future__ import annotations

import json
from pathlib import Path

from pretrain.metrics import chance_metrics, format_table
from pretrain import distributed as dist_utils

LABELS = {"zero_shot": "zero-shot", "before": "before finetuning", "after": "finetuned"}


def write_report(run_dir: Path, cfg, task, results: dict, config_name: str) -> str:
    """Rank 0 writes the files and prints the table; every rank returns the table."""
    rows = {}
    for name, label in LABELS.items():
        if name in results:
            rows.update(task.rows(results[name], label))
    any_result = next(iter(results.values()))
    if "chance" in any_result and isinstance(any_result["chance"], dict):
        rows["chance"] = any_result["chance"]
    size = any_result.get("num_videos", any_result.get("num_questions"))
    steps = "no finetuning" if cfg.task.name == "zeroshot" else f"{cfg.train.steps} steps"
    title = (f"{cfg.task.name} on {cfg.data.val_shards} ({size} {'videos' if 'num_videos' in any_result else 'questions'}); "
             f"config {config_name}, start {cfg.model.init_from or 'random initialisation'}, {steps}")
    table = format_table(rows, task.cols)
    if dist_utils.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = {"task": cfg.task.name, "config": config_name, "init_from": cfg.model.init_from,
                   "val_shards": cfg.data.val_shards, "steps": cfg.train.steps, "results": results,
                   "headline": {name: task.headline(r) for name, r in results.items()}}
        (run_dir / "results.json").write_text(json.dumps(summary, indent=1))
        (run_dir / "results.txt").write_text(f"{title}\n{table}\n")
        print(f"\n{title}\n{table}\n", flush=True)
        if "recall_curve" in any_result:
            plot_recall(results, run_dir / "recall_at_k.png", title)
    return table


def plot_recall(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    n = 0
    for name, label in LABELS.items():
        if name in results:
            for direction, style in (("paragraph_to_video", "-"), ("video_to_paragraph", ":")):
                curve = results[name]["recall_curve"][direction]
                n = len(curve)
                ax.plot(range(1, n + 1), curve, style, label=f"{label}, {direction.replace('_to_', '->')}")
    num = next(iter(results.values()))["num_videos"]
    ax.plot(range(1, n + 1), [chance_metrics(num)["R1"] * k for k in range(1, n + 1)], "--", color="grey", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
