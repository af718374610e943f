"""Annotation adapters on small files shaped exactly like the published ones, then a build from the manifest."""

import json
import pickle

import pytest

from shards.__main__ import main
from shards.adapters import VideoIndex, activitynet, didemo, queryd, table
from shards.testvideos import write_video

# ActivityNet Captions train.json / val_1.json: {video id: {duration, timestamps, sentences}}
ANET = {
    "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 79.42]],
                      "sentences": ["A young woman is seen standing in a room and leads into her dancing.",
                                    " The girl dances around the room while the camera captures her movements.",
                                    " She continues dancing around the room and ends by laying on the floor."]},
    "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[21.99, 61.72], [0, 23.45]],
                      "sentences": [" The man then puts on a belt.", "A man is seen speaking to the camera."]},
    "v_nwznKOuZM7w": {"duration": 30.1, "timestamps": [[0, 30.1]], "sentences": ["Nobody downloaded this one."]},
}

# DiDeMo train_data.json: one item per description, times = annotators' [first, last] 5-second chunk
DIDEMO = [
    {"annotation_id": 12115, "description": "the little girl jumps back up after falling.",
     "video": "12090392@N02_13482799053_87ef417396.mov", "times": [[3, 3], [3, 3], [2, 3], [3, 3]],
     "download_link": "https://www.flickr.com/video_download.gne?id=13482799053", "num_segments": 6},
    {"annotation_id": 12116, "description": "a girl in a blue shirt walks toward the camera.",
     "video": "12090392@N02_13482799053_87ef417396.mov", "times": [[0, 1], [0, 0], [0, 1], [1, 1]],
     "download_link": "https://www.flickr.com/video_download.gne?id=13482799053", "num_segments": 6},
    {"annotation_id": 23002, "description": "the dog runs off screen",
     "video": "43472519@N00_3413734397_b94dd5d4a3.avi", "times": [[4, 4], [4, 5], [4, 5], [4, 4]],
     "download_link": "https://www.flickr.com/video_download.gne?id=3413734397", "num_segments": 5},
]

# QuerYD: pickled dicts "video-" + YouTube id -> token lists / [start, end] seconds, same order
QUERYD_CAPTIONS = {"video-0A3e9lWz7Dw": [["a", "man", "walks", "in", "."], ["he", "sits", "down", "."]],
                   "video-9zYx_wq2-Ab": [["rain", "falls", "on", "a", "street", "."]]}
QUERYD_TIMES = {"video-0A3e9lWz7Dw": [[12.3, 15.9], [3.0, 6.5]], "video-9zYx_wq2-Ab": [[0.0, 4.0]]}


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    (d / "anet").mkdir()
    write_video(str(d / "anet" / "v_QOlSCBRmfWY.mp4"), 3, fps=10, width=64, height=36, gop=10)
    write_video(str(d / "anet" / "ehGHCYKzyZ8.mkv"), 2, fps=10, width=64, height=36, gop=10, container="matroska")
    write_video(str(d / "12090392@N02_13482799053_87ef417396.mov.mp4"), 2, fps=10, width=64, height=36, gop=10)
    write_video(str(d / "0A3e9lWz7Dw.mp4"), 2, fps=10, width=64, height=36, gop=10)
    return d


def test_activitynet(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ANET))
    entries = {e.id: e for e in activitynet(str(path))}
    e = entries["v_ehGHCYKzyZ8"]
    assert e.names == ["v_ehGHCYKzyZ8", "ehGHCYKzyZ8"] and e.duration == 61.72
    assert e.sentences[0] == {"text": " The man then puts on a belt.", "start": 21.99, "end": 61.72}


def test_didemo_takes_the_most_common_span_and_groups_by_video(tmp_path):
    path = tmp_path / "train_data.json"
    path.write_text(json.dumps(DIDEMO))
    entries = {e.id: e for e in didemo(str(path))}
    girl = entries["12090392@N02_13482799053_87ef417396.mov"]
    assert girl.names[1] == "12090392@N02_13482799053_87ef417396"
    assert [(s["start"], s["end"]) for s in girl.sentences] == [(15.0, 20.0), (0.0, 10.0)]  # [3,3] and [0,1]
    dog = entries["43472519@N00_3413734397_b94dd5d4a3.avi"]
    assert [(s["start"], s["end"]) for s in dog.sentences] == [(20.0, 25.0)]  # tie [4,4] / [4,5]: the earlier


