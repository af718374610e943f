"""`python -m pretrain.export` writes a shareable folder, and `VideoTextModel.from_pretrained` loads it: weights
in safetensors (no pickle), the original model's outputs, strict keys and shapes, a folder that works from
another path.

The "run" here is a tiny model saved with its config; DeepSpeed's zero_to_fp32 is replaced by a function
that returns its state dict as views of one flat buffer, as zero_to_fp32 does."""
import contextlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config, save_config
from pretrain.export import main as export_main
from pretrain.model import PretrainedError, VideoTextModel, pretrained_config
from test_pretrain_e2e import REPO, TINY


def flat_views(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as views of one flat fp32 buffer (what zero_to_fp32 returns)."""
    flat = torch.cat([v.detach().flatten().float() for v in state.values()])
    out, offset = {}, 0
    for k, v in state.items():
        out[k] = flat[offset:offset + v.numel()].view(v.shape)
        offset += v.numel()
    return out


@contextlib.contextmanager
def fake_zero_to_fp32(state: dict[str, torch.Tensor]):
    import deepspeed.utils.zero_to_fp32 as z

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(z, "get_fp32_state_dict_from_zero_checkpoint", lambda folder, **kw: flat_views(state))
        yield


def make_run(root: Path):
    """A run folder (config.yaml, checkpoints/latest) of a tiny model -> (run_dir, model, cfg)."""
    cfg = load_config(REPO / "pretrain" / "configs" / "demo.yaml", TINY)
    torch.manual_seed(0)
    model = VideoTextModel(cfg.model).eval()
    run = root / "run"
    (run / "checkpoints" / "global_step2").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("global_step2")
    save_config(cfg, run / "config.yaml")
    return run, model, cfg


def export_tiny(root: Path):
    """A tiny run exported with `python -m pretrain.export RUN OUT/model.pt` -> (OUT/model.pt, the folder
    OUT/model, the original model, its config)."""
    run, model, cfg = make_run(root)
    with fake_zero_to_fp32(model.state_dict()):
        assert export_main([str(run), str(root / "out" / "model.pt")]) == 0
    return root / "out" / "model.pt", root / "out" / "model", model, cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("export"))


def model_section(pt: Path) -> dict:
    import yaml

    return yaml.safe_load(pt.with_suffix(".yaml").read_text())["model"]


def fixed_batch(cfg, B: int = 2) -> dict:
    from transformers import AutoTokenizer

    g = torch.Generator().manual_seed(1)
    d = cfg.data
    video = torch.randint(0, 256, (B, d.num_clips * d.frames_per_clip, 3, d.size, d.size), generator=g,
                          dtype=torch.uint8)  # (B, T, 3, S, S)
    words = ["a red circle moves left", "in front of a blue square", "a green", "triangle moves up behind it"]
    tok = AutoTokenizer.from_pretrained(cfg.model.text.resolved_path())
    texts = [words[i:] + words[:i] for i in range(B)]
    tokens = [tok(t, padding="max_length", truncation=True, max_length=d.max_words, return_tensors="pt") for t in texts]
    return {"video": video, "input_ids": torch.stack([t["input_ids"] for t in tokens]),  # (B, M, L)
            "attention_mask": torch.stack([t["attention_mask"] for t in tokens])}


def outputs(model: VideoTextModel, batch: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        M = batch["input_ids"].shape[1]
        clips, video = model.encode_video(batch["video"], M)
        sentences, paragraph = model.encode_text(batch["input_ids"], batch["attention_mask"])
        losses = model(batch, generator=torch.Generator().manual_seed(0))
    return [clips, video, sentences, paragraph, losses["loss"]]


def test_export_writes_the_state_dict_and_a_folder_with_safetensors_without_pickle(exported):
    from safetensors import safe_open

    pt, folder, model, cfg = exported
    own = model.state_dict()
    saved = torch.load(pt, weights_only=True)  # as before: OUT.pt and OUT.yaml
    assert sorted(saved) == sorted(own) and all(torch.equal(saved[k], v) for k, v in own.items())
    assert pt.with_suffix(".yaml").read_text() == (pt.parent.parent / "run" / "config.yaml").read_text()

    weights = folder / "model.safetensors"
    raw = weights.read_bytes()  # safetensors: 8-byte header length, a JSON header, then raw tensor bytes only
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__") == len(raw) - 8 - n
    with safe_open(str(weights), framework="pt") as f:
        assert sorted(f.keys()) == sorted(own)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in own.items())

    config = json.loads((folder / "config.json").read_text())
    expected = model_section(pt)  # the run config's model section, as written
    assert config == {**expected, "text": {**expected["text"], "path": "text"}}
    inputs = json.loads((folder / "inputs.json").read_text())
    assert inputs == {"num_clips": 4, "frames_per_clip": 2, "size": 32, "max_words": 12, "clip_sampling": "sentences",
                      "clip_seconds": 2.0}
    text = sorted(p.name for p in (folder / "text").iterdir())
    assert "config.json" in text and "tokenizer_config.json" in text
    assert not [p for p in text if p.endswith((".safetensors", ".bin", ".pt", ".h5"))]  # no weights twice
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model", "model.pt", "model.yaml"]  # no leftovers


def test_tied_tensors_are_written_as_copies(tmp_path):
    """safetensors refuses two names for one tensor (zero_to_fp32 returns tied weights that way)."""
    from safetensors import safe_open

    from pretrain.export import write_folder
    from pretrain.text_encoder import default_text_model

    tied = torch.arange(6.0).view(2, 3)
    write_folder({"a.weight": tied, "b.weight": tied, "c": tied[0]}, {"model": {"text": {"path": ""}}},
                 Path(default_text_model()), tmp_path / "folder")
    with safe_open(str(tmp_path / "folder" / "model.safetensors"), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in (("a.weight", tied), ("b.weight", tied), ("c", tied[0])))


def test_from_pretrained_gives_the_original_outputs_without_the_text_models_weights(exported, monkeypatch):
    import transformers

    _, folder, model, cfg = exported

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained read the original text model's weights")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    loaded = VideoTextModel.from_pretrained(folder)
    assert not loaded.training
    batch = fixed_batch(cfg)
    for a, b in zip(outputs(model, batch), outputs(loaded, batch), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_the_folder_works_after_being_moved(exported, tmp_path):
    _, folder, model, _ = exported
    moved = tmp_path / "elsewhere" / "shared-model"
    shutil.copytree(folder, moved)
    hidden = folder.with_name("hidden")
    os.rename(folder, hidden)  # nothing may still point at the original folder
    try:
        loaded = VideoTextModel.from_pretrained(moved)
    finally:
        os.rename(hidden, folder)
    assert loaded.cfg.text.path == str(moved.resolve() / "text")
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())


def edited_copy(folder: Path, dest: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    state = load_file(dest / "model.safetensors")
    edit(state)
    save_file(state, dest / "model.safetensors")
    return dest


def test_a_renamed_key_or_a_wrong_shape_is_a_one_line_error_naming_it(exported, tmp_path):
    _, folder, _, _ = exported

    def rename(state):
        state["text_global.weights"] = state.pop("text_global.weight")

    with pytest.raises(PretrainedError) as e:
        VideoTextModel.from_pretrained(edited_copy(folder, tmp_path / "renamed", rename))
    message = str(e.value)
    assert "missing: text_global.weight" in message and "unexpected: text_global.weights" in message
    assert "\n" not in message

    def reshape(state):
        state["video_global.bias"] = torch.zeros(3)

    with pytest.raises(PretrainedError, match=r"with another shape: video_global.bias \(3,\) vs the model's \(32,\)"):
        VideoTextModel.from_pretrained(edited_copy(folder, tmp_path / "reshaped", reshape))


def test_the_config_is_rebuilt_from_every_field_run_only_keys_dropped_others_refused(exported, tmp_path):
    import dataclasses

    _, folder, _, cfg = exported
    section = json.loads((folder / "config.json").read_text())
    got = dataclasses.asdict(pretrained_config(folder))
    assert got == {**section, "text": {**section["text"], "path": str(folder.resolve() / "text")},
                   "init_from": "", "freeze": []}  # every field of every nested dataclass round-trips

    def with_config(name: str, data: dict) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(data))
        return tmp_path / name

    run_keys = {**section, "init_from": "/somewhere/stage1.pt", "init_partial": True, "freeze": ["video."]}
    rebuilt = pretrained_config(with_config("run_keys", run_keys))
    assert rebuilt.init_from == "" and rebuilt.freeze == [] and rebuilt.video == cfg.model.video
    bad = {**section, "video": {**section["video"], "bogus": 1}}
    with pytest.raises(PretrainedError, match=r"unknown key .*model\.video\.bogus; allowed keys here: preset"):
        pretrained_config(with_config("bad", bad))
    with pytest.raises(PretrainedError, match="is not an exported model"):
        pretrained_config(tmp_path / "nowhere")


def test_export_without_a_checkpoint_is_one_line_and_exit_2_and_writes_nothing(exported, tmp_path, capsys):
    _, folder, model, _ = exported
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(REPO / "pretrain" / "configs" / "demo.yaml", TINY), run / "config.yaml")
    assert export_main([str(run), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("input error: weights") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    (run / "checkpoints" / "global_step2").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("global_step2")
    other = tmp_path / "important"  # an existing folder that is not an export is never replaced
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with fake_zero_to_fp32(model.state_dict()):
        assert export_main([str(run), str(tmp_path / "out.pt"), "--folder", str(other)]) == 2
        assert "not an exported model folder" in capsys.readouterr().err
        assert (other / "notes.txt").read_text() == "keep me"
        again = tmp_path / "again"
        shutil.copytree(folder, again)  # an exported folder is replaced, through a temporary sibling
        assert export_main([str(run), str(tmp_path / "out.pt"), "--folder", str(again)]) == 0
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "important", "out.pt", "out.yaml", "run"]
