"""Soft-target caches: the teacher's outputs, computed once, read by every student and tuning trial.

Distilling from a cache instead of running the teacher at every step is what makes tuning T and alpha
cheap (PAPER.md section 1: cache logits or log-probabilities, never probabilities at one T). This
module is the cache's file format and bookkeeping, with no Ray in it: writing one shard, reading
shards back as whole numpy batches, the manifest and its fingerprints, the regeneration plan
(which shards are stale, missing or damaged) and `verify_cache`. The Ray Data job that fills a
cache is `pipeline.stages.targets`.

Layout under the cache URI (local folder or s3://bucket/prefix)::

    {split}-{index:06d}.parquet   one per input shard, same name stem and sample order as the input
    {split}-{index:06d}.tar       the same shard as WebDataset (when `targets.format` asks for it)
    _parts/{split}-{index:06d}.json   the shard's manifest entry, written right after its files
    manifest.json                 written last; its absence means "incomplete, run regen"

Per sample (both formats hold the same values):

* dense (default): ``generalist_logits`` (C,) the generalist's raw logits and ``ensemble_logprobs``
  (C,) the log-probabilities of the generalist + specialists combination (PAPER.md section 3),
  stored as float16 or float32. Log-probabilities are floored at ``LOGP_FLOOR`` (-1e4) so that a
  probability of exactly 0 is stored as a finite number: exp(-1e4 / T) is 0 for any T <= 1e3.
* top-k (``targets.top_k``, for large C): for each target t in (generalist, ensemble),
  ``{t}_topk_idx`` (k,) class indices sorted by decreasing probability (int16 when C <= 32767,
  else int32), ``{t}_topk_val`` (k,) their log-probabilities at T = 1 in the cache's dtype (the generalist's logits minus their logsumexp: the shift does
  not change softmax(z / T) at any T), and ``{t}_tail`` float32, the log of the probability mass
  outside the top k, computed exactly in float32 before rounding. `topk_to_dense` spreads the tail
  uniformly over the other C - k classes.

  The bias this introduces: the student is taught that every class outside the top k is equally
  likely, so the ranking among them (part of the "dark knowledge") is lost, and at T > 1 the
  softened tail has the wrong shape. Anshumann et al. (2025, "Sparse Logit Sampling") show such
  top-k targets are biased and cost accuracy and calibration; importance-sampled sparse targets are
  unbiased. Keep the default dense cache unless C makes it too large (e.g. JFT's 15,000 classes).

Parquet files have columns ``key`` (string), ``label`` (int32, null when unlabelled) and one
FixedSizeList column per 1-D field above (a plain float32 column for the top-k tails). They hold no
inputs: readers join them with the dataset's shards by position and check the keys. WebDataset tars
are self-contained: per sample ``KEY.cls`` (label; absent when unlabelled), ``KEY.input.npy`` (the
dataset's stored input) and ONE member for all its targets, ``KEY.targets.npy``: a 0-d .npy of a
packed little-endian structured dtype whose fields are the fields above in that order (e.g. dense
float16 at C classes: ``[("generalist_logits", "<f2", (C,)), ("ensemble_logprobs", "<f2", (C,))]``,
4 C bytes + a 128-byte header). Every tar member costs a 512-byte header plus its data rounded up
to 512 bytes, so one member instead of one per field saves at least 1 KiB per field per sample.
`np.load(..., allow_pickle=False)` and the `webdataset` library read it; the fields come out by
name. Bytes per sample of each layout are measured by bench/bench_cache_size.py (table in
docs/performance.md).

Format versions: 2 (this one). Version 1 wrote one tar member per field (top-k: per target) and
int32 top-k indices; its per-shard files are still readable by `read_parquet`/`read_webdataset`,
but `read_manifest` refuses a version-1 cache and says to run ``distill targets regen`` (every
shard's fingerprint includes the version, so regen rewrites them all).

Crash safety. Every file is written to a local temp file and published with
`storage.put_file_atomic` (rename locally, one PUT on S3), so a shard is visible complete or not at
all. Its `_parts/` entry (fingerprint, checksums) is written after its files, so a killed
regeneration keeps the shards it finished; `manifest.json` is removed before any shard is rewritten
and written again only when every shard is done.

Fingerprints. ``teacher`` = sha256 of the generalist's weights; ``specialists`` = hash of every
specialist's (weights sha256, subset); ``combination`` = hash of (top_n, method, iters, dustbin
corrections); ``teacher_fingerprint`` = hash of those three and C. A shard's fingerprint =
hash(teacher_fingerprint, source shard sha256, dtype, top_k, format version): a new teacher changes
every shard's, a changed input shard only its own.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.errors import UserError
from pipeline.tarfast import BLOCK as _BLOCK, USTAR_MAGIC as _USTAR_MAGIC, headers as _tar_headers
from pipeline.tarfast import npy_header as _npy_header, octal_values as _octal_values, padded as _padded

FORMAT_VERSION = 2
KIND = "distill-soft-targets"
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"
FORMATS = ("parquet", "webdataset")
EXTENSIONS = {"parquet": ".parquet", "webdataset": ".tar"}
TARGETS = ("generalist", "ensemble")
DENSE_FIELDS = {"generalist": "generalist_logits", "ensemble": "ensemble_logprobs"}
LOGP_FLOOR = -1.0e4
DTYPES = ("float16", "float32")
_SHARD_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_]+-\d{6})\.(?P<ext>parquet|tar)$")
_HASH_THREADS = 8


# --------------------------------------------------------------------------------------------------
# Fingerprints


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


def formats_from_setting(setting: str | Sequence[str]) -> list[str]:
    """`targets.format` ("parquet" | "webdataset" | "both") as the list of formats to write."""
    if isinstance(setting, str):
        if setting == "both":
            return list(FORMATS)
        setting = [setting]
    out = [f for f in FORMATS if f in setting]
    bad = [f for f in setting if f not in FORMATS]
    if bad or not out:
        raise UserError(f"targets.format: {list(setting)!r} is not valid; use parquet, webdataset or both")
    return out


def shard_file_name(name: str, fmt: str) -> str:
    return name + EXTENSIONS[fmt]


# --------------------------------------------------------------------------------------------------
# Values per sample


@dataclass(frozen=True)
class Layout:
    """What each cache row holds: C, the stored float dtype and top-k (None: dense)."""

    num_classes: int
    dtype: str = "float16"
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"targets.dtype: {self.dtype!r} is not supported; use float16 or float32")
        if self.top_k is not None and not 1 <= int(self.top_k) < int(self.num_classes):
            raise UserError(
                f"targets.top_k: {self.top_k} must be between 1 and num_classes - 1 = {self.num_classes - 1}; "
                "unset it to store dense targets"
            )

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def index_dtype(self) -> np.dtype:
        """Top-k class indices: int16 while every class index fits, else int32."""
        return np.dtype(np.int16) if self.num_classes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)

    def record_dtype(self) -> np.dtype:
        """The packed little-endian structured dtype of one sample's targets (WebDataset member)."""
        return np.dtype([(name, dt.newbyteorder("<"), shape) for name, (dt, shape) in self.fields().items()])

    def fields(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """field name -> (numpy dtype, per-sample shape), in storage order."""
        if self.top_k is None:
            return {f: (self.np_dtype, (self.num_classes,)) for f in DENSE_FIELDS.values()}
        k = int(self.top_k)
        out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        for t in TARGETS:
            out[f"{t}_topk_idx"] = (self.index_dtype, (k,))
            out[f"{t}_topk_val"] = (self.np_dtype, (k,))
            out[f"{t}_tail"] = (np.dtype(np.float32), ())
        return out

    def encode(self, generalist_logits: np.ndarray, ensemble_logprobs: np.ndarray) -> dict[str, np.ndarray]:
        """Float32 teacher outputs (N, C) -> the stored fields. Raises ValueError on non-finite values.

        Non-finite values would poison every student trained on the cache, so they are refused here
        (the writer names the shard) instead of being discovered by `verify`.
        """
        g = np.asarray(generalist_logits, dtype=np.float32)
        e = np.asarray(ensemble_logprobs, dtype=np.float32)
        if g.ndim != 2 or g.shape[1] != self.num_classes or e.shape != g.shape:
            raise ValueError(f"teacher outputs have shapes {g.shape} and {e.shape}; expected (N, {self.num_classes})")
        if not np.isfinite(g).all():
            raise ValueError("the generalist produced non-finite logits (NaN or inf): the checkpoint is broken")
        e = np.maximum(e, LOGP_FLOOR)  # exact zeros (log 0 = -inf) become a finite, negligible value
        if not np.isfinite(e).all():
            raise ValueError("the ensemble produced NaN log-probabilities: a specialist checkpoint is broken")
        if self.top_k is None:
            with np.errstate(over="ignore"):  # overflow is detected (and explained) just below
                out = {DENSE_FIELDS["generalist"]: g.astype(self.np_dtype),
                       DENSE_FIELDS["ensemble"]: e.astype(self.np_dtype)}
            for name, arr in out.items():
                if not np.isfinite(arr).all():
                    raise ValueError(
                        f"{name} overflows {self.dtype} (|value| > {float(np.finfo(self.np_dtype).max):g}); "
                        "set targets.dtype=float32"
                    )
            return out
        out = {}
        for t, logp in (("generalist", _log_softmax(g)), ("ensemble", e)):
            idx, val, tail = _topk(logp, int(self.top_k))
            out[f"{t}_topk_idx"] = idx.astype(self.index_dtype)
            out[f"{t}_topk_val"] = val.astype(self.np_dtype)
            out[f"{t}_tail"] = tail
        return out


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return (z - _logsumexp(z, 1)[:, None]).astype(np.float32)


def _topk(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (indices sorted by decreasing value, values) and the log tail mass, row by row."""
    part = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(logp, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1).astype(np.int32)
    val = np.maximum(np.take_along_axis(vals, order, 1), LOGP_FLOOR).astype(np.float32)
    rest = logp.astype(np.float32, copy=True)
    np.put_along_axis(rest, idx.astype(np.int64), -np.inf, 1)
    tail = np.maximum(_logsumexp(rest, 1), LOGP_FLOOR).astype(np.float32)
    return idx, val, tail


def topk_to_dense(idx: Any, val: Any, tail: Any, num_classes: int):
    """Dense (B, C) log-probabilities from top-k fields, the tail mass spread uniformly.

    Works on numpy arrays or torch tensors (returns the same kind, float32). Class c outside the
    top k gets log(tail mass / (C - k)); see the module docstring for the bias this introduces.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(val, torch.Tensor):
        k = val.shape[1]
        tail_t = torch.as_tensor(tail, device=val.device).float().reshape(-1, 1)
        dense = (tail_t - float(np.log(num_classes - k))).expand(val.shape[0], num_classes).clone()
        return dense.scatter_(1, torch.as_tensor(idx, device=val.device).long(), val.float())
    val = np.asarray(val, dtype=np.float32)
    k = val.shape[1]
    tail = np.asarray(tail, dtype=np.float32).reshape(-1, 1)
    dense = np.repeat(tail - np.float32(np.log(num_classes - k)), num_classes, axis=1)
    np.put_along_axis(dense, np.asarray(idx, dtype=np.int64), val, 1)
    return dense


# --------------------------------------------------------------------------------------------------
# Writing one shard


def _labels_or_none(labels: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
    """int64 labels with -1 for "no label", or None when the shard is unlabelled."""
    if labels is None:
        return None
    y = np.asarray(labels)
    if y.size == 0 and n:
        return None
    y = y.astype(np.int64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} samples")
    return None if (y < 0).all() else y


def write_parquet(path: str, keys: Sequence[str], labels: Optional[np.ndarray], fields: dict[str, np.ndarray],
                  layout: Layout, metadata: Optional[dict] = None) -> None:
    """One cache shard as a Parquet file at local `path` (one row group, zstd)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(keys)
    y = _labels_or_none(labels, n)
    cols: dict[str, Any] = {"key": pa.array(list(keys) if not isinstance(keys, np.ndarray) else keys.astype(str),
                                            type=pa.string())}
    if y is None:
        cols["label"] = pa.nulls(n, type=pa.int32())
    else:
        cols["label"] = pa.array(y.astype(np.int32), type=pa.int32(), mask=y < 0)
    for name, (dt, shape) in layout.fields().items():
        arr = np.ascontiguousarray(fields[name])
        if arr.shape != (n, *shape):
            raise ValueError(f"field {name} has shape {arr.shape}, expected {(n, *shape)}")
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


def write_webdataset(path: str, keys: Sequence[str], labels: Optional[np.ndarray], inputs: Optional[np.ndarray],
                     fields: dict[str, np.ndarray], layout: Layout) -> None:
    """One cache shard as a self-contained WebDataset tar at local `path`.

    Members per sample: KEY.cls (when labelled), KEY.input.npy (when `inputs` is given) and
    KEY.targets.npy, one structured record of all the sample's target fields (see the module
    docstring). Each .npy is a fixed header plus the row's bytes, so writing needs no per-sample
    `np.save`.
    """
    n = len(keys)
    y = _labels_or_none(labels, n)
    arrays: dict[str, np.ndarray] = {}
    if inputs is not None:
        x = np.ascontiguousarray(inputs)
        if len(x) != n:
            raise ValueError(f"{len(x)} inputs for {n} samples")
        arrays["input.npy"] = x
    for name, (dt, shape) in layout.fields().items():
        arr = np.ascontiguousarray(fields[name])
        if arr.shape != (n, *shape):
            raise ValueError(f"field {name} has shape {arr.shape}, expected {(n, *shape)}")
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


# Tar with array operations. Every sample of a cache shard has the same members with the same sizes
# (only the label's digit count varies, always within one block), so the archive is a (N, period)
# byte matrix: headers are built and checked for all samples at once instead of member by member.
_MAX_LABEL_CHARS = 20


def _tar_fast(keys: Sequence[str], y: Optional[np.ndarray],
              members: list[tuple[str, bytes, np.ndarray]]) -> Optional[list]:
    """The bytes `write_webdataset` would write member by member (as buffers to write in order),
    built as one (N, period) array; None when the shard is irregular (then `tarfile` is used)."""
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
        digits = np.array([str(int(v)) for v in y], dtype=f"S{_MAX_LABEL_CHARS}")
        slots.append(("cls", 0, np.char.str_len(digits).astype(np.int64),
                      [digits.view(np.uint8).reshape(n, _MAX_LABEL_CHARS)]))
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


def _read_tar_fast(data: bytes) -> Optional[dict[str, np.ndarray]]:
    """Decode a regular cache tar with array operations; None when it is not regular (the caller
    then reads it with `tarfile`). Every header is checked: name = key + suffix, ustar magic,
    regular file, size and checksum."""
    dv = np.frombuffer(data, dtype=np.uint8)
    layout: list[tuple[str, int, int]] = []
    off, key0 = 0, None
    while off + _BLOCK <= len(dv) and dv[off:off + _BLOCK].any():
        h = dv[off:off + _BLOCK]
        size = _octal_values(h[None, 124:135])
        if size is None:
            return None
        key, _, suffix = bytes(h[:100]).split(b"\0", 1)[0].decode("utf-8", "replace").partition(".")
        if key0 is None:
            key0 = key
        elif key != key0:
            break
        layout.append((suffix, off, int(size[0])))
        off += _BLOCK + _padded(int(size[0]))
    period = off
    if not layout or not key0:
        return None
    # The archive is n records, two zero blocks, then zero padding to tarfile's record size.
    n = (len(dv) - 2 * _BLOCK) // period
    while n > 0 and not dv[(n - 1) * period:(n - 1) * period + _BLOCK].any():
        n -= 1
    if n <= 0 or dv[n * period:].any():
        return None
    rows = dv[:n * period].reshape(n, period)
    klen = len(key0.encode("utf-8"))
    keys_arr = rows[:, layout[0][1]:layout[0][1] + klen]
    out: dict[str, np.ndarray] = {}
    for suffix, o, size in layout:
        hdr = rows[:, o:o + _BLOCK]
        sfx = np.frombuffer(("." + suffix).encode(), dtype=np.uint8)
        end = klen + len(sfx)
        stored = _octal_values(hdr[:, 148:154])
        sizes = _octal_values(hdr[:, 124:135])
        if (stored is None or sizes is None
                or not (hdr[:, :klen] == keys_arr).all() or not (hdr[:, klen:end] == sfx).all()
                or hdr[:, end:100].any() or not (hdr[:, 257:263] == _USTAR_MAGIC).all()
                or not np.isin(hdr[:, 156], (0, 48)).all()
                or not (stored == hdr.sum(axis=1, dtype=np.int64) - hdr[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32).all()):
            return None
        payload = rows[:, o + _BLOCK:o + _BLOCK + _padded(size)]
        if suffix == "cls":
            if sizes.max() > _MAX_LABEL_CHARS or size > _BLOCK:
                return None
            digits = np.ascontiguousarray(payload[:, :_MAX_LABEL_CHARS]).view(f"S{_MAX_LABEL_CHARS}").ravel()
            try:
                out["labels"] = digits.astype(np.int64)
            except ValueError:
                return None
            continue
        if not (sizes == size).all() or not suffix.endswith(".npy"):
            return None
        out[suffix] = payload[:, :size]
    if len(np.unique(keys_arr, axis=0)) != n:
        return None  # a key repeated: not one sample per record
    result: dict[str, np.ndarray] = {
        "keys": np.ascontiguousarray(keys_arr).view(f"S{klen}").ravel().astype(str).astype(object),
        "labels": out.pop("labels", np.full(n, -1, dtype=np.int64)),
    }
    for suffix, payload in out.items():
        result[suffix] = payload
    return result


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


def _pack_targets(fields: dict[str, np.ndarray], layout: Layout, n: int) -> np.ndarray:
    """(n,) records of `layout.record_dtype()`: all of a sample's targets in one tar member."""
    rec = np.empty(n, dtype=layout.record_dtype())
    for name in layout.fields():
        rec[name] = fields[name]
    return rec


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
        fname = shard_file_name(name, fmt)
        with _publishing(storage.join(cache_uri, fname)) as tmp:
            if fmt == "parquet":
                write_parquet(tmp, keys, labels, fields, layout, metadata)
            elif fmt == "webdataset":
                write_webdataset(tmp, keys, labels, inputs, fields, layout)
            else:
                raise ValueError(f"unknown cache format {fmt!r}")
            out[fmt] = {"path": fname, "sha256": storage.sha256_file(tmp), "bytes": os.path.getsize(tmp)}
    return out


# --------------------------------------------------------------------------------------------------
# Reading one shard


def format_of(uri: str) -> str:
    for fmt, ext in EXTENSIONS.items():
        if str(uri).endswith(ext):
            return fmt
    raise UserError(f"{uri}: not a cache shard (expected a .parquet or .tar file)")


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


def _stack_npy(blobs: list[bytes]) -> np.ndarray:
    """Decode many .npy blobs of one field into one array; vectorised when they share a header."""
    if not blobs:
        return np.empty(0)
    first = blobs[0]
    f = io.BytesIO(first)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    hl = f.tell()
    if (not fortran and not dtype.hasobject and all(len(b) == len(first) for b in blobs)
            and all(b[:hl] == first[:hl] for b in blobs)):
        body = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), len(first))[:, hl:]
        return np.ascontiguousarray(body).view(dtype).reshape(len(blobs), *shape)
    return np.stack([np.load(io.BytesIO(b), allow_pickle=False) for b in blobs])


