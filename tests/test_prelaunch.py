"""Pre-launch checks of pretrain/run.py and finetune/run.py (issue 12): a bad config key or value, a missing
config or base file, DeepSpeed JSON, shard set, label file or --init gives exit code 2 and one line on stderr
naming it, before any process group starts; s3:// shard sets are checked through data.s3_endpoint.

Everything here stops in the checks (no rank starts, nothing trains); the shard sets are index.json plus
empty tars, which is all a pre-launch check reads."""
import json
import tarfile
from pathlib import Path

import pytest

import finetune.run as finetune_run
import pretrain.run as pretrain_run
from moto_s3 import moto_s3

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = str(REPO / "pretrain" / "configs" / "demo.yaml")
FINETUNE = str(REPO / "finetune" / "configs" / "anet_retrieval_debug.yaml")
COMMANDS = {"pretrain": (pretrain_run, PRETRAIN), "finetune": (finetune_run, FINETUNE)}


def make_split(folder: Path, shards: int = 1) -> Path:
    folder.mkdir(parents=True)
    names = [f"s-{i:06d}.tar" for i in range(shards)]
    for name in names:
        tarfile.open(folder / name, "w").close()
    (folder / "index.json").write_text(json.dumps({"shards": names, "counts": [1] * shards, "num_samples": shards}))
    return folder


@pytest.fixture
def splits(tmp_path):
    return make_split(tmp_path / "data" / "train"), make_split(tmp_path / "data" / "val")


def argv(command: str, tmp_path: Path, splits, *extra: str) -> list[str]:
    train, val = splits
    return ["--config", COMMANDS[command][1], "--run-dir", str(tmp_path / "run"), f"data.train_shards={train}",
            f"data.val_shards={val}", *extra]


def fails(command: str, args: list[str], capsys) -> str:
    """main(args) exits 2 with exactly one line on stderr (no traceback); returns that line."""
    capsys.readouterr()
    assert COMMANDS[command][0].main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def passes(command: str, args: list[str]):
    module = COMMANDS[command][0]
    return module.preflight(module.parse_args(args))


@pytest.mark.parametrize("command", COMMANDS)
def test_good_inputs_pass_the_checks(command, tmp_path, splits):
    cfg, run_dir = passes(command, argv(command, tmp_path, splits))
    assert run_dir == tmp_path / "run" and cfg.data.train_shards == str(splits[0])


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_config_key_or_value_is_one_line_naming_the_key(command, tmp_path, splits, capsys):
    err = fails(command, argv(command, tmp_path, splits, "train.stpes=3"), capsys)
    assert err.startswith("config error: unknown config key train.stpes") and "did you mean train.steps" in err
    err = fails(command, argv(command, tmp_path, splits, "model.video.temporal_windows=[3,4,8,16]"), capsys)
    assert "bad value for model.video.temporal_windows[0] / spatial_window: expected" in err
    err = fails(command, argv(command, tmp_path, splits, "data.num_clips=0"), capsys)
    assert "bad value for data.num_clips: expected" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_config_or_base_file_is_named(command, tmp_path, splits, capsys):
    args = argv(command, tmp_path, splits)
    args[1] = str(tmp_path / "nope.yaml")
    assert fails(command, args, capsys) == f"config error: config file {tmp_path / 'nope.yaml'} does not exist"
    (tmp_path / "child.yaml").write_text("base: parent.yaml\n")
    args[1] = str(tmp_path / "child.yaml")
    err = fails(command, args, capsys)
    assert err.startswith(f"config error: base file {tmp_path / 'parent.yaml'}") and "does not exist" in err
    (tmp_path / "broken.yaml").write_text("train: [steps: 3\n")
    args[1] = str(tmp_path / "broken.yaml")
    assert "is not valid YAML" in fails(command, args, capsys)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("key", ["data.train_shards", "data.val_shards"])
def test_a_missing_shard_set_is_named(command, key, tmp_path, splits, capsys):
    err = fails(command, argv(command, tmp_path, splits, f"{key}={tmp_path / 'nowhere'}"), capsys)
    assert err == f"data error: {key} {tmp_path / 'nowhere'} does not exist"
    (splits[0] / "s-000000.tar").unlink()  # listed in index.json, not on disk
    err = fails(command, argv(command, tmp_path, splits), capsys)
    assert "data.train_shards" in err and "s-000000.tar" in err


