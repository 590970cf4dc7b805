"""Folders of real encoded images for the image-dataset tests: Fashion-MNIST digits written as JPEG
and PNG files of varying sizes (the Debian package dataset-fashion-mnist), and damaged files."""
from __future__ import annotations

import gzip
import os

import numpy as np

from _data_helpers import FASHION_DIR, HAVE_FASHION

FASHION_FOLDERS = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def fashion_arrays(split: str = "train", n: int = 1000):
    """The first `n` Fashion-MNIST images (n, 28, 28) uint8 and labels of `split` ("train"/"test")."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz")) as f:
        x = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        y = np.frombuffer(f.read(), dtype=np.uint8, offset=8)[:n].astype(np.int64)
    return x, y


def write_fashion_folder(root, n_train: int = 400, n_test: int = 100, sizes=(32, 48), png_every: int = 4,
                         rgb_every: int = 3, seed: int = 0, layout: str = "split") -> dict:
    """Fashion-MNIST images as root/{train,test}/CLASS/NNNNN.jpg|png (layout "split") or
    root/CLASS/... ("flat"): each resized to its own random width and height in `sizes`, every
    `png_every`-th one a PNG (the rest JPEG, quality 90), every `rgb_every`-th one RGB (the rest
    greyscale); 0 means none. Returns {split: number of files} and the total bytes under "bytes"."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    counts, total, k = {}, 0, 0
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = fashion_arrays(split, n)
        for i in range(len(x)):
            w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            im = Image.fromarray(x[i]).resize((w, h), Image.BICUBIC)
            if rgb_every and k % rgb_every == 0:
                im = im.convert("RGB")
            folder = os.path.join(root, split, FASHION_FOLDERS[y[i]]) if layout == "split" else \
                os.path.join(root, FASHION_FOLDERS[y[i]])
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{split}{i:05d}.{'png' if png_every and k % png_every == 0 else 'jpg'}")
            if path.endswith(".png"):
                im.save(path, format="PNG")
            else:
                im.save(path, format="JPEG", quality=90)
            total += os.path.getsize(path)
            k += 1
        counts[split] = len(x)
    counts["bytes"] = total
    return counts


def truncate_file(path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes (a download that stopped half way)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: max(1, int(len(data) * keep))])


__all__ = ["FASHION_FOLDERS", "HAVE_FASHION", "fashion_arrays", "truncate_file", "write_fashion_folder"]
