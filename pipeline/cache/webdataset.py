"""The WebDataset cache format: one self-contained tar per shard (inputs, labels and targets).

Belongs here: writing one cache tar (with array operations when the shard is regular), decoding it
back to numpy arrays, and `WebDatasetFormat`, its entry in the format registry (`formats.py`).
Reading the tar itself (headers, members, .npy payloads) is `pipeline.data.tario`, the one tar reader.

Per sample: ``KEY.cls`` (label; absent when unlabelled), ``KEY.input.npy`` (the dataset's stored
input) and ONE member for all its targets, ``KEY.targets.npy``: a 0-d .npy of a packed
little-endian structured dtype whose fields are the `Layout`'s fields in order (e.g. dense float16
at C classes: ``[("generalist_logits", "<f2", (C,)), ("ensemble_logprobs", "<f2", (C,))]``, 4 C
bytes + a 128-byte header). Every tar member costs a 512-byte header plus its data rounded up to
512 bytes, so one member instead of one per field saves at least 1 KiB per field per sample.
`np.load(..., allow_pickle=False)` and the `webdataset` library read it; the fields come out by
name. Format version 1 wrote one member per field (top-k: one structured member per target) and
int32 top-k indices; `read_webdataset` still decodes those files.
"""
from __future__ import annotations

import io
import tarfile
from typing import Any, Optional, Sequence

import numpy as np

from pipeline.cache.layout import Layout, labels_or_none
from pipeline.data import tario
from pipeline.data.tario import LABEL_EXT, MAX_LABEL_CHARS
from pipeline.tarfast import BLOCK as _BLOCK, headers as _tar_headers, npy_header as _npy_header, padded as _padded


def _pack_targets(fields: dict[str, np.ndarray], layout: Layout, n: int) -> np.ndarray:
    """(n,) records of `layout.record_dtype()`: all of a sample's targets in one tar member."""
    rec = np.empty(n, dtype=layout.record_dtype())
    for name in layout.fields():
        rec[name] = fields[name]
    return rec


def write_webdataset(path: str, keys: Sequence[str], labels: Optional[np.ndarray], inputs: Optional[np.ndarray],
                     fields: dict[str, np.ndarray], layout: Layout) -> None:
    """One cache shard as a self-contained WebDataset tar at local `path`.

    Members per sample: KEY.cls (when labelled), KEY.input.npy (when `inputs` is given) and
    KEY.targets.npy, one structured record of all the sample's target fields (see the module
    docstring). Each .npy is a fixed header plus the row's bytes, so writing needs no per-sample
    `np.save`.
    """
    n = len(keys)
    y = labels_or_none(labels, n)
    arrays: dict[str, np.ndarray] = {}
    if inputs is not None:
        x = np.ascontiguousarray(inputs)
        if len(x) != n:
            raise ValueError(f"{len(x)} inputs for {n} samples")
        arrays["input.npy"] = x
    layout.check_fields(fields, n)
    arrays["targets.npy"] = _pack_targets(fields, layout, n)
    members = []  # (suffix, .npy header, (N, row bytes) body)
    for m, a in arrays.items():
        body = np.ascontiguousarray(a).view(np.uint8).reshape(n, a.dtype.itemsize * int(np.prod(a.shape[1:])))
        members.append((m, _npy_header(a.dtype, a.shape[1:]), body))
    parts = _tar_fast(keys, y, members)
    with open(path, "wb") as f:
        if parts is not None:
            for part in parts:
                f.write(part)
            return
        # Irregular shards (keys of different lengths, partial labels): one tarfile member at a time.
        # Plain USTAR members with TarInfo's defaults (mtime 0, no owner): equal bytes either way.
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(n):
                key = str(keys[i])
                items = [(f"{key}.cls", str(int(y[i])).encode())] if y is not None and y[i] >= 0 else []
                items += [(f"{key}.{m}", header + body[i].tobytes()) for m, header, body in members]
                for mname, blob in items:
                    info = tarfile.TarInfo(mname)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))


def _tar_fast(keys: Sequence[str], y: Optional[np.ndarray],
              members: list[tuple[str, bytes, np.ndarray]]) -> Optional[list]:
    """The bytes `write_webdataset` would write member by member (as buffers to write in order),
    built as one (N, period) array; None when the shard is irregular (then `tarfile` is used).

    Every sample of a cache shard has the same members with the same sizes (only the label's digit
    count varies, always within one block), so the archive is a (N, period) byte matrix: headers
    are built for all samples at once instead of member by member."""
    n = len(keys)
    kb = [str(k).encode("utf-8") for k in keys]
    if n == 0 or not kb[0] or any(len(k) != len(kb[0]) for k in kb):
        return None
    klen = len(kb[0])
    suffixes = (["cls"] if y is not None else []) + [m for m, _, _ in members]
    if any(b"." in k for k in kb) or klen + 1 + max(len(sfx) for sfx in suffixes) > 99:
        return None
    keys_arr = np.frombuffer(b"".join(kb), dtype=np.uint8).reshape(n, klen)
    slots = []  # (suffix, offset in the sample's record, sizes, [(offset in payload, bytes or rows)])
    period = 0
    if y is not None:
        if (y < 0).any():
            return None
        digits = np.array([str(int(v)) for v in y], dtype=f"S{MAX_LABEL_CHARS}")
        slots.append(("cls", 0, np.char.str_len(digits).astype(np.int64),
                      [digits.view(np.uint8).reshape(n, MAX_LABEL_CHARS)]))
        period = 2 * _BLOCK
    for suffix, header, body in members:
        size = len(header) + body.shape[1]
        slots.append((suffix, period, np.full(n, size, dtype=np.int64), [header, body]))
        period += _BLOCK + _padded(size)
    rec = np.zeros((n, period), dtype=np.uint8)
    for suffix, off, sizes, pieces in slots:
        sfx = np.frombuffer(b"." + suffix.encode(), dtype=np.uint8)
        names = np.concatenate([keys_arr, np.broadcast_to(sfx, (n, len(sfx)))], axis=1)
        rec[:, off:off + _BLOCK] = _tar_headers(names, sizes)
        at = off + _BLOCK
        for piece in pieces:
            piece = np.frombuffer(piece, dtype=np.uint8) if isinstance(piece, bytes) else piece
            width = piece.shape[-1]
            rec[:, at:at + width] = piece
            at += width
    body_len = n * period + 2 * _BLOCK
    return [rec, bytes(2 * _BLOCK + (-body_len) % tarfile.RECORDSIZE)]