def test_the_val_set_is_not_required_when_pretraining_does_not_evaluate(tmp_path, splits):
    passes("pretrain", argv("pretrain", tmp_path, splits, f"data.val_shards={tmp_path / 'nowhere'}",
                            "train.eval_at_end=false"))


def test_zeroshot_needs_no_train_set_and_rejects_one(tmp_path, splits, capsys):
    """The zeroshot task evaluates a checkpoint: data.train_shards (and train.*) are not read, so setting them
    is an error; without them it passes."""
    args = ["--config", str(REPO / "finetune" / "configs" / "zeroshot.yaml"), "--run-dir", str(tmp_path / "run"),
            f"data.val_shards={splits[1]}"]
    passes("finetune", args)
    err = fails("finetune", args + [f"data.train_shards={tmp_path / 'x'}"], capsys)
    assert err.startswith("config error: unused config key data.train_shards: finetuning does not use it")
    assert "unused config key train.lr" in fails("finetune", args + ["train.lr=0.1"], capsys)


def test_task_keys_of_other_tasks_are_rejected(tmp_path, splits, capsys):
    err = fails("finetune", argv("finetune", tmp_path, splits, "task.decoder_dim=32"), capsys)
    assert "unused config key task.decoder_dim" in err and "task retrieval does not read it; caption do" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_init_weights_are_named(command, tmp_path, splits, capsys):
    missing = tmp_path / "nope.pt"
    if command == "finetune":
        err = fails(command, argv(command, tmp_path, splits, "--init", str(missing)), capsys)
        assert err.startswith("input error: --init:") and str(missing) in err
    err = fails(command, argv(command, tmp_path, splits, f"model.init_from={missing}"), capsys)
    assert err.startswith("input error: model.init_from:") and str(missing) in err
    (tmp_path / "empty").mkdir()
    err = fails(command, argv(command, tmp_path, splits, f"model.init_from={tmp_path / 'empty'}"), capsys)
    assert "folder without a checkpoint" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_or_malformed_deepspeed_json_is_named(command, tmp_path, splits, capsys):
    err = fails(command, argv(command, tmp_path, splits, "--ds-config", str(tmp_path / "ds.json")), capsys)
    assert err == f"config error: DeepSpeed config (--ds-config) {tmp_path / 'ds.json'} does not exist"
    (tmp_path / "ds.json").write_text("{not json")
    assert str(tmp_path / "ds.json") in fails(command, argv(command, tmp_path, splits, "--ds-config",
                                                             str(tmp_path / "ds.json")), capsys)
    if command == "pretrain":  # pretraining always runs under DeepSpeed: train.ds_config is read
        err = fails(command, argv(command, tmp_path, splits, f"train.ds_config={tmp_path / 'none.json'}"), capsys)
        assert f"DeepSpeed config (train.ds_config) {tmp_path / 'none.json'} does not exist" in err


def test_finetune_label_files_are_checked(tmp_path, splits, capsys):
    for key in ("task.train_labels", "task.val_labels"):
        err = fails("finetune", argv("finetune", tmp_path, splits, f"{key}={tmp_path / 'labels.jsonl'}"), capsys)
        assert err == f"data error: label file ({key}) {tmp_path / 'labels.jsonl'} does not exist"


def test_finetuning_rejects_loss_keys_it_does_not_use(tmp_path, splits, capsys):
    err = fails("finetune", argv("finetune", tmp_path, splits, "model.loss.mtc_weight=0.5"), capsys)
    assert "model.loss.mtc_weight" in err and "finetuning does not use it" in err
    passes("finetune", argv("finetune", tmp_path, splits, "model.loss.temperature=0.07"))


def checkpoint_at(run: Path, world_size: int, trainstate: bool = True) -> Path:
    """A checkpoint folder as the training core leaves it, reduced to what the pre-launch check reads."""
    tag = run / "checkpoints" / "global_step1"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("global_step1")
    (tag / "trainstate.json").write_text(json.dumps({"step": 1, "world_size": world_size}))
    if trainstate:
        (tag / "trainstate.pt").write_bytes(b"")
    return tag


@pytest.mark.parametrize("command", COMMANDS)
def test_a_run_folder_with_another_runs_checkpoints_needs_resume(command, tmp_path, splits, capsys):
    checkpoint_at(tmp_path / "run", world_size=1)
    assert "--resume" in fails(command, argv(command, tmp_path, splits), capsys)
    passes(command, argv(command, tmp_path, splits, "--resume"))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_without_a_train_state_is_refused_before_launch(command, tmp_path, splits, capsys):
    """An older version's checkpoint (no trainstate.pt) cannot be resumed: one line says how to use its weights."""
    tag = checkpoint_at(tmp_path / "run", world_size=1, trainstate=False)
    err = fails(command, argv(command, tmp_path, splits, "--resume"), capsys)
    assert err.startswith(f"input error: {tag} holds no trainstate.pt") and "model.init_from=" in err


