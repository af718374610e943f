"""`python -m shards stats` on an image set built by `python -m shards build` from an image manifest: images,
pixels (from each KEY.json's width x height), captions and words; no videos or hours."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from shards.__main__ import main

SIZES = [(40, 30), (64, 48), (20, 10)]  # (width, height) of the images
CAPTIONS = ["a very typical bus station", "two dogs", "the sun sets over the sea tonight"]


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image_stats")
    records = []
    for i, ((w, h), caption) in enumerate(zip(SIZES, CAPTIONS)):
        path = tmp / f"img{i}.jpg"
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(buf, format="JPEG")
        path.write_bytes(buf.getvalue())
        sentences = [{"text": caption, "start": 0.0, "end": 0.0}]
        records.append({"id": f"img{i}", "image": str(path), "sentences": sentences})
    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["build", "--manifest", str(manifest), "--out", str(tmp / "set"), "--per-shard", "2"]) == 0
    return tmp / "set"


def test_stats_of_an_image_set_counts_images_and_pixels(image_set, capsys):
    assert main(["stats", str(image_set), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["media"] == "image" and s["images"] == 3 and s["shards"] == 2 and s["unreadable"] == 0
    assert s["pixels"] == sum(w * h for w, h in SIZES) and s["images_without_size"] == 0
    assert s["image_megapixels"]["max"] == pytest.approx(64 * 48 / 1e6)
    assert s["sentences"] == 3 and s["words"] == sum(len(c.split()) for c in CAPTIONS)
    assert "videos" not in s and "hours" not in s
    assert main(["stats", str(image_set)]) == 0
    table = capsys.readouterr().out
    assert "images" in table and "megapixels" in table and "captions" in table and "hours" not in table
