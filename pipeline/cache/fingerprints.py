"""What a cache's contents depend on, as hashes: the teacher, the combination and each shard.

Belongs here: every hash the manifest records and regen compares. ``teacher`` = sha256 of the
generalist's weights; ``specialists`` = hash of every specialist's (weights sha256, subset);
``combination`` = hash of (top_n, method, iters, dustbin corrections); ``teacher_fingerprint`` =
hash of those three and C. A shard's fingerprint = hash(teacher_fingerprint, source shard sha256,
dtype, top_k, format version): a new teacher changes every shard's, a changed input shard only its
own. Which files a shard has (its formats) is checked separately, by `regen.plan_regen`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence

from pipeline.cache.layout import FORMAT_VERSION


def fingerprint_of(*parts: Any) -> str:
    """sha256 (hex) of the canonical JSON of `parts`: equal inputs, equal fingerprint, on any machine."""
    blob = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def teacher_fingerprints(
    generalist_sha256: str,
    specialists: Sequence[dict],
    top_n: int,
    method: str,
    iters: int,
    num_classes: int,
) -> dict[str, str]:
    """The manifest's `fingerprints` block.

    specialists: one dict per specialist with ``sha256`` (weights), ``subset`` (class list) and
        ``dustbin_correction`` (float added to its dustbin logit before the softmax).
    Returns {"teacher", "specialists", "combination", "teacher_fingerprint"}.
    """
    spec = fingerprint_of([{"sha256": s["sha256"], "subset": [int(c) for c in s["subset"]]} for s in specialists])
    corrections = [round(float(s.get("dustbin_correction", 0.0)), 12) for s in specialists]
    comb = fingerprint_of({"top_n": int(top_n), "method": str(method), "iters": int(iters),
                           "dustbin_corrections": corrections})
    return {
        "teacher": generalist_sha256,
        "specialists": spec,
        "combination": comb,
        "teacher_fingerprint": fingerprint_of(generalist_sha256, spec, comb, int(num_classes)),
    }


def shard_fingerprint(teacher_fingerprint: str, source_sha256: str, dtype: str, top_k: Optional[int]) -> str:
    """What a cache shard's contents depend on (its file format is checked separately)."""
    return fingerprint_of(teacher_fingerprint, source_sha256, dtype, top_k, FORMAT_VERSION)
