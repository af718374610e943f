"""A real S3 endpoint for tests: moto's HTTP server on loopback, with test credentials and no endpoint or
profile from the environment."""
import contextlib

import pytest


@contextlib.contextmanager
def moto_s3(*buckets: str):
    """Start the server, create `buckets`; yields its URL (http://127.0.0.1:PORT) and stops it afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            mp.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=url)
            for bucket in buckets:
                client.create_bucket(Bucket=bucket)
            yield url
        finally:
            server.stop()
