"""Annotation files of the downstream benchmarks -> build manifests with task labels:

    python -m finetune.adapters FORMAT --annotations FILE [...] --videos DIR --out MANIFEST.jsonl

A manifest line is what `python -m shards build` reads ({"id", "video", "sentences", "source"})
plus the task's label fields, "qa" or "captions" (see finetune/labels.py). Give the same manifest
to the finetune config as task.train_labels / task.val_labels: the labels are joined on the sample
key. shards/build.py also copies the label fields into each sample's KEY.json, so the shards carry
their labels with them.
Sentences only steer which moments become clips; where a benchmark has no timed text, the record
gets spans the loader can sample from. `end` may pass the video's end: the builder clips it.
The paragraph-retrieval collections (ActivityNet Captions, DiDeMo, QuerYD) are read by
`python -m shards manifest`; Condensed Movies is here.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

from shards.adapters import VideoIndex, strip_video_ext
from shards.storage import Storage

log = logging.getLogger("finetune")
WHOLE = 1e6  # "until the end of the video": the builder clips spans to the measured duration


@dataclass
class Record:
    id: str
    names: list[str]  # file names to look for under --videos, best first
    sentences: list[dict]
    labels: dict = field(default_factory=dict)  # {"qa": [...]} or {"captions": [...]}


def whole_video(text: str) -> list[dict]:
    return [{"text": text, "start": 0.0, "end": WHOLE}]


def tiles(text: str, start: float, end: float, n: int) -> list[dict]:
    """[start, end] cut into n equal spans, so `clip_sampling: sentences` with n clips covers exactly it."""
    step = (end - start) / n
    return [{"text": text, "start": start + i * step, "end": start + (i + 1) * step} for i in range(n)]


def how2qa(path: str, clips: int = 4) -> Iterator[Record]:
    """How2QA (Li et al., 2020, HERO): how2QA_train_release.csv, how2QA_val_release.csv.

    CSV without a header row, one question per row, 7 columns: the YouTube id of a HowTo100M video,
    the question's 60-s segment as "[start:end]" in seconds, three wrong answers, the question, the
    correct answer:
        -0uAXdg0KQo,[46.0:106.0],Pick up the brush,Open the door,Wash the car,What does the man do first?,He sands the board
    One record per segment (id "VIDEO_START_END"), its questions as 4-choice "qa" with the correct
    answer at a position that depends on the question text (stable across runs); the segment is tiled
    into `clips` sentence spans so that the clips come from it. Videos are found as VIDEO[.ext].
    """
    segments: dict[tuple, list[dict]] = defaultdict(list)
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if len(row) != 7:
                raise ValueError(f"{path} line {n}: expected 7 columns (video, [start:end], 3 wrong answers, question, "
                                 f"answer), got {len(row)}")
            video, span, w1, w2, w3, question, answer = (x.strip() for x in row)
            m = re.fullmatch(r"\[\s*([\d.]+)\s*:\s*([\d.]+)\s*\]", span)
            if m is None:
                if n == 1:
                    continue  # a header row
                raise ValueError(f"{path} line {n}: segment {span!r} is not [start:end]")
            start, end = float(m.group(1)), float(m.group(2))
            choices = [w1, w2, w3]
            at = sum(map(ord, question)) % 4  # where the correct answer goes
            choices.insert(at, answer)
            segments[(video, start, end)].append({"question": question, "choices": choices, "answer": at})
    for (video, start, end), qa in segments.items():
        yield Record(f"{video}_{start:g}_{end:g}", [video], tiles(qa[0]["question"], start, end, clips), {"qa": qa})


def violin(path: str, split: str) -> Iterator[Record]:
    """VIOLIN (Liu et al., 2020): violin_annotation.json.

    One JSON object keyed by clip id; per clip the clip's file name, the YouTube id of its source
    ("source"), the split ("train", "validate" or "test"), three pairs of [real, fake] statements,
    and (not used here) the subtitles and the span in the source video:
        {"12345": {"file": "friends_s01e02_seg02_clip_07", "source": "Rk2T5cPjGL0", "split": "train",
                   "statement": [["Ross is sad because ...", "Ross is happy because ..."], [...], [...]],
                   "sub": [...], "span": [...]}, ...}
    Each statement becomes a question with the choices ["true", "false"] (answer 0 for the real
    one, 1 for the fake); accuracy over statements is VIOLIN's metric. Videos are FILE[.ext].
    """
    with open(path) as f:
        data = json.load(f)
    for clip_id, clip in data.items():
        if clip.get("split") != split:
            continue
        qa = [{"question": s, "choices": ["true", "false"], "answer": answer}
              for real, fake in clip["statement"] for s, answer in ((real, 0), (fake, 1))]
        file = str(clip["file"]).strip()
        yield Record(str(clip_id), [file, strip_video_ext(file)], whole_video(clip["statement"][0][0]), {"qa": qa})


def activitynet_qa(questions_path: str, answers_path: str) -> Iterator[Record]:
    """ActivityNet-QA (Yu et al., 2019): {train,val,test}_q.json and {train,val,test}_a.json.

    Two JSON lists joined on "question_id":
        *_q.json: [{"video_name": "JDg--pjY5gg", "question_id": "v_JDg--pjY5gg_1", "question": "is the person outdoors"}, ...]
        *_a.json: [{"question_id": "v_JDg--pjY5gg_1", "answer": "yes", "type": 3}, ...]
    video_name is the YouTube id without ActivityNet's "v_"; videos are found as v_ID or ID.
    "type": 0 motion, 1 spatial relation, 2 temporal relation, 3 yes/no, 4 colour, 5 object,
    6 location, 7 number, 8 other.
    """
    with open(questions_path) as f:
        questions = json.load(f)
    with open(answers_path) as f:
        answers = {a["question_id"]: a for a in json.load(f)}
    by_video: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        a = answers.get(q["question_id"])
        if a is None:
            raise ValueError(f"{answers_path} has no answer for question {q['question_id']}")
        by_video[q["video_name"]].append({"question": q["question"], "answer": a["answer"], "type": a.get("type"),
                                          "question_id": q["question_id"]})
    for video, qa in by_video.items():
        name = video if video.startswith("v_") else f"v_{video}"
        yield Record(name, [name, video], whole_video(qa[0]["question"]), {"qa": qa})


def msrvtt(path: str, split: str) -> Iterator[Record]:
    """MSR-VTT (Xu et al., 2016): train_val_videodatainfo.json or test_videodatainfo.json.

    {"videos": [{"video_id": "video0", "category": 9, "url": "...", "start time": 137.72,
                 "end time": 149.44, "split": "train", "id": 0}, ...],
     "sentences": [{"caption": "a car is shown", "video_id": "video0", "sen_id": 0}, ...]}
    split: "train", "validate" or "test". 20 captions per video; videos are VIDEO_ID.mp4.
    """
    with open(path) as f:
        data = json.load(f)
    captions: dict[str, list[str]] = defaultdict(list)
    for s in data["sentences"]:
        captions[s["video_id"]].append(s["caption"].strip())
    for v in data["videos"]:
        vid = v["video_id"]
        if v.get("split") == split and captions.get(vid):
            yield Record(vid, [vid], whole_video(captions[vid][0]), {"captions": captions[vid]})


def msvd(path: str, split_list: str | None = None) -> Iterator[Record]:
    """MSVD (Chen and Dolan, 2011): AllVideoDescriptions.txt.

    Lines "CLIP caption words", CLIP being YOUTUBEID_START_END (the clip's file name in
    YouTubeClips/, .avi); lines starting with "#" are comments:
        -4wsuPCjDBc_5_15 a squirrel is eating a peanut in it's shell
    About 40 captions per clip. The usual split (1,200 train, 100 val, 670 test clips) is given
    as a list of clip names, one per line (--split-list).
    """
    keep = None
    if split_list:
        with open(split_list) as f:
            keep = {line.strip() for line in f if line.strip()}
    captions: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or " " not in line:
                continue
            clip, text = line.split(" ", 1)
            captions[clip].append(text.strip())
    for clip, caps in captions.items():
        if keep is None or clip in keep:
            yield Record(clip, [clip], whole_video(caps[0]), {"captions": caps})


def condensed_movies(descriptions: str, durations: str | None = None, split_list: str | None = None) -> Iterator[Record]:
    """Condensed Movies (Bain et al., 2020): metadata/descriptions.csv (+ durations.csv).

    CSVs with a header row; descriptions.csv has at least "videoid" (the clip's YouTube id) and
    "description" (the professional caption of the clip); durations.csv has "videoid" and
    "duration" (seconds). The challenge split is a list of video ids, one per line (--split-list).
    One sentence per clip, spanning it: retrieval with one clip and a one-sentence query
    (condensed_movies_retrieval.yaml). Videos are found as VIDEOID[.ext].
    """
    duration = {}
    if durations:
        with open(durations, newline="") as f:
            duration = {r["videoid"]: float(r["duration"]) for r in csv.DictReader(f) if r.get("duration")}
    keep = None
    if split_list:
        with open(split_list) as f:
            keep = {line.strip() for line in f if line.strip()}
    with open(descriptions, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"videoid", "description"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{descriptions}: missing columns {sorted(missing)}")
    for r in rows:
        vid = r["videoid"].strip()
        if keep is None or vid in keep:
            yield Record(vid, [vid], [{"text": r["description"].strip(), "start": 0.0, "end": duration.get(vid, WHOLE)}])


def write_manifest(records: Iterator[Record], videos: str, out: str, source: str, storage: Storage = Storage()) -> dict:
    """-> {"written", "missing"}; a record whose video is not under `videos` is counted, not written."""
    index = VideoIndex(videos, storage)
    written, missing = 0, []
    with open(out, "w") as f:
        for r in records:
            path = index.find(r.names)
            if path is None:
                missing.append(r.id)
                continue
            f.write(json.dumps({"id": r.id, "video": path, "sentences": r.sentences, "source": source, **r.labels}) + "\n")
            written += 1
    if missing:
        log.warning("%d videos not found under %s, e.g. %s", len(missing), videos, ", ".join(missing[:5]))
    return {"written": written, "missing": len(missing)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.adapters", description=__doc__.split("\n\n")[0])
    p.add_argument("format", choices=["how2qa", "violin", "activitynet_qa", "msrvtt", "msvd", "condensed_movies"])
    p.add_argument("--annotations", required=True, help="the annotation file (the questions file for activitynet_qa)")
    p.add_argument("--answers", help="activitynet_qa: the *_a.json file")
    p.add_argument("--durations", help="condensed_movies: durations.csv")
    p.add_argument("--split", help="violin: train / validate / test; msrvtt: train / validate / test")
    p.add_argument("--split-list", help="msvd / condensed_movies: the ids to keep, one per line")
    p.add_argument("--clips", type=int, default=4, help="how2qa: sentence spans per segment (= data.num_clips)")
    p.add_argument("--videos", required=True, help="folder (or s3:// prefix) holding the video files")
    p.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    p.add_argument("--s3-endpoint", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.format in ("violin", "msrvtt") and not args.split:
        p.error(f"{args.format} needs --split")
    if args.format == "activitynet_qa" and not args.answers:
        p.error("activitynet_qa needs --answers")
    records = {
        "how2qa": lambda: how2qa(args.annotations, args.clips),
        "violin": lambda: violin(args.annotations, args.split),
        "activitynet_qa": lambda: activitynet_qa(args.annotations, args.answers),
        "msrvtt": lambda: msrvtt(args.annotations, args.split),
        "msvd": lambda: msvd(args.annotations, args.split_list),
        "condensed_movies": lambda: condensed_movies(args.annotations, args.durations, args.split_list),
    }[args.format]()
    counts = write_manifest(records, args.videos, args.out, f"{args.format}/{os.path.basename(args.annotations)}",
                            Storage(args.s3_endpoint))
    print(f"{args.out}: {counts['written']} videos ({counts['missing']} not found under {args.videos})")
    return 0 if counts["written"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
