"""Reading a complete cache: which format to read, one shard as arrays, and one teacher's fields.

Belongs here: what a consumer of a finished cache calls. The student, tuning trials and inference
read caches as Ray Data datasets built by `pipeline.datasets.cache_items` (each shard checked
against the manifest's sha256 and joined with its input shard when the format carries no inputs);
those read tasks use `select_targets` and `formats.read_shard`. `load_cache_shard` reads one file
directly (benchmarks, tests, debugging).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline import storage
from pipeline.cache.formats import format_of, read_shard
from pipeline.cache.layout import DENSE_FIELDS, TARGETS, Layout
from pipeline.errors import UserError


def pick_format(manifest: dict, fmt: Optional[str], cache_uri: str) -> str:
    """The format to read: `fmt` if the cache holds it (UserError otherwise), else the first one written."""
    formats = manifest.get("formats", [])
    if fmt is None:
        return formats[0]
    if fmt not in formats:
        raise UserError(f"{cache_uri}: the cache holds {formats}, not {fmt!r}; set targets.format to include it and regen")
    return fmt


def select_targets(arrays: dict[str, np.ndarray], which: str, layout: Layout) -> dict[str, np.ndarray]:
    """The fields of one teacher (`which` = "ensemble" or "generalist") under student-facing names.

    dense: {"teacher": (N, C)}; top-k: {"teacher_topk_idx", "teacher_topk_val", "teacher_tail"}.
    The generalist's dense values are raw logits, the ensemble's log-probabilities; both give the
    same softmax(./T) as their log-softmax, so losses treat them alike.
    """
    if which not in TARGETS:
        raise UserError(f"student.target: {which!r} is not a cached target; use ensemble or generalist")
    if layout.top_k is None:
        return {"teacher": arrays[DENSE_FIELDS[which]]}
    return {"teacher_topk_idx": arrays[f"{which}_topk_idx"], "teacher_topk_val": arrays[f"{which}_topk_val"],
            "teacher_tail": arrays[f"{which}_tail"]}


def load_cache_shard(uri: str, fmt: Optional[str] = None) -> dict[str, np.ndarray]:
    """One cache shard file (local or s3://) as numpy arrays; see `formats.CacheFormat.read`.

    Keys: "keys" (N,) str objects, "labels" (N,) int64 (-1 where unlabelled), the stored fields
    (dense: "generalist_logits", "ensemble_logprobs" (N, C); top-k: "{t}_topk_idx", "{t}_topk_val"
    (N, k), "{t}_tail" (N,)), and for WebDataset also "inputs". No checksum is checked here.
    """
    return read_shard(storage.read_bytes(uri), fmt or format_of(uri))
