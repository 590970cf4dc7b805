"""The cache's file formats: the one registry, the interface a format implements, and writing a shard.

Belongs here: `CacheFormat` (what a format provides), `REGISTRY` (the one list of formats: every
other place — `targets.format` validation in `pipeline.config`, file names, readers, regen's
orphan check — derives from it), turning the `targets.format` setting into formats, and
`write_cache_shard`, which publishes one shard in each format atomically. A new format is a module
beside `parquet.py` and `webdataset.py` with a class of this shape, added to `REGISTRY`.

Crash safety. Every file is written to a local temp file and published with `os.replace` (locally)
or one PUT (`storage.atomic_local_target`, on S3), so a shard is visible complete or not at all.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Iterator, Optional, Protocol, Sequence

import numpy as np

from pipeline import storage
from pipeline.cache.layout import Layout
from pipeline.cache.parquet import ParquetFormat
from pipeline.cache.webdataset import WebDatasetFormat
from pipeline.errors import UserError


class CacheFormat(Protocol):
    """One file format of a cache shard (every format holds the same `Layout` fields)."""

    name: str             # as in `targets.format` and the manifest's "formats"
    extension: str        # the file name's suffix: {split}-{index:06d}{extension}
    carries_inputs: bool  # True: the file holds the inputs; False: readers join it with the input shard

    def write(self, path: str, keys: Sequence[str], labels: Optional[np.ndarray], fields: dict[str, np.ndarray],
              layout: Layout, inputs: Optional[np.ndarray] = None, metadata: Optional[dict] = None) -> None:
        """Write one shard to the local file `path`."""

    def read(self, source: Any) -> dict[str, np.ndarray]:
        """A shard (path, file object or bytes) as {"keys", "labels" (-1: none), field..., ["inputs"]}."""


REGISTRY: dict[str, CacheFormat] = {f.name: f for f in (ParquetFormat(), WebDatasetFormat())}
FORMATS: tuple[str, ...] = tuple(REGISTRY)                     # in the order a manifest lists them
EXTENSIONS = {name: f.extension for name, f in REGISTRY.items()}
FORMAT_SETTINGS: tuple[str, ...] = (*FORMATS, "both")         # what `targets.format` accepts


def get_format(name: str) -> CacheFormat:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown cache format {name!r}; the formats are {', '.join(FORMATS)}") from None


def formats_from_setting(setting: str | Sequence[str]) -> list[str]:
    """`targets.format` ("parquet" | "webdataset" | "both") as the list of formats to write."""
    if isinstance(setting, str):
        if setting == "both":
            return list(FORMATS)
        setting = [setting]
    out = [f for f in FORMATS if f in setting]
    bad = [f for f in setting if f not in FORMATS]
    if bad or not out:
        raise UserError(f"targets.format: {list(setting)!r} is not valid; use {', '.join(FORMAT_SETTINGS)}")
    return out


def shard_file_name(name: str, fmt: str) -> str:
    return name + get_format(fmt).extension


def format_of(uri: str) -> str:
    """The format of a cache shard file, from its name."""
    for fmt, ext in EXTENSIONS.items():
        if str(uri).endswith(ext):
            return fmt
    raise UserError(f"{uri}: not a cache shard (expected a file ending in {' or '.join(EXTENSIONS.values())})")


def read_shard(source: Any, fmt: str) -> dict[str, np.ndarray]:
    """One cache shard's bytes (or path, or file object) in format `fmt` as numpy arrays."""
    return get_format(fmt).read(source)


@contextlib.contextmanager
def _publishing(uri: str) -> Iterator[str]:
    """A local path to write; on success it appears at `uri` whole, on failure not at all.

    Locally the temp file sits in the destination folder (dot-prefixed, so no reader or shard
    listing takes it for a shard; regen deletes leftovers of killed writers) and `os.replace`
    publishes it without a copy. Remote URIs use `storage.atomic_local_target` (one upload).
    """
    if storage.is_remote(uri):
        with storage.atomic_local_target(uri) as tmp:
            yield tmp
        return
    path = storage.get_fs(uri)[1]
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_cache_shard(
    cache_uri: str,
    name: str,
    formats: Sequence[str],
    layout: Layout,
    keys: Sequence[str],
    labels: Optional[np.ndarray],
    fields: dict[str, np.ndarray],
    inputs: Optional[np.ndarray] = None,
    metadata: Optional[dict] = None,
) -> dict[str, dict]:
    """Write shard `name` in each format under `cache_uri`, each file atomically.

    Returns {format: {"path": file name, "sha256", "bytes"}} for the manifest. The checksum is taken
    from the local temp file before it is published, so S3 objects are never read back.
    """
    out: dict[str, dict] = {}
    for fmt in formats:
        impl = get_format(fmt)
        fname = shard_file_name(name, fmt)
        with _publishing(storage.join(cache_uri, fname)) as tmp:
            impl.write(tmp, keys, labels, fields, layout, inputs=inputs, metadata=metadata)
            out[fmt] = {"path": fname, "sha256": storage.sha256_file(tmp), "bytes": os.path.getsize(tmp)}
    return out
