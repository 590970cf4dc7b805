"""Specialists: trained in parallel on Ray from the generalist, retried alone, and better together.

The stage tests run the real cluster and specialists stages on tiny synthetic data (8 classes in 2
confusable groups) with a small, deliberately under-trained generalist, the regime where the
paper's specialists pay off.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from _specialists_helpers import ingest_synthetic, make_config, torch_threads, train_generalist
from pipeline import storage
from pipeline.data.shards import load_split
from pipeline.errors import UserError
from pipeline.models import load_checkpoint
from pipeline.runner import run_stage
from pipeline.specialist_training import is_complete, train_specialist
from pipeline.stages import specialists as spec_stage
from _reference import plain_error as evaluate

SETTINGS = {
    "data.synthetic.num_classes": 8, "data.synthetic.num_groups": 2, "data.synthetic.train": 3000,
    "data.synthetic.test": 1000, "data.synthetic.dim": 32, "data.shard_size": 1000,
    "cluster.num_specialists": 2,
    "specialists.epochs": 6, "specialists.lr": 2e-3, "specialists.batch_size": 64,
    "specialists.cpus_per_specialist": 1, "specialists.max_concurrent": 2, "specialists.max_failures": 1,
}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Data, an under-trained generalist and the cluster stage's subsets."""
    root = str(tmp_path_factory.mktemp("spec") / "base")
    cfg = make_config(root, **SETTINGS)
    ingest_synthetic(cfg)
    train_generalist(cfg, epochs=4, hidden=(64, 64), lr=2e-3)
    run_stage(cfg, "cluster")
    return root


def _copy(base_run, dest, **overrides):
    """A run of its own on the shared data (teacher and cluster outputs copied, nothing else)."""
    for stage in ("teacher", "cluster"):
        shutil.copytree(os.path.join(base_run, stage), os.path.join(dest, stage))
    return make_config(dest, **{**SETTINGS, "data.uri": os.path.join(base_run, "data"), **overrides})


