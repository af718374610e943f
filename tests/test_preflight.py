"""shards/preflight.py: the checks every command runs before it starts (the s3:// case is in test_shards_s3.py)."""

import json
import os

import pytest

from shards.format import write_tar
from shards.preflight import MissingInput, require_file, require_folder, require_shards
from shards.storage import Storage


def split(folder, names=("s-000000.tar", "s-000001.tar"), write=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").write_text(json.dumps({"shards": list(names)}))
    for name in names if write is None else write:
        write_tar(str(folder / name), {})
    return folder


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_require_file(tmp_path):
    f = tmp_path / "a.yaml"
    with pytest.raises(MissingInput, match=f"^config {f} does not exist$"):
        require_file(str(f), "config")
    f.write_text("x: 1\n")
    require_file(str(f), "config")
    with pytest.raises(MissingInput, match="is a folder") as e:
        require_file(str(tmp_path), "--init checkpoint")
    assert one_line(e).startswith("--init checkpoint ")
    with pytest.raises(MissingInput, match="not given"):
        require_file("", "manifest")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_require_file_unreadable(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("{}\n")
    f.chmod(0)
    with pytest.raises(MissingInput, match=f"^manifest {f} is not readable$"):
        require_file(str(f), "manifest")


def test_require_folder(tmp_path):
    with pytest.raises(MissingInput, match="video folder .* does not exist"):
        require_folder(str(tmp_path / "v"), "video folder")
    (tmp_path / "f").write_text("")
    with pytest.raises(MissingInput, match="is not a folder"):
        require_folder(str(tmp_path / "f"), "video folder")
    require_folder(str(tmp_path), "video folder")


def test_require_shards_local_specs(tmp_path):
    a = split(tmp_path / "a")
    want = [str(a / "s-000000.tar"), str(a / "s-000001.tar")]
    assert require_shards(str(a), None) == want
    assert require_shards("a", str(tmp_path)) == want  # relative to the root
    assert require_shards(str(a / "s-{000000..000001}.tar"), None) == want
    assert require_shards([str(a), str(a / "s-000000.tar")], None, Storage()) == want + want[:1]
    assert require_shards("a/s-000001.tar", str(tmp_path)) == want[1:]


def test_require_shards_names_what_is_wrong(tmp_path):
    with pytest.raises(MissingInput, match=f"^val shards {tmp_path / 'x'} does not exist$"):
        require_shards("x", str(tmp_path), what="val shards")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInput, match="has no index.json"):
        require_shards(str(tmp_path / "empty"), None)
    b = split(tmp_path / "b", write=["s-000000.tar"])
    with pytest.raises(MissingInput) as e:
        require_shards(str(b), None, what="train shards")
    assert one_line(e) == f"train shards {b}: shard {b / 's-000001.tar'} does not exist"
    with pytest.raises(MissingInput, match=r"s-000001.tar does not exist \(3 of 4 shards missing\)"):
        require_shards(str(b / "s-{000000..000003}.tar"), None)
    split(tmp_path / "c", names=())
    with pytest.raises(MissingInput, match="holds no shards"):
        require_shards(str(tmp_path / "c"), None)
    (tmp_path / "c" / "index.json").write_text('{"shards": 3}')
    with pytest.raises(MissingInput, match="index.json is malformed"):
        require_shards(str(tmp_path / "c"), None)
    with pytest.raises(MissingInput, match="is empty"):
        require_shards("", None)
    (tmp_path / "d" / "s-000000.tar").mkdir(parents=True)
    with pytest.raises(MissingInput, match="s-000000.tar does not exist"):  # a folder is no shard
        require_shards(str(tmp_path / "d" / "s-000000.tar"), None)


def test_missing_input_is_always_one_line():
    assert str(MissingInput("manifest m.jsonl\nline 2")) == "manifest m.jsonl line 2"


def test_unreadable_inputs_are_named_even_as_root(tmp_path, monkeypatch):
    """root reads every file whatever its mode, so the unreadable case is simulated through os.access."""
    import shards.preflight as preflight

    f = tmp_path / "m.jsonl"
    f.write_text("{}\n")
    a = split(tmp_path / "a")
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    with pytest.raises(MissingInput, match=f"^manifest {f} is not readable$"):
        require_file(str(f), "manifest")
    with pytest.raises(MissingInput, match="index.json is not readable"):
        require_shards(str(a), None)
    with pytest.raises(MissingInput, match="s-000000.tar is not readable"):
        require_shards(str(a / "s-000000.tar"), None)
