"""The shard format and `distill data verify`: WebDataset compatibility, the fast encoder/decoder
against the tarfile reference, and damage (flipped byte, truncation, missing shard) found and named."""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest

from _data_helpers import run_cli
from pipeline.data import shards
from pipeline.data.shards import (ShardError, decode_shard, encode_shard, encode_shard_tarfile, load_shard,
                                  load_split, read_manifest, sample_key, shard_uris, verify_dataset)
from pipeline.errors import UserError

@pytest.fixture
def dataset(tmp_path, tiny_synthetic):
    """A private copy of the session's tiny dataset, free to damage."""
    out = str(tmp_path / "ds")
    shutil.copytree(tiny_synthetic, out)
    return out


def _decode_with_tarfile(data: bytes):
    """The generic path (tarfile module, per member), for comparison with the fast one."""
    real = shards.index_regular_tar
    shards.index_regular_tar = lambda d: None
    try:
        return decode_shard(data)
    finally:
        shards.index_regular_tar = real


# ---------------------------------------------------------------------------------------------
# format
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,shape,labelled", [("uint8", (1, 28, 28), True), ("float32", (7,), True),
                                                  ("float32", (3, 4, 5), False), ("int16", (2,), True)])
def test_array_encoder_matches_tarfile_byte_for_byte_and_decodes_back(dtype, shape, labelled):
    rng = np.random.default_rng(0)
    n = 137
    x = (rng.random((n,) + shape) * 200).astype(dtype)
    y = rng.integers(0, 1000, n) if labelled else None
    keys = [sample_key("train", 5000 + i) for i in range(n)]
    data = encode_shard(x, y, keys)
    assert data == encode_shard_tarfile(x, y, keys)
    for got in (decode_shard(data), _decode_with_tarfile(data)):
        np.testing.assert_array_equal(got[0], x)
        assert got[0].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got[1], y if labelled else np.full(n, -1))
        assert got[2] == keys


