"""The synthetic shard writer: determinism, index, decodable MP4, sentences that match the pixels, depth."""

import hashlib
import io
import json
import os
import tarfile

import av
import numpy as np
import pytest
import webdataset as wds

from shards.__main__ import main
from shards.synth import (COLOURS, BACKGROUND, DIRECTIONS, SynthSettings, render_video, shape_at,
                          video_key, video_rng)

VIDEOS, VAL, PER_SHARD = 10, 4, 4
SETTINGS = SynthSettings(events=4, size=64, fps=8.0, event_seconds=2.0, per_shard=PER_SHARD)


def synth(out, seed=0, workers=1):
    argv = ["synth", "--out", str(out), "--videos", str(VIDEOS), "--seed", str(seed), "--val-videos", str(VAL),
            "--per-shard", str(PER_SHARD), "--workers", str(workers)]
    assert main(argv) == 0
    return out


def digests(folder) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("synth") / "a")


def all_members(data, split="train") -> dict[str, bytes]:
    index = json.load(open(data / split / "index.json"))
    out = {}
    for name in index["shards"]:
        out.update(members(data / split / name))
    return out


def test_same_seed_same_bytes_any_worker_count(data, tmp_path):
    again = synth(tmp_path / "b", seed=0, workers=2)
    for split in ("train", "val"):
        assert digests(data / split) == digests(again / split), f"{split} differs between runs"
    other = synth(tmp_path / "c", seed=1)
    a, c = digests(data / "train"), digests(other / "train")
    assert all(a[name] != c[name] for name in a if name.endswith(".tar"))


