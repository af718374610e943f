"""Pretraining corpora (issue 17): metadata files shaped like the public ones, written here, through each
adapter, `python -m shards manifest` and `python -m shards build`, and the tars read back."""

import io
import json
import tarfile

import av
import numpy as np
import pytest
from PIL import Image

from shards import corpora
from shards.__main__ import main
from shards.format import read_tar
from shards.testvideos import write_video

# HD-VILA-100M hdvila_partN.jsonl: one YouTube video per line, clip spans as HH:MM:SS.mmm
VIDEO_A = {"video_id": "QMi8x8o55Ns", "url": "https://www.youtube.com/watch?v=QMi8x8o55Ns", "clip": [
    {"clip_id": "QMi8x8o55Ns.1.mp4", "span": ["00:00:00.500", "00:00:02.000"]},
    {"clip_id": "QMi8x8o55Ns.2.mp4", "span": ["00:00:02.000", "00:00:03.500"]},
    {"clip_id": "QMi8x8o55Ns.3.mp4", "span": ["00:00:03.800", "00:00:05.000"]},  # 0.3 s gap: joins
    {"clip_id": "QMi8x8o55Ns.4.mp4", "span": ["00:00:05.000", "00:00:06.500"]},
    {"clip_id": "QMi8x8o55Ns.5.mp4", "span": ["00:00:08.000", "00:00:09.000"]},  # 1.5 s gap: splits
    {"clip_id": "QMi8x8o55Ns.6.mp4", "span": ["00:00:09.000", "00:00:10.000"]},
    {"clip_id": "QMi8x8o55Ns.7.mp4", "span": ["00:00:10.000", "00:00:11.000"]},
    {"clip_id": "QMi8x8o55Ns.8.mp4", "span": ["00:00:11.000", "00:00:11.800"]}]}
VIDEO_B = {"video_id": "zz-Top_9xQ", "url": "https://www.youtube.com/watch?v=zz-Top_9xQ", "clip": [  # a run of 3
    {"clip_id": f"zz-Top_9xQ.{i}.mp4", "span": [f"00:01:0{i}.000", f"00:01:0{i + 1}.000"]} for i in (1, 2, 3)]}
VIDEO_C = {"video_id": "C3p0-r2d2xy", "url": "https://www.youtube.com/watch?v=C3p0-r2d2xy", "clip": [  # clip 2 untranscribed
    {"clip_id": f"C3p0-r2d2xy.{i}.mp4", "span": [f"00:00:0{i}.000", f"00:00:0{i + 1}.000"]} for i in (1, 2, 3, 4, 5)]}
METADATA_LINES = [json.dumps(VIDEO_A), "{not json", json.dumps({"video_id": "noClips000", "url": "x"}),
                  json.dumps(VIDEO_B),
                  json.dumps({"video_id": "badSpan0000", "clip": [{"clip_id": "badSpan0000.1.mp4", "span": ["00:00:09.000", "00:00:02.000"]}]}),
                  json.dumps(VIDEO_C)]
TEXT = {f"QMi8x8o55Ns.{i}": f"sentence {i} of the cooking video" for i in range(1, 9)}
TEXT |= {f"zz-Top_9xQ.{i}": f"b {i}" for i in (1, 2, 3)} | {f"C3p0-r2d2xy.{i}": f"c {i}" for i in (1, 3, 4, 5)}


def write_hdvila(tmp_path):
    meta, asr = tmp_path / "hdvila_part0.jsonl", tmp_path / "hdvila_asr.jsonl"
    meta.write_text("\n".join(METADATA_LINES) + "\n")
    lines = [json.dumps({"clip_id": k + ".mp4", "text": v}) if i % 2 else json.dumps([k, v])  # both layouts
             for i, (k, v) in enumerate(TEXT.items())]
    asr.write_text("\n".join(lines[:3] + ['{"clip_id": 7}'] + lines[3:]) + "\n")
    return str(meta), str(asr)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    write_video(str(d / "QMi8x8o55Ns.mp4"), 12, fps=10, width=64, height=36, gop=10)  # the full YouTube video
    (d / "clips").mkdir()
    write_video(str(d / "clips" / "QMi8x8o55Ns.2.mp4"), 1.5, fps=10, width=64, height=36, gop=10)  # a cut clip
    (d / "006001_006050").mkdir()  # WebVid's download script: {page_dir}/{videoid}.mp4
    write_video(str(d / "006001_006050" / "21179416.mp4"), 2, fps=10, width=64, height=36, gop=10)
    (d / "00000").mkdir()  # video2dataset: 00000/000000001.mp4 + .json with the url
    write_video(str(d / "00000" / "000000001.mp4"), 1, fps=10, width=48, height=32, gop=10)
    (d / "00000" / "000000001.json").write_text(json.dumps({"url": WEBVID_URL2, "key": "000000001", "status": "success"}))
    return d


