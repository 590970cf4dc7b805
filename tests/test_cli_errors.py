"""Exit codes and messages of the CLI for bad input: 2 with a one-paragraph message naming the file
or key (no traceback) for a missing file, a wrong IDX magic number, labels out of range, a
truncated tar, an unknown config key; 1 when `data verify` finds damage."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from _data_helpers import idx_bytes, make_cifar10_tarball, make_idx_dir, make_image_folder, run_cli, write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def _expect_2(capsys, argv, *needles):
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    assert err.startswith("distill: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_source_file(tmp_path, capsys):
    missing = tmp_path / "nope"
    _expect_2(capsys, ["data", "ingest", missing, tmp_path / "out", "--format", "idx"],
              f"{missing}: no such file or directory")
    _expect_2(capsys, ["data", "ingest", tmp_path / "c.tar.gz", tmp_path / "out", "--format", "cifar"],
              f"{tmp_path / 'c.tar.gz'}: no such file")
    assert not (tmp_path / "out").exists()


def test_missing_file_inside_an_idx_folder(tmp_path, capsys):
    make_idx_dir(tmp_path / "src", n_train=20, n_test=10)
    os.remove(tmp_path / "src" / "t10k-labels-idx1-ubyte.gz")
    _expect_2(capsys, ["data", "ingest", tmp_path / "src", tmp_path / "out", "--format", "idx"],
              f"{tmp_path / 'src'}: no test labels file (t10k-labels-idx1-ubyte.gz or unzipped)")


def test_wrong_idx_magic_number(tmp_path, capsys):
    make_idx_dir(tmp_path / "src", n_train=20, n_test=10)
    bad = tmp_path / "src" / "train-images-idx3-ubyte.gz"
    raw = bytearray(idx_bytes(np.zeros((20, 28, 28), np.uint8)))
    raw[3] = 0x01  # "1 dimension": a labels file where images belong
    bad.write_bytes(gzip.compress(bytes(raw)))
    _expect_2(capsys, ["data", "ingest", tmp_path / "src", tmp_path / "out", "--format", "idx"],
              f"{bad}: wrong IDX magic number 0x00000801; expected 0x00000803")


def test_truncated_idx_file(tmp_path, capsys):
    make_idx_dir(tmp_path / "src", n_train=20, n_test=10, gz=False)
    f = tmp_path / "src" / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    _expect_2(capsys, ["data", "ingest", tmp_path / "src", tmp_path / "out", "--format", "idx"],
              f"{f}: header says (10, 28, 28) (7840 bytes of data) but the file holds 7740")


def test_labels_out_of_range(tmp_path, capsys):
    make_idx_dir(tmp_path / "src", n_train=40, n_test=10, num_classes=10)
    labels = np.zeros(10, np.uint8)
    labels[7] = 12
    bad = tmp_path / "src" / "t10k-labels-idx1-ubyte.gz"
    write_idx(bad, labels)
    _expect_2(capsys, ["data", "ingest", tmp_path / "src", tmp_path / "out", "--format", "idx"],
              f"{bad}: label 12 (sample 7) is out of range: labels must be 0..9 for the 10 classes")
    # in the training labels a stray large label leaves gaps in 0..max
    train = np.arange(40, dtype=np.uint8) % 10
    train[3] = 200
    write_idx(tmp_path / "src" / "train-labels-idx1-ubyte.gz", train)
    _expect_2(capsys, ["data", "ingest", tmp_path / "src", tmp_path / "out", "--format", "idx"],
              "train-labels-idx1-ubyte.gz: labels are not 0..200", "labels out of range?")


def test_labels_out_of_range_in_npz(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 2)), y_train=np.array([0, 1, 2, 5]),
             x_test=np.zeros((2, 2)), y_test=np.array([0, 1]), class_names=np.array(["a", "b", "c"]))
    _expect_2(capsys, ["data", "ingest", tmp_path / "d.npz", tmp_path / "out", "--format", "npz"],
              f"{tmp_path / 'd.npz'}:y_train: label 5 (sample 3) is out of range: labels must be 0..2")


def test_truncated_tar(tmp_path, capsys):
    full = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10_tarball(full, per_batch=50)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _expect_2(capsys, ["data", "ingest", cut, tmp_path / "out", "--format", "cifar"],
              f"{cut}: truncated or damaged tar archive", "download the CIFAR python tarball again")


def test_a_tar_that_is_not_cifar(tmp_path, capsys):
    import tarfile

    path = tmp_path / "other.tar"
    with tarfile.open(path, "w") as tf:
        tf.add(__file__, arcname="readme.txt")
    _expect_2(capsys, ["data", "ingest", path, tmp_path / "out", "--format", "cifar"],
              f"{path}: not a CIFAR-10/100 python tarball")


def test_unreadable_image_is_named(tmp_path, capsys):
    # Images of any size and mode are accepted (kept encoded); a file that is no image is named.
    make_image_folder(tmp_path / "imgs", per_class=(3, 2))
    odd = tmp_path / "imgs" / "test" / "cat" / "img999.png"
    odd.write_bytes(b"not a png")
    _expect_2(capsys, ["data", "ingest", tmp_path / "imgs", tmp_path / "out", "--format", "folder"],
              f"{odd}: not an image format Pillow can identify", "1 of 16 image file(s) cannot be read")


def test_bad_synthetic_setting(tmp_path, capsys):
    _expect_2(capsys, ["data", "ingest", "-", tmp_path / "out", "--format", "synthetic", "--synthetic", "groups=3"],
              "synthetic.groups: unknown key")
    _expect_2(capsys, ["data", "ingest", "-", tmp_path / "out", "--format", "synthetic", "--val-fraction", "0.95"],
              "--val-fraction 0.95: must be > 0 and < 0.9")


def test_unknown_format_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["data", "ingest", "-", tmp_path / "out", "--format", "parquet"], capsys)
    assert e.value.code == 2
    assert "invalid choice: 'parquet'" in capsys.readouterr().err


def test_config_show_with_an_unknown_key(capsys):
    _expect_2(capsys, ["config", "show", QUICKSTART, "no_such.key=1"],
              "no_such.key (command line): unknown key; valid keys at top level:")


def test_verify_finding_damage_exits_1(tmp_path, tiny_synthetic, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_synthetic, ds)
    shard = ds / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, err = run_cli(["data", "verify", ds], capsys)
    assert code == 1 and "DAMAGED val-000000.tar" in out and "Traceback" not in err


@pytest.mark.parametrize("argv,code,needle", [
    (["config", "show", QUICKSTART, "no_such.key=1"], 2, "no_such.key"),
    (["data", "ingest", "/nonexistent/fashion", "OUT", "--format", "idx"], 2, "/nonexistent/fashion: no such file"),
])
def test_the_installed_entry_point_exit_codes(argv, code, needle, tmp_path):
    """Through the console script / `python -m pipeline.cli` in a child process, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "distill")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "pipeline.cli"]
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    r = subprocess.run(cmd + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == code and needle in r.stderr and "Traceback" not in r.stderr
