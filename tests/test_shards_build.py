"""`python -m shards build / manifest / verify / stats` on video files made like users' videos
(long GOPs with B-frames, NTSC rates, audio, MKV/WebM/AVI), and the shards read back by plain webdataset."""

import hashlib
import io
import json
import os
import tarfile

import av
import numpy as np
import pytest
import webdataset as wds

from shards import build as build_module
from shards.__main__ import main
from shards.build import BuildSettings, build
from shards.format import write_tar
from shards.testvideos import write_video

SENTENCES = [{"text": "a man walks in", "start": 0.5, "end": 4.0}, {"text": "he sits down", "start": 4.0, "end": 9.0},
             {"text": "he waves", "start": 9.0, "end": 30.0},  # runs past the end: clipped
             {"text": "credits roll", "start": 40.0, "end": 45.0}]  # after the end: dropped


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    write_video(str(d / "v_camera01.mp4"), 12, audio=True)  # 30000/1001 fps, 160x90, GOP 250, B-frames, AAC
    write_video(str(d / "phone02.mkv"), 8, fps=25, width=128, height=96, container="matroska", gop=50)
    write_video(str(d / "screen03.webm"), 6, fps=24, width=96, height=64, codec="libvpx-vp9", container="webm", gop=48)
    write_video(str(d / "old04.avi"), 6, fps=15, width=100, height=76, codec="mpeg4", container="avi", gop=30)
    (d / "broken05.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    (d / "empty06.mp4").write_bytes(b"")
    return d


def manifest(path, videos, names) -> str:
    with open(path, "w") as f:
        for name in names:
            f.write(json.dumps({"id": name.split(".")[0], "video": str(videos / name), "sentences": SENTENCES}) + "\n")
    return str(path)


GOOD = ["v_camera01.mp4", "phone02.mkv", "screen03.webm", "old04.avi"]


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


def all_members(folder) -> dict[str, bytes]:
    index = json.load(open(folder / "index.json"))
    out = {}
    for name in index["shards"]:
        out |= tar_members(folder / name)
    return out


def decode_all(source) -> list[np.ndarray]:
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def copied(videos, tmp_path_factory):
    d = tmp_path_factory.mktemp("copied")
    m = manifest(d / "clips.jsonl", videos, GOOD + ["broken05.mp4", "empty06.mp4", "missing07.mp4"])
    assert main(["build", "--manifest", m, "--out", str(d / "out"), "--per-shard", "2"]) == 0
    return d / "out"


def test_copy_mode_keeps_mp4_bytes_and_remuxes_other_containers(copied, videos):
    got = all_members(copied)
    assert got["v_camera01.mp4"] == (videos / "v_camera01.mp4").read_bytes()  # byte copy, audio included
    for name in ("phone02", "screen03", "old04"):  # remuxed into MP4, not re-encoded: identical pixels
        src, stored = decode_all(videos / next(n for n in GOOD if n.startswith(name))), decode_all(got[f"{name}.mp4"])
        assert len(src) == len(stored) and all(np.array_equal(a, b) for a, b in zip(src, stored, strict=True)), name
        with av.open(io.BytesIO(got[f"{name}.mp4"])) as c:
            assert c.format.name.startswith("mov")
    meta = json.loads(got["v_camera01.json"])
    assert meta["fps"] == pytest.approx(30000 / 1001) and meta["num_frames"] == 359
    assert meta["duration"] == pytest.approx(359 / (30000 / 1001))
    assert (meta["width"], meta["height"]) == (160, 90) and meta["source"] == "clips.jsonl"
    spans = [(s["text"], s["start"], s["end"]) for s in meta["sentences"]]
    assert spans == [("a man walks in", 0.5, 4.0), ("he sits down", 4.0, 9.0), ("he waves", 9.0, meta["duration"])]
    assert meta["build"]["sentences_dropped"] == 1 and meta["build"]["video"] == "copy"


def test_index_journal_and_skipped_videos(copied):
    index = json.load(open(copied / "index.json"))
    assert index["shards"] == ["clips-000000.tar", "clips-000001.tar"] and index["counts"] == [2, 2]
    assert index["num_samples"] == 4 and index["num_sentences"] == 3 + 2 + 2 + 2
    assert index["skipped"] == {"bad_video": 1, "zero_length_video": 1, "missing_video": 1}
    assert index["bytes"] == [os.path.getsize(copied / n) for n in index["shards"]]
    assert sorted(os.listdir(copied)) == ["build.jsonl", "clips-000000.tar", "clips-000001.tar", "index.json"]
    journal = [json.loads(line) for line in open(copied / "build.jsonl")]
    assert journal[-1]["done"] and journal[-1]["records_end"] == 7
    assert {s["id"] for e in journal[1:] for s in e["skipped"]} == {"broken05", "empty06", "missing07"}


def test_reencode_to_fps_and_short_side(videos, tmp_path):
    m = manifest(tmp_path / "m.jsonl", videos, ["v_camera01.mp4", "phone02.mkv"])
    build(m, str(tmp_path / "out"), BuildSettings(name="re", fps=4.0, short_side=48, gop_seconds=2.0), progress=False)
    got = all_members(tmp_path / "out")
    meta = json.loads(got["v_camera01.json"])
    assert (meta["width"], meta["height"], meta["fps"]) == (86, 48, 4.0) and meta["build"]["video"] == "reencode"
    frames = decode_all(got["v_camera01.mp4"])
    assert len(frames) == meta["num_frames"] == 48  # 11.98 s at 4 fps
    source = decode_all(videos / "v_camera01.mp4")
    fps = 30000 / 1001
    for k in (0, 17, 47):  # output frame k shows the source frame on screen at k / 4 s
        ref = source[int(np.floor(k / 4 * fps + 1e-6))]
        ref = av.VideoFrame.from_ndarray(ref, format="rgb24").reformat(width=86, height=48).to_ndarray(format="rgb24")
        assert np.abs(frames[k].astype(int) - ref).mean() < 12, k
    with av.open(io.BytesIO(got["v_camera01.mp4"])) as c:
        stream = c.streams.video[0]
        keyframes = [e.timestamp * stream.time_base for e in stream.index_entries if e.is_keyframe]
    assert len(keyframes) >= 6 and max(np.diff(keyframes)) <= 2  # at least one every 2 s: seeks stay short


def test_max_shard_bytes(videos, tmp_path):
    m = manifest(tmp_path / "m.jsonl", videos, GOOD)
    limit = 300_000
    index = build(m, str(tmp_path / "out"), BuildSettings(name="b", max_shard_bytes=limit), progress=False)
    sizes = [os.path.getsize(tmp_path / "out" / n) for n in index["shards"]]
    assert len(sizes) >= 2 and index["num_samples"] == 4
    for size, count in zip(sizes, index["counts"], strict=True):
        assert size <= limit or count == 1  # a single sample larger than the limit gets a shard of its own


def test_rerun_after_a_crash_skips_finished_shards(videos, tmp_path, monkeypatch):
    names = GOOD + ["v_camera01.mp4"]  # 5 records (ids repeat below: give them distinct ids)
    m = tmp_path / "m.jsonl"
    with open(m, "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"id": f"clip{i}", "video": str(videos / name), "sentences": SENTENCES}) + "\n")
    settings = BuildSettings(name="r", per_shard=2)
    clean = build(str(m), str(tmp_path / "clean"), settings, progress=False)

    real, calls = build_module.prepare, []

    def crash_at_the_fourth(item, **kw):
        calls.append(item[0])
        if len(calls) == 4:
            raise KeyboardInterrupt  # the job is killed while preparing record 4
        return real(item, **kw)

    monkeypatch.setattr(build_module, "prepare", crash_at_the_fourth)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build(str(m), str(out), settings, progress=False)
    assert sorted(os.listdir(out)) == ["build.jsonl", "r-000000.tar"]  # no index, no partial tar
    first = os.stat(out / "r-000000.tar")

    calls.clear()
    monkeypatch.setattr(build_module, "prepare", lambda item, **kw: (calls.append(item[0]), real(item, **kw))[1])
    again = build(str(m), str(out), settings, progress=False)
    assert calls == [3, 4, 5]  # records 1-2 are in the finished shard and are not prepared again
    assert os.stat(out / "r-000000.tar").st_mtime_ns == first.st_mtime_ns
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert again["shards"] == clean["shards"] == ["r-000000.tar", "r-000001.tar", "r-000002.tar"]
    assert [digest(out / n) for n in again["shards"]] == [digest(tmp_path / "clean" / n) for n in clean["shards"]]
    calls.clear()
    build(str(m), str(out), settings, progress=False)  # complete: nothing to do
    assert calls == []


def test_build_refuses_another_manifest_in_the_same_folder(copied, videos, tmp_path):
    m = manifest(tmp_path / "clips.jsonl", videos, GOOD[:1])
    with pytest.raises(SystemExit, match="another manifest or other settings"):
        build(m, str(copied), BuildSettings(name="clips", per_shard=2), progress=False)


def test_bad_manifest_lines_are_named_before_any_work(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "video": "a.mp4", "sentences": []}\n{"id": "b", "sentences": []}\n'
                 '{"id": "c", "video": "c.mp4", "sentences": [{"text": "x", "start": "0"}]}\n'
                 '{"id": "a", "video": "a2.mp4", "sentences": []}\nnot json\n')
    with pytest.raises(ValueError) as e:
        build(str(m), str(tmp_path / "out"), BuildSettings(), progress=False)
    for needle in ("line 2: missing field 'video'", "line 3: a sentence needs", "line 4: id 'a'", "line 5: bad JSON"):
        assert needle in str(e.value)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_other_manifest_fields_go_into_the_metadata_and_builder_fields_are_refused(videos, tmp_path):
    qa = [{"question": "what does he do?", "choices": ["sits", "runs"], "answer": 0}]
    m = tmp_path / "labels.jsonl"
    m.write_text(json.dumps({"id": "cam", "video": str(videos / GOOD[0]), "sentences": SENTENCES, "qa": qa,
                             "split": "val", "duration": 999.0}) + "\n")
    build(str(m), str(tmp_path / "out"), BuildSettings(per_shard=2), progress=False)
    meta = json.loads(all_members(tmp_path / "out")["cam.json"])
    assert meta["qa"] == qa and meta["split"] == "val"
    assert meta["duration"] == pytest.approx(12.0, abs=0.1)  # measured, not the manifest's hint
    m.write_text(json.dumps({"id": "cam", "video": "x.mp4", "sentences": [], "fps": 30}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: field\(s\) \['fps'\] are measured and written by the builder"):
        build(str(m), str(tmp_path / "out2"), BuildSettings(), progress=False)


def test_plain_webdataset_reads_built_shards(copied):
    index = json.load(open(copied / "index.json"))
    urls = [str(copied / n) for n in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node).decode())
    assert [s["__key__"] for s in samples] == ["v_camera01", "phone02", "screen03", "old04"]
    for s in samples:
        assert set(s) >= {"mp4", "json"} and s["json"]["id"] == s["__key__"]
        assert len(decode_all(s["mp4"])) == s["json"]["num_frames"]


# ---- verify and stats ---------------------------------------------------------------------------


def test_verify_passes_a_good_set_and_lists_bad_samples(copied, tmp_path, capsys):
    assert main(["verify", str(copied)]) == 0
    assert "OK: 2 shards, 4 samples, 0 bad" in capsys.readouterr().out
    good = tar_members(copied / "clips-000000.tar")
    meta = json.loads(good["v_camera01.json"])
    bad = {"ok.mp4": good["v_camera01.mp4"], "ok.json": good["v_camera01.json"],
           "garbage.mp4": os.urandom(5000), "garbage.json": good["v_camera01.json"],
           "late.mp4": good["v_camera01.mp4"],
           "late.json": json.dumps(meta | {"sentences": [{"text": "x", "start": 50.0, "end": 60.0}]}).encode(),
           "nojson.mp4": good["v_camera01.mp4"],
           "liar.mp4": good["v_camera01.mp4"], "liar.json": json.dumps(meta | {"num_frames": 900}).encode()}
    folder = tmp_path / "bad"
    folder.mkdir()
    write_tar(str(folder / "bad-000000.tar"), bad)
    (folder / "index.json").write_text(json.dumps({"shards": ["bad-000000.tar"], "counts": [4]}))
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    for key, reason in (("garbage", "bad_video"), ("late", "sentence_outside_video"), ("nojson", "missing_json"),
                        ("liar", "frame_count_mismatch"), ("-", "index_count_mismatch")):
        assert f"{key}: {reason}" in out, (key, reason, out)
    assert " ok:" not in out and "FAILED: 1 shards, 5 samples, 5 bad" in out


def test_stats_counts_videos_hours_sentences_words(copied, capsys):
    assert main(["stats", str(copied), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    durations = [359 / (30000 / 1001), 8.0, 6.0, 6.0]
    assert s["videos"] == 4 and s["shards"] == 2 and s["sentences"] == 3 + 2 + 2 + 2
    assert s["hours"] == pytest.approx(sum(durations) / 3600, rel=1e-3)
    assert s["words"] == (4 + 3 + 2) + 3 * (4 + 3)  # the 8 s and 6 s videos keep 2 sentences
    assert s["shard_bytes"]["total"] == sum(os.path.getsize(copied / f"clips-00000{i}.tar") for i in (0, 1))
    assert main(["stats", str(copied)]) == 0
    assert "hours" in capsys.readouterr().out


def test_worker_processes_do_not_change_the_output(videos, tmp_path):
    m = manifest(tmp_path / "m.jsonl", videos, GOOD + ["broken05.mp4"])
    one = build(m, str(tmp_path / "one"), BuildSettings(name="w", per_shard=2), workers=1, progress=False)
    two = build(m, str(tmp_path / "two"), BuildSettings(name="w", per_shard=2), workers=2, progress=False)
    assert one == two | {"settings": one["settings"]} and one["skipped"] == {"bad_video": 1}
    for name in one["shards"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
