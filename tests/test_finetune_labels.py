"""Task labels: the synthetic tasks, vocabularies, paragraph queries, and the benchmark adapters on
tiny files shaped like the real annotation files."""
import csv
import json

import pytest

from finetune import adapters
from finetune.labels import (WordVocab, answer_vocab, blind_answers, constant_caption, parse_synthetic,
                             synthetic_labels, words)
from finetune.tasks import paragraph_groups
from shards.synth import COLOURS, SHAPES

META = {"sentences": [
    {"text": "a red circle moves left in front of a blue square", "start": 0, "end": 1},
    {"text": "a green triangle moves up behind a white circle", "start": 1, "end": 2},
    {"text": "an orange square moves down in front of a cyan triangle", "start": 2, "end": 3},
    {"text": "a red circle moves right behind a green square", "start": 3, "end": 4}]}


def test_parse_synthetic_sentence():
    e = parse_synthetic("an orange square moves down in front of a cyan triangle")
    assert e == {"mover": "orange square", "colour": "orange", "shape": "square", "direction": "down",
                 "where": "in front of", "still": "cyan triangle"}
    with pytest.raises(ValueError):
        parse_synthetic("a man cooks food")


def test_synthetic_multiple_choice_is_answerable_only_from_the_video():
    qa = synthetic_labels("k", META, 4, "question")["qa"]
    assert len(qa) == 4
    movers = ["red circle", "green triangle", "orange square", "red circle"]
    for q, mover, s in zip(qa, movers, META["sentences"], strict=True):
        e = parse_synthetic(s["text"])
        assert q["question"] == f"what moves {e['direction']} {e['where']} the {e['still']}?"
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        assert q["choices"][q["answer"]] == mover
        assert e["still"] not in q["choices"]  # the shape named in the question is never a choice
        assert all(c.split()[0] in COLOURS and c.split()[1] in SHAPES for c in q["choices"])
    assert synthetic_labels("k", META, 4, "question") == synthetic_labels("k", META, 4, "question")  # deterministic
    answers = {q["answer"] for key in "abcdef" for q in synthetic_labels(key, META, 4, "question")["qa"]}
    assert len(answers) > 1  # the correct choice is not always in the same place


def test_synthetic_statements_and_open_questions():
    qa = synthetic_labels("k", META, 2, "statement")["qa"]
    assert len(qa) == 8 and [q["answer"] for q in qa] == [0, 1] * 4
    for real, fake in zip(qa[::2], qa[1::2], strict=True):
        assert real["question"] != fake["question"] and real["choices"] == ["true", "false"]
        a, b = parse_synthetic(real["question"]), parse_synthetic(fake["question"])
        assert (a["colour"] != b["colour"]) != (a["direction"] != b["direction"])  # exactly one thing changed
    open_qa = synthetic_labels("k", META, 4, "open")["qa"]
    # "red circle" moves twice (no direction question for it); every (shape, direction) is unique
    assert {"question": "which way does the green triangle move?", "answer": "up"} in open_qa
    assert not any(q["question"] == "which way does the red circle move?" for q in open_qa)
    assert {"question": "what colour is the circle that moves right?", "answer": "red"} in open_qa
    assert synthetic_labels("k", META, 4, "open")["captions"] == [s["text"] for s in META["sentences"]]
    # colour questions: one yes and one no, yes exactly for the colours the video shows
    shown = {c for s in META["sentences"] for c in (parse_synthetic(s["text"])["colour"],
                                                    parse_synthetic(s["text"])["still"].split()[0])}
    colour_qs = [q for q in open_qa if q["question"].startswith("is there")]
    assert [q["answer"] for q in colour_qs].count("yes") == [q["answer"] for q in colour_qs].count("no") == 1
    for q in colour_qs:
        assert (q["question"].split()[3] in shown) == (q["answer"] == "yes"), q


def test_multiple_choice_distractors_never_share_a_colour_with_the_question():
    """The text alone cannot pick the mover: no choice has the still shape's colour, and no two share a colour."""
    for key in "abcdefgh":
        for q in synthetic_labels(key, META, 4, "question")["qa"]:
            still_colour = q["question"].split(" the ")[-1].split()[0]
            colours = [c.split()[0] for c in q["choices"]]
            assert still_colour not in colours and len(set(colours)) == 4, q


