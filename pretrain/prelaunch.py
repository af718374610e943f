"""The pre-launch check every training command runs before any process group starts (`pretrain/run.py`,
`finetune/run.py`; `python -m shards` uses `shards.preflight` the same way).

A failure is one line on stderr and exit code 2, never a traceback per rank: "config error: ..." (a
missing or unreadable config or `base:` file, a bad key or value, a missing or bad DeepSpeed JSON),
"data error: ..." (shard sets, checked through the configured storage so `data.s3_endpoint` is
honoured; label files) or "input error: ..." (`--init` / `model.init_from`; a run folder that holds
another run's checkpoints without --resume).

With fewer train shards than readers (ranks x data.num_workers) one line on stdout says how they share them.
A mixture (data.train_shards as a list of sources) is checked source by source, each named in a failure
("data.train_shards[cc3m] ..."), and listed on stdout: its share of the batches, its kind, its samples.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from pretrain.config import REPO_ROOT, Config, ConfigError, load_config, resolve_path
from pretrain.image_init import ImageInitError, load_image
from pretrain.trainer import check_run_dir
from pretrain.weights import WeightsError, check_source
from shards.format import is_split_folder, read_index, shard_path
from shards.loader import describe_readers, set_media
from shards.preflight import MissingInput, require_file, require_shards

BAD_INPUT = 2  # exit code: a pre-launch check failed


@contextlib.contextmanager
def reported_as(kind: str):
    """A MissingInput raised inside is reported as "KIND: ..." ("config error", "data error")."""
    try:
        yield
    except MissingInput as e:
        e.kind = kind
        raise


def check_inputs(cfg: Config, ds: tuple[str, str] | None, shard_sets: Sequence[str], label_files: Sequence[str] = (),
                 init_key: str = "model.init_from") -> None:
    """Every input the run reads exists and is readable: the DeepSpeed JSON `ds` = (path, what it is), or None
    without DeepSpeed; the shard sets and label files named by their dotted keys (empty values are skipped);
    the weights to start from."""
    if ds is not None:
        from pretrain.backends import build_ds_config

        with reported_as("config error"):
            require_file(ds[0], ds[1])
        build_ds_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), ds[0])  # parses and checks it (ConfigError)
    with reported_as("data error"):
        for key in shard_sets:
            if key == "data.train_shards":
                check_train_sources(cfg)
                report_readers(cfg)
            else:
                require_shards(_get(cfg, key), str(REPO_ROOT), cfg.data.storage, what=key)
        for key in label_files:
            if _get(cfg, key):
                require_file(resolve_path(_get(cfg, key)), f"label file ({key})", cfg.data.storage)
    if cfg.model.init_from:
        try:
            check_source(resolve_path(cfg.model.init_from))
        except WeightsError as e:
            raise MissingInput(f"{init_key}: {e}") from None
    if cfg.model.video.init_image:
        check_image(cfg)


def _source_key(cfg: Config, name: str) -> str:
    return "data.train_shards" if isinstance(cfg.data.train_shards, str) else f"data.train_shards[{name}]"


def check_train_sources(cfg: Config) -> None:
    """Every train source's shards exist and are readable and its media kind is known (an image set needs
    model.loss.image_losses non-empty, also when only its index.json says image); a mixture is listed on
    stdout (rank 0): each source's share of the batches (its weight over the sum), kind, path and samples."""
    root, storage, sources = str(REPO_ROOT), cfg.data.storage, cfg.data.sources
    lines, images = [], []
    for source in sources:
        key = _source_key(cfg, source.name)
        urls = require_shards(source.path, root, storage, what=key)
        try:
            media = set_media(source.path, source.media, root, storage)
            path = shard_path(source.path, root)
            samples = read_index(path, storage).get("num_samples") if is_split_folder(path) else None
        except (ValueError, OSError) as e:
            raise MissingInput(f"{key}: {e}") from None
        if media == "image" and source.media != "image":  # the config's own "media: image" was checked at load
            images.append(source.name)
        share = source.weight / sum(s.weight for s in sources)
        lines.append(f"  {source.name}: {100 * share:.1f}% of batches (weight {source.weight:g}), {media}, {source.path} "
                     f"({len(urls)} shards" + (f", {samples} samples)" if samples is not None else ")"))
    cfg.check_image_sources(images, "index.json says media image")  # model.loss.image_losses: [] refuses them
    if not isinstance(cfg.data.train_shards, str) and int(os.environ.get("RANK", "0")) == 0:
        print(f"data.train_shards: a mixture of {len(sources)} sources; each batch is one source's, drawn by weight "
              f"with the same draw on every rank (data.seed):\n" + "\n".join(lines))


