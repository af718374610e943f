"""Finetune recipes that learn: each task's `_debug` recipe, through the real entry point, ends above both
chance and its own starting point by more than the spread over seeds, on a synthetic task whose answer is
in the video.

The debug task: synthetic videos of one event (one shape moving in front of or behind another, 2 s, 32x32,
shapes of radius 0.25-0.3), one clip of 2 frames each; 128 train and 64 held-out videos. Per seed, as the
papers do, one backbone is trained first and every task starts from it:
- retrieval (VPC) from random weights; "before" is the random model;
- multiple-choice QA, open QA and captioning with `--init` = that retrieval run; "before" is the same
  backbone with the task's untrained head (`task.eval_before`).
Chance is each task's own:
- retrieval: R@5 of a random ranking, 5 / 64;
- multiple choice: the mean of 1 / choices (the distractors' colours are not in the video, so the text alone
  cannot tell: finetune/labels.py);
- open QA: "blind", each question's most frequent train answer (a model that reads only the question);
- captioning: the larger of CIDEr of one constant caption and "shuffled", the model's own captions scored
  against another video's references (a decoder that learned the captions' language and ignores the video).
Over SEEDS, for X = before and X = chance: min(after) - max(X) > the larger range (max - min over seeds) of
after and of X (chance varies over seeds only where it is measured on the model: captioning's "shuffled"). Both seeds run at once, one process and one thread
each; their numbers are printed (pytest -s) and in the README ("Finetune recipes that learn").
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "finetune" / "configs"
SEEDS = (0, 1)
VAL_VIDEOS = 128
SMALL = ["data.size=32", "data.frames_per_clip=2", "data.num_clips=1", "data.max_words=12", "data.num_workers=0",
         "data.batch_size=8", "train.precision=fp32", "train.save_every=100000", "train.log_every=10",
         "model.freeze=[text.]", "train.warmup_steps=4", "task.eval_before=true", "train.eval_at_end=true"]
# the backbone every task starts from: the tiny model, 1 + 1 of the text encoder's layers (frozen), a fusion
# layer (untrained here; the QA heads train it)
BACKBONE = ["model.video.preset=debug", "model.video.local_stage=0", "model.embed_dim=32", "model.fusion_layers=1",
            "model.text.sentence_layers=1", "model.text.paragraph_layers=1"]
# task -> (recipe, keys, score (higher is better), chance)
TASKS = {
    "retrieval": ("anet_retrieval_debug.yaml",
                  ["task.query_words=12", "train.steps=300", "train.lr=1e-3", "task.head_lr=1e-3", "train.decay_every=0"],
                  lambda r: r["paragraph_to_video"]["R5"], lambda r: r["chance"]["R5"]),
    # the fusion layer, a BERT layer, learns at train.lr (it comes with the backbone): at 1e-3 it did not learn
    "qa_mc": ("how2qa_debug.yaml",
              ["task.question_words=16", "train.steps=400", "train.lr=3e-4", "task.head_lr=3e-4", "train.decay_every=0"],
              lambda r: r["accuracy"], lambda r: r["chance"]),
    "qa_open": ("anetqa_debug.yaml",
                ["task.question_words=16", "train.steps=400", "train.lr=3e-4", "task.head_lr=1e-3", "train.decay_every=0"],
                lambda r: r["accuracy"], lambda r: r["blind"]),
    "caption": ("msvd_caption_debug.yaml",
                ["task.decoder_dim=64", "task.decoder_layers=1", "task.beam_size=1", "train.steps=150", "train.lr=1e-3",
                 "task.head_lr=1e-3"],
                lambda r: r["CIDEr"], lambda r: max(r["chance"]["CIDEr"], r["shuffled"]["CIDEr"])),
}
CHAIN = """
import json, sys, torch
torch.set_num_threads(1)
from finetune.run import main
for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        sys.exit(f"failed: {argv}")
"""


def chain(corpus: Path, out: Path, seed: int) -> list[list[str]]:
    """The four runs of one seed: retrieval from random weights, then each task from it."""
    common = [*SMALL, f"data.train_shards={corpus}/train", f"data.val_shards={corpus}/val", f"train.seed={seed}",
              f"data.seed={seed}"]
    runs = []
    for task, (recipe, keys, _, _) in TASKS.items():
        start = BACKBONE if task == "retrieval" else ["--init", str(out / "retrieval")]  # its architecture comes along
        runs.append(["--config", str(CONFIGS / recipe), "--run-dir", str(out / task), *start, *common, *keys])
    return runs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{task: [(before, after, chance) per seed]}; prints them and the wall time."""
    root = tmp_path_factory.mktemp("learns")
    corpus = root / "corpus"
    subprocess.run([sys.executable, "-m", "shards", "synth", "--out", str(corpus), "--videos", "128", "--val-videos",
                    str(VAL_VIDEOS), "--seed", "5", "--per-shard", "32", "--size", "32", "--events", "1",
                    "--event-seconds", "2.0", "--radius", "0.25", "0.3"],
                   check=True, cwd=REPO, capture_output=True, timeout=300)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    procs = []
    for seed in SEEDS:
        log = open(root / f"seed{seed}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", CHAIN, json.dumps(chain(corpus, root / f"seed{seed}", seed))],
                                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log, seed))
    try:
        for proc, log, seed in procs:
            rc = proc.wait(timeout=max(1.0, t0 + 1200 - time.monotonic()))  # bounded: pytest's own limit is 1200 s
            log.close()
            assert rc == 0, (root / f"seed{seed}.log").read_text()[-4000:]
    finally:
        for proc, log, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    wall = time.monotonic() - t0
    out = {}
    for task, (_, _, score, chance_of) in TASKS.items():
        rows = []
        for seed in SEEDS:
            r = json.loads((root / f"seed{seed}" / task / "results.json").read_text())["results"]
            rows.append((score(r["before"]), score(r["after"]), chance_of(r["after"])))
        out[task] = rows
    print(f"\nfinetune recipes that learn, {len(SEEDS)} seeds at once: {wall:.0f} s")
    for task, rows in out.items():
        print(f"  {task}: (before, after, chance) per seed {[tuple(round(x, 1) for x in row) for row in rows]}")
    return out


@pytest.mark.parametrize("task", list(TASKS))
def test_debug_recipe_beats_chance_and_its_start_by_more_than_the_seed_spread(task, results):
    rows = results[task]
    assert len(rows) == len(SEEDS)
    before, after, chance = zip(*rows)
    for name, other in (("before", before), ("chance", chance)):
        spread = max(max(after) - min(after), max(other) - min(other))
        assert min(after) - max(other) > spread, f"{task}: after {after} not above {name} {other} by more than {spread:.2f}"
