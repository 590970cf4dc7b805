"""`verify_cache`: check a complete cache against its manifest and its source dataset; never modifies.

Belongs here: every check `distill targets verify` runs and the report it prints (checksums, rows,
keys and labels against the source shards, finite and normalised values, coverage of the source
split, files no shard owns). Regen's cheaper check (checksums only) is `regen.plan_regen`.
"""
from __future__ import annotations

import concurrent.futures as cf
import json

import numpy as np

from pipeline import storage
from pipeline.cache.formats import read_shard
from pipeline.cache.layout import Layout, labels_or_none, logsumexp
from pipeline.cache.manifest import layout_of, manifest_uri, read_manifest
from pipeline.cache.regen import HASH_THREADS, orphan_files
from pipeline.data import shards as data_shards
from pipeline.errors import UserError


def _source_shards(dataset: dict) -> dict[str, dict]:
    """source path -> {"uri", "sha256", "num_samples"} from the dataset manifest the cache names."""
    data_uri, split = dataset["uri"], dataset["split"]
    manifest = data_shards.read_manifest(data_uri)
    entries = manifest["splits"][split]["shards"]
    return {e["path"]: {"uri": storage.join(data_uri, e["path"]), "sha256": e["sha256"],
                        "num_samples": int(e["num_samples"])} for e in entries}


def _check_values(arrays: dict[str, np.ndarray], layout: Layout) -> list[str]:
    problems = []
    for name, (dt, shape) in layout.fields().items():
        a = arrays.get(name)
        if a is None:
            problems.append(f"field {name} absent")
            continue
        if a.shape[1:] != shape or a.dtype != dt:
            problems.append(f"field {name} is {a.dtype}{list(a.shape[1:])}, manifest says {dt}{list(shape)}")
            continue
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a.reshape(len(a), -1))).any(axis=1).sum())
            problems.append(f"field {name}: {bad} rows with non-finite values")
        if a.dtype.kind == "i" and a.size and (a.min() < 0 or a.max() >= layout.num_classes):
            problems.append(f"field {name}: class indices outside [0, {layout.num_classes})")
    if problems:
        return problems
    # The ensemble's log-probabilities must be normalised (float16 rounding allows ~1e-2).
    if layout.top_k is None:
        lse = logsumexp(arrays["ensemble_logprobs"].astype(np.float32), 1)
    else:
        both = np.concatenate([arrays["ensemble_topk_val"].astype(np.float32),
                               arrays["ensemble_tail"].astype(np.float32)[:, None]], axis=1)
        lse = logsumexp(both, 1)
    if lse.size and float(np.abs(lse).max()) > 0.05:
        problems.append(f"ensemble log-probabilities do not sum to 1 (max |log sum| = {float(np.abs(lse).max()):.3g})")
    return problems


def _check_manifest_keys(uri: str, manifest: dict) -> None:
    """UserError naming the manifest and the key when a field every check needs is absent or of
    the wrong type (a hand-edited or foreign manifest), instead of a KeyError traceback."""
    need = {"num_classes": int, "dtype": str, "formats": list, "shards": list, "dataset": dict}
    for key, kind in need.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "is missing" if key not in manifest else f"is {json.dumps(value)[:40]}, not a {kind.__name__}"
            raise UserError(f"{manifest_uri(uri)}: '{key}' {what}, so the cache cannot be checked; "
                            "run `distill targets regen CONFIG` to rebuild the manifest")
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"{manifest_uri(uri)}: shards[{i}] is not a shard entry (no 'name'); run "
                            "`distill targets regen CONFIG` to rebuild the manifest")