def report_readers(cfg: Config) -> None:
    """With fewer train shards than readers (WORLD_SIZE ranks x data.num_workers), one line on stdout (from rank 0)
    per train source saying how the readers share them, or that the split has too few samples for them (the
    loader refuses it)."""
    for source in cfg.data.sources:
        try:
            line = describe_readers(cfg.data, int(os.environ.get("WORLD_SIZE", "1")), str(REPO_ROOT), source.path)
        except ValueError as e:
            line = f"{e} (the train loader will refuse it)"
        if line and int(os.environ.get("RANK", "0")) == 0:
            print(f"{_source_key(cfg, source.name)}: {line}")


def check_image(cfg: Config) -> None:
    """model.video.init_image maps onto the encoder: the whole mapping, from the checkpoint's shapes, on the
    meta device (nothing allocated; a renamed or missing tensor is named here, before launch)."""
    import torch

    from pretrain.video_encoder import VideoEncoder

    with torch.device("meta"):
        encoder = VideoEncoder(cfg.model.video)
    try:
        load_image(encoder, resolve_path(cfg.model.video.init_image), dry_run=True)
    except ImageInitError as e:
        raise MissingInput(str(e)) from None


def _get(cfg, dotted: str):
    for key in dotted.split("."):
        cfg = getattr(cfg, key)
    return cfg


def load_checked(args, cls: type, extra: Sequence = (), inputs: Callable[[Config], None] = lambda cfg: None,
                 same_world_size: bool = False):
    """The config (args.config + args.overrides + `extra`), its inputs checked by `inputs(cfg)`, and the run
    folder, which must not hold another run's checkpoints without --resume, nor (`same_world_size`) a checkpoint
    written at another world size than the launcher's WORLD_SIZE -> (cfg, run_dir)."""
    config = resolve_path(args.config)
    with reported_as("config error"):
        require_file(config, "config file")
    cfg = load_config(config, [*args.overrides, *extra], cls)
    inputs(cfg)
    run_dir = Path(resolve_path(args.run_dir or f"runs/{Path(args.config).stem}"))
    check_run_dir(run_dir, args.resume, int(os.environ.get("WORLD_SIZE", "1")) if same_world_size else None)
    return cfg, run_dir


def prelaunch(check: Callable, args):
    """check(args) -> (its result, None); or, when a pre-launch check fails, one line on stderr naming the
    key or the input and (None, 2)."""
    try:
        return check(args), None
    except (ConfigError, MissingInput, OSError) as e:
        text, kind = str(e), getattr(e, "kind", "config error" if isinstance(e, ConfigError) else "input error")
    except SystemExit as e:  # check_run_dir: this run folder holds another run
        if e.code is None or isinstance(e.code, int):
            raise
        text, kind = str(e.code), "input error"
    print(f"{kind}: {' '.join(text.split())}", file=sys.stderr)
    return None, BAD_INPUT


def prepare_process() -> None:
    """After the checks, in every rank: logging, this process's share of the node's cores as torch threads
    (unless OMP_NUM_THREADS says how many: two 1-thread runs side by side on 2 cores each took 3.7 times the
    CPU of running alone when this made them 2 threads each), and (one process per node) the removal of what
    killed launches left behind (`pretrain.ops.clean_node`)."""
    import logging

    import torch

    from pretrain.ops import clean_node

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if not os.environ.get("OMP_NUM_THREADS"):  # torch took it already
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one remover per node; the others only wait on locks
        clean_node()
