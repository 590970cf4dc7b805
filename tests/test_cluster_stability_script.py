"""scripts/cluster_stability.py: partitions counted over k-means seeds, with inertia and kept mass."""

import importlib.util
from pathlib import Path

import numpy as np

from _clustering_helpers import simplex_like_cov

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cluster_stability.py"


def _script():
    spec = importlib.util.spec_from_file_location("cluster_stability", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_counts_every_seed_and_scores_each_partition():
    mod = _script()
    cov = simplex_like_cov()
    names = [f"c{i}" for i in range(10)]
    res = mod.sweep(cov, 3, seeds=8, n_inits=[1, 3], names=names, min_size=1, normalize="excess")
    assert set(res) == {"1", "3"}
    for rows in res.values():
        assert sum(r["seeds"] for r in rows) == 8
        assert [r["seeds"] for r in rows] == sorted((r["seeds"] for r in rows), reverse=True)
        for r in rows:
            assert sorted(c for s in r["subsets"] for c in s) == sorted(names)  # min_size=1: a partition
            assert 0.0 <= r["within_mass"] <= 1.0 and r["inertia"] >= 0.0
            # The one positively correlated pair is kept together, so all positive mass is inside.
            assert any({"c0", "c1"} <= set(s) for s in r["subsets"]) and r["within_mass"] == 1.0


def test_inertia_and_within_mass_by_hand():
    mod = _script()
    points = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert mod.inertia(points, [[0, 2], [1]]) == 0.0
    assert mod.inertia(points, [[0, 1], [2]]) == 1.0  # two points 1.0 apart each 0.5 from their mean
    cov = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, -0.2], [0.0, -0.2, 1.0]])
    assert mod.within_mass(cov, [[0, 1], [2]]) == 1.0
    assert mod.within_mass(cov, [[0], [1, 2]]) == 0.0
