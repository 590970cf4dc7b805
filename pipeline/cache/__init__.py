"""Soft-target caches: the teacher's outputs, computed once, read by every student and tuning trial.

Distilling from a cache instead of running the teacher at every step is what makes tuning T and
alpha cheap. This package is the cache's file formats and bookkeeping, with no Ray and no torch in
it; the Ray Data job that fills a cache is `pipeline.stages.targets`, the datasets that read it are
`pipeline.datasets.cache_items`. Where things belong:

    layout.py        what a row holds (`Layout`: fields, dtypes, top-k) and `topk_to_dense`
    fingerprints.py  the hashes a cache's contents depend on (teacher, combination, shard)
    formats.py       the one format registry, the `CacheFormat` interface, `write_cache_shard`
    parquet.py       the Parquet format (targets only; joined with the input shard when read)
    webdataset.py    the WebDataset format (self-contained tars; tar reading is `pipeline.data.tario`)
    manifest.py      the folder layout, `manifest.json` and the `_parts/` entries
    regen.py         the regeneration plan (kept / stale / missing / damaged) and orphan files
    verify.py        `verify_cache`, the full check behind `distill targets verify`
    readers.py       reading a complete cache: format choice, one shard, one teacher's fields

The names production code uses are re-exported here, so `from pipeline import cache; cache.X`
works for all of them. Format description and bytes per sample: docs/performance.md, "Cache format".
"""
from __future__ import annotations

from pipeline.cache.fingerprints import fingerprint_of, shard_fingerprint, teacher_fingerprints
from pipeline.cache.formats import (EXTENSIONS, FORMAT_SETTINGS, FORMATS, REGISTRY, CacheFormat, format_of,
                                    formats_from_setting, get_format, read_shard, shard_file_name,
                                    write_cache_shard)
from pipeline.cache.layout import (DENSE_FIELDS, DTYPES, FORMAT_VERSION, KIND, LOGP_FLOOR, TARGETS, Layout,
                                   topk_to_dense)
from pipeline.cache.manifest import (MANIFEST_NAME, PARTS_DIR, build_manifest, describe_bytes, entry_from_task,
                                     layout_of, manifest_core, manifest_uri, part_uri, read_manifest, read_part,
                                     write_part)
from pipeline.cache.parquet import read_parquet, write_parquet
from pipeline.cache.readers import load_cache_shard, pick_format, select_targets
from pipeline.cache.regen import ShardPlan, orphan_files, plan_regen
from pipeline.cache.verify import verify_cache
from pipeline.cache.webdataset import read_webdataset, write_webdataset

__all__ = [
    "CacheFormat", "DENSE_FIELDS", "DTYPES", "EXTENSIONS", "FORMATS", "FORMAT_SETTINGS", "FORMAT_VERSION", "KIND",
    "LOGP_FLOOR", "Layout", "MANIFEST_NAME", "PARTS_DIR", "REGISTRY", "ShardPlan", "TARGETS", "build_manifest",
    "describe_bytes", "entry_from_task", "fingerprint_of", "format_of", "formats_from_setting", "get_format",
    "layout_of", "load_cache_shard", "manifest_core", "manifest_uri", "orphan_files", "part_uri", "pick_format",
    "plan_regen", "read_manifest", "read_parquet", "read_part", "read_shard", "read_webdataset", "select_targets",
    "shard_file_name", "shard_fingerprint", "teacher_fingerprints", "topk_to_dense", "verify_cache",
    "write_cache_shard", "write_parquet", "write_part", "write_webdataset",
]
