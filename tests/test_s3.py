"""Datasets on S3, for real over HTTP: a local `moto` server (conftest `s3_server`) reached through
s3fs. Ingest, verify and the shard reader behave exactly as on local disk; large shards go up as
multipart uploads; credentials never appear in any output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from _data_helpers import FASHION_DIR, HAVE_FASHION, run_cli
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from pipeline import storage
from pipeline.data.ingest import ingest
from pipeline.data.shards import load_split, read_manifest, verify_dataset

pytestmark = pytest.mark.s3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"num_classes": 6, "num_groups": 2, "train": 600, "test": 200, "dim": 8}


def _cli(*args, timeout=600):
    """The real entry point in a child process (it inherits the test AWS environment)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _shas(m):
    return {s: [e["sha256"] for e in v["shards"]] for s, v in m["splits"].items()}


def test_s3_dataset_is_the_same_as_a_local_one(s3_bucket, tmp_path):
    local, remote = str(tmp_path / "ds"), f"{s3_bucket}/datasets/small"
    ml = ingest("", local, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    mr = ingest("", remote, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    assert _shas(ml) == _shas(mr)
    assert storage.listdir(remote) == sorted(os.listdir(local))
    report = verify_dataset(remote, progress=False)
    assert report["ok"] and report["checked"] == 6 + 1 + 2
    assert report["samples"] == {"train": 540, "val": 60, "test": 200}
    for split in ("train", "test"):
        for a, b in zip(load_split(local, split), load_split(remote, split)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the streaming path's shard reader (what every Ray Data read task runs): same rows from either
    # place, each shard's sha256 checked against the manifest on the way
    from pipeline import datasets

    for el, er in zip(datasets.split_items(local, "train"), datasets.split_items(remote, "train"), strict=True):
        assert er["uri"].startswith("s3://")
        a, b = datasets._read_one(el), datasets._read_one(er)
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])
    # rerunning is a no-op on S3 too
    assert ingest("", remote, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False) == mr


def test_flipped_byte_on_s3_is_named_by_the_cli(s3_bucket, capsys):
    uri = f"{s3_bucket}/ds"
    ingest("", uri, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    target = storage.join(uri, "train-000002.tar")
    data = bytearray(storage.read_bytes(target))
    data[3000] ^= 0x80
    storage.write_bytes_atomic(target, bytes(data))
    code, out, _ = run_cli(["data", "verify", uri, "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["damaged_shards"] == ["train-000002.tar"]
    assert "sha256 mismatch" in report["problems"]["train-000002.tar"]


def test_interrupted_s3_ingest_is_finished_by_a_rerun(s3_bucket, monkeypatch, capsys):
    uri = f"{s3_bucket}/ds"
    real = storage.write_bytes_atomic
    calls = []

    def crash_after_two(u, data):
        calls.append(u)
        if len(calls) > 2:
            raise ConnectionError("network went away")
        real(u, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", crash_after_two)
    with pytest.raises(ConnectionError):
        ingest("", uri, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
    assert "manifest.json" not in storage.listdir(uri)
    written = [n for n in storage.listdir(uri) if n.endswith(".tar")]
    assert 1 <= len(written) <= 2
    capsys.readouterr()
    m = ingest("", uri, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    assert f"kept {len(written)} already complete" in capsys.readouterr().err
    assert len([n for n in storage.listdir(uri) if n.endswith(".tar")]) == 9
    assert verify_dataset(uri, progress=False)["ok"] and read_manifest(uri) == m


def test_credentials_are_never_printed_in_process(s3_bucket, capsys):
    uri = f"{s3_bucket}/creds"
    texts = []
    for argv in (["data", "ingest", "-", uri, "--format", "synthetic", "--synthetic", "train=300", "test=100"],
                 ["data", "verify", uri], ["data", "verify", uri, "--json"],
                 ["data", "verify", "s3://no-such-bucket-distill/x"]):
        code, out, err = run_cli(argv, capsys)
        texts.append(out + err)
        assert code == (2 if "no-such-bucket" in argv[-1] else 0), err
    texts.append(storage.read_bytes(storage.join(uri, "manifest.json")).decode())
    for text in texts:
        assert TEST_SECRET_KEY not in text and TEST_ACCESS_KEY not in text


@pytest.mark.slow
def test_credentials_are_never_printed_by_the_cli_processes(s3_bucket):
    uri = f"{s3_bucket}/creds"
    runs = [
        _cli("data", "ingest", "-", uri, "--format", "synthetic", "--shard-size", "200",
             "--synthetic", "train=600", "test=200", "dim=8"),
        _cli("data", "verify", uri),
        _cli("data", "verify", uri, "--json"),
        _cli("data", "verify", "s3://no-such-bucket-distill/x"),
        _cli("data", "ingest", "s3://no-such-bucket-distill/raw", uri + "2", "--format", "idx"),
    ]
    assert [r.returncode for r in runs] == [0, 0, 0, 2, 2], [r.stderr[-500:] for r in runs]
    assert "no dataset here" in runs[3].stderr and "s3://no-such-bucket-distill/x" in runs[3].stderr
    assert "no such file or directory" in runs[4].stderr
    manifest = storage.read_bytes(storage.join(uri, "manifest.json")).decode()
    for text in [r.stdout + r.stderr for r in runs] + [manifest]:
        assert TEST_SECRET_KEY not in text and TEST_ACCESS_KEY not in text
        assert "Traceback" not in text


@pytest.mark.slow
def test_shards_larger_than_the_multipart_threshold(s3_bucket, tmp_path):
    """A 110 MB shard: s3fs sends it as a multipart upload (parts of 50 MiB); S3 publishes the
    object only when the upload completes, and it verifies like any other."""
    import boto3

    rng = np.random.default_rng(0)
    n, dim = 3400, 8192  # 32 KiB per sample
    np.savez(tmp_path / "big.npz", x_train=rng.standard_normal((n, dim), dtype=np.float32), y_train=np.arange(n) % 4,
             x_test=rng.standard_normal((10, dim), dtype=np.float32), y_test=np.arange(10) % 4)
    uri = f"{s3_bucket}/big"
    m = ingest(str(tmp_path / "big.npz"), uri, "npz", val_fraction=0.01, shard_size=5000, progress=False)
    shard = m["splits"]["train"]["shards"][0]
    assert shard["size"] > 100 * 2**20
    head = boto3.client("s3").head_object(Bucket=s3_bucket[5:], Key=f"big/{shard['path']}")
    assert "-" in head["ETag"]  # multipart ETag: md5-of-parts "-" part count
    assert head["ContentLength"] == shard["size"]
    assert verify_dataset(uri, progress=False)["ok"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_on_s3(s3_bucket):
    uri = f"{s3_bucket}/fashion"
    t0 = time.perf_counter()
    r = _cli("data", "ingest", FASHION_DIR, uri, "--format", "idx")
    ingest_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train 54000, val 6000, test 10000" in r.stdout
    t0 = time.perf_counter()
    v = _cli("data", "verify", uri, "--json")
    verify_s = time.perf_counter() - t0
    report = json.loads(v.stdout)
    assert v.returncode == 0 and report["ok"] and report["checked"] == 15
    assert report["samples"] == {"train": 54000, "val": 6000, "test": 10000}
    x, y, _ = load_split(uri, "test")
    assert x.shape == (10000, 1, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    print(f"fashion-mnist on S3 (moto): ingest {ingest_s:.1f}s, verify {verify_s:.1f}s")
