"""Initial weights (`model.init_from`, `finetune/run.py --init`), loaded strictly.

A source is one of
    RUN/checkpoints     a DeepSpeed checkpoint folder (its `latest` tag, consolidated to fp32 with
                        DeepSpeed's zero_to_fp32: any ZeRO stage, any world size)
    RUN                 a run folder (the same, through RUN/checkpoints)
    a finetuning run    `finetune/run.py`'s RUN or RUN/checkpoints: accelerate's pytorch_model.bin of the
                        `latest` tag without DeepSpeed, as above with it; its task model's `backbone.`
                        tensors are the model, its `head.` tensors are left out (finetune retrieval, then QA)
    OUT.pt              a state dict saved with torch.save (`python -m pretrain.export`), read with
                        weights_only=True; a {"module": state_dict} wrapper is accepted

Strict by default: every parameter and buffer of the model must be in the source with the same shape,
and the source may hold nothing else, except the parameters under `new_prefixes`: the modules the
config creates new (a stage-2 fusion stack over a stage-1 checkpoint, "fusion."). Those are expected
to be missing only when the source has no key under that prefix at all; they keep their
initialisation and are logged as new. Anything else stops the run with an error that lists the keys,
unless `partial=True` (`model.init_partial`): then they are listed in a warning and the matching
tensors load.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from pretrain.checkpoint import LATEST

log = logging.getLogger("pretrain")
SHOWN = 10  # keys listed per kind in a message


class WeightsError(RuntimeError):
    """The weights source is missing or unreadable, or does not match the model; str() is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def checkpoint_folder(path: str | Path) -> Path | None:
    """The DeepSpeed checkpoint folder that `path` names (a checkpoint folder or a run folder), or None
    if `path` is a file. Raises WeightsError if `path` is missing or a folder without a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights {path} do not exist")
    if not path.is_dir():
        return None
    for folder in (path, path / "checkpoints"):
        if (folder / LATEST).is_file():
            return folder
    raise WeightsError(f"weights {path} is a folder without a checkpoint: expected a DeepSpeed checkpoint "
                       f"folder with a '{LATEST}' file (RUN/checkpoints) or a run folder (RUN), or a .pt state dict")


def check_source(path: str | Path) -> None:
    """Cheap pre-launch check that `path` can be a weights source (no tensors are read)."""
    folder = checkpoint_folder(path)
    if folder is None:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise WeightsError(f"weights {path} are not readable ({e.strerror or e})") from None
        return
    tag = (folder / LATEST).read_text().strip()
    if not (folder / tag).is_dir():
        raise WeightsError(f"weights {folder}: '{LATEST}' names {tag}, which is not a folder there")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The {name: tensor} state dict in a weights source (see the module's docstring)."""
    folder = checkpoint_folder(path)
    if folder is not None:
        plain = folder / (folder / LATEST).read_text().strip() / ACCELERATE_MODEL
        if plain.is_file():  # a finetuning run without DeepSpeed
            return task_backbone(_load_file(plain))
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return task_backbone(dict(get_fp32_state_dict_from_zero_checkpoint(str(folder))))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise WeightsError(f"weights {folder}: cannot consolidate the DeepSpeed checkpoint "
                               f"({type(e).__name__}: {e})") from None
    return task_backbone(_load_file(Path(path)))


ACCELERATE_MODEL = "pytorch_model.bin"  # what accelerate's save_state(safe_serialization=False) writes


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, not a torch file, objects weights_only refuses
        raise WeightsError(f"weights {path} are not a readable state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = state["module"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise WeightsError(f"weights {path} are not a state dict of named tensors (nor {{'module': state_dict}})")
    return state


def task_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A finetuned task model's state (`backbone.*`, `head.*`) -> its backbone's; any other state as it is."""
    if not any(k.startswith("backbone.") for k in state):
        return state
    if other := sorted(k for k in state if not k.startswith(("backbone.", "head."))):
        raise WeightsError(f"weights hold a task model's backbone.* and also {_listing(other, 'other keys')}")
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def _listing(keys: list[str], what: str) -> str:
    more = f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return f"{len(keys)} {what}: {', '.join(keys[:SHOWN])}{more}"


def new_modules(model_cfg) -> tuple[str, ...]:
    """Parameter prefixes a config creates that a checkpoint of an earlier stage need not hold (the stage-2
    fusion stack); if the checkpoint has them, they must match like every other tensor."""
    return ("fusion.",) if model_cfg.fusion_layers else ()


def load_weights(model: torch.nn.Module, path: str | Path, new_prefixes: Sequence[str] = (),
                 partial: bool = False) -> dict:
    """Load the weights source `path` into `model` (see the module's docstring for what is strict).

    Returns {"loaded": [names], "new": [names left as initialised under new_prefixes], "missing": [...],
    "unexpected": [...], "mismatched": [...]} (missing, unexpected and mismatched are empty unless partial)."""
    if isinstance(new_prefixes, str):
        new_prefixes = (new_prefixes,)
    state = read_state_dict(path)
    own = model.state_dict()
    prefixes_in_source = {p for p in new_prefixes if any(k.startswith(p) for k in state)}
    absent = [k for k in own if k not in state]
    new = [k for k in absent if k.startswith(tuple(p for p in new_prefixes if p not in prefixes_in_source))]
    missing = [k for k in absent if k not in set(new)]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(_listing(missing, "missing from the weights"))
    if unexpected:
        problems.append(_listing(unexpected, "unexpected (not in the model)"))
    if mismatched:
        shown = [f"{k} {tuple(state[k].shape)} vs the model's {tuple(own[k].shape)}" for k in mismatched]
        problems.append(_listing(shown, "with another shape"))
    if problems:
        expected = (f"; only parameters under {', '.join(new_prefixes)} may be new, and only when the weights "
                    "hold none under that prefix") if new_prefixes else ""
        message = f"weights {path} do not match the model: {'; '.join(problems)}{expected}"
        if not partial:
            raise WeightsError(f"{message}. Set model.init_partial=true to load the matching tensors anyway")
        log.warning("%s; model.init_partial=true: loading the %d matching tensors, the rest keep their "
                    "initialisation", message, len(own) - len(absent) - len(mismatched))
    skip = set(mismatched)
    loadable = {k: v for k, v in state.items() if k in own and k not in skip}
    model.load_state_dict(loadable, strict=False)
    if new:
        log.info("new (not in %s, left as initialised): %d tensors under %s", path, len(new),
                 ", ".join(sorted({p for p in new_prefixes if any(k.startswith(p) for k in new)})))
    log.info("initialised from %s (%d tensors)", path, len(loadable))
    return {"loaded": sorted(loadable), "new": new, "missing": missing, "unexpected": unexpected,
            "mismatched": mismatched}