def _score_top_n():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "score_top_n.py")
    spec = importlib.util.spec_from_file_location("score_top_n", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def _spec_metrics(root, m):
    return json.load(open(os.path.join(root, "specialists", f"spec_{m:03d}", "metrics.json")))


@pytest.mark.slow
def test_specialists_train_in_parallel_survive_a_failure_and_beat_the_generalist(base_run, tmp_path, ray_local, monkeypatch):
    root = str(tmp_path / "run")
    cfg = _copy(base_run, root)
    # Asking the 2-CPU local Ray for a GPU per specialist would leave the trials pending forever.
    with pytest.raises(UserError, match="specialists.gpus_per_specialist"):
        spec_stage.run(_copy(base_run, str(tmp_path / "gpu"), **{"specialists.gpus_per_specialist": 1}))
    subsets = storage.read_json(os.path.join(root, "cluster", "specialists.json"))["subsets"]
    assert len(subsets) == 2
    # Specialist 0 raises after its first epoch, once: Tune must retry it alone, from its saved epoch.
    monkeypatch.setenv(spec_stage.FAIL_ENV, "0")
    monkeypatch.setenv(spec_stage.FAIL_ONCE_ENV, str(tmp_path / "fail-markers"))
    res = run_stage(cfg, "specialists")
    assert res["trained"] == [0, 1]
    assert os.path.exists(tmp_path / "fail-markers" / "failed-0")

    m0, m1 = _spec_metrics(root, 0), _spec_metrics(root, 1)
    assert m0["resumed_from_epoch"] == 1 and m1["resumed_from_epoch"] is None
    # Both ran at the same time on the 2-CPU Ray (1 CPU each).
    assert max(m0["started_at"], m1["started_at"]) < min(m0["finished_at"], m1["finished_at"])

    _, y_train, _ = load_split(os.path.join(base_run, "data"), "train")
    x_test, y_test, _ = load_split(os.path.join(base_run, "data"), "test")
    for m, s in enumerate(subsets):
        model, meta = load_checkpoint(os.path.join(root, "specialists", f"spec_{m:03d}"))
        assert meta["num_outputs"] == len(s) + 1 and meta["extra"]["subset"] == s
        f = float(np.isin(y_train, s).mean())
        assert meta["extra"]["f"] == pytest.approx(f)
        assert meta["extra"]["dustbin_correction"] == pytest.approx(math.log((1 - f) / f))
        assert not os.path.exists(os.path.join(root, "specialists", f"spec_{m:03d}", "_resume"))
        sm = _spec_metrics(root, m)
        assert 1 <= sm["epochs_run"] <= 6 and len(sm["history"]) == sm["epochs_run"]

    metrics = json.load(open(os.path.join(root, "specialists", "metrics.json")))
    generalist, _ = load_checkpoint(os.path.join(root, "teacher"))
    g = evaluate(generalist, x_test, y_test)
    assert metrics["generalist_test_errors"] == g["test_errors"]
    assert metrics["num_specialists"] == 2 and metrics["num_test_examples"] == len(y_test)
    assert metrics["test_errors"] == round(metrics["test_error"] * len(y_test))
    # The point of the exercise: generalist + specialists make fewer mistakes than the generalist.
    assert metrics["test_error"] < metrics["generalist_test_error"], metrics
    rows = metrics["table4"]
    assert sum(r["num_test_examples"] for r in rows) == len(y_test)
    assert sum(r["generalist_correct"] for r in rows) == len(y_test) - g["test_errors"]
    assert sum(r["ensemble_correct"] for r in rows) == len(y_test) - metrics["test_errors"]
    assert [r["covered_by"] for r in rows] == [1]  # two disjoint subsets covering all 8 classes
    assert metrics["params"] == metrics["generalist_params"] + sum(s["params"] for s in metrics["specialists"])

    # scripts/score_top_n.py scores other top-n on the same checkpoints and writes nothing: at the
    # run's own top_n it reproduces the stage's test figures.
    before = _mtimes(root)
    scored = _score_top_n().score(cfg, [1, 2], ["val", "test"])["top_n"]
    assert scored["1"]["test"] == {"examples": len(y_test), "generalist_errors": g["test_errors"],
                                   "ensemble_errors": metrics["test_errors"]}
    assert scored["2"]["val"]["examples"] > 0 and 0 < scored["2"]["test"]["ensemble_errors"] < len(y_test)
    assert _mtimes(root) == before

    # Up to date: skipped. Only an evaluation setting changed: re-scored, nothing retrained.
    assert run_stage(cfg, "specialists")["skipped"]
    cfg2 = make_config(root, **SETTINGS, **{"data.uri": os.path.join(base_run, "data"), "specialists.top_n": 2})
    res2 = run_stage(cfg2, "specialists")
    assert not res2["skipped"] and res2["trained"] == []
    assert json.load(open(os.path.join(root, "specialists", "metrics.json")))["top_n"] == 2


@pytest.mark.slow
def test_a_specialist_that_keeps_failing_fails_the_stage_and_a_rerun_trains_only_it(base_run, tmp_path, ray_local, monkeypatch):
    root = str(tmp_path / "run")
    cfg = _copy(base_run, root, **{"specialists.max_failures": 0})
    monkeypatch.setenv(spec_stage.FAIL_ENV, "1")
    with pytest.raises(RuntimeError, match=r"specialists \[1\] failed"):
        run_stage(cfg, "specialists")
    done = os.path.join(root, "specialists", "spec_000", "model.pt")
    before = os.stat(done).st_mtime_ns
    assert not os.path.exists(os.path.join(root, "specialists", "spec_001", "model.json"))
    assert os.path.exists(os.path.join(root, "specialists", "spec_001", "_resume", "trainer.json"))

    monkeypatch.delenv(spec_stage.FAIL_ENV)
    res = run_stage(cfg, "specialists")
    assert res["trained"] == [1]
    assert os.stat(done).st_mtime_ns == before  # specialist 0 was not redone
    assert _spec_metrics(root, 1)["resumed_from_epoch"] == 1  # and 1 went on from its saved epoch
    metrics = json.load(open(os.path.join(root, "specialists", "metrics.json")))
    assert metrics["training"] == {**metrics["training"], "trained": [1], "skipped": [0]}


def test_specialists_stage_without_cluster_output_or_with_tiny_batches_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="distill stage cluster"):
        spec_stage.run(make_config(str(tmp_path / "run")))
    with pytest.raises(UserError, match="specialists.batch_size"):
        spec_stage.run(make_config(str(tmp_path / "run"), **{"specialists.batch_size": 1}))


