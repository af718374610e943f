"""Consolidate a run's latest sharded DeepSpeed checkpoint into one fp32 state dict.

    python -m pretrain.export RUN_DIR OUT.pt

Uses DeepSpeed's zero_to_fp32 (any ZeRO stage, any world size). Writes OUT.pt (a plain
`{name: tensor}` state dict that `VideoTextModel.load_state_dict` and `finetune/` load) and OUT.yaml
(the run's resolved config, to rebuild the model).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from pretrain.weights import WeightsError, read_state_dict


def export(run_dir: str | Path, out: str | Path) -> Path:
    """Raises WeightsError (one line) when RUN_DIR holds no complete checkpoint."""
    run_dir, out = Path(run_dir), Path(out)
    state = read_state_dict(run_dir / "checkpoints")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
    tmp.replace(out)
    shutil.copyfile(run_dir / "config.yaml", out.with_suffix(".yaml"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("out")
    args = p.parse_args(argv)
    try:
        print(f"wrote {export(args.run_dir, args.out)}")
    except WeightsError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