def decode(source) -> list[np.ndarray]:
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as c:
        return [f.to_ndarray(format="rgb24").astype(np.int16) for f in c.decode(video=0)]


def samples(out, members):
    index = json.loads((out / "index.json").read_text())
    got = {}
    for name in index["shards"]:
        for raw in read_tar(str(out / name), members=members):
            assert "__error__" not in raw and "__other__" not in raw, raw.get("__other__")
            got[raw["__key__"]] = raw
    return index, got


# ---- HD-VILA-100M and LF-VILA ---------------------------------------------------------------------


def test_lfvila_runs_exact_clip_ids(tmp_path):
    meta, asr = write_hdvila(tmp_path)
    skips = corpora.Skips()
    entries = list(corpora.lfvila(meta, asr, skips=skips))
    # A: 1-4 (a 0.3 s gap joins) and 5-8 (the 1.5 s gap splits); B: a run of 3; C: clip 2 has no transcript
    assert [e.id for e in entries] == ["QMi8x8o55Ns.1..4", "QMi8x8o55Ns.5..8"]
    assert [e.extra["clips"] for e in entries] == [[f"QMi8x8o55Ns.{i}" for i in (1, 2, 3, 4)],
                                                    [f"QMi8x8o55Ns.{i}" for i in (5, 6, 7, 8)]]
    first = entries[0]
    assert first.segment == (0.5, 6.5) and first.source_names == ["QMi8x8o55Ns"] and first.names == []
    assert [(s["start"], s["end"]) for s in first.sentences] == [(0.0, 1.5), (1.5, 3.0), (3.3, 4.5), (4.5, 6.0)]
    assert first.sentences[2]["text"] == "sentence 3 of the cooking video"
    assert skips.counts == {"bad_metadata_line": 2, "bad_clip": 1, "bad_transcript_line": 1}
    assert [e.id for e in corpora.lfvila(meta, asr, max_gap=2.0)] == ["QMi8x8o55Ns.1..8"]
    assert [e.id for e in corpora.lfvila(meta, asr, min_clips=3)] == ["QMi8x8o55Ns.1..4", "QMi8x8o55Ns.5..8",
                                                                       "zz-Top_9xQ.1..3", "C3p0-r2d2xy.3..5"]
    listed = tmp_path / "lfvila8m_clip_ids.txt"  # the LF-VILA-8M list without clip 6: 5, 7-8 are too short
    listed.write_text("\n".join(json.dumps([f"QMi8x8o55Ns.{i}.mp4" for i in group]) for group in ([1, 2, 3, 4], [5], [7, 8])))
    assert [e.id for e in corpora.lfvila(meta, asr, str(listed))] == ["QMi8x8o55Ns.1..4"]


