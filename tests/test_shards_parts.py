"""Building in parts (`python -m shards build --part I/N`, then `python -m shards index`): the parts in order
give exactly a single-machine build's samples; `index` waits for every part; a part that dies resumes after
its finished shards; folders of another kind are refused; the same on S3 (moto on loopback), and as a real
SLURM job array with the dependent merge, where one task is cancelled mid-part and resubmitted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from shards import build as build_module
from shards import format as fmt
from shards.__main__ import main
from shards.build import BuildSettings, Part, build
from shards.storage import Storage
from shards.testvideos import write_video

import test_slurm
from moto_s3 import moto_s3
from test_slurm import wait_for

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "launchers" / "slurm" / "build_shards.sbatch"
RECORDS, MISSING, PER_SHARD = 15, 12, 2  # 3 parts of 5 records; record 12 (part 2) has no video: skipped
BUCKET = "parts"
NAME = "longvl-test-shards"  # every SLURM job this file submits
slurm = test_slurm.slurm  # the fixture with the project's local SLURM (launchers/slurm/local-cluster.sh)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("parts-src")
    with open(d / "m.jsonl", "w") as f:
        for i in range(RECORDS):
            if i != MISSING:
                write_video(str(d / f"v{i}.mp4"), 1.0 + i % 3 * 0.5, fps=10, width=48, height=32, gop=10, seed=i)
            sentences = [{"text": f"clip {i} part {j}", "start": 0.4 * j, "end": 0.4 * j + 0.4} for j in range(2)]
            f.write(json.dumps({"id": f"v{i}", "video": str(d / f"v{i}.mp4"), "sentences": sentences}) + "\n")
    return str(d / "m.jsonl")


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> tuple[str, dict]:
    """The single-machine build of the same manifest and settings."""
    out = str(tmp_path_factory.mktemp("single") / "out")
    return out, build(manifest, out, BuildSettings(name="m", per_shard=PER_SHARD), progress=False)


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3(BUCKET) as url:
        yield url


def samples(folder: str, storage: Storage = Storage()) -> list[tuple[str, bytes, bytes]]:
    """(key, mp4 bytes, json bytes) of every sample, in the order of index.json: what the loader reads."""
    out = []
    for url in fmt.expand_shards(folder, storage=storage):
        for raw in fmt.read_tar(url, storage):
            assert "__error__" not in raw, raw
            out.append((raw["__key__"], raw["mp4"], raw["json"]))
    return out


def assert_same_as_reference(out: str, reference, storage: Storage = Storage()) -> dict:
    """out's samples equal the single-machine build's, sample for sample; its index differs only where the
    shard boundaries do."""
    got, want = samples(out, storage), samples(reference[0])
    assert len(got) == len(want) == RECORDS - 1
    assert [s[0] for s in got] == [s[0] for s in want] == [f"v{i}" for i in range(RECORDS) if i != MISSING]
    assert got == want
    index, single = fmt.read_index(out, storage), reference[1]
    boundaries = ("shards", "counts", "bytes", "total_duration")
    same = lambda i: {k: v for k, v in i.items() if k not in boundaries}  # noqa: E731
    assert same(index) == same(single)
    assert index["total_duration"] == pytest.approx(single["total_duration"])  # summed per shard: rounding differs
    assert index["skipped"] == {"missing_video": 1} and sum(index["counts"]) == RECORDS - 1
    assert index["shards"] == [f"m-p{p:04d}of0003-{s:06d}.tar" for p, n in enumerate((3, 3, 2)) for s in range(n)]
    assert index["counts"] == [2, 2, 1, 2, 2, 1, 2, 2]  # records 10-14 less the skipped 12: 2 + 2
    assert single["counts"] == [2] * 7
    return index


def build_argv(manifest: str, out: str, part: str, *extra: str) -> list[str]:
    return ["build", "--manifest", manifest, "--out", out, "--per-shard", str(PER_SHARD), "--part", part, *extra]


# ---- in one process -------------------------------------------------------------------------------


def test_parts_cover_the_records_in_order():
    for n in range(12):
        for count in range(1, 8):
            ranges = [Part(i, count).records(n) for i in range(count)]
            assert [r for start, end in ranges for r in range(start, end)] == list(range(n)), (n, count)
            assert max(end - start for start, end in ranges) - min(end - start for start, end in ranges) <= 1
    with pytest.raises(ValueError, match="0 <= I < N"):
        Part(3, 3)


def test_parts_then_index_equal_a_single_machine_build(manifest, reference, tmp_path, capsys):
    out = str(tmp_path / "out")
    for i in (2, 0, 1):  # any order, e.g. as the array tasks happen to run
        assert main(build_argv(manifest, out, f"{i}/3")) == 0
        assert f"once all 3 parts are done: python -m shards index {out}" in capsys.readouterr().out
        assert not os.path.exists(os.path.join(out, "index.json"))  # a part never writes it
    assert main(["index", out]) == 0
    assert f"{out}/index.json: 14 samples in 8 shards" in capsys.readouterr().out
    assert_same_as_reference(out, reference)
    journals = sorted(n for n in os.listdir(out) if n.endswith(".jsonl"))
    assert journals == ["build-p0000of0003.jsonl", "build-p0001of0003.jsonl", "build-p0002of0003.jsonl"]
    head = json.loads(open(os.path.join(out, journals[1])).readline())["header"]
    assert head["part"] == [1, 3] and head["records"] == [5, 10]
    assert main(build_argv(manifest, out, "1/3")) == 0  # a finished part: nothing to do
    assert main(["index", out]) == 0  # again: the same index
    assert_same_as_reference(out, reference)


def test_index_names_missing_and_unfinished_parts_and_a_killed_part_resumes(manifest, reference, tmp_path,
                                                                           monkeypatch, capsys):
    out = str(tmp_path / "out")
    assert main(build_argv(manifest, out, "0/3")) == 0
    real, calls = build_module.prepare, []

    def killed_at_the_fourth(item, **kw):  # part 1: records 5, 6 form its first shard once 7 is prepared
        calls.append(item[0])
        if len(calls) == 4:
            raise KeyboardInterrupt  # the task dies while preparing record 8 (line 9)
        return real(item, **kw)

    monkeypatch.setattr(build_module, "prepare", killed_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        main(build_argv(manifest, out, "1/3"))
    assert sorted(n for n in os.listdir(out) if "p0001" in n) == ["build-p0001of0003.jsonl", "m-p0001of0003-000000.tar"]
    first = os.stat(os.path.join(out, "m-p0001of0003-000000.tar"))
    capsys.readouterr()

    assert main(["index", out]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"python -m shards index: {out} is not complete, index.json not written: "
                           "part 1/3 unfinished (2 of 5 records done); part 2/3 missing (no build-p0002of0003.jsonl)")
    assert not os.path.exists(os.path.join(out, "index.json"))

    stale, busy = (os.path.join(out, f"m-p000{i}of0003-000001.tar.tmp-99999") for i in (1, 2))
    for path in (stale, busy):  # part 1's half-written tar, and one that part 2 may be writing right now
        open(path, "wb").close()
    calls.clear()
    monkeypatch.setattr(build_module, "prepare", lambda item, **kw: (calls.append(item[0]), real(item, **kw))[1])
    assert main(build_argv(manifest, out, "1/3")) == 0
    assert calls == [8, 9, 10]  # lines 6-7 (records 5, 6) are in the finished shard and are not prepared again
    again = os.stat(os.path.join(out, "m-p0001of0003-000000.tar"))
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert not os.path.exists(stale) and os.path.exists(busy)  # a part clears its own temporary files only
    assert main(["index", out]) == 1
    assert capsys.readouterr().err.strip().endswith("written: part 2/3 missing (no build-p0002of0003.jsonl)")
    assert main(build_argv(manifest, out, "2/3")) == 0
    assert main(["index", out]) == 0
    assert_same_as_reference(out, reference)


def test_folders_of_another_kind_are_refused(manifest, reference, tmp_path, capsys):
    parts = str(tmp_path / "parts")
    for i in range(3):
        assert main(build_argv(manifest, parts, f"{i}/3")) == 0
    with pytest.raises(SystemExit, match=r"holds a build in 3 parts \(build-p0000of0003.jsonl, ...\): finish it"):
        build(manifest, parts, BuildSettings(name="m", per_shard=PER_SHARD), progress=False)
    with pytest.raises(SystemExit, match=r"holds a build in 3 parts \(build-p0000of0003.jsonl\), not 2"):
        main(build_argv(manifest, parts, "1/2"))
    with pytest.raises(SystemExit, match="holds parts of a build of another manifest or other settings"):
        main(build_argv(manifest, parts, "1/3", "--fps", "5"))
    other = tmp_path / "m.jsonl"  # the same name, one record fewer
    other.write_text("".join(open(manifest).readlines()[:-1]))
    with pytest.raises(SystemExit, match="holds parts of a build of another manifest or other settings"):
        main(build_argv(str(other), parts, "2/3"))
    with pytest.raises(SystemExit, match=r"holds a single-machine build \(build.jsonl\); build parts into another"):
        main(build_argv(manifest, reference[0], "0/3"))
    with pytest.raises(SystemExit) as e:
        main(build_argv(manifest, parts, "3/3"))
    assert e.value.code == 2 and "bad part '3/3'" in capsys.readouterr().err  # argparse: exit 2

    assert main(["index", reference[0]]) == 2  # nothing to index: one line on stderr
    assert capsys.readouterr().err.strip().endswith("holds a single-machine build (build.jsonl), whose index.json "
                                                    "`build` writes: nothing to index")
    assert main(["index", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with open(os.path.join(parts, "build-p0000of0002.jsonl"), "w") as f:
        f.write(open(os.path.join(parts, "build-p0000of0003.jsonl")).read())
    with pytest.raises(SystemExit, match=r"mixes builds \(2 parts and 3 parts\)"):
        main(["index", parts])
    assert not os.path.exists(os.path.join(parts, "index.json"))


def test_parts_over_s3(manifest, reference, endpoint, capsys):
    out, storage = f"s3://{BUCKET}/sets/train", Storage(endpoint)
    for i in (1, 0):
        assert main(build_argv(manifest, out, f"{i}/3", "--s3-endpoint", endpoint)) == 0
    assert main(["index", out, "--s3-endpoint", endpoint]) == 1
    assert capsys.readouterr().err.strip().endswith("written: part 2/3 missing (no build-p0002of0003.jsonl)")
    assert main(build_argv(manifest, out, "2/3", "--s3-endpoint", endpoint)) == 0
    assert f"python -m shards index {out} --s3-endpoint {endpoint}" in capsys.readouterr().out
    assert main(["index", out, "--s3-endpoint", endpoint]) == 0
    assert_same_as_reference(out, reference, storage)
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix="sets/train/")
    names = sorted(o["Key"].rsplit("/", 1)[1] for o in listing["Contents"])
    assert names == sorted([f"build-p000{i}of0003.jsonl" for i in range(3)] + ["index.json"]
                           + fmt.read_index(out, storage)["shards"])  # final objects only


def test_a_journal_rewritten_after_a_listing_reads_whole(endpoint):
    """A part reads its siblings' journals (and `index` reads all) while those parts may rewrite them."""
    storage, url = Storage(endpoint, backoff_s=0.01), f"s3://{BUCKET}/race/build-p0000of0002.jsonl"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.put_object(Bucket=BUCKET, Key="race/build-p0000of0002.jsonl", Body=b'{"header": {}}\n')
    assert storage.listdir(f"s3://{BUCKET}/race") == ["build-p0000of0002.jsonl"]  # caches what it saw
    client.put_object(Bucket=BUCKET, Key="race/build-p0000of0002.jsonl", Body=b'{"header": {}}\n{"records_end": 3}\n')
    assert build_module.read_journal(url, storage) == [{"header": {}}, {"records_end": 3}]


