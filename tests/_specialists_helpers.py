"""Run directories with data and a generalist in place, for the cluster and specialists stage tests.

The generalist is trained in-process with `pipeline.training` (seconds on tiny data) instead of the
Ray Train teacher stage (tens of seconds of Ray startup); it is saved exactly where and how the
teacher stage saves it (`pipeline.models.save_checkpoint` into `teacher/`, then the stage marker),
so the stages under test cannot tell the difference.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from pipeline import storage
from pipeline.config import Config, load_config
from pipeline.data.ingest import ingest
from pipeline.data.shards import load_split, read_manifest
from pipeline.models import build_model, save_checkpoint
from pipeline.layout import marker_uri

from _reference import plain_error, plain_fit


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run tiny models single-threaded: on a busy 2-core machine, intra-op threads of a 64-unit
    layer only wait on each other (tens of ms per op); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_config(output_dir: str, **overrides) -> Config:
    """A config for `output_dir` with dotted-key overrides (values are Python objects)."""
    pairs = [f"output_dir={output_dir}"] + [f"{k}={_yaml(v)}" for k, v in overrides.items()]
    return load_config(None, pairs)


def _yaml(v) -> str:
    import json

    return json.dumps(v)


def ingest_synthetic(cfg: Config) -> dict:
    """Ingest the config's synthetic data into `cfg.stage_uri("data")` (and mark the data stage done)."""
    d = cfg.data
    manifest = ingest("", cfg.stage_uri("data"), "synthetic", val_fraction=d.val_fraction, shard_size=d.shard_size,
                      seed=d.seed, synthetic_overrides=d.synthetic.model_dump(), progress=False)
    storage.write_json_atomic(marker_uri(cfg, "data"), {"stage": "data", "fingerprint": "test-data", "seconds": 0})
    return manifest


def train_generalist(cfg: Config, epochs: int = 8, hidden=(64, 64), lr: float = 2e-3, seed: int = 0,
                     dropout: float = 0.0) -> dict:
    """Train a small MLP generalist on the train split and save it as the teacher stage would."""
    with torch_threads(1):
        return _train_generalist(cfg, epochs, hidden, lr, seed, dropout)


def _train_generalist(cfg: Config, epochs: int, hidden, lr: float, seed: int, dropout: float) -> dict:
    torch.manual_seed(seed)
    data_uri = cfg.stage_uri("data")
    manifest = read_manifest(data_uri)
    x, y, _ = load_split(data_uri, "train")
    xt, yt, _ = load_split(data_uri, "test")
    spec = {"arch": "mlp", "hidden": list(hidden), "dropout": dropout}
    model = build_model(spec, manifest["input_shape"], manifest["num_classes"])
    plain_fit(model, x, y, epochs=epochs, batch_size=128, lr=lr, seed=seed)
    res = plain_error(model, xt, yt)
    meta = save_checkpoint(cfg.stage_uri("teacher"), model, spec, manifest["input_shape"], manifest["num_classes"])
    storage.write_json_atomic(storage.join(cfg.stage_uri("teacher"), "metrics.json"), {**res, "params": meta["params"]})
    storage.write_json_atomic(marker_uri(cfg, "teacher"),
                              {"stage": "teacher", "fingerprint": "test-" + meta["sha256"][:12], "seconds": 0})
    return res


def class_labels(groups, num_classes: int) -> np.ndarray:
    labels = np.zeros(num_classes, dtype=np.int64)
    for g, members in enumerate(groups):
        labels[list(members)] = g
    return labels