def test_lfvila_manifest_and_build_cuts_the_segment(videos, tmp_path, capsys):
    meta, asr = write_hdvila(tmp_path)
    with open(meta, "a") as f:
        f.write(json.dumps(VIDEO_A) + "\n")  # a video listed twice: its samples once
    m = tmp_path / "lfvila.jsonl"
    assert main(["manifest", "--format", "lfvila", "--annotations", meta, "--transcripts", asr,
                 "--videos", str(videos), "--out", str(m)]) == 0
    out = capsys.readouterr().out
    assert "2 samples (0 not found under" in out and "2 repeated ids left out" in out
    records = [json.loads(line) for line in m.read_text().splitlines()]
    assert [(r["id"], r["segment"]) for r in records] == [("QMi8x8o55Ns.1..4", [0.5, 6.5]), ("QMi8x8o55Ns.5..8", [8.0, 11.8])]
    assert records[0]["video"] == str(videos / "QMi8x8o55Ns.mp4")
    assert main(["build", "--manifest", str(m), "--out", str(tmp_path / "out"), "--fps", "3"]) == 0
    index, got = samples(tmp_path / "out", ("mp4", "json"))
    assert index["media"] == "video" and index["num_samples"] == 2 and sorted(got) == ["QMi8x8o55Ns_1__4", "QMi8x8o55Ns_5__8"]
    j = json.loads(got["QMi8x8o55Ns_1__4"]["json"])
    assert (j["fps"], j["num_frames"], j["duration"], j["build"]["video"]) == (3.0, 18, 6.0, "reencode")
    assert j["segment"] == [0.5, 6.5] and j["clips"] == [f"QMi8x8o55Ns.{i}" for i in (1, 2, 3, 4)]
    assert [(s["start"], s["end"]) for s in j["sentences"]] == [(0.0, 1.5), (1.5, 3.0), (3.3, 4.5), (4.5, 6.0)]
    source, stored = decode(videos / "QMi8x8o55Ns.mp4"), decode(got["QMi8x8o55Ns_1__4"]["mp4"])
    for k in (0, 1, 2, 17):  # output frame k shows the source frame on screen at 0.5 + k/3 s (10 fps source)
        nearest = min(range(len(source)), key=lambda i: np.abs(source[i] - stored[k]).mean())
        assert nearest == int((0.5 + k / 3) * 10 + 1e-6), k
    j = json.loads(got["QMi8x8o55Ns_5__8"]["json"])
    assert j["num_frames"] == 12 and j["duration"] == 4.0 and j["sentences"][-1] == {
        "text": "sentence 8 of the cooking video", "start": 3.0, "end": 3.8}
    assert main(["verify", str(tmp_path / "out")]) == 0
    listed = tmp_path / "lfvila8m_clip_ids.txt"  # without clip 6; a 2 s gap joins clips 4 and 5
    listed.write_text("".join(f"QMi8x8o55Ns.{i}.mp4\n" for i in (1, 2, 3, 4, 5, 7, 8)))
    assert main(["manifest", "--format", "lfvila", "--annotations", meta, "--transcripts", asr, "--clip-list", str(listed),
                 "--max-gap", "2", "--videos", str(videos), "--out", str(m)]) == 0
    assert [json.loads(line)["id"] for line in m.read_text().splitlines()] == ["QMi8x8o55Ns.1..5"]


def test_hdvila_clip_file_or_segment_of_the_full_video(videos, tmp_path):
    meta, asr = write_hdvila(tmp_path)
    m = tmp_path / "hdvila.jsonl"
    assert main(["manifest", "--format", "hdvila", "--annotations", meta, "--transcripts", asr,
                 "--videos", str(videos), "--out", str(m)]) == 0
    records = {r["id"]: r for r in map(json.loads, m.read_text().splitlines())}
    assert sorted(records) == [f"QMi8x8o55Ns.{i}" for i in range(1, 9)]  # B and C are not downloaded
    assert records["QMi8x8o55Ns.2"]["video"].endswith("clips/QMi8x8o55Ns.2.mp4") and "segment" not in records["QMi8x8o55Ns.2"]
    assert records["QMi8x8o55Ns.3"] == {"id": "QMi8x8o55Ns.3", "video": str(videos / "QMi8x8o55Ns.mp4"),
                                        "sentences": [{"text": "sentence 3 of the cooking video", "start": 0.0, "end": 1.2}],
                                        "source": "hdvila/hdvila_part0.jsonl", "segment": [3.8, 5.0], "duration": 1.2}
    sub = tmp_path / "three.jsonl"  # build three of them: a copied clip file and two cut segments
    late = records["QMi8x8o55Ns.8"] | {"id": "late", "segment": [20.0, 21.0]}  # after the 12 s video's end
    sub.write_text("".join(json.dumps(r) + "\n" for r in [records["QMi8x8o55Ns.2"], records["QMi8x8o55Ns.3"], late,
                                                          records["QMi8x8o55Ns.8"]]))
    assert main(["build", "--manifest", str(sub), "--out", str(tmp_path / "out")]) == 0
    index, got = samples(tmp_path / "out", ("mp4", "json"))
    assert sorted(got) == ["QMi8x8o55Ns_2", "QMi8x8o55Ns_3", "QMi8x8o55Ns_8"]
    assert index["skipped"] == {"segment_outside_video": 1}
    assert got["QMi8x8o55Ns_2"]["mp4"] == (videos / "clips" / "QMi8x8o55Ns.2.mp4").read_bytes()
    three = json.loads(got["QMi8x8o55Ns_3"]["json"])
    assert (three["num_frames"], three["fps"], three["build"]["video"]) == (12, 10.0, "reencode")  # 1.2 s at 10 fps
    assert three["sentences"] == [{"text": "sentence 3 of the cooking video", "start": 0.0, "end": 1.2}]


