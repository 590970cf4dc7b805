"""Fixtures shared by the whole test suite.

s3_server      (session) a real S3 API over HTTP: `moto` in server mode, a separate process on
               127.0.0.1 (the s3fs project tests itself the same way). Yields the endpoint URL.
s3_bucket      (function) a fresh, uniquely named bucket on that server; yields "s3://name".
tiny_synthetic (session) URI of a small ingested synthetic dataset: 12 classes in 4 confusable
               groups, dim 32, shards of 200 samples (train 1080 in 6 shards, val 120 in 1, test
               400 in 2). Read-only: copy it before damaging anything.
ray_local      (session) a local 2-CPU Ray (150 MiB object store, no dashboard), started through
               `pipeline.raysetup.ensure_ray` so tests see the same environment as the CLI.

The AWS environment is pinned for the whole session, before any test runs: endpoint = the local
server's address (its port is reserved up front; the server itself starts only when a test asks
for `s3_server`), throw-away credentials, no profile or ~/.aws files. So every process the tests
start (Ray workers included, whenever Ray starts) talks to the local server and can never reach
a real account; the original environment is restored at the end of the session.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

# Distinctive values, so tests can assert that no output ever contains them.
TEST_ACCESS_KEY = "AKIADISTILLTESTKEY01"
TEST_SECRET_KEY = "distill-test-secret-5f1d0c9a7b"

_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
             "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
             "AWS_EC2_METADATA_DISABLED")
_saved_env: dict[str, str | None] = {}
_S3_PORT: int | None = None


def _free_port() -> int:
    # Between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768+), so that
    # nothing started later in the session is likely to take the port before the server binds it.
    rng = random.Random()
    for _ in range(100):
        port = rng.randint(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config):
    global _S3_PORT
    _S3_PORT = _free_port()
    for name in _AWS_VARS:
        _saved_env[name] = os.environ.pop(name, None)
    nowhere = os.path.join(os.path.sep, "nonexistent-distill-test-aws")
    os.environ.update({
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_S3_PORT}",
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": nowhere + "-config",
        "AWS_SHARED_CREDENTIALS_FILE": nowhere + "-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    # A proxy configured for the package registries must not capture calls to the local server.
    for name in ("NO_PROXY", "no_proxy"):
        _saved_env.setdefault(name, os.environ.get(name))
        os.environ[name] = ",".join(p for p in (os.environ.get(name), "127.0.0.1", "localhost") if p)


def pytest_unconfigure(config):
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _start_moto(port: int, log_path) -> subprocess.Popen | None:
    """moto_server on 127.0.0.1:port, once it answers HTTP; None if it could not start there."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # e.g. the port was taken after all
            return None
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            return proc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    return None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start `moto` in server mode on the reserved port; yield its endpoint URL."""
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    proc = _start_moto(_S3_PORT, log)
    if proc is None:  # rare: something took the reserved port; Ray workers already running keep the old one
        port = _free_port()
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        proc = _start_moto(port, log)
    if proc is None:
        raise RuntimeError(f"moto server did not start; see {log}")
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; removed with its objects afterwards (the server keeps them in memory)."""
    import boto3

    name = f"distill-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                client.delete_objects(Bucket=name, Delete={"Objects": objs})
        client.delete_bucket(Bucket=name)
    except Exception:  # noqa: BLE001 - cleanup is best effort; the server dies with the session
        pass


TINY_SYNTHETIC = {"num_classes": 12, "num_groups": 4, "train": 1200, "test": 400, "dim": 32,
                  "difficulty": 1.0, "seed": 0}


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> str:
    """URI of a tiny synthetic dataset (see TINY_SYNTHETIC; val_fraction 0.1, shard_size 200)."""
    from pipeline.data.ingest import ingest

    uri = str(tmp_path_factory.mktemp("tiny_synthetic") / "data")
    ingest("", uri, "synthetic", val_fraction=0.1, shard_size=200, seed=0,
           synthetic_overrides=TINY_SYNTHETIC, progress=False)
    return uri


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs and a 150 MiB object store, shut down at the end if we started it."""
    import ray

    from pipeline.config import Config
    from pipeline.raysetup import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(Config.model_validate({"ray": {"num_cpus": 2, "object_store_memory_mb": 150}}))
    yield ray
    if started and ray.is_initialized():
        ray.shutdown()
