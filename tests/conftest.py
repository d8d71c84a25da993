"""Shared fixtures. Real servers run as child processes on 127.0.0.1 (see tests/servers.py)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import pytest

# Dummy credentials so boto3 never reaches for real ones; no Hub downloads in tests.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from servers import ServerProcess, start_moto_server  # noqa: E402  (tests/ is on sys.path via rootdir conftest)


@dataclass
class MotoS3:
    server: ServerProcess
    endpoint_url: str

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """One moto S3 server per session (starting one takes ~1 s); stopped by PID at teardown."""
    server = start_moto_server(tmp_path_factory.mktemp("moto"))
    try:
        yield MotoS3(server=server, endpoint_url=server.url)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_s3):
    """A fresh bucket per test, so tests sharing the session server never see each other's objects."""
    name = f"nst-test-{uuid.uuid4().hex[:16]}"
    moto_s3.client().create_bucket(Bucket=name)
    yield name