def read_webdataset(source: Any) -> dict[str, np.ndarray]:
    """A WebDataset cache shard (local path, file object or bytes) as numpy arrays.

    Returns {"keys", "labels" (-1: none), "inputs" (if stored), field: (N, ...)} in the tar's order.
    Members are grouped by key in one pass; each field's .npy blobs are decoded together
    (`_stack_npy`), never with pickle.
    """
    if isinstance(source, str):
        with open(source, "rb") as f:
            source = f.read()
    elif not isinstance(source, (bytes, bytearray, memoryview)):
        source = source.read()
    fast = _read_tar_fast(bytes(source))
    if fast is not None:
        out = {"keys": fast.pop("keys"), "labels": fast.pop("labels")}
        for suffix, rows in fast.items():
            _put_member(out, suffix[:-4], _stack_rows(rows))
        return out
    source = io.BytesIO(bytes(source))
    keys: list[str] = []
    members: dict[str, list[bytes]] = {}
    labels: dict[int, int] = {}
    with tarfile.open(fileobj=source, mode="r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, suffix = info.name.partition(".")
            if not keys or keys[-1] != key:
                keys.append(key)
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            if suffix == "cls":
                labels[len(keys) - 1] = int(data.decode().strip())
            else:
                members.setdefault(suffix, []).append(data)
    n = len(keys)
    y = np.full(n, -1, dtype=np.int64)
    for i, v in labels.items():
        y[i] = v
    out: dict[str, np.ndarray] = {"keys": np.array(keys, dtype=object), "labels": y}
    for suffix, blobs in members.items():
        if len(blobs) != n:
            raise ValueError(f"member .{suffix} present for {len(blobs)} of {n} samples")
        _put_member(out, suffix[:-4] if suffix.endswith(".npy") else suffix, _stack_npy(blobs))
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


def _stack_rows(rows: np.ndarray) -> np.ndarray:
    """(N, L) .npy blobs of equal length (one per row) -> one array, when their headers agree."""
    f = io.BytesIO(rows[0].tobytes())
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    hl = f.tell()
    if fortran or dtype.hasobject or not (rows[:, :hl] == rows[0, :hl]).all():
        return np.stack([np.load(io.BytesIO(r.tobytes()), allow_pickle=False) for r in rows])
    return np.ascontiguousarray(rows[:, hl:]).view(dtype).reshape(len(rows), *shape)


def load_cache_shard(uri: str, fmt: Optional[str] = None) -> dict[str, np.ndarray]:
    """One cache shard (local or s3://) as numpy arrays; see `read_parquet` / `read_webdataset`.

    Keys: "keys" (N,) str objects, "labels" (N,) int64 (-1 where unlabelled), the stored fields
    (dense: "generalist_logits", "ensemble_logprobs" (N, C); top-k: "{t}_topk_idx", "{t}_topk_val"
    (N, k), "{t}_tail" (N,)), and for WebDataset also "inputs".
    """
    fmt = fmt or format_of(uri)
    data = storage.read_bytes(uri)
    return read_parquet(data) if fmt == "parquet" else read_webdataset(data)


# --------------------------------------------------------------------------------------------------
# Manifest and per-shard entries


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
    try:
        entry = storage.read_json(part_uri(cache_uri, name))
    except (FileNotFoundError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("name") == name else None


def write_part(cache_uri: str, entry: dict) -> None:
    storage.write_json_atomic(part_uri(cache_uri, entry["name"]), entry)


def layout_of(manifest: dict) -> Layout:
    return Layout(int(manifest["num_classes"]), manifest["dtype"], manifest.get("top_k"))


def build_manifest(*, layout: Layout, formats: Sequence[str], fingerprints: dict, dataset: dict,
                   shards: Sequence[dict], extra: Optional[dict] = None) -> dict:
    """The manifest.json object (see module docstring); `shards` are entries in source order."""
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


# --------------------------------------------------------------------------------------------------
# Regeneration plan


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


def entry_from_task(task: dict, files: dict[str, dict]) -> dict:
    """A shard's manifest entry (also its `_parts/` file) from its task and its written files."""
    return {
        "name": task["name"], "index": int(task["index"]), "source": task["source"],
        "source_sha256": task["source_sha256"], "num_samples": int(task["num_samples"]),
        "fingerprint": task["fingerprint"], "files": {fmt: files[fmt] for fmt in FORMATS if fmt in files},
    }


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

    with cf.ThreadPoolExecutor(_HASH_THREADS) as pool:  # hashing is I/O bound on S3
        return list(pool.map(inspect, plans))


def orphan_files(cache_uri: str, keep_names: Iterable[str], formats: Sequence[str]) -> list[str]:
    """Files under the cache that no current shard owns: shards of vanished inputs or dropped
    formats, their `_parts/` entries and temp files of killed writers."""
    keep = set(keep_names)
    out = []
    for fname in storage.listdir(cache_uri):
        m = _SHARD_FILE.match(fname)
        if m:
            fmt = "parquet" if m.group("ext") == "parquet" else "webdataset"
            if m.group("name") not in keep or fmt not in formats:
                out.append(fname)
        elif fname.startswith(".tmp-"):
            out.append(fname)
    for fname in storage.listdir(storage.join(cache_uri, PARTS_DIR)):
        stem = fname[:-5] if fname.endswith(".json") else fname
        if stem not in keep or fname.startswith(".tmp-"):
            out.append(f"{PARTS_DIR}/{fname}")
    return out


# --------------------------------------------------------------------------------------------------
# Verification


def _source_shards(dataset: dict) -> dict[str, dict]:
    """source path -> {"uri", "sha256", "num_samples"} from the dataset manifest the cache names."""
    from pipeline.data import shards as data_shards

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
        lse = _logsumexp(arrays["ensemble_logprobs"].astype(np.float32), 1)
    else:
        both = np.concatenate([arrays["ensemble_topk_val"].astype(np.float32),
                               arrays["ensemble_tail"].astype(np.float32)[:, None]], axis=1)
        lse = _logsumexp(both, 1)
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
        from pipeline.data import shards as data_shards

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
                arrays = read_parquet(data) if fmt == "parquet" else read_webdataset(data)
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
                    sl = _labels_or_none(src_labels, n)
                    want = sl if sl is not None else np.full(n, -1)
                    if not np.array_equal(arrays["labels"], want):
                        found.append(f"{fname} labels differ from the source shard's labels")
            for msg in _check_values(arrays, layout):
                found.append(f"{fname}: {msg}")
        return name, found, rows

    entries = manifest.get("shards", [])
    with cf.ThreadPoolExecutor(min(_HASH_THREADS, max(1, len(entries)))) as pool:
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


# --------------------------------------------------------------------------------------------------
# Readers for the student


def open_cache(cache_uri: str) -> dict:
    """The manifest of a complete cache (UserError otherwise). Useful keys: num_classes, dtype, top_k,
    formats, dataset {"uri", "split"}, shards [{name, source, num_samples, files}], teacher_fingerprint."""
    return read_manifest(cache_uri)


def cache_shard_uris(cache_uri: str, fmt: Optional[str] = None, manifest: Optional[dict] = None) -> list[str]:
    """URIs of the cache's shards in source order, in format `fmt` (default: the first one written)."""
    manifest = manifest or read_manifest(cache_uri)
    fmt = _pick_format(manifest, fmt, cache_uri)
    return [storage.join(cache_uri, e["files"][fmt]["path"]) for e in manifest["shards"]]


def _pick_format(manifest: dict, fmt: Optional[str], cache_uri: str) -> str:
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


def _shard_list(manifest: dict, shard_indices: Optional[Sequence[int]]) -> list[dict]:
    shards = manifest["shards"]
    if shard_indices is None:
        return list(shards)
    bad = [i for i in shard_indices if not 0 <= int(i) < len(shards)]
    if bad:
        raise UserError(f"shard indices {bad} out of range: the cache has {len(shards)} shards")
    return [shards[int(i)] for i in shard_indices]


def load_cache_split(cache_uri: str, which: str = "ensemble", shard_indices: Optional[Sequence[int]] = None,
                     fmt: Optional[str] = None, threads: int = 4, check_sha256: bool = True) -> dict[str, np.ndarray]:
    """Targets of (some of) the cache's shards, concatenated in source order.

    Returns {"keys", "labels" (-1: none)} plus `select_targets`' keys (and "inputs" for WebDataset).
    `shard_indices` picks shards by position (e.g. one worker's share); shards load in parallel.
    Each file is checked against the manifest's sha256 (cheap next to parsing), so a student never
    trains on damaged targets: UserError names the shard.
    """
    manifest = read_manifest(cache_uri)
    layout = layout_of(manifest)
    fmt = _pick_format(manifest, fmt, cache_uri)
    entries = _shard_list(manifest, shard_indices)

    def load(entry: dict) -> dict[str, np.ndarray]:
        info = entry["files"][fmt]
        uri = storage.join(cache_uri, info["path"])
        data = storage.read_bytes(uri)
        if check_sha256 and storage.sha256_bytes(data) != info["sha256"]:
            raise UserError(f"{uri}: sha256 differs from the cache manifest (damaged); run "
                            f"`distill targets verify {cache_uri}` and `distill targets regen CONFIG`")
        return read_parquet(data) if fmt == "parquet" else read_webdataset(data)

    with cf.ThreadPoolExecutor(max(1, min(threads, len(entries)))) as pool:
        parts = list(pool.map(load, entries))
    for e, p in zip(entries, parts):
        if len(p["keys"]) != int(e["num_samples"]):
            raise UserError(f"{storage.join(cache_uri, e['files'][fmt]['path'])}: {len(p['keys'])} rows, manifest says "
                            f"{e['num_samples']}; run `distill targets verify` and `distill targets regen`")
    out = {"keys": _concat([p["keys"] for p in parts]), "labels": _concat([p["labels"] for p in parts])}
    sel = [select_targets(p, which, layout) for p in parts]
    for k in sel[0] if sel else []:
        out[k] = _concat([s[k] for s in sel])
    if fmt == "webdataset" and parts and "inputs" in parts[0]:
        out["inputs"] = _concat([p["inputs"] for p in parts])
    return out


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def load_joined(cache_uri: str, which: str = "ensemble", shard_indices: Optional[Sequence[int]] = None,
                fmt: Optional[str] = None, data_uri: Optional[str] = None, threads: int = 4) -> dict[str, Any]:
    """Inputs joined with their cached targets, ready for `pipeline.training.iterate_minibatches`.

    Returns {"x": (N, ...) inputs as stored in the dataset, "y": (N,) int64 labels or None when the
    transfer set is unlabelled, "keys", "teacher_is_logprob": bool, "num_classes": C, "top_k"} plus
    `select_targets`' arrays. Parquet caches are joined with the dataset's shards (`data_uri`
    overrides the dataset location the manifest records); WebDataset caches carry their inputs.
    Keys are compared shard by shard and any mismatch raises UserError naming the shard.
    """
    manifest = read_manifest(cache_uri)
    layout = layout_of(manifest)
    fmt = _pick_format(manifest, fmt, cache_uri)
    entries = _shard_list(manifest, shard_indices)
    indices = list(shard_indices) if shard_indices is not None else list(range(len(entries)))
    cached = load_cache_split(cache_uri, which, indices, fmt, threads)
    if fmt == "webdataset" and "inputs" in cached:
        x = cached.pop("inputs")
    else:
        from pipeline.data import shards as data_shards

        root = data_uri or manifest["dataset"]["uri"]
        uris = [storage.join(root, e["source"]) for e in entries]
        with cf.ThreadPoolExecutor(max(1, min(threads, len(uris)))) as pool:
            loaded = list(pool.map(data_shards.load_shard, uris))
        offset = 0
        for e, (xs, _, ks) in zip(entries, loaded):
            n = len(xs)
            want = cached["keys"][offset:offset + n]
            if n != int(e["num_samples"]) or not np.array_equal(np.asarray(ks, dtype=object), want):
                raise UserError(
                    f"{storage.join(root, e['source'])}: its keys do not match cache shard {e['name']} "
                    "(the dataset changed or the cache is damaged); run `distill targets regen CONFIG`"
                )
            offset += n
        x = _concat([xs for xs, _, _ in loaded])
    y = cached.pop("labels")
    out: dict[str, Any] = {
        "x": x,
        "y": None if (y < 0).all() else y,
        "keys": cached.pop("keys"),
        "teacher_is_logprob": which == "ensemble" or layout.top_k is not None,
        "num_classes": layout.num_classes,
        "top_k": layout.top_k,
    }
    out.update(cached)
    return out


def iter_joined_batches(joined: dict[str, Any], batch_size: int, shuffle: bool = True, seed: int = 0,
                        epoch: int = 0, dense: bool = False) -> Iterator[dict]:
    """Whole-batch torch tensors from `load_joined`'s arrays (one gather per array per batch).

    Yields {"x", "y" (if labelled), "teacher"} (dense caches, or top-k with dense=True: the tail
    spread by `topk_to_dense`) or {"x", "y", "teacher_topk_idx", "teacher_topk_val", "teacher_tail"}.
    """
    import torch

    arrays = {"x": joined["x"]}
    if joined.get("y") is not None:
        arrays["y"] = joined["y"]
    for k in ("teacher", "teacher_topk_idx", "teacher_topk_val", "teacher_tail"):
        if k in joined:
            arrays[k] = joined[k]
    n = len(arrays["x"])
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else None
    for start in range(0, n, batch_size):
        sl = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        batch = {k: torch.from_numpy(np.ascontiguousarray(a[sl])) for k, a in arrays.items()}
        if dense and "teacher_topk_val" in batch:
            batch["teacher"] = topk_to_dense(batch.pop("teacher_topk_idx"), batch.pop("teacher_topk_val"),
                                             batch.pop("teacher_tail"), joined["num_classes"])
        yield batch


def describe_bytes(manifest: dict) -> dict[str, float]:
    """Bytes per sample of each format (for reports and the benchmark)."""
    n = max(1, int(manifest.get("num_samples", 0)))
    out = {}
    for fmt in manifest.get("formats", []):
        total = sum(int(e["files"][fmt]["bytes"]) for e in manifest["shards"] if fmt in e.get("files", {}))
        out[fmt] = total / n
    return out
