"""`python -m pretrain.embed`, in one process and on 2 ranks under the deepspeed launcher: every sample of the
shards exactly once, rows in the same order in every file, the embeddings of `encode_video` / `encode_text`,
and the retrieval that the project's own evaluation (pretrain/evaluate.py) reports."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.embed import KINDS, main as embed_main
from test_export import export_tiny
from test_pretrain_e2e import REPO, TINY, free_port, run_group


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """-> (OUT.pt, the exported folder, the model, its config)."""
    return export_tiny(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """10 held-out synthetic videos in 5 shards (2 ranks get 3 and 2 shards)."""
    out = tmp_path_factory.mktemp("synth")
    subprocess.run([sys.executable, "-m", "shards", "synth", "--out", str(out), "--videos", "2", "--val-videos", "10",
                    "--seed", "3", "--per-shard", "2", "--size", "32", "--event-seconds", "1.0"], check=True, cwd=REPO,
                   capture_output=True, timeout=120)
    return out / "val"


def shard_keys(folder: Path) -> list[str]:
    """Sample keys read from the tars' member names, without the project's loader."""
    keys = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += [Path(name).name.split(".", 1)[0] for name in t.getnames() if name.endswith(".json")]
    return keys


def read_out(out: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    keys = out.joinpath("keys.txt").read_text().splitlines()
    return keys, {k: np.load(out / f"{k}.npy", allow_pickle=False) for k in KINDS if (out / f"{k}.npy").exists()}


def model_and_config(pt: Path, shards: Path):
    from pretrain.model import VideoTextModel

    cfg = load_config(pt.with_suffix(".yaml"), [f"data.val_shards={shards}"])
    model = VideoTextModel(cfg.model).eval()
    model.load_state_dict(torch.load(pt, weights_only=True), strict=True)
    return model, cfg


@pytest.fixture(scope="module")
def single(exported, shards, tmp_path_factory) -> Path:
    """Embeddings of OUT.pt (architecture from OUT.yaml) in this process."""
    out = tmp_path_factory.mktemp("embed") / "one"
    assert embed_main(["--init", str(exported[0]), "--shards", str(shards), "--out", str(out), "--batch-size", "3"]) == 0
    return out


def test_one_process_embeds_every_sample_once_as_encode_video_and_encode_text(single, exported, shards):
    from shards.loader import build_eval_loader

    keys, arrays = read_out(single)
    expected = shard_keys(shards)
    assert len(expected) == 10 and keys == sorted(expected)  # each exactly once, rows sorted by key
    assert {k: a.shape for k, a in arrays.items()} == {"video": (10, 32), "clips": (10, 4, 32), "paragraph": (10, 32),
                                                       "sentences": (10, 4, 32)}
    info = json.loads((single / "info.json").read_text())
    assert info["num_samples"] == 10 and info["world_size"] == 1 and info["data"]["size"] == 32  # from OUT.yaml
    model, cfg = model_and_config(exported[0], shards)
    row = {k: i for i, k in enumerate(keys)}
    seen = []
    with torch.no_grad():  # the same samples through the model directly, row by row
        for batch in build_eval_loader(cfg.data, cfg.model.text.resolved_path(), 0, 1, root=str(REPO)):
            clips, video = model.encode_video(batch["video"], batch["input_ids"].shape[1], batch.get("depth"))
            sentences, paragraph = model.encode_text(batch["input_ids"], batch["attention_mask"])
            direct = {"video": video, "clips": clips, "paragraph": paragraph, "sentences": sentences}
            for i, key in enumerate(batch["key"]):
                seen.append(key)
                for kind, x in direct.items():
                    np.testing.assert_allclose(arrays[kind][row[key]], x[i].numpy(), rtol=0, atol=1e-5,
                                               err_msg=f"{kind} of {key}")
    assert sorted(seen) == keys


def test_retrieval_scored_from_the_files_equals_the_projects_evaluation(single, exported, shards):
    from pretrain.evaluate import evaluate_retrieval

    _, arrays = read_out(single)
    similarity = arrays["paragraph"] @ arrays["video"].T  # (N paragraphs, N videos), NumPy only
    truth = np.arange(len(similarity))
    r1 = {"paragraph_to_video": 100.0 * np.mean(similarity.argmax(1) == truth),
          "video_to_paragraph": 100.0 * np.mean(similarity.argmax(0) == truth)}
    model, cfg = model_and_config(exported[0], shards)
    result = evaluate_retrieval(model, cfg)
    assert result["num_videos"] == 10
    for direction, value in r1.items():
        assert result[direction]["R1"] == pytest.approx(value, abs=1e-9), direction


def test_two_ranks_write_the_same_files_from_the_exported_folder(single, exported, shards, tmp_path):
    out = tmp_path / "two"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain.embed",
           "--init", str(exported[1]), "--shards", str(shards), "--out", str(out), "--batch-size", "2"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = run_group(cmd, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    keys, arrays = read_out(out)
    keys1, arrays1 = read_out(single)
    assert keys == keys1 == sorted(shard_keys(shards))  # 6 + 4 samples: none twice, none missing
    for kind in KINDS:
        np.testing.assert_allclose(arrays[kind], arrays1[kind], rtol=0, atol=1e-5, err_msg=kind)
    assert json.loads((out / "info.json").read_text())["world_size"] == 2
    assert not out.with_name("two.tmp").exists()


def test_an_encoder_without_clip_features_writes_no_clips_file(shards, tmp_path):
    from pretrain.config import save_config
    from pretrain.model import VideoTextModel

    cfg = load_config(REPO / "pretrain" / "configs" / "demo.yaml",
                      [*TINY, "model.video.preset=testa_small", "model.loss.mtc_weight=0"])
    torch.manual_seed(0)
    model = VideoTextModel(cfg.model)
    assert model.video_local is None  # TESTA merges frames before any clip feature
    torch.save(model.state_dict(), tmp_path / "testa.pt")
    save_config(cfg, tmp_path / "testa.yaml")
    out = tmp_path / "emb"
    assert embed_main(["--init", str(tmp_path / "testa.pt"), "--shards", str(shards), "--out", str(out)]) == 0
    keys, arrays = read_out(out)
    assert len(keys) == 10 and sorted(arrays) == ["paragraph", "sentences", "video"]


def test_missing_inputs_are_one_line_and_exit_2(exported, shards, tmp_path, capsys):
    pt = str(exported[0])

    def fails(*args) -> str:
        assert embed_main(["--out", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert fails("--init", str(tmp_path / "nope.pt"), "--shards", str(shards)).startswith("input error: --init")
    assert fails("--init", pt, "--shards", str(tmp_path / "nowhere")).startswith("data error: --shards")
    bare = tmp_path / "bare.pt"
    bare.write_bytes(exported[0].read_bytes())  # weights without OUT.yaml: no architecture
    assert "no config beside it" in fails("--init", str(bare), "--shards", str(shards))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.npy").write_bytes(b"")
    assert "exists and is not an empty folder" in fails("--init", pt, "--shards", str(shards))
    assert "did you mean data.batch_size" in fails("--init", pt, "--shards", str(shards), "data.batch_sise=2")
    assert fails("--init", pt, "--shards", str(shards), "model.embed_dim=16").startswith(
        "config error: override 'model.embed_dim=16': model.* comes from --init's config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pt", "out"]