# ---- on the real local SLURM ------------------------------------------------------------------------

# The first array's PYTHON: part 1 hangs before its record 8 (line 9), after its first shard is journaled,
# so the test cancels it mid-part on any machine, however loaded. The resubmitted task uses plain python.
HANG = """
import os, runpy, sys, time
if os.environ.get("SLURM_ARRAY_TASK_ID") == "1":
    import shards.build as b
    real = b.prepare
    def prepare(item, **kw):
        if item[0] == 9:
            time.sleep(300)  # until the test's scancel (bounded all the same)
        return real(item, **kw)
    b.prepare = prepare
assert sys.argv[1:3] == ["-m", "shards"], sys.argv
sys.argv = ["python -m shards", *sys.argv[3:]]
runpy.run_module("shards", run_name="__main__", alter_sys=True)
"""
SBATCH_ARGS = ["-J", NAME, "--cpus-per-task=1", "--time=10"]
RUNNING = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_slurm_array_with_a_cancelled_task_and_the_dependent_merge(slurm, where, manifest, reference, tmp_path,
                                                                  request):
    if where == "s3":
        url = request.getfixturevalue("endpoint")
        out, storage, s3 = f"s3://{BUCKET}/slurm/train", Storage(url), ["--s3-endpoint", url]
    else:
        out, storage, s3 = str(tmp_path / "out"), Storage(), []
    hang = tmp_path / "hang-python"
    hang.write_text(f"#!{sys.executable}\n{HANG}")
    hang.chmod(0o755)
    logs, scratch = tmp_path / "logs", tmp_path / "scratch"
    logs.mkdir()
    scratch.mkdir()

    def sbatch(*args: str, **env: str) -> str:
        cmd = ["sbatch", "--parsable", *SBATCH_ARGS, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=slurm.env() | env)
        assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        job = proc.stdout.strip().split(";")[0]
        slurm.jobs.append(job)
        return job

    def state(job: str) -> dict:
        return slurm.job_info(job)

    def journal(part: int) -> list[dict]:
        url = f"{out}/build-p{part:04d}of0003.jsonl"
        return build_module.read_journal(url, storage)[1:] if storage.exists(url) else []

    def ended(job: str) -> dict | None:
        info = state(job)
        return info if info.get("JobState") not in RUNNING else None

    def log_of(name: str) -> str:
        path = logs / name
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    build_args = ["build", "--manifest", manifest, "--out", out, "--per-shard", str(PER_SHARD), "--tmp-dir",
                  str(scratch), *s3]
    array = sbatch("--array=0-2", "-o", str(logs / "%A_%a.log"), str(SBATCH), *build_args, PYTHON=str(hang))
    merge = sbatch(f"--dependency=afterok:{array}", "-o", str(logs / "merge-%j.log"), str(SBATCH), "index", out, *s3)
    try:
        def first_shard_of_part_1():
            info = state(f"{array}_1")
            assert info.get("JobState") in RUNNING, f"task 1 ended early: {info}\n{log_of(f'{array}_1.log')}"
            return len(journal(1)) == 1

        wait_for("part 1 to journal its first shard", first_shard_of_part_1, timeout=120, every=0.2)
        subprocess.run(["scancel", f"{array}_1"], check=True, timeout=30, env=slurm.env())
        assert wait_for("task 1 to end", lambda: ended(f"{array}_1"), timeout=60)["JobState"] == "CANCELLED"
        (entry,) = journal(1)  # killed mid-part: one finished shard, not done
        assert entry["shard"] == "m-p0001of0003-000000.tar" and entry["records_end"] == 7 and "done" not in entry
        for task in (0, 2):
            info = wait_for(f"task {task} to end", lambda t=task: ended(f"{array}_{t}"), timeout=120)
            assert info["JobState"] == "COMPLETED", f"{info}\n{log_of(f'{array}_{task}.log')}"
        assert not any(scratch.iterdir())  # SIGTERM ended task 1 through its cleanup: no scratch folder left
        # afterok: a merge after a failed task never starts (SLURM leaves it pending); it is cancelled by hand
        info = wait_for("the merge to give up", lambda: "NeverSatisfied" in state(merge).get("Reason", "") and
                        state(merge), timeout=60)
        assert info["JobState"] == "PENDING" and not storage.exists(f"{out}/index.json")
        subprocess.run(["scancel", merge], check=True, timeout=30, env=slurm.env())

        # resubmit that one task (its N from LONGVL_PARTS: an array of one has SLURM_ARRAY_TASK_COUNT=1) + a merge
        again = sbatch("--array=1", "-o", str(logs / "%A_%a.log"), str(SBATCH), *build_args, LONGVL_PARTS="3")
        merge = sbatch(f"--dependency=afterok:{again}", "-o", str(logs / "merge-%j.log"), str(SBATCH), "index", out,
                       *s3)
        info = wait_for("the second merge to end", lambda: ended(merge), timeout=120)
        text = log_of(f"{again}_1.log")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log_of(f'merge-{merge}.log')}"
        assert state(f"{again}_1")["JobState"] == "COMPLETED", text
        assert "resuming after 1 finished shards (2 of 5 records done)" in text  # its finished shard was kept
        assert journal(1)[0] == entry and journal(1)[-1]["done"]
        assert "14 samples in 8 shards" in log_of(f"merge-{merge}.log")
        assert_same_as_reference(out, reference, storage)
    except BaseException:
        for path in sorted(logs.iterdir()):
            print(f"---- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        raise
