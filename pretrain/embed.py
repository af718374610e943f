"""Embed every sample of a shard set with a pretrained model, as NumPy files.

    python -m pretrain.embed --init CKPT --shards DIR_OR_URL --out DIR [--batch-size N] [--config YAML] \
        [dotted.key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module pretrain.embed --init ... (or torchrun --nproc-per-node 2 -m ...)

CKPT is what `model.init_from` takes (a run folder, RUN/checkpoints, OUT.pt from `pretrain.export`) or a
folder from `pretrain.export`. The model (architecture and objectives) comes from the config saved
beside it (RUN/config.yaml, OUT.yaml) or the folder's config.json; the weights are loaded strictly.
How a sample becomes tensors (data.num_clips, frames_per_clip, size, max_words, clip_sampling,
clip_seconds) defaults to what the model was trained on, from the same config; precedence: those <
the --config YAML's data.* (its model.* is not read) < dotted overrides (of data.*; model.* is refused)
< --shards, --batch-size.

The shards are read with the evaluation loader (first clips, centre frames and crop, no shuffling;
each rank reads shards[rank::world_size], every sample once; undecodable samples are skipped and
logged). Each rank embeds its share and writes it to DIR.tmp/; rank 0 checks that no key comes
twice, merges, and renames DIR.tmp to DIR. DIR holds, rows sorted by sample key, in float32:
    keys.txt        N sample keys, one per line
    video.npy       (N, E) video embeddings           } VideoTextModel.encode_video, L2-normalised
    clips.npy       (N, M, E) clip embeddings         }  (absent when the video encoder has no clip
                                                         features: TESTA's frame merging)
    paragraph.npy   (N, E) paragraph embeddings       } VideoTextModel.encode_text, L2-normalised
    sentences.npy   (N, M, E) sentence embeddings     }
    info.json       what is inside: the weights, shards, count, shapes and the data settings used
A missing or unreadable input, or an --out that exists and is not empty, is one line on stderr and
exit code 2 before any process group starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from pretrain import distributed as dist_utils
from pretrain.config import (REPO_ROOT, Config, ConfigError, from_dict, merge, parse_override, pretrained_config_path,
                             read_yaml, resolve_path, set_dotted)
from pretrain.export import INPUT_KEYS, INPUTS_FILE, is_exported
from pretrain.model import RUN_ONLY_KEYS, PretrainedError, VideoTextModel, is_image_batch, pretrained_config
from pretrain.prelaunch import prelaunch, prepare_process, reported_as
from pretrain.weights import WeightsError, check_source, load_weights
from shards.format import is_split_folder, read_index, shard_path
from shards.loader import build_eval_loader
from shards.preflight import MissingInput, require_file, require_shards

log = logging.getLogger("pretrain")
KINDS = ("video", "clips", "paragraph", "sentences")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="weights: a run folder, RUN/checkpoints, OUT.pt or an exported folder")
    p.add_argument("--shards", required=True, help="shard set: a split folder, an s3:// prefix or a brace pattern")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch and rank (data.batch_size)")
    p.add_argument("--config", default=None, help="YAML with data.* settings (s3_endpoint, num_workers, ...)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p.parse_args(argv)


def saved_sections(init: str) -> tuple[dict, dict]:
    """(model.* without its run-only keys, the data.* input settings) saved with the weights `init`."""
    if is_exported(init):
        inputs_path = Path(init) / INPUTS_FILE
        try:
            model = dataclasses.asdict(pretrained_config(init))  # text.path: the folder's own text/
            inputs = json.loads(inputs_path.read_text()) if inputs_path.is_file() else {}
        except (PretrainedError, ValueError) as e:
            raise MissingInput(f"--init {init}: {e}") from None
    else:
        try:
            check_source(init)
        except WeightsError as e:
            raise MissingInput(f"--init: {e}") from None
        path = pretrained_config_path(init)
        if path is None:
            raise MissingInput(f"--init {init}: no config beside it (OUT.yaml beside OUT.pt, RUN/config.yaml), "
                               "which gives the model's architecture")
        saved = read_yaml(path)
        model = {k: v for k, v in (saved.get("model") or {}).items() if k not in RUN_ONLY_KEYS}
        inputs = saved.get("data") or {}
    return model, {k: v for k, v in inputs.items() if k in INPUT_KEYS}


def load_embed_config(args) -> tuple[Config, str]:
    """The config (see the module's docstring for the precedence) and the resolved --init; no tensor is read."""
    init = resolve_path(args.init)
    model, inputs = saved_sections(init)
    data = {"data": inputs}
    if args.config:
        with reported_as("config error"):
            require_file(resolve_path(args.config), "config file (--config)")
        data = merge(data, read_yaml(resolve_path(args.config)))
    data["model"] = model
    for item in args.overrides:
        keys, value = parse_override(item)
        if keys[0] == "model":
            raise ConfigError(f"override {item!r}: model.* comes from --init's config, the weights need it as it is")
        set_dotted(data, keys, value)
    set_dotted(data, ["data", "val_shards"], resolve_path(args.shards))
    if args.batch_size is not None:
        set_dotted(data, ["data", "batch_size"], args.batch_size)
    return from_dict(Config, data), init


def check(args) -> tuple[Config, str, Path]:
    """Pre-launch: the config, --init (and the config beside it), --shards and --out -> (cfg, init, out)."""
    cfg, init = load_embed_config(args)
    with reported_as("data error"):
        require_shards(cfg.data.val_shards, str(REPO_ROOT), cfg.data.storage, what="--shards")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MissingInput(f"--out {out} exists and is not an empty folder: remove it or choose another")
    return cfg, init, out


def build_model(cfg: Config, init: str) -> VideoTextModel:
    """The model with the weights `init`, loaded strictly, in eval mode; the text encoder's original
    weights are not read (every tensor comes from `init`)."""
    if is_exported(init):
        return VideoTextModel.from_pretrained(init)
    model = VideoTextModel(cfg.model, pretrained_text=False)
    load_weights(model, init)
    return model.eval()


def share_size(cfg: Config, rank: int, world_size: int) -> int | None:
    """Samples in this rank's shards per the split's index.json (None for a brace pattern): the bar's total."""
    path = shard_path(cfg.data.val_shards, str(REPO_ROOT))
    if not is_split_folder(path):
        return None
    try:
        counts = read_index(path, cfg.data.storage).get("counts")
    except (OSError, ValueError):
        return None
    return sum(counts[rank::world_size]) if counts else None


@torch.no_grad()
def embed_share(model: VideoTextModel, cfg: Config, rank: int, world_size: int, device: torch.device) -> dict:
    """This rank's samples -> {"keys": [str], kind: float32 array (n, ...) or None} (see KINDS)."""
    from tqdm import tqdm

    loader = build_eval_loader(cfg.data, cfg.model.text.resolved_path(), rank, world_size, root=str(REPO_ROOT))
    out = {"keys": [], **{kind: [] for kind in KINDS}}
    bar = tqdm(total=share_size(cfg, rank, world_size), desc=f"embed (rank {rank} of {world_size})", unit="video",
               disable=rank != 0, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    for batch in loader:
        M = batch["input_ids"].shape[1]
        depth = batch["depth"].to(device) if "depth" in batch else None
        clips, video = model.encode_video(batch["video"].to(device), M, depth, image=is_image_batch(batch))  # (b, M, E) or None, (b, E)
        sentences, paragraph = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        for kind, x in {"video": video, "clips": clips, "paragraph": paragraph, "sentences": sentences}.items():
            if x is not None:
                out[kind].append(x.float().cpu().numpy())
        out["keys"] += batch["key"]
        bar.update(len(batch["key"]))
    bar.close()
    E, M = cfg.model.embed_dim, cfg.data.num_clips
    empty = {"video": (0, E), "clips": (0, M, E), "paragraph": (0, E), "sentences": (0, M, E)}  # a rank without shards
    for kind in KINDS:
        out[kind] = np.concatenate(out[kind]) if out[kind] else np.zeros(empty[kind], np.float32)
    if model.video_local is None:  # no clip features (TESTA's frame merging)
        out["clips"] = None
    return out


def write_part(share: dict, tmp: Path, rank: int) -> None:
    arrays = {kind: share[kind] for kind in KINDS if share[kind] is not None}
    np.savez(tmp / f"part-{rank:05d}.npz", keys=np.array(share["keys"], dtype=str), **arrays)


def merge_parts(tmp: Path, world_size: int) -> int:
    """Rank 0: the parts of every rank -> the output files in `tmp`, rows sorted by key; the parts are
    removed. Raises RuntimeError if a key comes twice (a sample embedded twice). Returns N."""
    parts = [np.load(tmp / f"part-{r:05d}.npz", allow_pickle=False) for r in range(world_size)]
    keys = np.concatenate([p["keys"].astype(str) for p in parts])
    unique, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise RuntimeError(f"{(counts > 1).sum()} sample keys come more than once, e.g. {unique[counts > 1][0]!r}: "
                           "the shard set holds duplicate keys, or a sample was read twice")
    if len(keys) == 0:
        raise RuntimeError("the shard set yielded no usable sample (see the skipped-sample warnings)")
    row = np.empty(len(keys), dtype=np.int64)
    row[np.argsort(keys, kind="stable")] = np.arange(len(keys))  # row of the i-th key read, in key order
    for kind in KINDS:
        if kind not in parts[0].files:
            continue
        shape = (len(keys), *parts[0][kind].shape[1:])
        merged = np.lib.format.open_memmap(tmp / f"{kind}.npy", mode="w+", dtype=np.float32, shape=shape)
        start = 0
        for p in parts:
            x = p[kind]
            merged[row[start:start + len(x)]] = x
            start += len(x)
        merged.flush()
        del merged
    (tmp / "keys.txt").write_text("".join(f"{k}\n" for k in np.sort(keys)))
    for r, p in enumerate(parts):
        p.close()
        (tmp / f"part-{r:05d}.npz").unlink()
    return len(keys)


def describe(tmp: Path, cfg: Config, init: str, n: int, world_size: int) -> None:
    shapes = {f"{k}.npy": list(np.load(tmp / f"{k}.npy", mmap_mode="r").shape)
              for k in KINDS if (tmp / f"{k}.npy").exists()}
    info = {"init": init, "shards": cfg.data.val_shards, "num_samples": n, "world_size": world_size,
            "rows": "sorted by sample key (keys.txt)", "files": shapes,
            "data": {k: getattr(cfg.data, k) for k in INPUT_KEYS}}
    (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")


def start_process_group(timeout_s: float) -> torch.device:
    """A process group when launched with several ranks (deepspeed, torchrun: WORLD_SIZE, RANK, MASTER_*),
    with train.dist_timeout_s as its collective timeout, and this rank's device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.set_device(device)
    dist_utils.start_process_group(timeout_s)
    return device


def main(argv=None) -> int:
    args = parse_args(argv)
    checked, failed = prelaunch(check, args)
    if failed:
        return failed
    cfg, init, out = checked
    prepare_process()
    device = start_process_group(cfg.train.dist_timeout_s)
    rank, world_size = dist_utils.rank(), dist_utils.world_size()
    try:
        model = build_model(cfg, init).to(device)
    except (WeightsError, ValueError) as e:  # PretrainedError is a ValueError; the same on every rank
        if rank == 0:
            print(f"input error: --init {init}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftovers
        tmp.mkdir(parents=True)
    dist_utils.barrier()
    write_part(embed_share(model, cfg, rank, world_size, device), tmp, rank)
    dist_utils.barrier()
    if rank == 0:
        n = merge_parts(tmp, world_size)
        describe(tmp, cfg, init, n, world_size)
        if out.exists():
            out.rmdir()  # empty (checked before launch)
        tmp.rename(out)
        print(f"wrote {n} samples' embeddings to {out}", flush=True)
    dist_utils.barrier()
    if dist_utils.is_dist():
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