def test_finetuning_resumes_only_at_the_world_size_that_saved(tmp_path, splits, capsys, monkeypatch):
    """accelerate cannot reshard, so another world size is refused before launch; pretraining converts instead."""
    checkpoint_at(tmp_path / "run", world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    err = fails("finetune", argv("finetune", tmp_path, splits, "--resume"), capsys)
    assert "written by 2 ranks and this run has 1" in err
    passes("pretrain", argv("pretrain", tmp_path, splits, "--resume"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    passes("finetune", argv("finetune", tmp_path, splits, "--resume"))


# ---- s3:// through data.s3_endpoint ------------------------------------------------------------------

BUCKET = "prelaunch"


@pytest.fixture(scope="module")
def endpoint():
    """A split (index.json + one shard) at s3://BUCKET/train and /val, and one with a shard missing at /holey."""
    import boto3

    with moto_s3(BUCKET) as url:
        client = boto3.client("s3", endpoint_url=url)
        for split, names in (("train", ["s-000000.tar"]), ("val", ["s-000000.tar"]), ("holey", ["s-000000.tar", "s-000001.tar"])):
            client.put_object(Bucket=BUCKET, Key=f"{split}/index.json",
                              Body=json.dumps({"shards": names, "counts": [1] * len(names), "num_samples": len(names)}))
            client.put_object(Bucket=BUCKET, Key=f"{split}/s-000000.tar", Body=b"\0" * 1024)
        yield url


@pytest.mark.parametrize("command", COMMANDS)
def test_s3_shard_sets_are_checked_through_the_configured_endpoint(command, endpoint, tmp_path, capsys):
    s3 = (f"s3://{BUCKET}/train", f"s3://{BUCKET}/val")
    cfg, _ = passes(command, argv(command, tmp_path, s3, f"data.s3_endpoint={endpoint}"))
    assert cfg.data.s3_endpoint == endpoint
    err = fails(command, argv(command, tmp_path, (f"s3://{BUCKET}/nope", s3[1]), f"data.s3_endpoint={endpoint}"), capsys)
    assert f"data.train_shards s3://{BUCKET}/nope does not exist" in err
    err = fails(command, argv(command, tmp_path, (s3[0], f"s3://{BUCKET}/holey"), f"data.s3_endpoint={endpoint}"), capsys)
    assert "data.val_shards" in err and "s-000001.tar" in err


def test_export_of_a_run_without_a_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    from pretrain.export import main as export_main

    assert export_main([str(tmp_path), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("input error:") and str(tmp_path / "checkpoints") in err
    assert not (tmp_path / "out.pt").exists()


def test_relative_paths_are_taken_from_the_working_directory_when_they_exist_there(tmp_path, monkeypatch):
    """A config and a DeepSpeed JSON given relative to where the user stands, outside the repository."""
    from pretrain.config import REPO_ROOT, resolve_path

    (tmp_path / "mine.json").write_text((REPO / "ds_configs" / "zero2.json").read_text())
    monkeypatch.chdir(tmp_path)
    assert resolve_path("mine.json") == str(tmp_path / "mine.json")
    assert resolve_path("ds_configs/zero1.json") == str(REPO_ROOT / "ds_configs" / "zero1.json")  # not here: the repo's
    train, val = make_split(tmp_path / "d" / "train"), make_split(tmp_path / "d" / "val")
    passes("pretrain", argv("pretrain", tmp_path, (train, val), "--ds-config", "mine.json"))


def test_each_process_takes_its_share_of_the_cores_unless_omp_num_threads_says(monkeypatch):
    """Two runs side by side with OMP_NUM_THREADS=1 must stay at 1 thread each (tests/test_finetune_learns.py runs
    two): the share of the node's cores only applies when OMP_NUM_THREADS is not set."""
    import os

    import torch

    import pretrain.ops
    from pretrain.prelaunch import prepare_process

    monkeypatch.setattr(pretrain.ops, "clean_node", lambda: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        prepare_process()
        assert torch.get_num_threads() == 4  # 8 cores, 2 processes on the node
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        prepare_process()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