def verify_cache(uri: str, check_source: bool = True, progress: bool = False) -> dict:
    """Check a cache against its manifest and its source dataset; never modifies anything.

    For each shard and format: the file exists with its recorded sha256, parses, has the recorded
    row count, its keys equal the source shard's keys in order (and its labels the source labels),
    every stored value is finite and the ensemble's log-probabilities are normalised. The source
    shard's sha256 must still be the one the cache was made from (else the shard is stale). Files
    that no shard owns are reported as `orphans` (not damage).

    Returns {"uri", "checked", "damaged", "damaged_shards": [names], "problems": {name: message},
    "num_samples", "formats", "orphans", "teacher_fingerprint"}.
    """
    manifest = read_manifest(uri)
    _check_manifest_keys(uri, manifest)
    layout = layout_of(manifest)
    formats = manifest.get("formats", [])
    dataset = manifest.get("dataset", {})
    sources: dict[str, dict] = {}
    source_problem = None
    if check_source:
        try:
            sources = _source_shards(dataset)
        except (UserError, FileNotFoundError, KeyError, ValueError) as e:
            source_problem = f"source dataset {dataset.get('uri')!r} split {dataset.get('split')!r} unreadable: {e}"
    problems: dict[str, str] = {}
    total = 0

    def check(entry: dict) -> tuple[str, list[str], int]:
        name = entry.get("name", "?")
        found: list[str] = []
        src_keys = src_labels = None
        if check_source:
            if source_problem:
                found.append(source_problem)
            else:
                src = sources.get(entry.get("source"))
                if src is None:
                    found.append(f"source shard {entry.get('source')!r} is not in the dataset any more")
                else:
                    if src["sha256"] != entry.get("source_sha256"):
                        found.append("source shard changed since the cache was written (stale; run regen)")
                    try:
                        _, src_labels, src_keys = data_shards.load_shard(src["uri"])
                        src_keys = np.asarray(src_keys, dtype=object)
                    except Exception as e:  # noqa: BLE001 - any unreadable source is reported, not raised
                        found.append(f"source shard {entry.get('source')} unreadable: {e}")
        rows = 0
        for fmt in formats:
            info = (entry.get("files") or {}).get(fmt)
            if info is None:
                found.append(f"{fmt} file not recorded in the manifest")
                continue
            fname = info["path"]
            try:
                data = storage.read_bytes(storage.join(uri, fname))
            except FileNotFoundError:
                found.append(f"{fname} missing")
                continue
            if storage.sha256_bytes(data) != info.get("sha256"):
                found.append(f"{fname} sha256 mismatch (damaged)")
                continue
            try:
                arrays = read_shard(data, fmt)
            except Exception as e:  # noqa: BLE001
                found.append(f"{fname} unreadable: {e}")
                continue
            n = len(arrays["keys"])
            rows = n
            if n != int(entry.get("num_samples", -1)):
                found.append(f"{fname} has {n} rows, manifest says {entry.get('num_samples')}")
            if src_keys is not None:
                if len(src_keys) != n or not np.array_equal(arrays["keys"], src_keys):
                    found.append(f"{fname} keys differ from the source shard's keys (order or content)")
                elif src_labels is not None:
                    sl = labels_or_none(src_labels, n)
                    want = sl if sl is not None else np.full(n, -1)
                    if not np.array_equal(arrays["labels"], want):
                        found.append(f"{fname} labels differ from the source shard's labels")
            for msg in _check_values(arrays, layout):
                found.append(f"{fname}: {msg}")
        return name, found, rows

    entries = manifest.get("shards", [])
    with cf.ThreadPoolExecutor(min(HASH_THREADS, max(1, len(entries)))) as pool:
        for i, (name, found, rows) in enumerate(pool.map(check, entries)):
            total += rows
            if found:
                problems[name] = "; ".join(found)
            if progress:
                from pipeline.log import log

                log(f"targets verify: {i + 1}/{len(entries)} {name}: {'DAMAGED' if found else 'ok'}")
    owned = {e.get("name") for e in entries}
    orphans = orphan_files(uri, owned, formats)
    damaged = [e.get("name") for e in entries if e.get("name") in problems]
    # Coverage: a `shards` list that lost entries (truncated, emptied) must not verify. Every shard
    # of the source split needs its cache shard, and the list must match the manifest's own totals.
    lost = []
    if check_source and not source_problem:
        covered = {e.get("source") for e in entries}
        lost = [path for path in sources if path not in covered]
    for path in lost:
        name = f"(source {path})"
        damaged.append(name)
        problems[name] = (f"no cache shard covers source shard {path} of {dataset.get('uri')} split "
                          f"{dataset.get('split')!r} (the manifest's shards list lost it); run "
                          "`distill targets regen CONFIG` to write it")
    if check_source and source_problem and not entries:
        damaged.append("(source)")
        problems["(source)"] = f"the manifest lists no shards and {source_problem}"
    recorded = manifest.get("num_shards")
    if not lost and recorded is not None and int(recorded) != len(entries):
        name = "(manifest)"
        damaged.append(name)
        problems[name] = (f"{manifest_uri(uri)} lists {len(entries)} shard(s) but records num_shards "
                          f"{recorded}; run `distill targets regen CONFIG` to rewrite it")
    return {
        "uri": uri,
        "checked": len(entries),
        "damaged": len(damaged),
        "damaged_shards": damaged,
        "problems": problems,
        "num_samples": total,
        "formats": formats,
        "orphans": orphans,
        "teacher_fingerprint": manifest.get("teacher_fingerprint"),
    }
