"""The geometry corpus (`shards.synth.GEOMETRY`): what it claims to hold. Occlusion in every frame that agrees
with the stated depth order and the rendered depth, the stated left/right in the pixels, both relations
balanced, and paragraphs that differ in nothing but their relations (the hard negatives a contrastive loss
needs to learn them)."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from shards.__main__ import main
from shards.synth import (COLOURS, FIXED_CAST, FLIPS, GEOMETRY, SynthSettings, render_video, sample_event, shape_at,
                          shape_mask, video_rng)

SIZE, EVENTS, VIDEOS = 32, 8, 24
GEO = SynthSettings(events=EVENTS, size=SIZE, fps=4.0, event_seconds=2.0, **GEOMETRY)  # as benchmarks/ablation.py


@pytest.fixture(scope="module")
def videos():
    return [render_video(video_rng(0, "train", i), GEO) for i in range(VIDEOS)]


def test_the_defaults_are_the_first_corpus():
    s = SynthSettings()
    assert (s.cast, s.motion, s.radius, s.directions) == ("random", "cross", (0.12, 0.18), ("left", "right", "up", "down"))


def test_the_shapes_overlap_in_every_frame_and_the_nearer_one_is_drawn_and_stored(videos):
    n = GEO.frames_per_event
    for frames, depth, events in videos:
        for e, event in enumerate(events):
            front, back = (event.mover, event.still) if event.mover_in_front else (event.still, event.mover)
            assert front.depth < back.depth < 1.0
            assert ("in front of" in event.sentence()) == event.mover_in_front
            landmark = shape_at(event.landmark, 0.0, SIZE)
            for t in range(n):
                both = shape_at(front, t / (n - 1), SIZE) & shape_at(back, t / (n - 1), SIZE) & ~landmark
                assert both.sum() >= 4, "the mover must stay over the still shape in every frame"
                assert (frames[e * n + t][both] == COLOURS[front.colour]).all()
                assert (depth[e * n + t][both] == np.float16(front.depth)).all()


def test_left_right_of_the_landmark_is_in_the_pixels(videos):
    """The blue square's visible pixels lie on the stated side of the green triangle's, in every frame."""
    blue, green = (np.array(COLOURS[c]) for c in ("blue", "green"))
    checked = 0
    for frames, _, events in videos:
        for e, event in enumerate(events):
            for frame in frames[e * GEO.frames_per_event:(e + 1) * GEO.frames_per_event]:
                xs = [np.nonzero((frame == c).all(-1))[1] for c in (blue, green)]
                if min(len(x) for x in xs) < 3:  # the mover may hide the small landmark for a frame
                    continue
                assert (xs[0].mean() < xs[1].mean()) == (event.still_side == "left of")
                checked += 1
    assert checked >= 0.9 * VIDEOS * EVENTS * GEO.frames_per_event


def test_relations_are_balanced_and_independent():
    """Over the events of 128 videos, drawn as `render_video` draws them (events first, then pixels)."""
    events = [e for i in range(128) for rng in [video_rng(0, "train", i)]
              for e in [sample_event(rng, SIZE, True, GEO) for _ in range(EVENTS)]]
    assert events[:EVENTS] == render_video(video_rng(0, "train", 0), GEO)[2]
    front = np.array([e.mover_in_front for e in events])
    left = np.array([e.still_side == "left of" for e in events])
    assert len(events) == 128 * EVENTS
    assert 0.45 < front.mean() < 0.55 and 0.45 < left.mean() < 0.55
    assert 0.2 < (front & left).mean() < 0.3  # all four combinations about equally often


def test_paragraphs_differ_only_in_their_relations(videos):
    """One sentence template for the whole corpus: the same cast, the same direction; remove the relation
    phrases and every sentence is the same, so a batch's negatives differ from the positive only there."""
    phrases = "|".join(p for pair in FLIPS.values() for p in pair)
    sentences = [e.sentence() for _, _, events in videos for e in events]
    assert {re.sub(phrases, "REL", s) for s in sentences} == {
        f"a {FIXED_CAST[0][0]} {FIXED_CAST[0][1]} moves right REL a {FIXED_CAST[1][0]} {FIXED_CAST[1][1]} "
        f"REL a {FIXED_CAST[2][0]} {FIXED_CAST[2][1]}"}
    paragraphs = [tuple(e.sentence() for e in events[:4]) for _, _, events in videos]  # the eval sample
    assert len(set(paragraphs)) >= 0.9 * len(paragraphs), "16 relation pairs per sentence: 4 events tell videos apart"


def test_a_fixed_cast_keeps_every_other_draw():
    """cast="fixed" renames the shapes and draws nothing else: positions and relations match the random cast's."""
    a = render_video(video_rng(3, "val", 1), SynthSettings(events=4, size=SIZE, relations="depth+plane"))[2]
    b = render_video(video_rng(3, "val", 1), SynthSettings(events=4, size=SIZE, relations="depth+plane",
                                                           cast="fixed"))[2]
    for x, y in zip(a, b, strict=True):
        assert (x.mover.start, x.still.start, x.relations()) == (y.mover.start, y.still.start, y.relations())
        assert (y.mover.colour, y.still.colour, y.landmark.colour) == ("red", "blue", "green")


def test_settings_are_checked():
    for bad, match in ((dict(cast="same"), "cast"), (dict(motion="jump"), "motion"), (dict(radius=(0.3, 0.1)), "radius"),
                       (dict(directions=("sideways",)), "directions"), (dict(directions=()), "directions")):
        with pytest.raises(ValueError, match=match):
            SynthSettings(**bad)
    assert shape_mask("circle", 16, 16, 6, SIZE).sum() > 0


def test_cli_geometry_writes_the_settings_and_relations(tmp_path):
    argv = ["synth", "--out", str(tmp_path), "--videos", "2", "--val-videos", "1", "--seed", "0", "--size", "32",
            "--geometry", "--radius", "0.15", "0.2"]
    assert main(argv) == 0
    settings = json.loads((tmp_path / "train" / "index.json").read_text())["settings"]
    assert {k: settings[k] for k in ("relations", "cast", "motion", "directions")} == {
        "relations": "depth+plane", "cast": "fixed", "motion": "overlap", "directions": ["right"]}
    assert settings["radius"] == [0.15, 0.2]  # a flag overrides the preset's field


def test_ablation_builds_the_geometry_corpus_and_refuses_a_folder_of_another(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ablation

    ablation.make_corpus(tmp_path, 2, 1, 4, SIZE, "geometry")
    index = json.loads((tmp_path / "val" / "index.json").read_text())
    assert index["settings"]["cast"] == "fixed" and index["num_samples"] == 1
    ablation.make_corpus(tmp_path, 2, 1, 4, SIZE, "geometry")  # the same corpus: kept
    with pytest.raises(SystemExit, match="another corpus"):
        ablation.make_corpus(tmp_path, 2, 1, 4, SIZE, "captions")