def test_chance_baselines_of_open_qa_and_captioning():
    qa = [{"question": "which way?", "answer": "left"}, {"question": "Which way", "answer": "left"},
          {"question": "which way?", "answer": "up"}, {"question": "what colour?", "answer": "red"},
          {"question": "what colour?", "answer": "blue"}]
    # per question its most frequent answer (ties alphabetical); "" the overall majority
    assert blind_answers(qa) == {"": "left", "which way": "left", "what colour": "blue"}
    captions = ["a red circle moves left", "a blue circle moves left", "a blue square moves up", "two words"]
    # the most common length is 5 words; at each position the most frequent word of those captions
    assert constant_caption(captions) == "a blue circle moves left"
    assert constant_caption([]) == ""


def test_vocabularies():
    assert answer_vocab(["Yes", "no", "yes.", "two", "no", "yes"], 2) == ["yes", "no"]
    assert words("A man's dog, running!") == ["a", "man's", "dog", "running"]
    v = WordVocab.build(["a cat sat", "a cat ran", "the dog"], min_count=2)
    assert v.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "cat"]
    ids = v.encode("A cat jumped high", max_len=4)
    assert ids == [4, 5, WordVocab.UNK, WordVocab.EOS]
    assert v.decode(ids + [5]) == "a cat <unk>"


def test_paragraph_groups_keep_every_sentence_in_order():
    assert paragraph_groups(["a", "b", "c", "d", "e"], 2) == ["a b c", "d e"]
    assert paragraph_groups(["a", "b"], 4) == ["a", "b", "", ""]
    assert paragraph_groups(["a", "b", "c", "d"], 4) == ["a", "b", "c", "d"]


# ---- adapters -----------------------------------------------------------------------------------


def videos(tmp_path, *names):
    folder = tmp_path / "videos"
    folder.mkdir(exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"\0")
    return str(folder)


def manifest(path):
    return [json.loads(line) for line in open(path)]


def test_how2qa(tmp_path):
    ann = tmp_path / "how2QA_train_release.csv"
    with open(ann, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["vid1", "[10.0:70.0]", "Pick up the brush", "Open the door", "Wash the car",
                    "What does the man do first?", "He sands the board"])
        w.writerow(["vid1", "[10.0:70.0]", "red", "blue", "green", "What colour is the paint?", "white"])
        w.writerow(["vid2", "[0:60]", "a", "b", "c", "Where is he?", "in a garage"])
        w.writerow(["missing", "[0:60]", "a", "b", "c", "q?", "d"])
    out = tmp_path / "m.jsonl"
    counts = adapters.write_manifest(adapters.how2qa(str(ann), clips=4), videos(tmp_path, "vid1.mp4", "vid2.webm"),
                                     str(out), "how2qa/test")
    assert counts == {"written": 2, "missing": 1}
    first, second = manifest(out)
    assert first["id"] == "vid1_10_70" and first["video"].endswith("vid1.mp4") and len(first["qa"]) == 2
    assert [(s["start"], s["end"]) for s in first["sentences"]] == [(10, 25), (25, 40), (40, 55), (55, 70)]
    q = first["qa"][0]
    assert q["question"] == "What does the man do first?" and len(q["choices"]) == 4
    assert q["choices"][q["answer"]] == "He sands the board"
    assert second["qa"][0]["choices"][second["qa"][0]["answer"]] == "in a garage"


def test_violin(tmp_path):
    ann = tmp_path / "violin_annotation.json"
    ann.write_text(json.dumps({
        "1": {"file": "friends_clip_1", "source": "yt1", "split": "train",
              "statement": [["Ross is sad.", "Ross is happy."], ["A cup falls.", "A cup flies."]], "sub": [], "span": []},
        "2": {"file": "friends_clip_2", "source": "yt2", "split": "test",
              "statement": [["x", "y"]], "sub": [], "span": []}}))
    out = tmp_path / "m.jsonl"
    adapters.write_manifest(adapters.violin(str(ann), "train"), videos(tmp_path, "friends_clip_1.mp4", "friends_clip_2.mp4"),
                            str(out), "violin")
    (r,) = manifest(out)
    assert r["id"] == "1" and [q["answer"] for q in r["qa"]] == [0, 1, 0, 1]
    assert r["qa"][1] == {"question": "Ross is happy.", "choices": ["true", "false"], "answer": 1}


