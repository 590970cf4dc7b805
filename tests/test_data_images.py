"""Encoded-image datasets: `data ingest --format folder` keeps each file's JPEG/PNG/WebP bytes in the
shards, names every unreadable file, and `data verify` decodes every image."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from _data_helpers import run_cli
from _image_helpers import HAVE_FASHION, truncate_file, write_fashion_folder
from pipeline.data.ingest import ingest
from pipeline.data.shards import decode_shard, load_split, read_manifest, verify_dataset

needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion") / "imgs"
    counts = write_fashion_folder(root, n_train=400, n_test=100)
    return root, counts


@needs_fashion
def test_fashion_jpegs_and_pngs_of_mixed_sizes_are_kept_encoded(fashion_folder, tmp_path):
    from PIL import Image

    root, counts = fashion_folder
    out = tmp_path / "ds"
    m = ingest(str(root), str(out), "folder", val_fraction=0.1, shard_size=128, progress=False)
    assert m["encoding"] == "image" and m["image_format"] == "mixed" and m["dtype"] == "uint8"
    assert m["image_formats"] == {"jpeg": 375, "png": 125}
    assert m["input_shape"][0] == 3 and 32 <= m["input_shape"][1] <= 48  # RGB among them; a common size
    assert m["image_size"]["min"] >= [32, 32] and m["image_size"]["max"] <= [48, 48]
    counts_ = {s: v["num_samples"] for s, v in m["splits"].items()}
    assert counts_["train"] + counts_["val"] == 400 and 35 <= counts_["val"] <= 45 and counts_["test"] == 100
    assert m["class_names"][:3] == ["bag", "boot", "coat"] and m["num_classes"] == 10

    # every sample is its file's own bytes, under the WebDataset extension of its format
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                files[f.read()] = n.rsplit(".", 1)[1]
    x, y, keys = load_split(str(out), "train")
    assert x.dtype == object and x.shape == (counts_["train"],) and len(keys) == len(x) and y.min() >= 0
    assert all(isinstance(b, bytes) and b in files for b in x)
    with open(out / m["splits"]["test"]["shards"][0]["path"], "rb") as f:
        data = f.read()
    import tarfile

    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert names[:2] == ["test_00000000.cls", f"test_00000000.{files[decode_shard(data)[0][0]]}"]
    with Image.open(io.BytesIO(x[0])) as im:
        im.load()

    # shards: no more than twice the files plus tar's own overhead (3 blocks/sample + end of archive)
    shard_bytes = sum(s["size"] for v in m["splits"].values() for s in v["shards"])
    n_shards = sum(len(v["shards"]) for v in m["splits"].values())
    overhead = 500 * 3 * 512 + n_shards * 10240
    assert shard_bytes <= 2 * counts["bytes"] + overhead
    assert verify_dataset(str(out), progress=False)["ok"]


@needs_fashion
def test_ingest_of_images_is_deterministic_and_a_rerun_writes_nothing(fashion_folder, tmp_path):
    root, _ = fashion_folder
    a = ingest(str(root), str(tmp_path / "a"), "folder", shard_size=200, progress=False)
    b = ingest(str(root), str(tmp_path / "b"), "folder", shard_size=200, progress=False)
    sha = lambda m: [s["sha256"] for v in m["splits"].values() for s in v["shards"]]  # noqa: E731
    assert sha(a) == sha(b)
    again = ingest(str(root), str(tmp_path / "a"), "folder", shard_size=200, progress=False)
    assert again == a


def test_every_corrupt_image_is_named_and_nothing_is_written(tmp_path, capsys):
    from _data_helpers import make_image_folder
    from PIL import Image

    make_image_folder(tmp_path / "imgs", per_class=(4, 2), size=(20, 16), mode="RGB")
    good = tmp_path / "imgs" / "train" / "cat" / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(good, quality=95)
    half = tmp_path / "imgs" / "train" / "cat" / "half.jpg"
    half.write_bytes(good.read_bytes())
    truncate_file(half, 0.5)
    junk = tmp_path / "imgs" / "test" / "dog" / "junk.png"
    junk.write_bytes(b"this is not a png at all")
    empty = tmp_path / "imgs" / "train" / "eel" / "empty.webp"
    empty.write_bytes(b"")
    # an intact dataset already in OUT survives the failed ingest
    out = tmp_path / "ds"
    before = ingest("", str(out), "synthetic", synthetic_overrides={"train": 200, "test": 50, "dim": 4}, progress=False)
    code, _, err = run_cli(["data", "ingest", tmp_path / "imgs", out, "--format", "folder"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "3 of 22 image file(s) cannot be read or decoded" in err
    for bad in (half, junk, empty):
        assert str(bad) in err
    assert str(good) + ":" not in err and "nothing was written" in err
    assert read_manifest(str(out)) == before and verify_dataset(str(out), progress=False)["ok"]


def test_other_formats_are_stored_as_png_and_modes_are_kept(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("a", "b"):
            d = tmp_path / "imgs" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (9 + i, 11, 4), dtype=np.uint8)
                im = Image.fromarray(arr, "RGBA")
                if i % 3 == 0:
                    im.convert("RGB").save(d / f"{i}.bmp")
                elif i % 3 == 1:
                    im.convert("P").save(d / f"{i}.gif")
                else:
                    im.save(d / f"{i}.webp", lossless=True)
    m = ingest(str(tmp_path / "imgs"), str(tmp_path / "ds"), "folder", progress=False)
    assert m["image_formats"] == {"png": 12, "webp": 4}
    x, _, _ = load_split(str(tmp_path / "ds"), "train")
    kinds = {b[:4] for b in x}
    assert kinds <= {b"\x89PNG", b"RIFF"}
    assert verify_dataset(str(tmp_path / "ds"), progress=False)["ok"]


def test_verify_names_a_shard_whose_image_does_not_decode(tmp_path, capsys):
    """A damaged image inside a shard whose manifest entry was updated to match (so only decoding
    can tell): `data verify` exits 1 naming the shard and the sample."""
    from _data_helpers import make_image_folder

    from pipeline import storage
    from pipeline.data.shards import encode_image_shard

    make_image_folder(tmp_path / "imgs", per_class=(5, 2), size=(12, 10))
    out = tmp_path / "ds"
    m = ingest(str(tmp_path / "imgs"), str(out), "folder", shard_size=100, progress=False)
    entry = m["splits"]["test"]["shards"][0]
    x, y, keys = decode_shard((out / entry["path"]).read_bytes())
    blobs = list(x)
    blobs[1] = blobs[1][:40]  # cut inside the pixel data
    data = encode_image_shard(blobs, ["png"] * len(blobs), y, keys)
    (out / entry["path"]).write_bytes(data)
    entry.update(sha256=storage.sha256_bytes(data), size=len(data))
    (out / "manifest.json").write_text(json.dumps(m))
    code, stdout, _ = run_cli(["data", "verify", out], capsys)
    assert code == 1
    assert f"DAMAGED {entry['path']}" in stdout and "1 image(s) not decodable" in stdout and keys[1] in stdout


def test_image_shards_are_read_by_webdataset(tmp_path):
    import webdataset as wds

    from _data_helpers import make_image_folder

    make_image_folder(tmp_path / "imgs", per_class=(3, 2), size=(12, 10))
    out = tmp_path / "ds"
    m = ingest(str(tmp_path / "imgs"), str(out), "folder", progress=False)
    shard = str(out / m["splits"]["train"]["shards"][0]["path"])
    samples = list(wds.WebDataset(shard, shardshuffle=False).decode("pil").to_tuple("png", "cls"))
    assert len(samples) == m["splits"]["train"]["num_samples"]
    assert samples[0][0].size == (12, 10) and isinstance(samples[0][1], int)


@pytest.mark.s3
def test_an_image_folder_in_a_bucket_gives_the_same_shards_as_on_disk(s3_bucket, tmp_path, capsys):
    from _data_helpers import make_image_folder
    from PIL import Image

    from pipeline import storage

    make_image_folder(tmp_path / "imgs", per_class=(6, 2), size=(12, 10), mode="RGB")
    Image.fromarray(np.zeros((20, 14, 3), np.uint8)).save(tmp_path / "imgs" / "train" / "cat" / "big.jpg")
    fs, _ = storage.get_fs(s3_bucket)
    fs.put(str(tmp_path / "imgs"), f"{s3_bucket[5:]}/raw", recursive=True)
    src = f"{s3_bucket}/raw"
    assert storage.isdir(f"{src}/train/cat")
    local = ingest(str(tmp_path / "imgs"), str(tmp_path / "ds"), "folder", shard_size=8, progress=False)
    remote = ingest(src, f"{s3_bucket}/ds", "folder", shard_size=8, progress=False)
    sha = lambda m: [s["sha256"] for v in m["splits"].values() for s in v["shards"]]  # noqa: E731
    assert sha(local) == sha(remote) and remote["image_formats"] == {"jpeg": 1, "png": 24}
    assert verify_dataset(f"{s3_bucket}/ds", progress=False)["ok"]
    # a corrupt object in the bucket is named by its s3:// URI
    fs.pipe(f"{s3_bucket[5:]}/raw/test/dog/bad.png", b"junk")
    code, _, err = run_cli(["data", "ingest", src, f"{s3_bucket}/ds2", "--format", "folder"], capsys)
    assert code == 2 and f"{src}/test/dog/bad.png: not an image format" in err
    assert not storage.exists(f"{s3_bucket}/ds2/manifest.json")