def test_queryd_joins_tokens_and_filters_by_split(tmp_path):
    caps, times, split = tmp_path / "raw_captions_combined_filtered-v2.pkl", tmp_path / "times.pkl", tmp_path / "val_list.txt"
    caps.write_bytes(pickle.dumps(QUERYD_CAPTIONS))
    times.write_bytes(pickle.dumps(QUERYD_TIMES))
    split.write_text("video-0A3e9lWz7Dw\n")
    (e,) = list(queryd(str(caps), str(times), str(split)))
    assert e.id == "video-0A3e9lWz7Dw" and e.names == ["video-0A3e9lWz7Dw", "0A3e9lWz7Dw"]
    assert e.sentences == [{"text": "a man walks in .", "start": 12.3, "end": 15.9},
                           {"text": "he sits down .", "start": 3.0, "end": 6.5}]


def test_csv_groups_rows_by_id(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text('id,video,start,end,text\ncook,cook.mkv,12.5,30,"he fries them, slowly"\n'
                    'walk,,0,3,a dog walks\ncook,cook.mkv,0,12.5,a man chops onions\n')
    entries = {e.id: e for e in table(str(path))}
    assert entries["cook"].names == ["cook.mkv", "cook"] and len(entries["cook"].sentences) == 2
    assert entries["cook"].sentences[0]["text"] == "he fries them, slowly"
    assert entries["walk"].names == ["walk", "walk"]
    bad = tmp_path / "bad.csv"
    bad.write_text("video,begin,end,caption\nx,0,1,y\n")
    with pytest.raises(ValueError, match="missing columns"):
        list(table(str(bad)))


def test_video_index_finds_files_with_or_without_extensions(video_dir):
    index = VideoIndex(str(video_dir))
    assert index.find(["v_QOlSCBRmfWY"]).endswith("anet/v_QOlSCBRmfWY.mp4")
    assert index.find(["v_ehGHCYKzyZ8", "ehGHCYKzyZ8"]).endswith("anet/ehGHCYKzyZ8.mkv")
    assert index.find(["12090392@N02_13482799053_87ef417396.mov"]).endswith(".mov.mp4")
    assert index.find(["nothing"]) is None


def test_manifest_command_then_build(video_dir, tmp_path):
    ann = tmp_path / "val_1.json"
    ann.write_text(json.dumps(ANET))
    out = tmp_path / "anet.jsonl"
    argv = ["manifest", "--format", "activitynet", "--annotations", str(ann), "--videos", str(video_dir), "--out", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8"]  # the third video is not on disk
    assert records[1]["sentences"][0]["text"] == "A man is seen speaking to the camera."  # sorted by start
    assert records[0]["source"] == "activitynet/val_1.json" and records[0]["duration"] == 82.73
    assert main(["build", "--manifest", str(out), "--out", str(tmp_path / "shards")]) == 0
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["shards"] == ["anet-000000.tar"] and index["num_samples"] == 2

    caps, times = tmp_path / "caps.pkl", tmp_path / "times.pkl"
    caps.write_bytes(pickle.dumps(QUERYD_CAPTIONS))
    times.write_bytes(pickle.dumps(QUERYD_TIMES))
    argv = ["manifest", "--format", "queryd", "--annotations", str(caps), "--times", str(times),
            "--videos", str(video_dir), "--out", str(tmp_path / "q.jsonl")]
    assert main(argv) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert record["video"].endswith("0A3e9lWz7Dw.mp4") and record["sentences"][0]["start"] == 3.0


def test_manifest_without_videos_folder_is_one_line(tmp_path, capsys):
    ann = tmp_path / "val_1.json"
    ann.write_text(json.dumps(ANET))
    argv = ["manifest", "--format", "activitynet", "--annotations", str(ann), "--out", str(tmp_path / "m.jsonl")]
    assert main(argv) == 2
    assert "--format activitynet needs --videos" in capsys.readouterr().err


def test_video_index_by_downloader_url(tmp_path):
    (tmp_path / "00000").mkdir()
    (tmp_path / "00000" / "000000001.mp4").write_bytes(b"x")
    (tmp_path / "00000" / "000000001.json").write_text(json.dumps({"url": "https://a/b/clip.mp4"}))
    (tmp_path / "00000" / "000000002.mp4").write_bytes(b"x")  # no .json: found by name
    (tmp_path / "00000" / "000000003.json").write_text("{broken")  # no video beside it: ignored
    index = VideoIndex(str(tmp_path), by_url=True)
    assert index.find(["nothing"], ["https://a/b/clip.mp4"]).endswith("00000/000000001.mp4")
    assert index.find(["000000001"]) is None  # a file with a url is found by its url only
    assert index.find(["000000002"]).endswith("000000002.mp4")
