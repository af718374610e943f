"""`python -m shards ...` pre-launch checks, run as a user runs them (a subprocess): a missing, unreadable or
malformed input is one line on stderr naming it and exit code 2, never a traceback, before any work
starts; `verify` keeps exit 1 for bad samples."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shards.format import write_tar

REPO = Path(__file__).resolve().parent.parent


def shards(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=os.environ | {"PYTHONPATH": str(REPO)})


def input_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, stderr one line holding every needle, no traceback; -> that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- manifest ------------------------------------------------------------------------------------


def test_manifest_missing_annotation_file_and_video_folder(tmp_path):
    missing = tmp_path / "nope" / "train.json"
    input_error(shards("manifest", "--format", "activitynet", "--annotations", missing, "--videos", tmp_path,
                       "--out", tmp_path / "m.jsonl"), "annotation file", str(missing), "does not exist")
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"v_a": {"duration": 10.0, "timestamps": [[0, 5]], "sentences": ["a man walks"]}}))
    input_error(shards("manifest", "--format", "activitynet", "--annotations", ann, "--videos", tmp_path / "videos",
                       "--out", tmp_path / "m.jsonl"), "video folder", str(tmp_path / "videos"), "does not exist")
    input_error(shards("manifest", "--format", "activitynet", "--annotations", tmp_path, "--videos", tmp_path,
                       "--out", tmp_path / "m.jsonl"), "annotation file", "is a folder")
    input_error(shards("manifest", "--format", "queryd", "--annotations", ann, "--times", tmp_path / "times.pkl",
                       "--videos", tmp_path, "--out", tmp_path / "m.jsonl"), "times file", "times.pkl", "does not exist")
    assert not (tmp_path / "m.jsonl").exists()


def test_manifest_malformed_annotation_file_is_named(tmp_path):
    ann = tmp_path / "train.json"
    ann.write_text('{"v_a": {"duration": 10.0, ')  # cut off
    (tmp_path / "videos").mkdir()
    input_error(shards("manifest", "--format", "activitynet", "--annotations", ann, "--videos", tmp_path / "videos",
                       "--out", tmp_path / "m.jsonl"), "annotation file", str(ann), "malformed")
    ann.write_text(json.dumps({"v_a": {"duration": 10.0, "sentences": ["a man walks"]}}))  # no "timestamps"
    input_error(shards("manifest", "--format", "activitynet", "--annotations", ann, "--videos", tmp_path / "videos",
                       "--out", tmp_path / "m.jsonl"), str(ann), "malformed", "timestamps")
    assert not (tmp_path / "m.jsonl").exists()


# ---- build ---------------------------------------------------------------------------------------


def test_build_missing_manifest_and_depth_model(tmp_path):
    input_error(shards("build", "--manifest", tmp_path / "m.jsonl", "--out", tmp_path / "out"),
                "manifest", str(tmp_path / "m.jsonl"), "does not exist")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "a", "video": "a.mp4", "sentences": []}) + "\n")
    input_error(shards("build", "--manifest", m, "--out", tmp_path / "out", "--depth-model", tmp_path / "dpt"),
                "depth model", str(tmp_path / "dpt"), "does not exist")
    (tmp_path / "dpt").mkdir()
    input_error(shards("build", "--manifest", m, "--out", tmp_path / "out", "--depth-model", tmp_path / "dpt"),
                "depth model config", "config.json", "does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_build_unreadable_manifest(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "a", "video": "a.mp4", "sentences": []}) + "\n")
    m.chmod(0)
    input_error(shards("build", "--manifest", m, "--out", tmp_path / "out"), "manifest", str(m), "is not readable")


def test_build_names_malformed_manifest_lines_before_any_work(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join([
        json.dumps({"id": "a", "video": "a.mp4", "sentences": []}),
        '{"id": "b", "video": "b.mp4", "sentences": [',  # bad JSON
        json.dumps({"id": "c", "sentences": []}),  # no video
        json.dumps({"video": "d.mp4", "sentences": []}),  # no id
        json.dumps({"id": "e", "video": "e.mp4", "sentences": "one sentence"}),  # wrong type
        json.dumps({"id": "f", "video": 7, "sentences": []}),  # wrong type
    ]) + "\n")
    line = input_error(shards("build", "--manifest", m, "--out", tmp_path / "out"), f"manifest {m}",
                       "line 2: bad JSON", "line 3: missing field 'video'", "line 4: missing field 'id'",
                       "line 5: sentences must be a list", "line 6: bad video 7")
    assert "line 1" not in line
    assert not (tmp_path / "out").exists()  # nothing started
    m.write_text("\n\n")
    input_error(shards("build", "--manifest", m, "--out", tmp_path / "out"), f"manifest {m}", "has no records")


def test_build_reports_only_the_first_five_bad_lines_on_one_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text("".join("[1, 2]\n" for _ in range(8)))
    line = input_error(shards("build", "--manifest", m, "--out", tmp_path / "out"), "line 1: a record must be a JSON object",
                       "line 5:", "(and 3 more bad lines)")
    assert "line 6:" not in line


# ---- verify and stats ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["verify", "stats"])
def test_missing_shard_sets(command, tmp_path):
    input_error(shards(command, tmp_path / "none"), "shard set", str(tmp_path / "none"), "does not exist")
    (tmp_path / "split").mkdir()
    input_error(shards(command, tmp_path / "split"), "shard set", "has no index.json")
    (tmp_path / "split" / "index.json").write_text("{not json")
    input_error(shards(command, tmp_path / "split"), "index.json is malformed")
    (tmp_path / "split" / "index.json").write_text(json.dumps({"shards": ["s-000000.tar", "s-000001.tar"]}))
    write_tar(str(tmp_path / "split" / "s-000000.tar"), {})
    input_error(shards(command, tmp_path / "split"), "shard", str(tmp_path / "split" / "s-000001.tar"), "does not exist")
    input_error(shards(command, tmp_path / "split" / "s-{000000..000002}.tar"), str(tmp_path / "split" / "s-000001.tar"),
                "does not exist", "(2 of 3 shards missing)")


def test_verify_keeps_exit_1_for_bad_samples(tmp_path):
    (tmp_path / "s-000000.tar").write_bytes(os.urandom(4096))  # exists and reads, but is no tar
    (tmp_path / "index.json").write_text(json.dumps({"shards": ["s-000000.tar"], "counts": [1]}))
    proc = shards("verify", tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "bad_tar" in proc.stdout and "FAILED: 1 shards" in proc.stdout and "Traceback" not in proc.stderr
