"""The Parquet cache format: one file per shard, targets only (readers join it with the input shard).

Belongs here: writing and reading one Parquet cache shard, and `ParquetFormat`, its entry in the
format registry (`formats.py`). Columns: ``key`` (string), ``label`` (int32, null when unlabelled)
and one FixedSizeList column per 1-D field of the `Layout` (a plain float32 column for the top-k
tails), in one zstd row group. The file holds no inputs: `pipeline.datasets` reads it together with
its source input shard and checks the keys. pyarrow is imported only when a file is read or written.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np

from pipeline.cache.layout import FORMAT_VERSION, KIND, Layout, labels_or_none


def write_parquet(path: str, keys: Sequence[str], labels: Optional[np.ndarray], fields: dict[str, np.ndarray],
                  layout: Layout, metadata: Optional[dict] = None) -> None:
    """One cache shard as a Parquet file at local `path` (one row group, zstd)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(keys)
    y = labels_or_none(labels, n)
    layout.check_fields(fields, n)
    cols: dict[str, Any] = {"key": pa.array(list(keys) if not isinstance(keys, np.ndarray) else keys.astype(str),
                                            type=pa.string())}
    if y is None:
        cols["label"] = pa.nulls(n, type=pa.int32())
    else:
        cols["label"] = pa.array(y.astype(np.int32), type=pa.int32(), mask=y < 0)
    for name, (_, shape) in layout.fields().items():
        arr = np.ascontiguousarray(fields[name])
        if shape:
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), shape[0])
        else:
            cols[name] = pa.array(arr)
    meta = {"distill.kind": KIND, "distill.format_version": str(FORMAT_VERSION),
            "distill.num_classes": str(layout.num_classes), "distill.dtype": layout.dtype,
            "distill.top_k": json.dumps(layout.top_k)}
    meta.update({f"distill.{k}": str(v) for k, v in (metadata or {}).items()})
    table = pa.table(cols).replace_schema_metadata(meta)
    # Logits are near-random bits: statistics and dictionaries only cost time; zstd still saves on
    # keys, labels and float16 exponents.
    pq.write_table(table, path, compression="zstd", row_group_size=max(n, 1), write_statistics=["key", "label"],
                   use_dictionary=False)


def read_parquet(source: Any) -> dict[str, np.ndarray]:
    """A Parquet cache shard (local path, file object or bytes) as numpy arrays, column by column.

    Returns {"keys": (N,) str objects, "labels": (N,) int64 (-1: no label), field: (N, ...)}.
    FixedSizeList columns are flattened and reshaped in one step: no per-row Python loop.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = pa.BufferReader(source)
    table = pq.read_table(source)
    out: dict[str, np.ndarray] = {
        "keys": table.column("key").to_numpy(zero_copy_only=False),
        "labels": pc.fill_null(table.column("label"), -1).to_numpy(zero_copy_only=False).astype(np.int64),
    }
    for name in table.column_names:
        if name in ("key", "label"):
            continue
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            width = col.type.list_size
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


class ParquetFormat:
    """`formats.CacheFormat` for Parquet: targets only, joined with the input shard when read."""

    name = "parquet"
    extension = ".parquet"
    carries_inputs = False

    def write(self, path: str, keys: Sequence[str], labels: Optional[np.ndarray], fields: dict[str, np.ndarray],
              layout: Layout, inputs: Optional[np.ndarray] = None, metadata: Optional[dict] = None) -> None:
        write_parquet(path, keys, labels, fields, layout, metadata)

    def read(self, source: Any) -> dict[str, np.ndarray]:
        return read_parquet(source)
