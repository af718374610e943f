"""What the loop's metrics record says of mixed batches: clips counted per kind (data.num_clips per video
sample, 1 per image sample) and the media and source of the batch whose losses it holds
(pretrain.trainer.StepBatches, MetricsLog)."""

import json

from pretrain.trainer import MetricsLog, StepBatches


def batch(media: str, source: str, size: int) -> dict:
    return {"media": media, "source": source, "key": [f"{source}_{i}" for i in range(size)]}


def test_a_step_counts_clips_by_kind_and_names_its_last_batch():
    batches = StepBatches(iter([batch("video", "webvid", 4), batch("image", "cc3m", 4), batch("image", "cc3m", 2),
                                {"key": ["a", "b"]}]), num_clips=3)
    next(batches), next(batches)  # one step of grad_accum 2: a video micro-batch, then an image one
    assert batches.clips == 4 * 3 + 4 * 1 and batches.kind == {"media": "image", "source": "cc3m"}
    batches.start_step()
    next(batches)
    assert batches.clips == 2 and batches.kind == {"media": "image", "source": "cc3m"}
    batches.start_step()
    next(batches)  # a batch without "media" (an older loader): a video
    assert batches.clips == 2 * 3 and batches.kind == {"media": "video", "source": ""}


def test_media_and_source_reach_metrics_jsonl_and_not_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, resumed_step=0)
    log.write({"step": 1, "media": "image", "source": "cc3m", "vpc": 2.5, "clips_per_s": 8.0,
               "samples_by_source": {"cc3m": 4}})
    log.close()
    (row,) = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert row["media"] == "image" and row["source"] == "cc3m" and row["vpc"] == 2.5
    tags = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    assert sorted(tags) == ["data/samples_seen/cc3m", "train/clips_per_s", "train/vpc"]