def test_specialist_fingerprint_ignores_resources_and_combination_settings(tmp_path):
    base = make_config(str(tmp_path))
    fp = spec_stage.specialist_fingerprint(base, [1, 2], "abc")
    same = make_config(str(tmp_path), **{"specialists.cpus_per_specialist": 2, "specialists.top_n": 3,
                                         "specialists.combine_method": "gradient", "specialists.max_concurrent": 1})
    assert spec_stage.specialist_fingerprint(same, [1, 2], "abc") == fp
    assert spec_stage.specialist_fingerprint(make_config(str(tmp_path), **{"specialists.lr": 0.01}), [1, 2], "abc") != fp
    assert spec_stage.specialist_fingerprint(base, [1, 3], "abc") != fp
    assert spec_stage.specialist_fingerprint(base, [1, 2], "abd") != fp
    assert spec_stage.fingerprint(same) != spec_stage.fingerprint(base)  # re-scoring is still needed


def test_table4_counts_examples_by_how_many_specialists_cover_their_class():
    y = np.array([0, 0, 1, 2, 3, 3])
    subsets = [[0, 1], [1, 2]]  # class 0: 1 specialist, 1: 2, 2: 1, 3: none
    gen_ok = np.array([1, 0, 1, 0, 1, 1], dtype=bool)
    ens_ok = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    rows = spec_stage.table4(y, subsets, 4, gen_ok, ens_ok)
    assert [(r["covered_by"], r["num_test_examples"], r["generalist_correct"], r["ensemble_correct"]) for r in rows] == [
        (0, 2, 2, 1), (1, 3, 1, 3), (2, 1, 1, 1)]
    assert rows[1]["relative_accuracy_change"] == pytest.approx(2.0)
    assert rows[0]["relative_accuracy_change"] == pytest.approx(-0.5)


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(6, 10)) * 2.5
    y = rng.integers(0, 6, n)
    return (centres[y] + rng.normal(size=(n, 10))).astype(np.float32), y


def test_an_interrupted_specialist_resumes_to_the_same_weights(tmp_path):
    """Resume state after each epoch: a crash after epoch 1 then a rerun gives bit-identical weights."""
    with torch_threads(1):
        _interrupted_specialist_resumes(tmp_path)


def _in_memory_streams(x, y, xv, yv, chunk=100):
    """Streams shaped like the Ray Data ones the stage hands `train_specialist`."""
    def epoch_chunks(e):
        perm = np.random.default_rng([0, e]).permutation(len(x))
        for s in range(0, len(x), chunk):
            idx = perm[s:s + chunk]
            yield {"x": torch.from_numpy(x[idx]), "y": torch.from_numpy(y[idx]), "epoch": torch.full((len(idx),), e)}

    def val_batches():
        for s in range(0, len(xv), 128):
            yield {"x": torch.from_numpy(xv[s:s + 128]), "y": torch.from_numpy(yv[s:s + 128])}

    return epoch_chunks, val_batches


