"""A tiny finished run directory up to the soft-target cache, for the tune and student stage tests.

Data are ingested with the real synthetic ingester; the generalist is trained in-process
(`_specialists_helpers.train_generalist`); each specialist starts as the generalist with its head
swapped for |S| + 1 outputs (`replace_head` with the subset's rows: the generalist's own view of the
subset plus a dustbin) and is saved where the specialists stage saves it; the cache is written by
the targets stage's own code path, in-process. Stage markers are written as the runner would, so
the stages under test see a normal run directory.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline import storage
from pipeline.config import Config
from pipeline.models import load_checkpoint, replace_head, save_checkpoint
from pipeline.layout import marker_uri
from pipeline.layout import spec_dirname

from _specialists_helpers import ingest_synthetic, make_config, train_generalist

SYNTH = {"num_classes": 6, "num_groups": 3, "train": 1200, "test": 300, "dim": 16, "difficulty": 0.6, "seed": 0}
SUBSETS = [[0, 1], [2, 3], [4, 5]]


def tiny_config(root: str, **overrides) -> Config:
    base = {
        "data.shard_size": 300, "data.val_fraction": 0.15, "data.synthetic": SYNTH,
        "targets.dtype": "float32",
        "student.model": {"arch": "mlp", "hidden": [16]}, "student.epochs": 3, "student.batch_size": 64,
        "student.lr": 0.003, "student.num_workers": 1,
        "tune.epochs": 3, "tune.max_concurrent": 2,
        "ray.num_cpus": 2, "ray.object_store_memory_mb": 150,
    }
    base.update(overrides)
    return make_config(root, **base)


def build_run(cfg: Config) -> None:
    """data/, teacher/, cluster/, specialists/ and targets/ of a finished run (seconds on 2 CPUs)."""
    from pipeline.stages import targets

    torch.set_num_threads(1)
    ingest_synthetic(cfg)
    train_generalist(cfg, epochs=6, hidden=(64, 64))
    _, meta = load_checkpoint(cfg.stage_uri("teacher"))
    c = int(meta["num_classes"])
    storage.write_json_atomic(storage.join(cfg.stage_uri("cluster"), "specialists.json"), {"subsets": SUBSETS})
    for m, s in enumerate(SUBSETS):
        model, _ = load_checkpoint(cfg.stage_uri("teacher"))
        replace_head(model, len(s) + 1, torch.tensor(s))
        f = len(s) / c
        save_checkpoint(storage.join(cfg.stage_uri("specialists"), spec_dirname(m)), model, meta["spec"],
                        meta["input_shape"], c,
                        extra={"subset": s, "f": f, "dustbin_correction": float(np.log((1 - f) / f))})
    for stage in ("cluster", "specialists"):
        storage.write_json_atomic(marker_uri(cfg, stage), {"stage": stage, "fingerprint": f"test-{stage}", "seconds": 0})
    targets.regenerate(cfg, progress=False, use_ray=False, write_marker=True)