def test_index_lists_the_shards_and_counts(data):
    for split, n in (("train", VIDEOS), ("val", VAL)):
        index = json.load(open(data / split / "index.json"))
        shards = sorted(f for f in os.listdir(data / split) if f != "index.json")
        assert index["shards"] == shards == [f"synth-{i:06d}.tar" for i in range(-(-n // PER_SHARD))]
        assert index["num_samples"] == sum(index["counts"]) == n
        assert index["counts"] == [len(members(data / split / s)) // 3 for s in shards]
        assert index["total_duration"] == pytest.approx(n * SETTINGS.events * SETTINGS.event_seconds)
        assert index["settings"]["seed"] == 0 and index["settings"]["split"] == split
        assert index["settings"]["events"] == SETTINGS.events and index["settings"]["size"] == SETTINGS.size


def test_tar_members_have_fixed_metadata(data):
    with tarfile.open(data / "train" / "synth-000000.tar") as tf:
        for m in tf:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
            assert m.name.count(".") == (2 if m.name.endswith(".depth.npz") else 1)  # no dots in keys


def test_val_is_a_different_stream(data):
    train, val = all_members(data, "train"), all_members(data, "val")
    assert not set(train) & set(val)
    train_videos = {hashlib.sha256(v).digest() for k, v in train.items() if k.endswith(".mp4")}
    assert not train_videos & {hashlib.sha256(v).digest() for k, v in val.items() if k.endswith(".mp4")}


def decode_all(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # (T, H, W, 3)


def test_mp4_decodes_to_the_rendered_frames(data):
    got = all_members(data)
    key = video_key("train", 3)
    frames = decode_all(got[f"{key}.mp4"])
    rendered, _, _ = render_video(video_rng(0, "train", 3), SETTINGS)
    T = SETTINGS.events * SETTINGS.frames_per_event
    assert frames.shape == rendered.shape == (T, 64, 64, 3)
    assert np.abs(frames.astype(int) - rendered).mean() < 8  # lossy, but the same picture
    meta = json.loads(got[f"{key}.json"])
    assert meta["id"] == key and meta["source"] == "synth" and meta["fps"] == SETTINGS.fps
    assert meta["duration"] == pytest.approx(T / SETTINGS.fps)
    spans = [(s["start"], s["end"]) for s in meta["sentences"]]
    assert spans == [(i * 2.0, (i + 1) * 2.0) for i in range(SETTINGS.events)]


def nearest_colour(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) index into [BACKGROUND, *COLOURS]."""
    palette = np.array([BACKGROUND, *COLOURS.values()], np.float32)  # (K, 3)
    return ((frame[:, :, None, :].astype(np.float32) - palette) ** 2).sum(-1).argmin(-1)


def centroid(frame: np.ndarray, colour: str) -> np.ndarray:
    ys, xs = np.nonzero(nearest_colour(frame) == 1 + list(COLOURS).index(colour))
    assert len(xs) > 20, f"{colour} hardly visible"
    return np.array([xs.mean(), ys.mean()])


def test_sentence_names_the_moving_shape_and_its_direction(data):
    """From the decoded pixels alone: the first colour crosses the frame the named way, the second stays."""
    got, n = all_members(data), SETTINGS.frames_per_event
    for i in range(VIDEOS):
        key = video_key("train", i)
        frames = decode_all(got[f"{key}.mp4"])
        for e, sentence in enumerate(json.loads(got[f"{key}.json"])["sentences"]):
            words = sentence["text"].split()  # a COLOUR SHAPE moves DIR (in front of | behind) a COLOUR SHAPE
            mover, direction, still = words[1], words[4], words[-2]
            first, last = frames[e * n], frames[(e + 1) * n - 1]
            moved = centroid(last, mover) - centroid(first, mover)
            step = np.array(DIRECTIONS[direction])
            assert moved @ step > 0.3 * SETTINGS.size, f"{key}: {sentence['text']!r} but moved {moved}"
            assert np.abs(centroid(last, still) - centroid(first, still)).max() < 0.15 * SETTINGS.size


def test_front_shape_is_drawn_on_top_and_has_smaller_depth(data):
    got, n = all_members(data), SETTINGS.frames_per_event
    events_with_overlap = events_total = 0
    for i in range(VIDEOS):
        key = video_key("train", i)
        frames, depth, events = render_video(video_rng(0, "train", i), SETTINGS)
        with np.load(io.BytesIO(got[f"{key}.depth.npz"]), allow_pickle=False) as npz:
            stored = npz["depth"]
        assert stored.shape == (SETTINGS.events * n, 64, 64) and stored.dtype == np.float16
        np.testing.assert_array_equal(stored, depth)
        sentences = [s["text"] for s in json.loads(got[f"{key}.json"])["sentences"]]
        for e, event in enumerate(events):
            front_named = "in front of" in sentences[e]
            front, back = (event.mover, event.still) if front_named else (event.still, event.mover)
            assert front.depth < back.depth < 1.0
            overlapped = False
            for t in range(n):
                both = shape_at(front, t / (n - 1), 64) & shape_at(back, t / (n - 1), 64)
                if both.any():
                    overlapped = True
                    assert (stored[e * n + t][both] == np.float16(front.depth)).all()
                    assert (frames[e * n + t][both] == COLOURS[front.colour]).all()
            events_with_overlap += overlapped
            events_total += 1
    assert events_with_overlap >= 0.8 * events_total, "the mover should pass over/under the other shape"


def test_plain_webdataset_reads_the_shards(data):
    index = json.load(open(data / "train" / "index.json"))
    urls = [str(data / "train" / name) for name in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node))
    assert [s["__key__"] for s in samples] == [video_key("train", i) for i in range(VIDEOS)]
    for s in samples:
        assert {"mp4", "json", "depth.npz"} <= set(s)
        assert json.loads(s["json"])["id"] == s["__key__"]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="size"):
        SynthSettings(size=63)
    with pytest.raises(ValueError, match="event_seconds"):
        SynthSettings(fps=3.0, event_seconds=0.5)


PLANE = SynthSettings(events=4, size=64, fps=8.0, event_seconds=2.0, per_shard=PER_SHARD, relations="depth+plane")


def test_image_plane_relation_is_visible_in_the_frames():
    """"... a blue square left of a green triangle": in the rendered pixels the square's centroid is left of
    the triangle's, in every frame where both are mostly visible; the landmark shares the still shape's depth."""
    from shards.synth import flip_relation

    sides = []
    for i in range(6):
        frames, depth, events = render_video(video_rng(0, "train", i), PLANE)
        n = PLANE.frames_per_event
        for e, event in enumerate(events):
            words = event.sentence().split()  # a C S moves D (in front of | behind) a C S (left | right) of a C S
            assert words[-5] in ("left", "right") and words[-4] == "of"
            still, landmark = words[-7], words[-2]
            assert (still, landmark) == (event.still.colour, event.landmark.colour)
            assert event.landmark.depth == event.still.depth and event.mover.colour not in (still, landmark)
            seen = 0
            for frame in frames[e * n:(e + 1) * n]:  # the mover may hide either shape for a few frames
                labels = nearest_colour(frame)
                if min((labels == 1 + list(COLOURS).index(c)).sum() for c in (still, landmark)) <= 20:
                    continue
                seen += 1
                dx = centroid(frame, landmark)[0] - centroid(frame, still)[0]
                assert dx * (1 if words[-5] == "left" else -1) > 0.15 * PLANE.size, (event.sentence(), dx)
            assert seen >= n // 2, f"{event.sentence()!r}: both still shapes visible in only {seen} of {n} frames"
            sides.append(words[-5])
            flipped = flip_relation(event.sentence(), "plane").split()
            assert flipped[-5] != words[-5] and flipped[:-5] == words[:-5] and flipped[-4:] == words[-4:]
    assert 0.25 < sides.count("left") / len(sides) < 0.75


def test_plane_corpus_records_relations_and_default_stays_unchanged(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "p"), "--videos", "2", "--val-videos", "1", "--seed", "0",
                 "--relations", "depth+plane", "--long", "--size", "32", "--fps", "2"]) == 0
    got = all_members(tmp_path / "p")
    meta = json.loads(got[f"{video_key('train', 0)}.json"])
    assert len(meta["sentences"]) == 8  # --long
    for s in meta["sentences"]:
        assert s["relations"]["depth"] in s["text"] and s["text"].endswith(s["relations"]["plane"] + " " + " ".join(s["text"].split()[-3:]))
    _, _, events = render_video(video_rng(0, "train", 0), SETTINGS)  # the default corpus: two shapes, no plane clause
    assert all(e.landmark is None and " of a" not in e.sentence().replace("in front of a", "") for e in events)
    with pytest.raises(ValueError, match="relations"):
        SynthSettings(relations="sideways")
