"""How stable a finished run's clustering is across k-means seeds, writing nothing in the run.

The cluster stage clusters once, at `cluster.seed`. This recomputes the same covariance (the
generalist on the val split, on Ray workers, `pipeline.inference.generalist_statistics`), then runs
`specialists.clustering.cluster_classes` at k-means seeds 0..N-1 for each `n_init` asked for and
prints one JSON object: each distinct partition, how many seeds found it, its k-means inertia on
the class points and the share of the covariance's off-diagonal confusion mass it keeps inside
subsets (the mass the specialists can work on). It is how docs/method.md's stability figures are
made.

    .venv/bin/python scripts/cluster_stability.py configs/fashion_mnist.yaml runs/fashion_mnist/seed-0 \
        --seeds 20 --n-init 1,3,10 [--normalize excess] [--save-cov cov.npy | --cov cov.npy]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specialists.clustering import class_points, cluster_classes  # noqa: E402


def inertia(points: np.ndarray, subsets: list[list[int]]) -> float:
    """k-means objective of a partition: squared distances of each class point to its subset's mean."""
    return float(sum(((points[s] - points[s].mean(axis=0)) ** 2).sum() for s in subsets))


def within_mass(cov: np.ndarray, subsets: list[list[int]]) -> float:
    """Share of the positive off-diagonal correlation mass that falls inside subsets."""
    sd = np.sqrt(np.clip(np.diag(cov), 1e-30, None))
    r = cov / sd[:, None] / sd[None, :]
    np.fill_diagonal(r, 0.0)
    r = np.clip(r, 0.0, None)
    inside = sum(r[np.ix_(s, s)].sum() for s in subsets)
    return float(inside / max(r.sum(), 1e-30))


def sweep(cov: np.ndarray, num_specialists: int, seeds: int, n_inits: list[int], names: list[str],
          **kw) -> dict:
    points = class_points(cov, kw.get("normalize", "correlation"), kw.get("self_similarity", "max")).astype(np.float64)
    out = {}
    for n in n_inits:
        found = Counter()
        for s in range(seeds):
            subsets = cluster_classes(cov, num_specialists, seed=s, n_init=n, **kw)
            found[tuple(tuple(x) for x in subsets)] += 1
        rows = []
        for part, count in found.most_common():
            subsets = [list(x) for x in part]
            rows.append({"seeds": count, "inertia": round(inertia(points, subsets), 4),
                         "within_mass": round(within_mass(cov, subsets), 4),
                         "subsets": [[names[c] for c in x] for x in subsets]})
        out[str(n)] = rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("run_dir")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--n-init", default="1,3,10")
    ap.add_argument("--save-cov", help="write the covariance here (.npy) for later sweeps")
    ap.add_argument("--normalize", choices=["correlation", "excess"], help="override cluster.normalize")
    ap.add_argument("--cov", help="read the covariance from this .npy instead of running the generalist")
    a = ap.parse_args(argv)
    from pipeline.config import load_config
    from pipeline.data.shards import read_manifest

    cfg = load_config(a.config, [f"output_dir={a.run_dir}"])
    manifest = read_manifest(cfg.stage_uri("data"))
    names = list(manifest.get("class_names") or [str(c) for c in range(int(manifest["num_classes"]))])
    if a.cov:
        cov = np.load(a.cov, allow_pickle=False)
    else:
        from pipeline import inference
        from pipeline.raysetup import ensure_ray

        ensure_ray(cfg)
        stats = inference.generalist_statistics(
            cfg.stage_uri("teacher"), cfg.stage_uri("data"), "val",
            **{**inference.options(cfg), "batch_size": cfg.cluster.batch_size},
            transform=inference.eval_transform(cfg, manifest))
        cov = stats["covariance"]
    if a.save_cov:
        np.save(a.save_cov, cov, allow_pickle=False)
    cc = cfg.cluster
    res = sweep(cov, cc.num_specialists, a.seeds, [int(x) for x in a.n_init.split(",")], names,
                subset_size=cc.subset_size, min_size=cc.min_size, max_size=cc.max_size,
                normalize=a.normalize or cc.normalize, self_similarity=cc.self_similarity)
    print(json.dumps({"run_dir": a.run_dir, "k_means_seeds": a.seeds, "n_init": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
