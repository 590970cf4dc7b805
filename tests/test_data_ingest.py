"""`distill data ingest`: every source format, the splits, the synthetic generator's structure, and
the atomic / resumable writing of shards and manifest."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from _data_helpers import (FASHION_DIR, HAVE_FASHION, make_cifar10_tarball, make_cifar100_tarball,
                           make_idx_dir, make_image_folder, run_cli)
from pipeline import storage
from pipeline.config import SyntheticConfig, load_config
from pipeline.data.ingest import ingest, stratified_split
from pipeline.data.synthetic import make_synthetic
from pipeline.data.shards import load_split, read_manifest, verify_dataset
from pipeline.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shard_files(uri):
    """Published shards (temp files of an unfinished write start with a dot)."""
    return sorted(n for n in storage.listdir(uri) if n.endswith(".tar") and not n.startswith("."))


def _all_keys_unique(uri, m):
    for split in m["splits"]:
        _, _, keys = load_split(uri, split)
        assert len(keys) == len(set(keys)) == m["splits"][split]["num_samples"]
        assert keys == [f"{split}_{i:08d}" for i in range(len(keys))]


# ---------------------------------------------------------------------------------------------
# idx
# ---------------------------------------------------------------------------------------------

def test_idx_round_trip_with_a_stratified_seeded_val_split(tmp_path):
    raw = make_idx_dir(tmp_path / "src", n_train=400, n_test=120, num_classes=10)
    out = str(tmp_path / "ds")
    m = ingest(str(tmp_path / "src"), out, "idx", val_fraction=0.25, shard_size=64, seed=3, progress=False)
    assert m["num_classes"] == 10 and m["class_names"] == [str(i) for i in range(10)]
    assert m["input_shape"] == [1, 28, 28] and m["dtype"] == "uint8" and m["source_format"] == "idx"
    assert {s: m["splits"][s]["num_samples"] for s in m["splits"]} == {"train": 300, "val": 100, "test": 120}
    # stratified: every class gives a quarter of its 40 training samples to val
    assert m["splits"]["val"]["class_counts"] == [10] * 10
    assert [s["num_samples"] for s in m["splits"]["train"]["shards"]] == [64] * 4 + [44]
    # test keeps the source order, byte for byte
    xt, yt, _ = load_split(out, "test")
    np.testing.assert_array_equal(xt[:, 0], raw["test"][0])
    np.testing.assert_array_equal(yt, raw["test"][1])
    # train + val hold exactly the source's training images, each once
    xtr, ytr, _ = load_split(out, "train")
    xv, yv, _ = load_split(out, "val")
    got = sorted(zip([r.tobytes() for r in np.concatenate([xtr, xv]).reshape(400, -1)],
                     np.concatenate([ytr, yv]).tolist()))
    want = sorted(zip([r.tobytes() for r in raw["train"][0].reshape(400, -1)], raw["train"][1].tolist()))
    assert got == want
    _all_keys_unique(out, m)
    # same seed, same split; another seed, another split
    m2 = ingest(str(tmp_path / "src"), str(tmp_path / "ds2"), "idx", val_fraction=0.25, shard_size=64, seed=3,
                progress=False)
    assert [s["sha256"] for s in m2["splits"]["val"]["shards"]] == [s["sha256"] for s in m["splits"]["val"]["shards"]]
    m3 = ingest(str(tmp_path / "src"), str(tmp_path / "ds3"), "idx", val_fraction=0.25, shard_size=64, seed=4,
                progress=False)
    assert [s["sha256"] for s in m3["splits"]["val"]["shards"]] != [s["sha256"] for s in m["splits"]["val"]["shards"]]


def test_idx_unzipped_files_and_class_names_file(tmp_path):
    make_idx_dir(tmp_path / "src", n_train=50, n_test=20, num_classes=5, gz=False)
    (tmp_path / "src" / "class_names.txt").write_text("a\nb\nc\nd\ne\nf\n")
    m = ingest(str(tmp_path / "src"), str(tmp_path / "ds"), "idx", progress=False)
    assert m["class_names"] == ["a", "b", "c", "d", "e", "f"] and m["num_classes"] == 6


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_ingest_and_verify(tmp_path, capsys):
    out = str(tmp_path / "fashion")
    t0 = time.perf_counter()
    code, stdout, _ = run_cli(["data", "ingest", FASHION_DIR, out, "--format", "idx"], capsys)
    ingest_s = time.perf_counter() - t0
    assert code == 0, stdout
    m = read_manifest(out)
    assert m["splits"]["train"]["num_samples"] + m["splits"]["val"]["num_samples"] == 60000
    assert m["splits"]["test"]["num_samples"] == 10000
    assert m["class_names"][0] == "T-shirt/top" and m["input_shape"] == [1, 28, 28]
    assert m["splits"]["val"]["class_counts"] == [600] * 10
    t0 = time.perf_counter()
    code, stdout, _ = run_cli(["data", "verify", out, "--json"], capsys)
    verify_s = time.perf_counter() - t0
    report = json.loads(stdout)
    assert code == 0 and report["ok"] and report["damaged"] == 0 and report["checked"] == 15
    assert report["samples"] == {"train": 54000, "val": 6000, "test": 10000}
    print(f"fashion-mnist local: ingest {ingest_s:.1f}s, verify {verify_s:.1f}s")


# ---------------------------------------------------------------------------------------------
# cifar
# ---------------------------------------------------------------------------------------------

def test_cifar10_tarball(tmp_path):
    raw = make_cifar10_tarball(tmp_path / "cifar-10-python.tar.gz", per_batch=20, batches=5, n_test=30)
    out = str(tmp_path / "ds")
    m = ingest(str(tmp_path / "cifar-10-python.tar.gz"), out, "cifar", val_fraction=0.2, shard_size=32, progress=False)
    assert m["name"] == "cifar-10" and m["class_names"][:2] == ["airplane", "automobile"]
    assert m["input_shape"] == [3, 32, 32] and m["dtype"] == "uint8"
    assert m["splits"]["train"]["num_samples"] + m["splits"]["val"]["num_samples"] == 100
    xt, yt, _ = load_split(out, "test")
    np.testing.assert_array_equal(xt, raw["test"][0])
    np.testing.assert_array_equal(yt, raw["test"][1])
    assert verify_dataset(out, progress=False)["ok"]


def test_cifar100_tarball_records_the_coarse_groups(tmp_path):
    _, groups = make_cifar100_tarball(tmp_path / "c100.tar.gz")
    m = ingest(str(tmp_path / "c100.tar.gz"), str(tmp_path / "ds"), "cifar", progress=False)
    assert m["name"] == "cifar-100" and m["num_classes"] == 10
    assert m["class_groups"] == groups
    assert m["group_names"] == [f"coarse{i}" for i in range(5)]


def test_cifar_loader_refuses_pickles_that_call_anything(tmp_path):
    """A tampered tarball whose batch would run code when unpickled is rejected, and nothing runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, obj in (("cifar-10-batches-py/batches.meta", {b"label_names": [b"a", b"b"]}),
                          ("cifar-10-batches-py/data_batch_1", {b"data": Evil(), b"labels": [0]}),
                          ("cifar-10-batches-py/test_batch", {b"data": Evil(), b"labels": [0]})):
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            import io

            tf.addfile(info, io.BytesIO(blob))
    with pytest.raises(UserError) as e:
        ingest(str(path), str(tmp_path / "ds"), "cifar", progress=False)
    assert "refusing to load global" in str(e.value) and "data_batch_1" in str(e.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# npz, folder, digits
# ---------------------------------------------------------------------------------------------

def test_npz_images_with_its_own_val_split_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.integers(0, 256, (n, 10, 12), dtype=np.uint8) for s, n in
              (("train", 40), ("val", 12), ("test", 9))}
    arrays.update({f"y_{s}": np.arange(len(arrays[f"x_{s}"])) % 3 for s in ("train", "val", "test")})
    np.savez(tmp_path / "d.npz", class_names=np.array(["r", "g", "b"]), **arrays)
    out = str(tmp_path / "ds")
    m = ingest(str(tmp_path / "d.npz"), out, "npz", shard_size=16, progress=False)
    assert m["class_names"] == ["r", "g", "b"] and m["input_shape"] == [1, 10, 12]
    assert {s: v["num_samples"] for s, v in m["splits"].items()} == {"train": 40, "val": 12, "test": 9}
    xv, yv, _ = load_split(out, "val")  # the source's val, not carved (shuffled by the seed)
    assert sorted(r.tobytes() for r in xv[:, 0]) == sorted(r.tobytes() for r in arrays["x_val"])


