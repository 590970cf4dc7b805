"""Small raw datasets in the real on-disk layouts (IDX, CIFAR python tarballs, npz, image folders),
generated inside the tests, plus a helper to run the `distill` CLI in-process."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile

import numpy as np

from pipeline.cli import main

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
HAVE_FASHION = os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


def write_idx(path, arr: np.ndarray) -> None:
    data = idx_bytes(arr)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if str(path).endswith(".gz") else data)


def make_idx_dir(folder, n_train=300, n_test=100, num_classes=10, size=28, seed=0, gz=True):
    """An MNIST-format folder; returns {split: (images (N, H, W), labels)}."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        y = (np.arange(n) % num_classes).astype(np.uint8)
        rng.shuffle(y)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), x)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), y)
        out[split] = (x, y.astype(np.int64))
    return out


def _py2_style_pickle(obj) -> bytes:
    # Protocol 2 like the original (Python 2) CIFAR files, with their numpy global names.
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_cifar10_tarball(path, per_batch=20, batches=5, n_test=30, seed=0):
    """A cifar-10-python.tar.gz look-alike; returns {split: (x (N,3,32,32), y)} in file order."""
    rng = np.random.default_rng(seed)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    xs, ys = [], []
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "cifar-10-batches-py/batches.meta",
             _py2_style_pickle({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}))
        for b in range(1, batches + 1):
            x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            y = [int(v) for v in rng.integers(0, 10, per_batch)]
            _add(tf, f"cifar-10-batches-py/data_batch_{b}",
                 _py2_style_pickle({b"batch_label": b"training batch", b"labels": y, b"data": x,
                                    b"filenames": [b"f.png"] * per_batch}))
            xs.append(x)
            ys.extend(y)
        xt = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
        yt = [int(v) for v in rng.integers(0, 10, n_test)]
        _add(tf, "cifar-10-batches-py/test_batch",
             _py2_style_pickle({b"batch_label": b"testing batch", b"labels": yt, b"data": xt}))
    return {"train": (np.concatenate(xs).reshape(-1, 3, 32, 32), np.array(ys)),
            "test": (xt.reshape(-1, 3, 32, 32), np.array(yt))}


def make_cifar100_tarball(path, n_train=200, n_test=50, seed=0):
    """A cifar-100-python.tar.gz look-alike with 10 fine classes in 5 coarse groups (2 each)."""
    rng = np.random.default_rng(seed)
    fine = [f"fine{i}".encode() for i in range(10)]
    coarse = [f"coarse{i}".encode() for i in range(5)]
    coarse_of = [3, 0, 1, 4, 2, 0, 1, 2, 3, 4]
    out = {}
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "cifar-100-python/meta",
             _py2_style_pickle({b"fine_label_names": fine, b"coarse_label_names": coarse}))
        for split, n in (("train", n_train), ("test", n_test)):
            x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            y = [int(v) for v in np.arange(n) % 10]
            _add(tf, f"cifar-100-python/{split}",
                 _py2_style_pickle({b"fine_labels": y, b"coarse_labels": [coarse_of[v] for v in y], b"data": x}))
            out[split] = (x.reshape(-1, 3, 32, 32), np.array(y))
    groups = [sorted(i for i, c in enumerate(coarse_of) if c == g) for g in range(5)]
    return out, groups


def make_image_folder(root, classes=("cat", "dog", "eel"), per_class=(6, 3), size=(12, 10), mode="L", seed=0,
                      layout="split"):
    """PNG files as root/{train,test}/CLASS/*.png (layout "split") or root/CLASS/*.png ("flat")."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    splits = (("train", per_class[0]), ("test", per_class[1])) if layout == "split" else (("", per_class[0]),)
    for split, n in splits:
        for c in classes:
            d = os.path.join(root, split, c) if split else os.path.join(root, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                shape = (h, w) if mode == "L" else (h, w, 3)
                Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(
                    os.path.join(d, f"img{i:03d}.png"))


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `distill ARGV`, run in-process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
