"""Tiny run directories for the soft-target cache tests: a hand-made dataset and a teacher.

The dataset is written with `pipeline.data.shards.encode_shard` plus a manifest, so a test can change
one shard's bytes and nothing else; the teacher is a small MLP generalist and two specialists (the
generalist with its head replaced by |S| + 1 outputs) saved with `pipeline.models.save_checkpoint`,
laid out as the teacher, cluster and specialists stages would.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from pipeline import storage
from pipeline.config import Config
from pipeline.data.shards import encode_shard, sample_key, shard_name

NUM_CLASSES = 6
DIM = 8
SUBSETS = [[0, 1], [2, 3, 4]]


def make_inputs(split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    centres = np.random.default_rng(123).normal(size=(NUM_CLASSES, DIM)).astype(np.float32) * 2
    x = (centres[y] + rng.normal(size=(n, DIM)).astype(np.float32)).astype(np.float32)
    return x, y


def write_dataset(uri: str, shard_sizes: Sequence[int], split: str = "train", seed: int = 0,
                  labelled: bool = True) -> dict:
    """A dataset at `uri` whose `split` has shards of the given sizes (and a small test split)."""
    splits = {}
    for sp, sizes, sd in ((split, shard_sizes, seed), ("test", [20], seed + 1000)):
        entries, start = [], 0
        for i, n in enumerate(sizes):
            x, y = make_inputs(sp, n, sd * 100 + i)
            keys = [sample_key(sp, start + j) for j in range(n)]
            data = encode_shard(x, y if (labelled or sp == "test") else None, keys)
            storage.write_bytes_atomic(storage.join(uri, shard_name(sp, i)), data)
            entries.append({"path": shard_name(sp, i), "num_samples": n, "sha256": storage.sha256_bytes(data),
                            "bytes": len(data)})
            start += n
        splits[sp] = {"num_samples": start, "shards": entries}
    manifest = {"format_version": 1, "name": "tiny", "num_classes": NUM_CLASSES,
                "class_names": [str(c) for c in range(NUM_CLASSES)], "input_shape": [DIM], "dtype": "float32",
                "splits": splits}
    storage.write_json_atomic(storage.join(uri, "manifest.json"), manifest)
    return manifest


def replace_shard(uri: str, split: str, index: int, seed: int) -> None:
    """Give one shard new inputs (same keys and size) and record its new checksum."""
    m = storage.read_json(storage.join(uri, "manifest.json"))
    entry = m["splits"][split]["shards"][index]
    start = sum(e["num_samples"] for e in m["splits"][split]["shards"][:index])
    n = entry["num_samples"]
    x, y = make_inputs(split, n, seed)
    data = encode_shard(x, y, [sample_key(split, start + j) for j in range(n)])
    storage.write_bytes_atomic(storage.join(uri, entry["path"]), data)
    entry["sha256"] = storage.sha256_bytes(data)
    entry["bytes"] = len(data)
    storage.write_json_atomic(storage.join(uri, "manifest.json"), m)


def write_teacher(cfg: Config, seed: int = 0, subsets: Optional[list[list[int]]] = None, hidden=(16,)) -> None:
    """Generalist + specialists checkpoints and cluster/specialists.json for `cfg`'s run directory."""
    from pipeline.models import build_model, replace_head, save_checkpoint
    from pipeline.layout import spec_dirname

    subsets = SUBSETS if subsets is None else subsets
    spec = {"arch": "mlp", "hidden": list(hidden)}
    torch.manual_seed(seed)
    g = build_model(spec, (DIM,), NUM_CLASSES)
    save_checkpoint(cfg.stage_uri("teacher"), g, spec, (DIM,), NUM_CLASSES)
    storage.write_json_atomic(storage.join(cfg.stage_uri("cluster"), "specialists.json"), {"subsets": subsets})
    for m, s in enumerate(subsets):
        torch.manual_seed(seed * 100 + m + 1)
        model = build_model(spec, (DIM,), NUM_CLASSES)
        replace_head(model, len(s) + 1, torch.tensor(s))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        f = len(s) / NUM_CLASSES
        save_checkpoint(storage.join(cfg.stage_uri("specialists"), spec_dirname(m)), model, spec, (DIM,),
                        NUM_CLASSES, extra={"subset": s, "f": f, "dustbin_correction": float(np.log((1 - f) / f))})


def make_config(root: str, **targets) -> Config:
    cfg = Config.model_validate({"output_dir": root, "targets": {"batch_size": 64, **targets},
                                 "ray": {"num_cpus": 2, "object_store_memory_mb": 150}})
    return cfg
