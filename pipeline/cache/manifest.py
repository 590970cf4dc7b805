"""The cache folder's bookkeeping: `manifest.json`, the per-shard `_parts/` entries and their readers.

Belongs here: where the bookkeeping files live, reading and writing them, and what a manifest and a
shard entry hold. Layout under the cache URI (local folder or s3://bucket/prefix)::

    {split}-{index:06d}.parquet       one per input shard, same name stem and sample order as the input
    {split}-{index:06d}.tar           the same shard as WebDataset (when `targets.format` asks for it)
    _parts/{split}-{index:06d}.json   the shard's manifest entry, written right after its files
    manifest.json                     written last; its absence means "incomplete, run regen"

A shard's `_parts/` entry (fingerprint, checksums) is written after its files, so a killed
regeneration keeps the shards it finished; `manifest.json` is removed before any shard is rewritten
and written again only when every shard is done (`pipeline.stages.targets`). `read_manifest` refuses
a cache of another format version and says to run ``distill targets regen`` (every shard's
fingerprint includes the version, so regen rewrites them all).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from pipeline import storage
from pipeline.cache.formats import FORMATS
from pipeline.cache.layout import FORMAT_VERSION, KIND, Layout
from pipeline.errors import UserError

MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"


def manifest_uri(cache_uri: str) -> str:
    return storage.join(cache_uri, MANIFEST_NAME)


def part_uri(cache_uri: str, name: str) -> str:
    return storage.join(cache_uri, PARTS_DIR, f"{name}.json")


def read_manifest(cache_uri: str) -> dict:
    """The cache's manifest; UserError naming the URI when it is absent (incomplete) or not a cache."""
    uri = manifest_uri(cache_uri)
    try:
        manifest = storage.read_json(uri)
    except FileNotFoundError:
        hint = ""
        if storage.exists(storage.join(cache_uri, PARTS_DIR)):
            hint = " (shards exist: a regeneration was interrupted)"
        raise UserError(
            f"{uri}: no manifest, so {cache_uri} is not a complete soft-target cache{hint}; "
            "run `distill targets regen CONFIG` (or `distill stage targets CONFIG`) to finish it"
        ) from None
    except ValueError as e:
        raise UserError(f"{uri}: not valid JSON ({e}); run `distill targets regen CONFIG` to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise UserError(f"{uri}: not a soft-target cache manifest (kind {manifest.get('kind') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{uri}: cache format version {manifest.get('format_version')!r}, this distill reads {FORMAT_VERSION}; "
            "run `distill targets regen CONFIG` to rebuild it"
        )
    return manifest


def read_part(cache_uri: str, name: str) -> Optional[dict]:
    """Shard `name`'s `_parts/` entry, or None when it is absent or unreadable (then regen redoes it)."""
    try:
        entry = storage.read_json(part_uri(cache_uri, name))
    except (FileNotFoundError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("name") == name else None


def write_part(cache_uri: str, entry: dict) -> None:
    storage.write_json_atomic(part_uri(cache_uri, entry["name"]), entry)


def layout_of(manifest: dict) -> Layout:
    return Layout(int(manifest["num_classes"]), manifest["dtype"], manifest.get("top_k"))


def entry_from_task(task: dict, files: dict[str, dict]) -> dict:
    """A shard's manifest entry (also its `_parts/` file) from its task and its written files."""
    return {
        "name": task["name"], "index": int(task["index"]), "source": task["source"],
        "source_sha256": task["source_sha256"], "num_samples": int(task["num_samples"]),
        "fingerprint": task["fingerprint"], "files": {fmt: files[fmt] for fmt in FORMATS if fmt in files},
    }


def build_manifest(*, layout: Layout, formats: Sequence[str], fingerprints: dict, dataset: dict,
                   shards: Sequence[dict], extra: Optional[dict] = None) -> dict:
    """The manifest.json object; `shards` are entries (`entry_from_task`) in source order."""
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "num_classes": layout.num_classes,
        "dtype": layout.dtype,
        "top_k": layout.top_k,
        "formats": list(formats),
        "fields": {k: {"dtype": str(d), "shape": list(s)} for k, (d, s) in layout.fields().items()},
        "fingerprints": dict(fingerprints),
        "teacher_fingerprint": fingerprints["teacher_fingerprint"],
        "dataset": dict(dataset),
        "num_samples": int(sum(int(s["num_samples"]) for s in shards)),
        "num_shards": len(shards),
        "shards": list(shards),
        **(extra or {}),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def manifest_core(manifest: Optional[dict]) -> Any:
    """The manifest without timestamps/timings: equal cores mean nothing needs rewriting."""
    if not manifest:
        return None
    return {k: v for k, v in manifest.items() if k not in ("written_at", "seconds")}


def describe_bytes(manifest: dict) -> dict[str, float]:
    """Bytes per sample of each format (for reports and the benchmark)."""
    n = max(1, int(manifest.get("num_samples", 0)))
    out = {}
    for fmt in manifest.get("formats", []):
        total = sum(int(e["files"][fmt]["bytes"]) for e in manifest["shards"] if fmt in e.get("files", {}))
        out[fmt] = total / n
    return out