def read_webdataset(source: Any, name: str = "cache shard") -> dict[str, np.ndarray]:
    """A WebDataset cache shard (local path, file object or bytes) as numpy arrays.

    Returns {"keys", "labels" (-1: none), "inputs" (if stored), field: (N, ...)} in the tar's order.
    A regular tar (what `write_webdataset` writes with labels on every sample or none) is indexed
    with array operations (`tario.index_regular_tar`); anything else member by member
    (`tario.tar_members`), where a sample may lack its `.cls`. Each member's .npy payloads are
    decoded together (`tario.decode_npy`), never with pickle; members that are not .npy are
    ignored, as WebDataset would. Raises `tario.ShardError` (or ValueError) on a damaged tar.
    """
    if isinstance(source, str):
        with open(source, "rb") as f:
            source = f.read()
    elif not isinstance(source, (bytes, bytearray, memoryview)):
        source = source.read()
    data = bytes(source)
    fast = tario.index_regular_tar(data)
    if fast is not None and all(ext.endswith(".npy") for ext in fast.members):
        n = len(fast.keys)
        labels = fast.labels.astype(np.int64) if fast.labels is not None else np.full(n, -1, dtype=np.int64)
        out: dict[str, np.ndarray] = {"keys": np.array(fast.keys, dtype=object), "labels": labels}
        for ext, (offsets, size) in fast.members.items():
            arr = tario.decode_npy(data, offsets, np.full(n, size, dtype=np.int64), name, f".{ext} member")
            _put_member(out, ext[:-4], arr)
        return out
    keys: list[str] = []
    index: dict[str, int] = {}
    label_of: dict[int, int] = {}
    at: dict[str, dict[int, tuple[int, int]]] = {}  # extension -> sample -> (offset, size)
    for key, ext, off, size in tario.tar_members(data, name):
        i = index.get(key)
        if i is None:
            i = index[key] = len(keys)
            keys.append(key)
        if ext == LABEL_EXT:
            label_of[i] = int(data[off:off + size].decode().strip())
        elif ext.endswith(".npy"):
            if i in at.setdefault(ext, {}):
                raise ValueError(f"{name}: sample {key} has two .{ext} members")
            at[ext][i] = (off, size)
    n = len(keys)
    y = np.full(n, -1, dtype=np.int64)
    for i, v in label_of.items():
        y[i] = v
    out = {"keys": np.array(keys, dtype=object), "labels": y}
    for ext, where in at.items():
        if len(where) != n:
            raise ValueError(f"{name}: member .{ext} present for {len(where)} of {n} samples")
        offsets = np.array([where[i][0] for i in range(n)], dtype=np.int64)
        sizes = np.array([where[i][1] for i in range(n)], dtype=np.int64)
        _put_member(out, ext[:-4], tario.decode_npy(data, offsets, sizes, name, f".{ext} member"))
    return out


def _put_member(out: dict[str, np.ndarray], name: str, arr: np.ndarray) -> None:
    """Store a decoded member under its field name(s): `input` -> "inputs"; the structured
    `targets` record -> one array per field; a format-1 structured top-k record -> its
    idx/val/tail fields."""
    if name == "targets" and arr.dtype.names:
        for part in arr.dtype.names:
            sub = np.ascontiguousarray(arr[part])
            out[part] = sub.astype(sub.dtype.newbyteorder("="), copy=False)
    elif name.endswith("_topk") and arr.dtype.names:
        for part in arr.dtype.names:  # idx, val, tail
            sub = np.ascontiguousarray(arr[part])
            out[f"{name}_{part}" if part != "tail" else f"{name[:-5]}_tail"] = sub.astype(sub.dtype.newbyteorder("="))
    else:
        out["inputs" if name == "input" else name] = arr


class WebDatasetFormat:
    """`formats.CacheFormat` for WebDataset: self-contained tars that carry the inputs too."""

    name = "webdataset"
    extension = ".tar"
    carries_inputs = True

    def write(self, path: str, keys: Sequence[str], labels: Optional[np.ndarray], fields: dict[str, np.ndarray],
              layout: Layout, inputs: Optional[np.ndarray] = None, metadata: Optional[dict] = None) -> None:
        write_webdataset(path, keys, labels, inputs, fields, layout)

    def read(self, source: Any) -> dict[str, np.ndarray]:
        return read_webdataset(source)
