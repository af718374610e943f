"""Data for long-form video-language pretraining, as WebDataset tar shards.

- `shards.synth`: a synthetic generator (moving, occluding coloured shapes with one sentence per event).
- `shards.video`: in-memory MP4 encode/decode with PyAV.
- `shards.loader`: the streaming train loader (exactly resumable) and the eval loader.

Shard layout, one sample per video: KEY.mp4, KEY.json {"id", "duration", "fps",
"sentences": [{"text", "start", "end"}], "source"}, optional KEY.depth.npz (array "depth",
(T, H, W) float16). Keys have no dots. A split folder holds NAME-%06d.tar and an index.json
{"shards", "counts", "num_samples", "total_duration", "settings"} written last.

Command line: `python -m shards --help`.
"""
