"""Consolidate a run's latest sharded DeepSpeed checkpoint into one fp32 state dict, and a folder to share.

    python -m pretrain.export RUN_DIR OUT.pt [--folder DIR]

Uses DeepSpeed's zero_to_fp32 (any ZeRO stage, any world size). Writes
    OUT.pt     a plain `{name: tensor}` state dict that `VideoTextModel.load_state_dict` and `finetune/` load
    OUT.yaml   the run's resolved config, to rebuild the model
    OUT/       (or --folder DIR) a self-contained folder that `VideoTextModel.from_pretrained(DIR)` loads
               without pickle, on any machine:
        model.safetensors          every trained tensor (safetensors: no pickle)
        config.json                the run config's `model` section, with text.path = "text"
        inputs.json                the inputs the model was trained on (the run's data.num_clips,
                                   frames_per_clip, size, max_words, clip_sampling, clip_seconds)
        text/                      the text encoder's config.json and tokenizer files (no weights:
                                   model.safetensors holds them)
The folder is written beside its final place and renamed into it; an existing exported folder there is
replaced, any other existing path is refused. A run folder without a checkpoint or config is one line
on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from pretrain.model import CONFIG_FILE, WEIGHTS_FILE
from pretrain.text_encoder import default_text_model
from pretrain.weights import WeightsError, check_source, read_state_dict

TEXT_DIR = "text"
INPUTS_FILE = "inputs.json"  # not transformers' preprocessor_config.json: other keys, another meaning
INPUT_KEYS = ("num_clips", "frames_per_clip", "size", "max_words", "clip_sampling", "clip_seconds")
# a Hugging Face tokenizer's files, whichever of them the text encoder folder has
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def default_folder(out: Path) -> Path:
    folder = out.with_suffix("")
    if folder == out:
        raise WeightsError(f"{out} has no suffix to drop for the default folder: give --folder DIR")
    return folder


def is_exported(folder: str | Path) -> bool:
    """A folder written by `export` (it may be replaced by the next export)."""
    return (Path(folder) / WEIGHTS_FILE).is_file() and (Path(folder) / CONFIG_FILE).is_file()


def export(run_dir: str | Path, out: str | Path, folder: str | Path | None = None) -> Path:
    """Write OUT.pt, OUT.yaml and the folder (default: OUT without its suffix); returns OUT.
    Raises WeightsError (one line) when RUN_DIR holds no complete checkpoint or config, or `folder`
    is an existing path that is not an exported folder."""
    run_dir, out = Path(run_dir), Path(out)
    folder = Path(folder) if folder is not None else default_folder(out)
    check_source(run_dir / "checkpoints")  # no checkpoint: say that first
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise WeightsError(f"run folder {run_dir} has no config.yaml (the run's resolved config)")
    config = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(config.get("model"), dict):
        raise WeightsError(f"{config_path} has no `model` section")
    text_source = Path(config["model"].get("text", {}).get("path") or default_text_model())
    if not (text_source / "config.json").is_file():
        raise WeightsError(f"the text encoder folder {text_source} (model.text.path) has no config.json")
    if folder.exists() and not is_exported(folder):
        raise WeightsError(f"--folder {folder} exists and is not an exported model folder: choose another")
    state = read_state_dict(run_dir / "checkpoints")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
    tmp.replace(out)
    shutil.copyfile(config_path, out.with_suffix(".yaml"))
    write_folder(state, config, text_source, folder)
    return out


def write_folder(state: dict[str, torch.Tensor], config: dict, text_source: Path, folder: Path) -> None:
    """The shareable folder (see the module's docstring), written to a temporary sibling and renamed."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # clones: safetensors refuses tensors that share memory (tied weights: zero_to_fp32 gives both names one tensor)
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, tmp / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        model = dict(config["model"])
        model["text"] = {**model.get("text", {}), "path": TEXT_DIR}
        (tmp / CONFIG_FILE).write_text(json.dumps(model, indent=1) + "\n")
        inputs = {k: v for k, v in (config.get("data") or {}).items() if k in INPUT_KEYS}
        (tmp / INPUTS_FILE).write_text(json.dumps(inputs, indent=1) + "\n")
        copy_text_files(text_source, tmp / TEXT_DIR)
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_text_files(source: Path, dest: Path) -> None:
    """The text encoder folder's config.json and tokenizer files, as they are (no weights); checked by
    tokenizing a probe the same way from both folders, so a tokenizer needing another file is an error."""
    from transformers import AutoTokenizer

    dest.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    probe = ["A red circle moves left, in front of a blue square.", "Zürich 2024: naïve café!"]
    try:
        same = (AutoTokenizer.from_pretrained(source, local_files_only=True)(probe)["input_ids"]
                == AutoTokenizer.from_pretrained(dest, local_files_only=True)(probe)["input_ids"])
    except (OSError, ValueError) as e:
        raise WeightsError(f"the tokenizer of {source} does not load from the files copied ({', '.join(TOKENIZER_FILES)}):"
                           f" {type(e).__name__}: {e}") from None
    if not same:
        raise WeightsError(f"the tokenizer of {source} tokenizes differently from the files copied "
                           f"({', '.join(TOKENIZER_FILES)}): it needs a file export does not know")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("out", help="OUT.pt; OUT.yaml is written beside it")
    p.add_argument("--folder", default=None, help="the shareable folder (default: OUT without its suffix)")
    args = p.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, args.folder)
    except WeightsError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}, {out.with_suffix('.yaml')} and {Path(args.folder) if args.folder else default_folder(out)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