def test_npz_float_vectors_and_channels_last_images(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "v.npz", x_train=rng.standard_normal((30, 5)), y_train=np.arange(30) % 2,
             x_test=rng.standard_normal((8, 5)), y_test=np.arange(8) % 2)
    m = ingest(str(tmp_path / "v.npz"), str(tmp_path / "v"), "npz", progress=False)
    assert m["dtype"] == "float32" and m["input_shape"] == [5] and m["num_classes"] == 2
    np.savez(tmp_path / "hwc.npz", x_train=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), y_train=np.arange(20) % 4,
             x_test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), y_test=np.arange(4))
    m = ingest(str(tmp_path / "hwc.npz"), str(tmp_path / "hwc"), "npz", progress=False)
    assert m["input_shape"] == [3, 8, 8]


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "o.npz", x_train=np.array([{"a": 1}] * 4, dtype=object), y_train=np.arange(4),
             x_test=np.zeros((2, 3)), y_test=np.arange(2))
    with pytest.raises(UserError) as e:
        ingest(str(tmp_path / "o.npz"), str(tmp_path / "ds"), "npz", progress=False)
    assert "o.npz" in str(e.value) and "unpickling" in str(e.value)


def test_npz_missing_arrays_are_named(tmp_path):
    np.savez(tmp_path / "m.npz", x_train=np.zeros((4, 3)), y_train=np.arange(4))
    with pytest.raises(UserError, match=r"m\.npz: missing array\(s\) x_test, y_test"):
        ingest(str(tmp_path / "m.npz"), str(tmp_path / "ds"), "npz", progress=False)


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_image_folder_with_train_and_test(tmp_path, mode, channels):
    make_image_folder(tmp_path / "imgs", mode=mode, per_class=(10, 4), size=(12, 10))
    m = ingest(str(tmp_path / "imgs"), str(tmp_path / "ds"), "folder", val_fraction=0.2, progress=False)
    assert m["class_names"] == ["cat", "dog", "eel"] and m["input_shape"] == [channels, 10, 12]
    assert {s: v["num_samples"] for s, v in m["splits"].items()} == {"train": 24, "val": 6, "test": 12}
    assert verify_dataset(str(tmp_path / "ds"), progress=False)["ok"]