def test_npy_members_are_exactly_np_save_bytes():
    import tarfile

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    data = encode_shard(x, np.array([3, 11]), ["val_00000000", "val_00000001"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = tf.getnames()
        member = tf.extractfile("val_00000001.input.npy").read()
        label = tf.extractfile("val_00000001.cls").read()
    assert names == ["val_00000000.cls", "val_00000000.input.npy", "val_00000001.cls", "val_00000001.input.npy"]
    buf = io.BytesIO()
    np.save(buf, x[1], allow_pickle=False)
    assert member == buf.getvalue() and label == b"11"


def test_webdataset_reads_our_shards(tiny_synthetic):
    import webdataset as wds

    uri = shard_uris(tiny_synthetic, "test")[0]
    x, y, keys = load_shard(uri)
    samples = list(wds.WebDataset(uri, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == keys
    np.testing.assert_array_equal(np.stack([s["input.npy"] for s in samples]), x)
    assert [int(s["cls"]) for s in samples] == y.tolist()


def test_shards_written_by_webdataset_decode_through_the_generic_path():
    import webdataset as wds

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 3, 4, 4), dtype=np.uint8)
    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for i in range(20):
            w.write({"__key__": f"sample{i:03d}", "input.npy": x[i], "cls": i % 5, "txt": "extra member"})
    gx, gy, gkeys = decode_shard(buf.getvalue())
    np.testing.assert_array_equal(gx, x)
    assert gy.tolist() == [i % 5 for i in range(20)] and gkeys[0] == "sample000"


def test_samples_of_different_shapes_are_reported():
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        w.write({"__key__": "a", "input.npy": np.zeros((2, 2), np.float32), "cls": 0})
        w.write({"__key__": "b", "input.npy": np.zeros((3,), np.float32), "cls": 1})
    with pytest.raises(ShardError, match=r"input #1 has shape \(3,\) but input #0 has \(2, 2\)"):
        decode_shard(buf.getvalue(), name="odd.tar")


def test_load_split_of_chosen_shards(tiny_synthetic):
    m = read_manifest(tiny_synthetic)
    x, y, keys = load_split(tiny_synthetic, "train", shard_indices=[1, 3])
    assert len(keys) == 400 and keys[0] == "train_00000200" and keys[-1] == "train_00000799"
    assert x.shape == (400, *m["input_shape"]) and x.dtype == np.float32
    with pytest.raises(UserError, match="has 6 shards"):
        load_split(tiny_synthetic, "train", shard_indices=[6])
    with pytest.raises(UserError, match="no split 'unlabelled'"):
        load_split(tiny_synthetic, "unlabelled")


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------

def test_intact_dataset_verifies(dataset, capsys):
    code, out, _ = run_cli(["data", "verify", dataset, "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    assert report["checked"] == 9 and report["damaged"] == 0 and report["damaged_shards"] == []
    assert report["samples"] == report["expected"] == {"train": 1080, "val": 120, "test": 400}


def test_one_flipped_byte_fails_verify_and_names_the_shard(dataset, capsys):
    path = os.path.join(dataset, "train-000003.tar")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01  # inside a sample's payload: still decodable, checksum differs
    open(path, "wb").write(bytes(data))
    code, out, _ = run_cli(["data", "verify", dataset], capsys)
    assert code == 1
    assert "DAMAGED train-000003.tar: sha256 mismatch" in out
    assert "9 shards checked, 1 damaged" in out
    assert out.count("DAMAGED") == 1
    code, out, _ = run_cli(["data", "verify", dataset, "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["damaged_shards"] == ["train-000003.tar"] and report["samples"]["train"] == 880


def test_truncated_and_missing_shards_are_named(dataset, capsys):
    trunc = os.path.join(dataset, "test-000001.tar")
    data = open(trunc, "rb").read()
    open(trunc, "wb").write(data[: len(data) // 3])
    os.remove(os.path.join(dataset, "val-000000.tar"))
    report = verify_dataset(dataset, progress=False)
    assert report["ok"] is False and report["damaged"] == 2
    assert report["problems"]["val-000000.tar"] == "missing"
    assert "not decodable" in report["problems"]["test-000001.tar"]
    assert "truncated" in report["problems"]["test-000001.tar"]
    code, out, _ = run_cli(["data", "verify", dataset], capsys)
    assert code == 1 and "DAMAGED test-000001.tar" in out and "DAMAGED val-000000.tar: missing" in out


def test_a_shard_swapped_for_another_splits_shard_is_caught(dataset):
    # Right format and decodable, but not the bytes the manifest promises.
    shutil.copy(os.path.join(dataset, "test-000000.tar"), os.path.join(dataset, "train-000000.tar"))
    report = verify_dataset(dataset, progress=False)
    why = report["problems"]["train-000000.tar"]
    assert "sha256 mismatch" in why and "does not belong to split 'train'" in why


def test_verify_of_a_folder_without_dataset_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["data", "verify", str(tmp_path / "empty")], capsys)
    assert code == 2
    assert f"{tmp_path / 'empty'}: no dataset here (manifest.json not found)" in err
    assert "Traceback" not in err


def test_verify_of_a_broken_manifest_exits_2(dataset, capsys):
    open(os.path.join(dataset, "manifest.json"), "w").write('{"num_classes": 3')
    code, _, err = run_cli(["data", "verify", dataset], capsys)
    assert code == 2 and "manifest.json: not valid JSON" in err
    open(os.path.join(dataset, "manifest.json"), "w").write('{"num_classes": 3, "splits": {}}')
    code, _, err = run_cli(["data", "verify", dataset], capsys)
    assert code == 2 and "missing key 'class_names'" in err


def test_verify_accepts_the_manifest_path_itself(dataset):
    assert verify_dataset(os.path.join(dataset, "manifest.json"), progress=False)["ok"]