def test_activitynet_qa(tmp_path):
    (tmp_path / "train_q.json").write_text(json.dumps([
        {"video_name": "JDg--pjY5gg", "question_id": "v_JDg--pjY5gg_1", "question": "is the person outdoors"},
        {"video_name": "JDg--pjY5gg", "question_id": "v_JDg--pjY5gg_2", "question": "what colour is the ball"}]))
    (tmp_path / "train_a.json").write_text(json.dumps([
        {"question_id": "v_JDg--pjY5gg_2", "answer": "red", "type": 4},
        {"question_id": "v_JDg--pjY5gg_1", "answer": "yes", "type": 3}]))
    out = tmp_path / "m.jsonl"
    adapters.write_manifest(adapters.activitynet_qa(str(tmp_path / "train_q.json"), str(tmp_path / "train_a.json")),
                            videos(tmp_path, "v_JDg--pjY5gg.mkv"), str(out), "anetqa")
    (r,) = manifest(out)
    assert r["id"] == "v_JDg--pjY5gg" and [(q["question"], q["answer"]) for q in r["qa"]] == [
        ("is the person outdoors", "yes"), ("what colour is the ball", "red")]


def test_msrvtt_and_msvd(tmp_path):
    (tmp_path / "info.json").write_text(json.dumps({
        "videos": [{"video_id": "video0", "split": "train", "id": 0}, {"video_id": "video1", "split": "test", "id": 1}],
        "sentences": [{"caption": "a car is shown", "video_id": "video0", "sen_id": 0},
                      {"caption": "a red car drives", "video_id": "video0", "sen_id": 1},
                      {"caption": "a man talks", "video_id": "video1", "sen_id": 2}]}))
    out = tmp_path / "m.jsonl"
    adapters.write_manifest(adapters.msrvtt(str(tmp_path / "info.json"), "train"),
                            videos(tmp_path, "video0.mp4", "video1.mp4"), str(out), "msrvtt")
    (r,) = manifest(out)
    assert r["id"] == "video0" and r["captions"] == ["a car is shown", "a red car drives"]
    assert r["sentences"][0]["start"] == 0.0 and r["sentences"][0]["end"] >= 1e5  # the builder clips it
    (tmp_path / "AllVideoDescriptions.txt").write_text(
        "# MSVD\n-4wsuPCjDBc_5_15 a squirrel is eating a peanut\n-4wsuPCjDBc_5_15 a chipmunk eats\nabc_1_2 a dog runs\n")
    (tmp_path / "train_list.txt").write_text("-4wsuPCjDBc_5_15\n")
    adapters.write_manifest(adapters.msvd(str(tmp_path / "AllVideoDescriptions.txt"), str(tmp_path / "train_list.txt")),
                            videos(tmp_path, "-4wsuPCjDBc_5_15.avi", "abc_1_2.avi"), str(out), "msvd")
    (r,) = manifest(out)
    assert r["id"] == "-4wsuPCjDBc_5_15" and r["captions"] == ["a squirrel is eating a peanut", "a chipmunk eats"]


def test_condensed_movies(tmp_path):
    with open(tmp_path / "descriptions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "imdbid", "description"])
        w.writerow(["abc123", "tt01", "Jack meets Rose on the deck."])
        w.writerow(["def456", "tt02", "Neo dodges bullets."])
    (tmp_path / "durations.csv").write_text("videoid,duration\nabc123,132.5\n")
    (tmp_path / "test.txt").write_text("abc123\n")
    out = tmp_path / "m.jsonl"
    adapters.write_manifest(adapters.condensed_movies(str(tmp_path / "descriptions.csv"), str(tmp_path / "durations.csv"),
                                                      str(tmp_path / "test.txt")),
                            videos(tmp_path, "abc123.mp4", "def456.mp4"), str(out), "cm")
    (r,) = manifest(out)
    assert r["sentences"] == [{"text": "Jack meets Rose on the deck.", "start": 0.0, "end": 132.5}] and "qa" not in r


def test_adapter_command_line(tmp_path):
    (tmp_path / "info.json").write_text(json.dumps({"videos": [{"video_id": "video0", "split": "train"}],
                                                    "sentences": [{"caption": "a cat", "video_id": "video0"}]}))
    out = tmp_path / "m.jsonl"
    assert adapters.main(["msrvtt", "--annotations", str(tmp_path / "info.json"), "--split", "train",
                          "--videos", videos(tmp_path, "video0.mp4"), "--out", str(out)]) == 0
    assert manifest(out)[0]["captions"] == ["a cat"]