def test_flat_image_folder_carves_test_and_val(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=(10,), layout="flat")
    m = ingest(str(tmp_path / "imgs"), str(tmp_path / "ds"), "folder", val_fraction=0.25, progress=False)
    assert {s: v["num_samples"] for s, v in m["splits"].items()} == {"train": 18, "val": 6, "test": 6}


def test_image_folder_accepts_images_of_any_size_and_mode(tmp_path):
    from PIL import Image

    make_image_folder(tmp_path / "imgs", per_class=(3, 2), size=(12, 10))
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "train" / "dog" / "zz_odd.png")
    m = ingest(str(tmp_path / "imgs"), str(tmp_path / "ds"), "folder", progress=False)
    # one colour image makes the dataset RGB; the most common size is the nominal input size
    assert m["encoding"] == "image" and m["input_shape"] == [3, 10, 12]
    assert m["image_size"] == {"min": [10, 12], "max": [16, 16]} and m["image_format"] == "png"
    assert verify_dataset(str(tmp_path / "ds"), progress=False)["ok"]


def test_digits(tmp_path):
    m = ingest("-", str(tmp_path / "ds"), "digits", progress=False)
    counts = {s: v["num_samples"] for s, v in m["splits"].items()}
    assert sum(counts.values()) == 1797 and m["num_classes"] == 10
    assert m["input_shape"] == [1, 8, 8] and m["dtype"] == "uint8"
    x, y, _ = load_split(str(tmp_path / "ds"), "train")
    assert x.max() == 255 and set(np.unique(y)) == set(range(10))


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------

