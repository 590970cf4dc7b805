"""The cluster stage finds the generalist's confusable class groups and hands them on as subsets.

The generalist's predictions on val run on Ray workers (`pipeline.inference`), so the stage tests
are slow and use the private local Ray of `ray_local`."""
import json
import os

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from _specialists_helpers import class_labels, ingest_synthetic, make_config, train_generalist
from pipeline import storage
from pipeline.errors import UserError
from pipeline.runner import run_stage
from pipeline.stages import cluster as cluster_stage

SYN = {"data.synthetic.num_classes": 12, "data.synthetic.num_groups": 4, "data.synthetic.train": 3000,
       "data.synthetic.test": 500, "data.synthetic.dim": 32, "data.shard_size": 1000}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Data + a generalist in `teacher/`, shared by the tests (each runs the cluster stage itself)."""
    root = str(tmp_path_factory.mktemp("cluster") / "run")
    cfg = make_config(root, **SYN)
    ingest_synthetic(cfg)
    train_generalist(cfg, epochs=6, hidden=(64, 64), lr=3e-3)
    return root


def _cfg(root, **kw):
    return make_config(root, **SYN, **{"cluster.num_specialists": 4, **kw})


def _fresh(run_dir, tmp_path):
    """A private copy of the run (data stays shared) so tests do not see each other's outputs."""
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("cluster"))
    return out


@pytest.mark.slow
def test_cluster_stage_finds_the_true_groups_and_writes_its_files(run_dir, tmp_path, ray_local):
    root = _fresh(run_dir, tmp_path)
    cfg = _cfg(root)
    res = run_stage(cfg, "cluster")
    assert not res["skipped"]
    out = os.path.join(root, "cluster")
    doc = json.load(open(os.path.join(out, "specialists.json")))
    subsets = doc["subsets"]
    manifest = json.load(open(os.path.join(root, "data", "manifest.json")))
    # Every class in exactly one subset (disjoint mode), and the subsets are the planted groups.
    assert sorted(c for s in subsets for c in s) == list(range(12))
    labels = np.zeros(12, dtype=int)
    for m, s in enumerate(subsets):
        labels[s] = m
    ari = adjusted_rand_score(class_labels(manifest["class_groups"], 12), labels)
    assert ari >= 0.8, (subsets, manifest["class_groups"])
    assert doc["class_names"] == [[manifest["class_names"][c] for c in s] for s in subsets]

    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["ari"] == pytest.approx(ari)
    assert metrics["subset_sizes"] == [len(s) for s in subsets] and metrics["coverage"] == 1.0
    assert metrics["val_samples"] == manifest["splits"]["val"]["num_samples"]
    # The streamed count equals the generalist scored on val in memory, and beats chance (11/12).
    from pipeline.data.shards import load_split
    from pipeline.models import load_checkpoint
    from _reference import plain_error as evaluate

    x_val, y_val, _ = load_split(os.path.join(root, "data"), "val")
    want = evaluate(load_checkpoint(os.path.join(root, "teacher"))[0], x_val, y_val)
    assert (metrics["val_errors"], metrics["val_error"]) == (want["test_errors"], want["test_error"])
    assert metrics["val_error"] < 0.75

    import matplotlib.image as mpimg

    img = mpimg.imread(os.path.join(out, "covariance.png"))
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300

    # Up to date: skipped. A different K: the stage runs again and writes K subsets.
    assert run_stage(cfg, "cluster")["skipped"]
    res3 = run_stage(_cfg(root, **{"cluster.num_specialists": 3}), "cluster")
    assert not res3["skipped"]
    assert len(json.load(open(os.path.join(out, "specialists.json")))["subsets"]) <= 3


@pytest.mark.slow
def test_fixed_subset_size_gives_overlapping_subsets_of_that_size(run_dir, tmp_path, ray_local):
    root = _fresh(run_dir, tmp_path)
    run_stage(_cfg(root, **{"cluster.subset_size": 4}), "cluster")
    subsets = storage.read_json(os.path.join(root, "cluster", "specialists.json"))["subsets"]
    assert subsets and all(len(s) == 4 for s in subsets)


@pytest.mark.slow
def test_missing_teacher_and_bad_num_specialists_are_user_errors(run_dir, tmp_path, ray_local):
    with pytest.raises(UserError, match="teacher"):
        cluster_stage.run(_cfg(str(tmp_path / "empty"), **{"data.uri": os.path.join(run_dir, "data")}))
    root = _fresh(run_dir, tmp_path)
    with pytest.raises(UserError, match="cluster.num_specialists"):
        cluster_stage.run(_cfg(root, **{"cluster.num_specialists": 13}))
    with pytest.raises(UserError, match="min_size"):
        cluster_stage.run(_cfg(root, **{"cluster.min_size": 13}))


def test_read_subsets_without_the_stage_names_the_command(tmp_path):
    with pytest.raises(UserError, match="distill stage cluster"):
        cluster_stage.read_subsets(make_config(str(tmp_path / "nothing")))


def test_cluster_order_groups_each_subset_and_outlines_overlaps_once():
    order, blocks = cluster_stage.cluster_order([[4, 1], [1, 2, 5]], 7)
    assert order.tolist() == [4, 1, 2, 5, 0, 3, 6]
    assert blocks == [(0, 2), (2, 4)]


def test_heatmap_of_many_classes_is_drawn_as_block_means(tmp_path):
    """At thousands of classes the plot must stay small and fast (block means, no tick labels)."""
    rng = np.random.default_rng(0)
    C = 1300
    a = rng.normal(size=(200, C)).astype(np.float32)
    cov = np.cov(a, rowvar=False)
    subsets = [list(range(i, i + 100)) for i in range(0, 1200, 100)]
    path = str(tmp_path / "cov.png")
    cluster_stage.plot_covariance(cov, subsets, None, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert cluster_stage._block_mean(np.ones((5, 5)), 2).shape == (3, 3)
