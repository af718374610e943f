"""Data for long-form video-language pretraining, as WebDataset tar shards (the format: shards/FORMAT.md).

Writing:
- `shards.synth`: the synthetic corpus (moving, occluding coloured shapes, one sentence per event).
- `shards.adapters`: ActivityNet Captions / DiDeMo / QuerYD / CSV annotations -> manifests (`shards.manifest`).
- `shards.build`: manifest -> shards, copying or re-encoding (`shards.transcode`), optional depth (`shards.depth`);
  whole, or one part of N (`--part I/N`, e.g. a SLURM array task), and `shards.index` merges the parts.
- `shards.verify`, `shards.stats`: check and count a shard set.
Reading:
- `shards.loader`: the exactly resumable train stream and the eval pass; `shards.sampling` picks the
  clips, `shards.video` seeks and decodes only their frames, `shards.transforms` crops and flips.
Shared: `shards.format` (keys, members, index.json), `shards.storage` (local folders and s3:// with retries).
Checks: `shards.preflight` (every input a command needs exists and is readable, before it starts; used by
`python -m shards`, `pretrain/run.py` and `finetune/run.py`).

Command line: `python -m shards --help` (synth, manifest, build, index, verify, stats); exit 2 = a missing or
malformed input.
"""