def test_synthetic_manifest_records_the_ground_truth_groups(tmp_path):
    m = ingest("", str(tmp_path / "ds"), "synthetic", shard_size=500, progress=False,
               synthetic_overrides=["num_classes=10", "num_groups=3", "train=900", "test=300", "dim=16"])
    groups = m["class_groups"]
    assert sorted(c for g in groups for c in g) == list(range(10))
    assert sorted(len(g) for g in groups) == [3, 3, 4]
    assert groups != [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]  # seeded assignment, not index ranges
    assert m["dtype"] == "float32" and m["input_shape"] == [16]
    assert m["synthetic"]["num_groups"] == 3 and m["splits"]["test"]["num_samples"] == 300


def test_synthetic_is_seeded():
    a, ga = make_synthetic(SyntheticConfig(train=200, test=50, dim=8))
    b, gb = make_synthetic(SyntheticConfig(train=200, test=50, dim=8))
    c, _ = make_synthetic(SyntheticConfig(train=200, test=50, dim=8, seed=1))
    assert ga == gb
    np.testing.assert_array_equal(a["train"][0], b["train"][0])
    assert not np.array_equal(a["train"][0], c["train"][0])


def _confusions(difficulty: float):
    from sklearn.neural_network import MLPClassifier

    cfg = SyntheticConfig(num_classes=9, num_groups=3, train=2700, test=900, dim=24, difficulty=difficulty)
    splits, groups = make_synthetic(cfg)
    group_of = {c: g for g, members in enumerate(groups) for c in members}
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=60, random_state=0).fit(*splits["train"])
    pred = clf.predict(splits["test"][0])
    y = splits["test"][1]
    wrong = pred != y
    within = sum(group_of[p] == group_of[t] for p, t in zip(pred[wrong], y[wrong]))
    return 1 - wrong.mean(), within, int(wrong.sum())


def test_synthetic_classes_are_confused_within_groups_not_across(recwarn):
    acc, within, errors = _confusions(1.0)
    assert acc > 3 / 9  # three times chance
    assert errors > 0 and within / errors > 0.95  # nearly every error stays inside the true group
    harder, _, _ = _confusions(2.5)
    assert harder < acc - 0.05  # difficulty controls within-group overlap


@pytest.mark.slow
def test_a_specialist_beats_the_generalist_on_its_group():
    """The property the whole pipeline relies on: fine-tuning on one group's data (plus as many
    others) improves accuracy among that group's classes over the generalist it started from."""
    import copy

    import torch
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    try:
        _specialist_vs_generalist(torch, nn, copy)
    finally:
        torch.set_num_threads(threads)