def test_hdvila_and_lfvila_need_their_transcripts(videos, tmp_path, capsys):
    meta, _ = write_hdvila(tmp_path)
    for fmt in ("hdvila", "lfvila"):
        argv = ["manifest", "--format", fmt, "--annotations", meta, "--videos", str(videos), "--out", str(tmp_path / "m")]
        assert main(argv) == 2
        assert "needs --transcripts" in capsys.readouterr().err
    argv = ["manifest", "--format", "lfvila", "--annotations", meta, "--transcripts", str(tmp_path / "nope.jsonl"),
            "--videos", str(videos), "--out", str(tmp_path / "m")]
    assert main(argv) == 2 and "transcript file" in capsys.readouterr().err


# ---- WebVid ----------------------------------------------------------------------------------------

WEBVID_URL1 = "https://ak.picdn.net/shutterstock/videos/21179416/preview/stock-footage-aerial-shot-winter-forest.mp4"
WEBVID_URL2 = "https://ak.picdn.net/shutterstock/videos/1013212094/preview/stock-footage-man-runs-on-a-beach.mp4"
WEBVID_CSV = (
    "videoid,contentUrl,duration,page_dir,name\n"
    f"21179416,{WEBVID_URL1},PT00H00M11S,006001_006050,Aerial shot winter forest\n"
    f"1013212094,{WEBVID_URL2},PT00H00M14S,035951_036000,\"Man runs on a beach, slow motion\"\n"
    "1015598023,https://ak.picdn.net/x/stock-footage-gone.mp4,PT00H00M08S,036001_036050,Never downloaded\n"
    "1234,https://ak.picdn.net/x/y.mp4,eleven seconds,000001_000050,bad duration\n"
    "99999,short row\n"
    f"55555,https://ak.picdn.net/x/z.mp4,PT5S,000001_000050,\"{'a' * 140_000}\"\n")  # past csv's field limit


def test_webvid_manifest_and_build(videos, tmp_path, caplog):
    csv_path = tmp_path / "results_2M_val.csv"
    csv_path.write_text(WEBVID_CSV)
    m = tmp_path / "webvid.jsonl"
    assert main(["manifest", "--format", "webvid", "--annotations", str(csv_path), "--videos", str(videos), "--out", str(m)]) == 0
    assert "results_2M_val.csv line 5: skipped (bad_row)" in caplog.text and "line 6: skipped (bad_row)" in caplog.text
    assert "line 7: skipped (bad_row) Error('field larger than field limit" in caplog.text
    records = [json.loads(line) for line in m.read_text().splitlines()]
    assert records == [
        {"id": "21179416", "video": str(videos / "006001_006050" / "21179416.mp4"),
         "sentences": [{"text": "Aerial shot winter forest", "start": 0.0, "end": 11.0}], "source": "webvid/results_2M_val.csv",
         "duration": 11.0},
        {"id": "1013212094", "video": str(videos / "00000" / "000000001.mp4"),  # found by the url in its .json
         "sentences": [{"text": "Man runs on a beach, slow motion", "start": 0.0, "end": 14.0}],
         "source": "webvid/results_2M_val.csv", "duration": 14.0}]
    assert main(["build", "--manifest", str(m), "--out", str(tmp_path / "out")]) == 0
    index, got = samples(tmp_path / "out", ("mp4", "json"))
    assert sorted(got) == ["1013212094", "21179416"] and index["media"] == "video"
    assert got["21179416"]["mp4"] == (videos / "006001_006050" / "21179416.mp4").read_bytes()
    j = json.loads(got["21179416"]["json"])
    assert j["sentences"] == [{"text": "Aerial shot winter forest", "start": 0.0, "end": j["duration"]}]  # clipped to 2 s
    assert j["num_frames"] == 20 and j["build"]["video"] == "copy"