def _interrupted_specialist_resumes(tmp_path):
    from pipeline.models import build_model, save_checkpoint

    torch.manual_seed(0)
    x, y = _blobs(1200, 0)
    xv, yv = _blobs(300, 1)
    counts = np.bincount(y, minlength=6)
    chunks, val = _in_memory_streams(x, y, xv, yv)
    gen = build_model({"arch": "mlp", "hidden": [16], "dropout": 0.1}, (10,), 6)
    save_checkpoint(str(tmp_path / "gen"), gen, {"arch": "mlp", "hidden": [16], "dropout": 0.1}, (10,), 6)
    cfg = {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 1e-2, "schedule": "cosine", "patience": 5}

    def crash(row):
        if row["epoch"] == 1:
            raise RuntimeError("worker died")

    def train(out, fp, report=None):
        return train_specialist(str(tmp_path / "gen"), [2, 4], chunks, val, counts, cfg, str(tmp_path / out),
                                fingerprint=fp, report=report)

    with pytest.raises(RuntimeError, match="worker died"):
        train("a", "fp", crash)
    assert not is_complete(str(tmp_path / "a"), "fp")
    resumed = train("a", "fp")
    straight = train("b", "fp")
    assert resumed["resumed_from_epoch"] == 2 and straight["resumed_from_epoch"] is None
    assert resumed["f"] == pytest.approx(np.isin(y, [2, 4]).mean())
    assert len(straight["history"]) == 3 and straight["history"][0]["val_subset_error"] is not None
    assert is_complete(str(tmp_path / "a"), "fp") and not is_complete(str(tmp_path / "a"), "other")
    a, _ = load_checkpoint(str(tmp_path / "a"))
    b, _ = load_checkpoint(str(tmp_path / "b"))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    # Resume state from other inputs (another fingerprint) is ignored, not loaded.
    with pytest.raises(RuntimeError):
        train("c", "one", crash)
    fresh = train("c", "two")
    assert fresh["resumed_from_epoch"] is None


@pytest.mark.slow
@pytest.mark.s3
def test_specialists_stage_with_the_run_directory_on_s3(base_run, s3_bucket, ray_local):
    """Trials read the dataset and the generalist and write their checkpoints through s3fs; Tune's
    experiment folder goes to the bucket too."""
    root = f"{s3_bucket}/run"
    for stage in ("teacher", "cluster"):
        for name in os.listdir(os.path.join(base_run, stage)):
            storage.put_file_atomic(os.path.join(base_run, stage, name), storage.join(root, stage, name))
    cfg = make_config(root, **{**SETTINGS, "data.uri": os.path.join(base_run, "data"), "specialists.epochs": 2})
    res = run_stage(cfg, "specialists")
    assert res["trained"] == [0, 1]
    for m in (0, 1):
        model, meta = load_checkpoint(storage.join(root, "specialists", f"spec_{m:03d}"))
        assert meta["extra"]["subset"] == storage.read_json(storage.join(root, "cluster", "specialists.json"))["subsets"][m]
    metrics = storage.read_json(storage.join(root, "specialists", "metrics.json"))
    assert metrics["num_specialists"] == 2 and 0 <= metrics["test_error"] <= 1
    assert any(n.startswith("fit-") for n in storage.listdir(storage.join(root, "specialists", "ray")))
    assert run_stage(cfg, "specialists")["skipped"]


def test_a_subset_smaller_than_half_a_batch_trains(tmp_path):
    """Small datasets: 24 subset rows under a batch of 128 give one step per epoch of those rows
    plus as many rest rows (the half/half batch shrinks), instead of an epoch that can never fill."""
    from pipeline.models import build_model, save_checkpoint

    torch.manual_seed(0)
    x, y = _blobs(240, 0)
    keep = ~np.isin(y, [2, 4]) | (np.cumsum(np.isin(y, [2, 4])) <= 24)
    x, y = x[keep], y[keep]
    xv, yv = _blobs(120, 1)
    counts = np.bincount(y, minlength=6)
    assert counts[[2, 4]].sum() == 24
    chunks, val = _in_memory_streams(x, y, xv, yv)
    spec = {"arch": "mlp", "hidden": [16]}
    save_checkpoint(str(tmp_path / "gen"), build_model(spec, (10,), 6), spec, (10,), 6)
    cfg = {"epochs": 2, "batch_size": 128, "optimizer": "adam", "lr": 1e-2}
    with torch_threads(1):
        out = train_specialist(str(tmp_path / "gen"), [2, 4], chunks, val, counts, cfg, str(tmp_path / "s"),
                               fingerprint="fp")
    assert len(out["history"]) == 2 and is_complete(str(tmp_path / "s"), "fp")
