"""A real S3 endpoint for tests: moto's server as its own process, speaking the S3 HTTP API.

The trainer reaches it as it would reach MinIO or AWS: s3fs/botocore configured only by the
standard environment variables (`AWS_ENDPOINT_URL`, keys, region), which on a cluster come from
the run's `secrets.objectStore` Secret.

    def test_x(s3_store): s3_store.uri("runs")    # s3://<bucket>/runs; s3_store.env for processes
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from tests.support.ports import free_port


BUCKET = "kubetune-test"


@dataclass(frozen=True)
class S3Store:
    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing",
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})

    def keys(self, prefix: str) -> list[str]:
        """Object names under `prefix`, relative to it."""
        fs, base = self.filesystem(), f"{self.bucket}/{prefix.strip('/')}"
        fs.invalidate_cache()
        return sorted(path[len(base) + 1:] for path in fs.find(base))


def wait_until_up(endpoint: str, process: subprocess.Popen, log: Path, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise RuntimeError(f"moto server not up at {endpoint} after {deadline_s:.0f}s")


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory) -> Iterator[S3Store]:
    port, log = free_port(), tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT)
    store = S3Store(f"http://127.0.0.1:{port}", BUCKET)
    try:
        wait_until_up(store.endpoint, process, log)
        import boto3  # us-east-1 takes no LocationConstraint, which s3fs's mkdir would send

        boto3.client("s3", endpoint_url=store.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield store
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def s3_env(s3_store, monkeypatch) -> S3Store:
    """The S3 store with its credentials in this process's environment (and its children's)."""
    for key, value in s3_store.env.items():
        monkeypatch.setenv(key, value)
    return s3_store