def test_webvid_without_its_columns_is_refused(videos, tmp_path, capsys):
    bad = tmp_path / "other.csv"
    bad.write_text("id,url,caption\n1,http://a/b.mp4,hello\n")
    assert main(["manifest", "--format", "webvid", "--annotations", str(bad), "--videos", str(videos),
                 "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "missing columns ['videoid', 'contentUrl', 'duration', 'page_dir', 'name']" in capsys.readouterr().err


def test_iso_durations():
    assert [corpora.parse_iso_duration(t) for t in ("PT00H00M11S", "PT1H2M3.5S", "PT45S", "P1DT1S")] == [11, 3723.5, 45, 86401]
    with pytest.raises(ValueError):
        corpora.parse_iso_duration("PT")


# ---- CC3M / CC12M ----------------------------------------------------------------------------------


def jpeg(width, height, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


CC_URL1 = "http://lh6.ggpht.com/-IvRtNLNcG8o/TpFyrudaT6I/AAAAAAAAM6o/_11MuAAKalQ/IMG_3422.JPG?imgmax=800"
CC_URL2 = "https://i.pinimg.com/736x/66/01/6c/66016c3ba27c0e04f39e2bd81a934e3e--anita-ekberg-bridget-bardot.png"
CC_URL3 = "http://www.robertharding.com/watermark.php?type=preview&im=RM/RH/VERTICAL/1127-12838"
CC_URL4 = "https://example.com/never/downloaded.jpg"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    (d / "00000").mkdir()  # img2dataset: 00000/000000000.jpg + 000000000.json {"url", "caption", "key", ...}
    (d / "00000" / "000000000.jpg").write_bytes(jpeg(40, 30, (200, 30, 30)))
    (d / "00000" / "000000000.json").write_text(json.dumps({"url": CC_URL1, "caption": "x", "key": "000000000", "status": "success"}))
    (d / "00000" / "000000002.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20)  # undecodable
    (d / "00000" / "000000002.json").write_text(json.dumps({"url": CC_URL3, "key": "000000002", "status": "success"}))
    rgba = Image.new("RGBA", (24, 16), (0, 0, 255, 0))  # transparent: stored white
    rgba.save(d / "66016c3ba27c0e04f39e2bd81a934e3e--anita-ekberg-bridget-bardot.png")  # found by the url's file name
    return d


def test_cc3m_manifest_build_and_verify(images, tmp_path, caplog):
    tsv = tmp_path / "Train_GCC-training.tsv"  # caption<TAB>url, no header
    tsv.write_text(f"a very typical bus station\t{CC_URL1}\n"
                   f"actor in a black dress at the premiere\t{CC_URL2}\n"
                   f"a glacier in the mountains\t{CC_URL3}\n"
                   "a line without its url\n"
                   f"a dog on a sofa\t{CC_URL4}\n")
    m = tmp_path / "cc3m.jsonl"
    assert main(["manifest", "--format", "cc3m", "--annotations", str(tsv), "--images", str(images), "--out", str(m)]) == 0
    assert "Train_GCC-training.tsv line 4: skipped (bad_line)" in caplog.text
    records = [json.loads(line) for line in m.read_text().splitlines()]
    assert records[0] == {"id": "cc3m-000000001", "image": str(images / "00000" / "000000000.jpg"),
                          "sentences": [{"text": "a very typical bus station", "start": 0.0, "end": 0.0}],
                          "source": "cc3m/Train_GCC-training.tsv", "url": CC_URL1}
    assert [r["id"] for r in records] == ["cc3m-000000001", "cc3m-000000002", "cc3m-000000003"]  # line 5: not downloaded
    assert main(["build", "--manifest", str(m), "--out", str(tmp_path / "out")]) == 0
    index, got = samples(tmp_path / "out", ("jpg", "json"))
    assert index["media"] == "image" and index["num_samples"] == 2 and index["skipped"] == {"bad_image": 1}
    assert index["total_duration"] == 0
    assert list(got) == ["cc3m-000000001", "cc3m-000000002"]
    assert got["cc3m-000000001"]["jpg"] == (images / "00000" / "000000000.jpg").read_bytes()  # a JPEG: its bytes
    assert json.loads(got["cc3m-000000001"]["json"]) == {
        "url": CC_URL1, "id": "cc3m-000000001", "media": "image", "width": 40, "height": 30,
        "sentences": [{"text": "a very typical bus station", "start": 0.0, "end": 0.0}],
        "source": "cc3m/Train_GCC-training.tsv", "build": {"image": "copy"}}
    png = json.loads(got["cc3m-000000002"]["json"])
    assert (png["width"], png["height"], png["build"]) == (24, 16, {"image": "reencode"})
    with Image.open(io.BytesIO(got["cc3m-000000002"]["jpg"])) as img:  # re-encoded as JPEG, transparency white
        assert img.format == "JPEG" and img.size == (24, 16) and min(img.convert("RGB").getpixel((5, 5))) > 245
    with tarfile.open(tmp_path / "out" / index["shards"][0]) as tf:
        names = tf.getnames()
    assert names == ["cc3m-000000001.jpg", "cc3m-000000001.json", "cc3m-000000002.jpg", "cc3m-000000002.json"]
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_cc12m_url_first(images, tmp_path):
    tsv = tmp_path / "cc12m.tsv"  # url<TAB>caption, no header
    tsv.write_text(f"{CC_URL1}\t<PERSON> waits at a typical bus station\n{CC_URL2}\n")
    entries = list(corpora.cc12m(str(tsv)))
    assert [(e.id, e.urls, e.sentences[0]["text"]) for e in entries] == [
        ("cc12m-000000001", [CC_URL1], "<PERSON> waits at a typical bus station")]
    m = tmp_path / "cc12m.jsonl"
    assert main(["manifest", "--format", "cc12m", "--annotations", str(tsv), "--images", str(images), "--out", str(m)]) == 0
    assert main(["build", "--manifest", str(m), "--out", str(tmp_path / "out")]) == 0
    _, got = samples(tmp_path / "out", ("jpg", "json"))
    assert list(got) == ["cc12m-000000001"] and json.loads(got["cc12m-000000001"]["json"])["media"] == "image"


def test_a_manifest_mixing_videos_and_images_is_refused(videos, images, tmp_path, capsys):
    m = tmp_path / "mixed.jsonl"
    m.write_text(json.dumps({"id": "v", "video": str(videos / "QMi8x8o55Ns.mp4"), "sentences": []}) + "\n"
                 + json.dumps({"id": "i", "image": str(images / "00000" / "000000000.jpg"),
                               "sentences": [{"text": "x", "start": 0.0, "end": 0.0}]}) + "\n")
    assert main(["build", "--manifest", str(m), "--out", str(tmp_path / "out")]) == 2
    assert "mixes videos (line 1) and images (line 2)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    m.write_text(m.read_text().splitlines()[1] + "\n")
    with pytest.raises(SystemExit, match="holds images; --fps applies to videos only"):
        main(["build", "--manifest", str(m), "--out", str(tmp_path / "out"), "--fps", "3"])


def test_a_file_name_in_two_folders_matches_no_caption(tmp_path, caplog):
    """Two CC3M URLs ending in the same file name, downloaded into two folders without downloader metadata:
    either file could be either caption's, so neither is matched by name (counted as not found, a warning),
    never paired silently with the wrong caption; a name held once is still found."""
    for sub, colour in (("a.com/x", (255, 0, 0)), ("b.com/y", (0, 0, 255))):
        (tmp_path / "dl" / sub).mkdir(parents=True)
        (tmp_path / "dl" / sub / "image.jpg").write_bytes(jpeg(8, 8, colour))
    (tmp_path / "dl" / "unique.jpg").write_bytes(jpeg(8, 8, (0, 255, 0)))
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a red thing\thttp://a.com/x/image.jpg\na blue thing\thttp://b.com/y/image.jpg\n"
                   "a green thing\thttp://c.com/unique.jpg\n")
    m = tmp_path / "cc3m.jsonl"
    assert main(["manifest", "--format", "cc3m", "--annotations", str(tsv), "--images", str(tmp_path / "dl"),
                 "--out", str(m)]) == 0
    records = [json.loads(line) for line in m.read_text().splitlines()]
    assert [(r["id"], r["image"]) for r in records] == [("cc3m-000000003", str(tmp_path / "dl" / "unique.jpg"))]
    assert "1 file names occur in several folders" in caplog.text


def test_a_re_encoded_image_is_stored_upright(tmp_path):
    """A PNG whose EXIF orientation says "rotate 90" (6): re-encoding drops EXIF, so the builder turns the pixels
    first; KEY.json gives the upright size. (A JPEG is copied with its EXIF, which the loader applies.)"""
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 10))  # left half blue: after the turn, the top half
    img.save(tmp_path / "turned.png", exif=exif)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "turned", "image": str(tmp_path / "turned.png"), "source": "t",
                             "sentences": [{"text": "a blue square over a red one", "start": 0, "end": 0}]}) + "\n")
    assert main(["build", "--manifest", str(m), "--out", str(tmp_path / "out")]) == 0
    _, got = samples(tmp_path / "out", ("jpg", "json"))
    meta = json.loads(got["turned"]["json"])
    assert (meta["width"], meta["height"], meta["build"]) == (10, 20, {"image": "reencode"})
    with Image.open(io.BytesIO(got["turned"]["jpg"])) as out:
        rgb = out.convert("RGB")
        assert out.size == (10, 20) and rgb.getpixel((5, 2))[2] > 200 and rgb.getpixel((5, 17))[0] > 200