def _specialist_vs_generalist(torch, nn, copy):
    torch.manual_seed(0)
    cfg = SyntheticConfig()  # the quickstart's generator settings
    splits, groups = make_synthetic(cfg)
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]

    def fit(model, x, y, epochs, lr):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        X, Y = torch.from_numpy(x), torch.from_numpy(y)
        gen = torch.Generator().manual_seed(1)
        for _ in range(epochs):
            perm = torch.randperm(len(X), generator=gen)
            for i in range(0, len(X), 128):
                b = perm[i:i + 128]
                opt.zero_grad()
                nn.functional.cross_entropy(model(X[b]), Y[b]).backward()
                opt.step()
        return model.eval()

    def predict_within(model, x, members):
        with torch.no_grad():
            return np.asarray(members)[model(torch.from_numpy(x))[:, members].argmax(1).numpy()]

    gen = fit(nn.Sequential(nn.Linear(cfg.dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                            nn.Linear(128, cfg.num_classes)), xtr, ytr, epochs=8, lr=1e-3)
    with torch.no_grad():
        gen_acc = (gen(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean()
    assert gen_acc > 4 / cfg.num_classes
    gains = []
    rng = np.random.default_rng(0)
    for members in groups:
        inside = np.isin(ytr, members)
        idx = np.concatenate([np.flatnonzero(inside), rng.choice(np.flatnonzero(~inside), inside.sum(), replace=False)])
        spec = fit(copy.deepcopy(gen), xtr[idx], ytr[idx], epochs=8, lr=5e-4)
        test = np.isin(yte, members)
        g = (predict_within(gen, xte[test], members) == yte[test]).mean()
        s = (predict_within(spec, xte[test], members) == yte[test]).mean()
        gains.append(s - g)
    print(f"generalist test accuracy {gen_acc:.3f}; specialist gains within groups {np.round(gains, 3).tolist()}")
    assert np.mean(gains) > 0.01, gains


def test_bad_synthetic_settings_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"synthetic\.num_clases: unknown key; valid keys: .*num_classes"):
        ingest("", str(tmp_path / "ds"), "synthetic", synthetic_overrides=["num_clases=3"], progress=False)
    with pytest.raises(UserError, match=r"synthetic\.num_groups: 5 groups for 3 classes"):
        ingest("", str(tmp_path / "ds"), "synthetic", synthetic_overrides={"num_classes": 3, "num_groups": 5},
               progress=False)
    with pytest.raises(UserError, match=r"synthetic\.difficulty"):
        ingest("", str(tmp_path / "ds"), "synthetic", synthetic_overrides=["difficulty=-1"], progress=False)


def test_stratified_split_takes_the_fraction_of_each_class():
    y = np.repeat(np.arange(4), [10, 20, 40, 1])
    keep, take = stratified_split(y, 0.25, seed=0)
    assert np.bincount(y[take], minlength=4).tolist() == [2, 5, 10, 0]  # round(2.5)=2; a singleton stays
    assert len(np.intersect1d(keep, take)) == 0 and len(keep) + len(take) == len(y)


# ---------------------------------------------------------------------------------------------
# atomic writes, reruns, interruptions
# ---------------------------------------------------------------------------------------------

SMALL = {"num_classes": 6, "num_groups": 2, "train": 600, "test": 200, "dim": 8}


def test_rerun_of_a_finished_ingest_writes_nothing(tmp_path, monkeypatch):
    out = str(tmp_path / "ds")
    m1 = ingest("", out, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    writes = []
    monkeypatch.setattr(storage, "write_bytes_atomic", lambda *a, **k: writes.append(a))
    m2 = ingest("", out, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    assert writes == [] and m2 == m1


def test_interrupted_ingest_leaves_no_manifest_and_a_rerun_finishes_without_duplicates(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "ds")
    real = storage.write_bytes_atomic
    calls = []

    def crash_after_three(uri, data):
        calls.append(uri)
        if len(calls) > 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-ingest
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        ingest("", out, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    partial = _shard_files(out)
    assert 1 <= len(partial) <= 3 and not [n for n in os.listdir(out) if n.startswith(".tmp")]
    with pytest.raises(UserError, match="no dataset here"):
        read_manifest(out)

    m = ingest("", out, "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    assert f"kept {len(partial)} already complete" in capsys.readouterr().err
    names = [s["path"] for v in m["splits"].values() for s in v["shards"]]
    assert _shard_files(out) == sorted(names)
    assert verify_dataset(out, progress=False)["ok"]
    _all_keys_unique(out, m)


def test_reingest_with_other_settings_replaces_the_dataset_and_its_stale_shards(tmp_path):
    out = str(tmp_path / "ds")
    ingest("", out, "synthetic", shard_size=50, synthetic_overrides=SMALL, progress=False)
    assert len(_shard_files(out)) == 11 + 2 + 4
    m = ingest("", out, "synthetic", shard_size=300, synthetic_overrides=SMALL, progress=False)
    assert _shard_files(out) == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert m["ingest"]["shard_size"] == 300 and verify_dataset(out, progress=False)["ok"]


def test_a_failing_source_leaves_an_existing_dataset_alone(tmp_path):
    out = str(tmp_path / "ds")
    m = ingest("", out, "synthetic", shard_size=300, synthetic_overrides=SMALL, progress=False)
    with pytest.raises(UserError):
        ingest(str(tmp_path / "nowhere"), out, "idx", progress=False)
    assert read_manifest(out) == m and verify_dataset(out, progress=False)["ok"]


@pytest.mark.slow
def test_sigkill_mid_ingest_then_rerun(tmp_path):
    """A real crash: kill -9 the CLI while it writes shards. Only complete shards are visible (temp
    names aside), there is no manifest, and a rerun completes the dataset without duplicates."""
    out = str(tmp_path / "ds")
    cmd = [sys.executable, "-m", "pipeline.cli", "data", "ingest", "-", out, "--format", "synthetic",
           "--shard-size", "500", "--synthetic", "train=60000", "test=2000", "dim=256"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(out) and len(_shard_files(out)) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "ingest finished before it could be killed; make the data bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    visible = _shard_files(out)
    assert visible
    from pipeline.data.shards import load_shard

    for name in visible:  # every visible shard is whole
        x, _, keys = load_shard(os.path.join(out, name))
        assert len(keys) == 500 and x.shape == (500, 256)
    code = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    assert code == 0
    m = read_manifest(out)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    assert len(_shard_files(out)) == sum(len(v["shards"]) for v in m["splits"].values())
    report = verify_dataset(out, progress=False)
    assert report["ok"] and report["samples"] == {"train": 54000, "val": 6000, "test": 2000}


# ---------------------------------------------------------------------------------------------
# the data stage
# ---------------------------------------------------------------------------------------------

def test_data_stage_ingests_then_is_skipped_and_reuses_a_shared_dataset(tmp_path):
    from pipeline import runner
    from pipeline.stages import data as data_stage

    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      [f"output_dir={tmp_path / 'run'}", "data.synthetic.train=600", "data.synthetic.test=200",
                       "data.shard_size=200"])
    res = runner.run_stage(cfg, "data")
    assert res["skipped"] is False and res["train"] == 540 and res["val"] == 60 and res["test"] == 200
    assert json.loads((tmp_path / "run" / "data" / "metrics.json").read_text())["num_classes"] == 12
    assert runner.run_stage(cfg, "data")["skipped"] is True
    fp = data_stage.fingerprint(cfg)
    assert data_stage.fingerprint(load_config(None, [f"output_dir={tmp_path / 'run'}"])) != fp

    # A dataset ingested elsewhere (other settings than this config's) is used as it is.
    uri = str(tmp_path / "shared")
    ingest("", uri, "synthetic", shard_size=200, synthetic_overrides=SMALL, progress=False)
    before = {n: os.path.getmtime(os.path.join(uri, n)) for n in os.listdir(uri)}
    counts = data_stage.run(load_config(None, [f"output_dir={tmp_path / 'run2'}", f"data.uri={uri}"]))
    assert counts == {"train": 540, "val": 60, "test": 200, "num_classes": 6}
    assert {n: os.path.getmtime(os.path.join(uri, n)) for n in before} == before


def test_data_stage_refuses_a_shared_dataset_with_missing_shards(tmp_path):
    from pipeline.stages import data as data_stage

    uri = str(tmp_path / "shared")
    ingest("", uri, "synthetic", shard_size=200, synthetic_overrides=SMALL, progress=False)
    os.remove(os.path.join(uri, "train-000001.tar"))
    with pytest.raises(UserError, match="missing or have the wrong size"):
        data_stage.run(load_config(None, [f"output_dir={tmp_path / 'run'}", f"data.uri={uri}"]))



# ---------------------------------------------------------------------------------------------
# streaming: the carve, the generator, memory
# ---------------------------------------------------------------------------------------------

def test_streaming_carve_is_exactly_stratified_and_seeded():
    from pipeline.data.ingest import StreamingCarve, _take_count

    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=5000)
    y[y == 6] = 5  # class 6 absent
    y[0] = 6  # ... but for one singleton, which stays in train
    counts = np.bincount(y, minlength=7)
    blocks = np.array_split(y, 13)

    def run(seed):
        carve = StreamingCarve(counts, 0.15, seed)
        return np.concatenate([carve(b) for b in blocks])

    a, b, c = run(3), run(3), run(4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert np.bincount(y[a], minlength=7).tolist() == [_take_count(int(n), 0.15) for n in counts]
    assert not a[0]
    # every sample is about equally likely to be taken, wherever it is in the stream
    hits = np.mean([run(s)[y == 1] for s in range(60)], axis=0)
    assert abs(hits[: len(hits) // 2].mean() - hits[len(hits) // 2:].mean()) < 0.02


def test_synthetic_data_do_not_depend_on_the_shard_size(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ingest("", a, "synthetic", shard_size=70, synthetic_overrides=SMALL, progress=False)
    ingest("", b, "synthetic", shard_size=1000, synthetic_overrides=SMALL, progress=False)
    for split in ("train", "val", "test"):
        xa, ya, ka = load_split(a, split)
        xb, yb, kb = load_split(b, split)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert ka == kb


def test_synthetic_generator_streams_what_make_synthetic_returns():
    from pipeline.data.synthetic import SYNTHETIC_BLOCK, SyntheticGenerator

    cfg = SyntheticConfig(train=2 * SYNTHETIC_BLOCK + 10, test=20, dim=8)
    gen = SyntheticGenerator(cfg)
    blocks = list(gen.blocks("train"))
    assert [len(y) for _, y in blocks] == [SYNTHETIC_BLOCK, SYNTHETIC_BLOCK, 10]
    labels = np.concatenate(list(gen.labels("train")))
    np.testing.assert_array_equal(labels, np.concatenate([y for _, y in blocks]))
    assert np.bincount(labels).max() - np.bincount(labels).min() <= 1  # balanced over the split
    whole, _ = make_synthetic(cfg)
    np.testing.assert_array_equal(whole["train"][0], np.concatenate([x for x, _ in blocks]))


_PEAK_RSS = r"""
import resource, sys
from pipeline.cli import main
code = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def _ingest_peak_mb(out, train, test, dim=512, shard_size=1000):
    cmd = [sys.executable, "-c", _PEAK_RSS, "data", "ingest", "-", str(out), "--format", "synthetic",
           "--shard-size", str(shard_size), "--synthetic", f"train={train}", f"test={test}", f"dim={dim}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split("PEAK_KB")[1].split()[0]) / 1024


@pytest.mark.slow
def test_ingest_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak RSS of `distill data ingest --format synthetic` at ~62 MB and ~250 MB of float32 inputs
    (4x the samples). The old whole-array ingest peaked at ~9x the data: +1.7 GB between these sizes."""
    small = _ingest_peak_mb(tmp_path / "small", 24_000, 6_000)
    import shutil

    shutil.rmtree(tmp_path / "small")
    big = _ingest_peak_mb(tmp_path / "big", 96_000, 24_000)
    data_growth_mb = (120_000 - 30_000) * 512 * 4 / 2**20
    print(f"peak RSS: {small:.0f} MB at 30k samples, {big:.0f} MB at 120k ({data_growth_mb:.0f} MB more data)")
    # Python-tracked allocations stay flat (tracemalloc: 61 vs 65 MB); RSS also carries the malloc
    # arenas of the writer threads, which vary by a few tens of MB from run to run.
    assert big < 1.4 * small and big - small < 0.25 * data_growth_mb


# ---------------------------------------------------------------------------------------------
# files ingest did not write
# ---------------------------------------------------------------------------------------------

def test_a_foreign_manifest_is_refused_and_left_as_it_is(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "someone else\'s dataset", "splits": {}}')
    (out / "train-000000.tar").write_bytes(b"not ours")
    code, _, err = run_cli(["data", "ingest", "-", out, "--format", "synthetic", "--synthetic", "train=300",
                            "test=100", "dim=4"], capsys)
    assert code == 2 and f"{out / 'manifest.json'}: this manifest.json was not written by `distill data ingest`" in err
    assert "Ingest into another (new or empty) folder" in err and "Traceback" not in err
    assert (out / "manifest.json").read_text() == '{"name": "someone else\'s dataset", "splits": {}}'
    assert (out / "train-000000.tar").read_bytes() == b"not ours"
    (out / "manifest.json").write_bytes(b"\xff\xfe not json")  # unreadable: not ours either
    code, _, err = run_cli(["data", "ingest", "-", out, "--format", "synthetic"], capsys)
    assert code == 2 and (out / "manifest.json").read_bytes() == b"\xff\xfe not json"


def test_foreign_shard_files_are_never_removed_nor_overwritten(tmp_path, capsys):
    out = tmp_path / "ds"
    ingest("", str(out), "synthetic", shard_size=100, synthetic_overrides=SMALL, progress=False)
    assert len(_shard_files(str(out))) == 6 + 1 + 2
    # Someone else's files, named like shards, that no manifest of ours lists:
    (out / "train-000042.tar").write_bytes(b"foreign, beyond the new dataset")
    (out / "extra-000000.tar").write_bytes(b"foreign split")
    m = ingest("", str(out), "synthetic", shard_size=300, synthetic_overrides=SMALL, progress=False)
    # our own stale shards (train-000002..5 of the old manifest) are gone; the foreign ones stay
    assert _shard_files(str(out)) == ["extra-000000.tar", "test-000000.tar", "train-000000.tar",
                                      "train-000001.tar", "train-000042.tar", "val-000000.tar"]
    assert (out / "train-000042.tar").read_bytes() == b"foreign, beyond the new dataset"
    assert verify_dataset(str(out), progress=False)["ok"] and m["ingest"]["shard_size"] == 300
    # A foreign file where the new dataset would write a shard: refused, nothing changed.
    other = tmp_path / "other"
    other.mkdir()
    (other / "train-000000.tar").write_bytes(b"foreign")
    code, _, err = run_cli(["data", "ingest", "-", other, "--format", "synthetic", "--synthetic", "train=300",
                            "test=100", "dim=4"], capsys)
    assert code == 2 and "holds 1 shard file(s) that distill did not write" in err and "train-000000.tar" in err
    assert sorted(os.listdir(other)) == ["train-000000.tar"]
    assert (other / "train-000000.tar").read_bytes() == b"foreign"


def test_an_unfinished_ingest_knows_its_own_shards(tmp_path, monkeypatch):
    """After a crash the manifest is gone; the journal still names the shards as ours, so the next
    ingest (other settings) may overwrite and remove them, and only them."""
    from pipeline.data.ingest import JOURNAL

    out = str(tmp_path / "ds")
    real = storage.write_bytes_atomic
    calls = []

    def crash(uri, data):
        calls.append(uri)
        if len(calls) > 4:
            raise KeyboardInterrupt
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        ingest("", out, "synthetic", shard_size=50, synthetic_overrides=SMALL, progress=False)
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
    assert os.path.exists(os.path.join(out, JOURNAL)) and not os.path.exists(os.path.join(out, "manifest.json"))
    ingest("", out, "synthetic", shard_size=400, synthetic_overrides=SMALL, progress=False)
    assert _shard_files(out) == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert not os.path.exists(os.path.join(out, JOURNAL))
