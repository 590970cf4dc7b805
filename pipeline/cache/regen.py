"""The regeneration plan: which cache shards are up to date, stale, missing or damaged; nothing written.

Belongs here: comparing what a cache should hold (one desired entry per input shard, with its
fingerprint from `fingerprints.py`) with what it holds, and finding files no shard owns. The Ray
Data job that then writes what the plan asks for is `pipeline.stages.targets`.
"""
from __future__ import annotations

import concurrent.futures as cf
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from pipeline import storage
from pipeline.cache.formats import EXTENSIONS, format_of, shard_file_name
from pipeline.cache.manifest import PARTS_DIR, entry_from_task, manifest_uri, read_part

HASH_THREADS = 8  # files hashed at once: hashing is I/O bound on S3
_SHARD_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_]+-\d{6})(?P<ext>" + "|".join(re.escape(e) for e in EXTENSIONS.values())
                         + r")$")


@dataclass
class ShardPlan:
    """What regen must do for one input shard."""

    name: str
    index: int
    source: str          # source shard path as in the dataset manifest
    source_uri: str
    source_sha256: str
    num_samples: int
    fingerprint: str
    status: str = "kept"   # kept | missing | stale | damaged
    write_formats: list[str] = field(default_factory=list)
    kept_files: dict[str, dict] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def entry(self, files: dict[str, dict]) -> dict:
        return entry_from_task(self.task(), files)

    def task(self) -> dict:
        """JSON-able work item for a writer (see `pipeline.stages.targets`)."""
        return {"name": self.name, "index": self.index, "source": self.source, "source_uri": self.source_uri,
                "source_sha256": self.source_sha256, "num_samples": self.num_samples,
                "fingerprint": self.fingerprint, "write_formats": list(self.write_formats),
                "kept_files": dict(self.kept_files)}


def _check_file(cache_uri: str, info: dict) -> Optional[str]:
    """None if the file exists with the recorded checksum, else what is wrong."""
    uri = storage.join(cache_uri, info["path"])
    try:
        digest = storage.sha256_file(uri)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e})"
    if digest != info.get("sha256"):
        return "damaged"
    return None


def plan_regen(cache_uri: str, desired: Sequence[dict], formats: Sequence[str]) -> list[ShardPlan]:
    """Compare each desired shard with what the cache holds; nothing is written.

    desired: dicts with name, index, source, source_uri, source_sha256, num_samples, fingerprint.
    A shard is `kept` when its recorded fingerprint matches and every wanted format's file exists
    with its recorded sha256 (every file is hashed: a flipped byte is found). The record comes from
    `_parts/NAME.json` (newest), else the manifest. Otherwise it is `stale` (fingerprint differs:
    all formats rewritten), `missing` (no record, or a file is absent) or `damaged` (checksum
    mismatch); only the formats that need it are rewritten.
    """
    try:
        manifest_entries = {e["name"]: e for e in storage.read_json(manifest_uri(cache_uri)).get("shards", [])}
    except (FileNotFoundError, ValueError, AttributeError, KeyError, TypeError):
        manifest_entries = {}
    plans = [ShardPlan(**{k: d[k] for k in ("name", "index", "source", "source_uri", "source_sha256",
                                             "num_samples", "fingerprint")}) for d in desired]

    def inspect(p: ShardPlan) -> ShardPlan:
        entry = read_part(cache_uri, p.name) or manifest_entries.get(p.name)
        if entry is None:
            p.status, p.write_formats = "missing", list(formats)
            p.problems.append("not in the cache")
            return p
        if entry.get("fingerprint") != p.fingerprint or int(entry.get("num_samples", -1)) != p.num_samples:
            p.status, p.write_formats = "stale", list(formats)
            p.problems.append("fingerprint differs (teacher, input shard or settings changed)")
            return p
        worst = None
        for fmt in formats:
            info = (entry.get("files") or {}).get(fmt)
            why = "missing" if info is None else _check_file(cache_uri, info)
            if why is None:
                p.kept_files[fmt] = info
                continue
            p.write_formats.append(fmt)
            p.problems.append(f"{shard_file_name(p.name, fmt)} {why}")
            kind = "missing" if why == "missing" else "damaged"
            worst = "damaged" if kind == "damaged" or worst == "damaged" else kind
        p.status = worst or "kept"
        return p

    with cf.ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(inspect, plans))


def orphan_files(cache_uri: str, keep_names: Iterable[str], formats: Sequence[str]) -> list[str]:
    """Files under the cache that no current shard owns: shards of vanished inputs or dropped
    formats, their `_parts/` entries and temp files of killed writers."""
    keep = set(keep_names)
    out = []
    for fname in storage.listdir(cache_uri):
        m = _SHARD_FILE.match(fname)
        if m:
            if m.group("name") not in keep or format_of(fname) not in formats:
                out.append(fname)
        elif fname.startswith(".tmp-"):
            out.append(fname)
    for fname in storage.listdir(storage.join(cache_uri, PARTS_DIR)):
        stem = fname[:-5] if fname.endswith(".json") else fname
        if stem not in keep or fname.startswith(".tmp-"):
            out.append(f"{PARTS_DIR}/{fname}")
    return out
