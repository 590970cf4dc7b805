"""The dataset format on disk: WebDataset tar shards plus `manifest.json` (docs/data.md, "The dataset folder").

A dataset folder (local path or `s3://` prefix) holds

    {split}-{index:06d}.tar   one WebDataset shard; per sample two members: `{key}.cls` (ASCII int)
                              and the input, either `{key}.input.npy` (np.save bytes, never pickled;
                              manifest `"encoding": "npy"`, also when the key is absent) or the
                              image file's own encoded bytes `{key}.jpg` / `.png` / `.webp`
                              (`"encoding": "image"`, WebDataset's convention); keys are
                              `{split}_{index:08d}`, stable per sample
    manifest.json             written last: classes, input shape/dtype, encoding, per split the
                              shards with their sample counts, byte sizes and sha256

Shards are plain tars, so `webdataset.WebDataset` (or `tar tf`) reads them; this module also decodes a
whole shard at once: the npy header is parsed once and every payload is sliced out of the tar bytes
into one array, which is much faster than a per-sample loop. Tar member order and metadata are fixed
(mtime 0, no owner), so the same samples always give the same bytes and the same sha256: an
interrupted ingest can keep the shards it already wrote, and `verify_dataset` can name any shard whose
bytes changed.

This module is also the project's one tar and .npy reader: `index_regular_tar` (the vectorised
index of a tar whose samples all have the same members), `tar_members` (member by member, for
anything else), `decode_npy` (many .npy members as one array) and `MAX_LABEL_CHARS`. The
soft-target cache's WebDataset shards (`pipeline.cache.webdataset`) are read with them: they are
tars of the same kind with one more member per sample, so one reader keeps the header checks, the
damage handling and the no-pickle rule identical for both. Building headers for writing is shared
through `pipeline.tarfast`.
"""
from __future__ import annotations

import collections
import io
import itertools
import json
import re
import sys
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.errors import UserError
from pipeline.tarfast import BLOCK as _BLOCK, USTAR_MAGIC as _USTAR, headers as _headers, npy_header
from pipeline.tarfast import octal_values as _octal, padded as _padded

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
INPUT_EXT = "input.npy"
LABEL_EXT = "cls"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ENCODINGS = ("npy", "image")
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9]+)-(?P<index>\d{6})\.tar$")
DTYPES = ("uint8", "float32")
MAX_LABEL_CHARS = 20  # a `.cls` member holds at most this many ASCII digits (every writer refuses more)


class ShardError(RuntimeError):
    """A shard whose bytes cannot be decoded as a dataset shard (damaged, truncated, foreign)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"


def encoding_of(manifest: dict) -> str:
    """How a dataset stores its inputs: "npy" (also for manifests from before the key existed) or
    "image" (encoded JPEG/PNG/WebP bytes, decoded at training time by `pipeline.transforms`)."""
    return str(manifest.get("encoding") or "npy")


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    # TarInfo's defaults (mtime 0, mode 0644, uid/gid 0, no owner names) keep the bytes reproducible.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def encode_shard_tarfile(x: np.ndarray, y: Optional[np.ndarray], keys: Sequence[str]) -> bytes:
    """The reference encoder: the tarfile module, one member at a time."""
    header = npy_header(x.dtype, x.shape[1:])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(len(x)):
            if y is not None:
                _add_member(tf, f"{keys[i]}.{LABEL_EXT}", str(int(y[i])).encode("ascii"))
            _add_member(tf, f"{keys[i]}.{INPUT_EXT}", header + x[i].tobytes())
    return buf.getvalue()


def encode_image_shard(blobs: Sequence[bytes], exts: Sequence[str], y: Optional[np.ndarray],
                       keys: Sequence[str]) -> bytes:
    """Tar bytes holding encoded images: per sample `{key}.cls` then `{key}.{ext}` with the image
    file's own bytes (ext one of IMAGE_EXTS). Same input, same bytes."""
    n = len(blobs)
    if len(keys) != n or len(exts) != n or (y is not None and len(y) != n):
        raise ValueError(f"encode_image_shard: {n} images, {len(exts)} extensions, {len(keys)} keys, "
                         f"{None if y is None else len(y)} labels")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(n):
            if exts[i] not in IMAGE_EXTS:
                raise ValueError(f"encode_image_shard: extension {exts[i]!r} is not one of {IMAGE_EXTS}")
            if y is not None:
                if int(y[i]) < 0:
                    raise ValueError("encode_image_shard: labels must be non-negative integers")
                _add_member(tf, f"{keys[i]}.{LABEL_EXT}", str(int(y[i])).encode("ascii"))
            _add_member(tf, f"{keys[i]}.{exts[i]}", bytes(blobs[i]))
    return buf.getvalue()


def _encode_shard_arrays(x: np.ndarray, y: Optional[np.ndarray], keys: Sequence[str]) -> Optional[bytes]:
    """The same bytes as `encode_shard_tarfile`, assembled with array operations (every sample has
    the same layout); None when keys differ in length or are too long for a ustar name."""
    n = len(x)
    kb = [k.encode("utf-8") for k in keys]
    klen = len(kb[0]) if kb else 0
    if n == 0 or klen == 0 or any(len(k) != klen for k in kb) or klen + 1 + len(INPUT_EXT) > 100:
        return None
    keys_arr = np.frombuffer(b"".join(kb), dtype=np.uint8).reshape(n, klen)
    npy = np.frombuffer(npy_header(x.dtype, x.shape[1:]), dtype=np.uint8)
    payload = len(npy) + x[0].nbytes
    slots = []  # (offset of header in the record, names, sizes)
    period = 0
    if y is not None:
        labels = [str(int(v)).encode("ascii") for v in y]
        slots.append((0, b"." + LABEL_EXT.encode(), np.fromiter(map(len, labels), dtype=np.int64, count=n)))
        period = 2 * _BLOCK
    in_off = period
    slots.append((in_off, b"." + INPUT_EXT.encode(), np.full(n, payload, dtype=np.int64)))
    period += _BLOCK + _padded(payload)
    body = n * period + 2 * _BLOCK
    # One buffer for the records and the end-of-archive padding, so the result is one copy of it.
    buf = np.zeros(body + 2 * _BLOCK + (-body) % tarfile.RECORDSIZE - 2 * _BLOCK, dtype=np.uint8)
    rec = buf[:n * period].reshape(n, period)
    for off, suffix, sizes in slots:
        names = np.concatenate([keys_arr, np.broadcast_to(np.frombuffer(suffix, dtype=np.uint8), (n, len(suffix)))], axis=1)
        rec[:, off:off + _BLOCK] = _headers(names, sizes)
    if y is not None:
        rec[:, _BLOCK:_BLOCK + MAX_LABEL_CHARS] = (np.array(labels, dtype=f"S{MAX_LABEL_CHARS}").view(np.uint8)
                                                   .reshape(n, MAX_LABEL_CHARS))
    start = in_off + _BLOCK
    rec[:, start:start + len(npy)] = npy
    rec[:, start + len(npy):start + payload] = np.ascontiguousarray(x).reshape(n, -1).view(np.uint8)
    return buf.tobytes()


def encode_shard(x: np.ndarray, y: Optional[np.ndarray], keys: Sequence[str]) -> bytes:
    """Tar bytes holding samples `x[i]` (label `y[i]`, key `keys[i]`); same input, same bytes.

    `y` None writes no `.cls` members (an unlabelled transfer set).
    """
    x = np.ascontiguousarray(x)
    n = len(x)
    if len(keys) != n or (y is not None and len(y) != n):
        raise ValueError(f"encode_shard: {n} inputs, {len(keys)} keys, {None if y is None else len(y)} labels")
    if y is not None and n and (int(np.min(y)) < 0 or len(str(int(np.max(y)))) > MAX_LABEL_CHARS):
        raise ValueError("encode_shard: labels must be non-negative integers")
    fast = _encode_shard_arrays(x, y, keys)
    return fast if fast is not None else encode_shard_tarfile(x, y, keys)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def _walk_plain_tar(data: bytes) -> Optional[list[tuple[str, int, int]]]:
    """`_index_tar` for plain ustar archives (what this project and webdataset's TarWriter write),
    reading the 512-byte headers directly: ~20x faster than the tarfile module per member, which
    matters for shards of many small encoded images. None for anything else (pax or GNU long-name
    records, a bad checksum, damage): the caller then falls back to `_index_tar`."""
    out = []
    n, off = len(data), 0
    while off + _BLOCK <= n:
        h = data[off:off + _BLOCK]
        if not any(h):
            tail = data[off:]
            if len(tail) < 2 * _BLOCK or any(tail):
                return None
            return out
        try:
            size = int(h[124:136].replace(b"\0", b" ").strip() or b"0", 8)
            stored = int(h[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
        except ValueError:
            return None
        if stored != sum(h[:148]) + 8 * 32 + sum(h[156:]):
            return None
        kind = h[156:157]
        if kind not in (b"0", b"\0", b"5"):
            return None  # pax headers, GNU long names, links...: the tarfile module handles those
        mname = h[:100].split(b"\0", 1)[0]
        if h[257:262] == b"ustar" and h[345]:
            mname = h[345:500].split(b"\0", 1)[0] + b"/" + mname
        if off + _BLOCK + size > n:
            return None
        if kind != b"5":
            out.append((mname.decode("utf-8", "replace"), off + _BLOCK, size))
        off += _BLOCK + _padded(size)
    return None


def _index_tar(data: bytes, name: str) -> list[tuple[str, int, int]]:
    """(member name, payload offset, payload size) of every regular file, in tar order."""
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    out.append((m.name, m.offset_data, m.size))
            end = tf.offset  # where iteration stopped: the end-of-archive marker, if intact
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"{name}: truncated or damaged tar archive ({e})") from None
    # tarfile silently stops at a cut-off header; a complete archive ends in zero blocks only.
    tail = np.frombuffer(data, dtype=np.uint8)[end:]
    if len(tail) < 2 * _BLOCK or tail.any():
        raise ShardError(f"{name}: truncated or damaged after byte {end} (no intact end-of-archive marker; "
                         f"{len(out)} complete members before it)")
    for mname, off, size in out:
        if off + size > len(data):
            raise ShardError(f"{name}: truncated (member {mname} ends at byte {off + size}, "
                             f"file has {len(data)})")
    return out


def _split_member(mname: str) -> tuple[str, str]:
    # WebDataset's rule: the key is the path up to the first dot of the file name.
    folder, _, base = mname.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def tar_members(data: bytes, name: str) -> list[tuple[str, str, int, int]]:
    """(key, extension, payload offset, payload size) of every regular member, in tar order.

    Keys follow WebDataset's rule (`_split_member`). Plain ustar headers are read directly
    (`_walk_plain_tar`); anything else goes through the tarfile module. ShardError when the archive
    is truncated or damaged."""
    return [(*_split_member(m), off, size) for m, off, size in (_walk_plain_tar(data) or _index_tar(data, name))]


def _first_header(dv: np.ndarray, off: int) -> Optional[tuple[str, int]]:
    if off + _BLOCK > len(dv) or not dv[off:off + _BLOCK].any():
        return None
    h = dv[off:off + _BLOCK]
    size = _octal(h[None, 124:135])
    if size is None:
        return None
    return bytes(h[:100]).split(b"\0", 1)[0].decode("utf-8", "replace"), int(size[0])


@dataclass(frozen=True)
class RegularTar:
    """What `index_regular_tar` found: N samples, each with the same members in the same order."""

    keys: list[str]
    labels: Optional[np.ndarray]                 # (N,) int64 from the `.cls` members; None without them
    members: dict[str, tuple[np.ndarray, int]]   # other extension -> (payload offsets (N,), payload size)


def index_regular_tar(data: bytes) -> Optional[RegularTar]:
    """Index a regularly laid-out tar with array operations instead of a per-member Python loop.

    Regular: every sample has the same members in the same order, each (but `.cls`) of one fixed
    size — what `encode_shard` and the soft-target cache's WebDataset writer produce. The first
    sample's headers give the record layout; then every header of every sample is checked at once:
    ustar magic, regular-file type, no name prefix, octal size and checksum, name = key + extension,
    keys without dots and unique, `.cls` payloads of 1 to MAX_LABEL_CHARS ASCII digits. None whenever
    anything differs (the caller then walks the members one by one with `tar_members`).
    """
    dv = np.frombuffer(data, dtype=np.uint8)
    slots: list[tuple[int, str, int]] = []  # (header offset within a sample's record, extension, size)
    key0, off = None, 0
    while True:
        head = _first_header(dv, off)
        if head is None:
            break
        key, ext = _split_member(head[0])
        if key0 is None:
            key0 = key
        elif key != key0:
            break
        slots.append((off, ext, head[1]))
        off += _BLOCK + _padded(head[1])
    period = off
    exts = [e for _, e, _ in slots]
    if not key0 or len(set(exts)) != len(exts) or set(exts) <= {LABEL_EXT}:
        return None
    nmax = (len(dv) - 2 * _BLOCK) // period
    if nmax < 1:
        return None
    heads = np.lib.stride_tricks.as_strided(dv, shape=(nmax, _BLOCK), strides=(period, 1), writeable=False)
    present = heads.any(axis=1)
    n = int(nmax if present.all() else np.argmin(present))
    if n == 0 or dv[n * period:].any():
        return None
    keys_b = None
    labels = None
    members: dict[str, tuple[np.ndarray, int]] = {}
    named = []  # (member names (N,), b".ext"): each must be key + extension
    for slot_off, ext, size0 in slots:
        h = np.lib.stride_tricks.as_strided(dv[slot_off:], shape=(n, _BLOCK), strides=(period, 1),
                                            writeable=False)
        if not (np.array_equal(h[:, 257:263], np.broadcast_to(_USTAR, (n, 6)))
                and np.isin(h[:, 156], (0, 48)).all() and not h[:, 345].any()):
            return None
        sizes = _octal(h[:, 124:135])
        stored = _octal(h[:, 148:154])
        if sizes is None or stored is None:
            return None
        chk = h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
        if not np.array_equal(chk, stored):
            return None
        names = np.ascontiguousarray(h[:, :100]).view("S100").ravel()
        suffix = ("." + ext).encode()
        named.append((names, suffix))
        if ext == LABEL_EXT:
            if sizes.min() < 1 or sizes.max() > MAX_LABEL_CHARS:
                return None
            w = np.lib.stride_tricks.as_strided(dv[slot_off + _BLOCK:], shape=(n, MAX_LABEL_CHARS),
                                                strides=(period, 1), writeable=False)
            digits = w.astype(np.int64) - 48
            col = np.arange(MAX_LABEL_CHARS)
            used = col[None, :] < sizes[:, None]
            if ((digits < 0) | (digits > 9))[used].any():
                return None
            power = np.where(used, sizes[:, None] - 1 - col[None, :], 0)
            labels = np.where(used, digits * 10 ** power, 0).sum(axis=1)
            continue
        if not np.all(sizes == size0):
            return None
        members[ext] = (slot_off + _BLOCK + period * np.arange(n, dtype=np.int64), int(size0))
        if keys_b is None:
            if not np.char.endswith(names, suffix).all():
                return None
            kb = np.char.replace(names, suffix, b"")
            if ((np.char.find(kb, b".") >= 0).any() or (np.char.str_len(kb) == 0).any()
                    or (np.char.str_len(kb) + len(suffix) != np.char.str_len(names)).any()):
                return None
            keys_b = kb
    for names, suffix in named:
        if not np.array_equal(np.char.add(keys_b, suffix), names):
            return None
    keys = [k.decode("utf-8") for k in keys_b.tolist()]
    if len(set(keys)) != n:
        return None
    return RegularTar(keys, labels, members)


def parse_npy_header(blob: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, header length) of the .npy bytes that start `blob`."""
    bio = io.BytesIO(blob)
    major, _minor = np.lib.format.read_magic(bio)
    if major == 1:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(bio)
    elif major in (2, 3):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(bio)
    else:
        raise ValueError(f"unsupported npy format version {major}")
    return tuple(shape), bool(fortran), np.dtype(dtype), bio.tell()


def _rows(data: bytes, offsets: np.ndarray, size: int) -> np.ndarray:
    """(N, size) uint8 view/copy of the payloads starting at `offsets`, without a Python loop when
    the payloads are evenly spaced (always, for shards we wrote)."""
    dv = np.frombuffer(data, dtype=np.uint8)
    n = len(offsets)
    if n > 1:
        steps = np.diff(offsets)
        if np.all(steps == steps[0]) and steps[0] > 0:
            return np.lib.stride_tricks.as_strided(
                dv[int(offsets[0]):], shape=(n, size), strides=(int(steps[0]), 1), writeable=False)
    out = np.empty((n, size), dtype=np.uint8)
    for i, o in enumerate(offsets.tolist()):
        out[i] = dv[o:o + size]
    return out


_NPY_HEADER_MAX = 65536 + 16  # a version-1 header length is a uint16: the header is within this


def decode_npy(data: bytes, offsets: np.ndarray, sizes: np.ndarray, name: str, what: str = "input") -> np.ndarray:
    """(N, ...) array of the .npy payloads at `offsets` (one member per sample), never unpickled.

    One header parse and one copy when every payload shares the first one's header (the fast path),
    else np.load per member; every member must have the same shape. Non-native byte orders are
    converted. ShardError names the shard and the member (`what`) when a payload is not a valid .npy.
    """
    n = len(offsets)
    if n == 0:
        return np.zeros((0,), dtype=np.float32)
    o0, s0 = int(offsets[0]), int(sizes[0])
    try:
        shape, fortran, dtype, hlen = parse_npy_header(data[o0:o0 + min(s0, _NPY_HEADER_MAX)])
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a bad header
        raise ShardError(f"{name}: first {what} is not a valid .npy ({e})") from None
    if dtype.hasobject:
        raise ShardError(f"{name}: {what}s hold Python objects (dtype {dtype}); refusing to unpickle")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not fortran and np.all(sizes == s0) and s0 == hlen + nbytes:
        rows = _rows(data, offsets, s0)
        header = np.frombuffer(data[o0:o0 + hlen], dtype=np.uint8)
        if np.array_equal(rows[:, :hlen], np.broadcast_to(header, (n, hlen))):
            x = np.ascontiguousarray(rows[:, hlen:]).view(dtype).reshape((n,) + shape)
            return x if dtype.isnative else x.astype(dtype.newbyteorder("="))
    arrays = []
    for i, (o, s) in enumerate(zip(offsets.tolist(), sizes.tolist())):
        try:
            arrays.append(np.load(io.BytesIO(data[o:o + s]), allow_pickle=False))
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"{name}: {what} #{i} is not a valid .npy ({e})") from None
    first = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != first:
            raise ShardError(f"{name}: {what} #{i} has shape {a.shape} but {what} #0 has {first}; "
                             "every sample of a dataset must have the same shape")
    return np.stack(arrays)


def decode_shard(data: bytes, name: str = "shard") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x, y (N,) int64 or -1 where unlabelled, keys) from the bytes of one shard.

    x is the (N, ...) input array of an npy shard, or for a shard of encoded images a 1-D object
    array of N `bytes` (each image file's own bytes; `pipeline.transforms` decodes them)."""
    fast = index_regular_tar(data)
    if fast is not None and set(fast.members) == {INPUT_EXT}:
        n = len(fast.keys)
        offsets, size = fast.members[INPUT_EXT]
        x = decode_npy(data, offsets, np.full(n, size, dtype=np.int64), name)
        y = fast.labels.astype(np.int64) if fast.labels is not None else np.full(n, -1, dtype=np.int64)
        return x, y, fast.keys
    inputs: dict[str, tuple[int, int]] = {}
    labels_at: dict[str, tuple[int, int]] = {}
    order: list[str] = []
    kinds = set()
    for key, ext, off, size in tar_members(data, name):
        if ext == INPUT_EXT or ext.lower() in IMAGE_EXTS:
            if key in inputs:
                raise ShardError(f"{name}: key {key} appears twice")
            kinds.add("npy" if ext == INPUT_EXT else "image")
            inputs[key] = (off, size)
            order.append(key)
        elif ext == LABEL_EXT:
            labels_at[key] = (off, size)
        # other members (future extensions) are ignored, as WebDataset would
    if len(kinds) > 1:
        raise ShardError(f"{name}: mixes .{INPUT_EXT} inputs with encoded images; a shard holds one kind")
    orphans = set(labels_at) - set(inputs)
    if orphans:
        raise ShardError(f"{name}: {len(orphans)} label(s) without input, e.g. {sorted(orphans)[0]}")
    if kinds == {"image"}:
        x = np.empty(len(order), dtype=object)
        for i, k in enumerate(order):
            o, sz = inputs[k]
            x[i] = data[o:o + sz]
    else:
        offsets = np.array([inputs[k][0] for k in order], dtype=np.int64)
        sizes = np.array([inputs[k][1] for k in order], dtype=np.int64)
        x = decode_npy(data, offsets, sizes, name)
    y = np.full(len(order), -1, dtype=np.int64)
    if labels_at:
        if len(labels_at) != len(order):
            missing = next(k for k in order if k not in labels_at)
            raise ShardError(f"{name}: sample {missing} has no .{LABEL_EXT} label while others do")
        try:
            y[:] = [int(data[o:o + s]) for o, s in (labels_at[k] for k in order)]
        except ValueError as e:
            raise ShardError(f"{name}: a .{LABEL_EXT} member is not an integer ({e})") from None
    return x, y, order


def load_shard(shard_uri: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode one shard (local or s3://) into (x, y, keys); raises ShardError if damaged."""
    return decode_shard(storage.read_bytes(shard_uri), name=_basename(shard_uri))


def _basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------

def dataset_root(uri: str) -> str:
    """The dataset folder, also when given the path of its manifest."""
    uri = str(uri).rstrip("/")
    if _basename(uri) == MANIFEST:
        return uri[: -len(MANIFEST)].rstrip("/") or "."
    return uri


def _check_manifest(m: Any, where: str) -> None:
    if not isinstance(m, dict):
        raise UserError(f"{where}: not a dataset manifest (a JSON object is expected)")
    problems = []
    for key in ("num_classes", "class_names", "input_shape", "dtype", "splits"):
        if key not in m:
            problems.append(f"missing key '{key}'")
    splits = m.get("splits")
    if isinstance(splits, dict):
        for split, info in splits.items():
            if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
                problems.append(f"splits.{split} has no 'shards' list")
                continue
            for j, s in enumerate(info["shards"]):
                if not isinstance(s, dict) or not {"path", "num_samples", "sha256"} <= set(s):
                    problems.append(f"splits.{split}.shards[{j}] lacks path/num_samples/sha256")
    elif "splits" in m:
        problems.append("'splits' is not an object")
    if m.get("dtype") not in (None, *DTYPES):
        problems.append(f"dtype {m.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    if m.get("encoding") not in (None, *ENCODINGS):
        problems.append(f"encoding {m.get('encoding')!r} is not one of {', '.join(ENCODINGS)}")
    if problems:
        raise UserError(f"{where}: invalid dataset manifest: {'; '.join(problems)}. "
                        "Re-run `distill data ingest` into this folder to rebuild it")


def read_manifest(uri: str) -> dict:
    """The manifest of the dataset at `uri` (folder or manifest path); UserError naming it if absent."""
    root = dataset_root(uri)
    muri = storage.join(root, MANIFEST)
    try:
        raw = storage.read_bytes(muri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(
            f"{root}: no dataset here ({MANIFEST} not found). Create one with "
            f"`distill data ingest SOURCE {root} --format FMT`, or fix the path"
        ) from None
    except PermissionError as e:
        raise UserError(f"{muri}: access denied ({e}); check the AWS credentials and the bucket's "
                        "permissions (AWS_PROFILE, AWS_ACCESS_KEY_ID, ~/.aws, instance role)") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{muri}: not valid JSON ({e}); re-run `distill data ingest` into this folder") from None
    _check_manifest(m, muri)
    return m


def split_entries(uri: str, split: str, manifest: Optional[dict] = None) -> list[dict]:
    """The manifest's shard entries of `split`, each with an added absolute `uri`."""
    root = dataset_root(uri)
    m = manifest if manifest is not None else read_manifest(root)
    if split not in m["splits"]:
        raise UserError(f"{root}: the dataset has no split '{split}'; it has {', '.join(m['splits'])}")
    return [dict(s, uri=storage.join(root, s["path"])) for s in m["splits"][split]["shards"]]


def shard_uris(uri: str, split: str) -> list[str]:
    return [e["uri"] for e in split_entries(uri, split)]


def prefetch(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 4,
             window: Optional[int] = None) -> Iterator[tuple[Any, Future]]:
    """Yield (item, future of fn(item)) in order, with up to `window` calls running ahead.

    Shard reads are I/O (S3 round trips, disk); overlapping them with decoding the previous shard
    hides most of the latency. `window` bounds memory to that many shards in flight.
    """
    window = max(1, window or workers)
    it = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="distill-read") as ex:
        pending: collections.deque = collections.deque(
            (item, ex.submit(fn, item)) for item in itertools.islice(it, window))
        try:
            while pending:
                item, fut = pending.popleft()
                nxt = next(it, _END)
                if nxt is not _END:
                    pending.append((nxt, ex.submit(fn, nxt)))
                yield item, fut
        finally:
            for _, fut in pending:
                fut.cancel()


_END = object()


def load_split(uri: str, split: str, shard_indices: Optional[Sequence[int]] = None,
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every sample of `split` (or of the shards at `shard_indices`) as (x, y, keys), in shard order."""
    root = dataset_root(uri)
    m = read_manifest(root)
    entries = split_entries(root, split, m)
    if shard_indices is not None:
        try:
            entries = [entries[i] for i in shard_indices]
        except IndexError:
            raise UserError(f"{root}: split '{split}' has {len(entries)} shards; "
                            f"shard indices {list(shard_indices)} are out of range") from None
    xs, ys, keys = [], [], []
    for entry, fut in prefetch(lambda e: storage.read_bytes(e["uri"]), entries, workers=4, window=4):
        x, y, k = decode_shard(fut.result(), name=entry["path"])
        xs.append(x)
        ys.append(y)
        keys.extend(k)
    if not xs:
        if encoding_of(m) == "image":
            return np.empty(0, dtype=object), np.zeros((0,), dtype=np.int64), []
        shape = tuple(m["input_shape"])
        return np.zeros((0,) + shape, dtype=m["dtype"]), np.zeros((0,), dtype=np.int64), []
    return np.concatenate(xs), np.concatenate(ys), keys


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------

def _check_shard(data: bytes, entry: dict, split: str, m: dict, seen: set) -> tuple[list[str], int]:
    """Problems found in one shard's bytes, and its decoded sample count."""
    problems = []
    sha = storage.sha256_bytes(data)
    if sha != entry["sha256"]:
        problems.append(f"sha256 mismatch (manifest {entry['sha256'][:12]}..., file {sha[:12]}...)")
    if "size" in entry and len(data) != entry["size"]:
        problems.append(f"size {len(data)} bytes, manifest says {entry['size']}")
    try:
        x, y, keys = decode_shard(data, name=entry["path"])
    except ShardError as e:
        problems.append(f"not decodable: {e}")
        return problems, 0
    n = len(keys)
    if n != entry["num_samples"]:
        problems.append(f"{n} samples, manifest says {entry['num_samples']}")
    if encoding_of(m) == "image":
        if n and x.dtype != object:
            problems.append("holds .npy inputs but the manifest says encoding 'image'")
        else:
            problems.extend(_check_images(x, keys))
    else:
        shape = tuple(m["input_shape"])
        if n and x.dtype == object:
            problems.append("holds encoded images but the manifest says encoding 'npy'")
        elif n and x.shape[1:] != shape:
            problems.append(f"input shape {x.shape[1:]}, manifest says {shape}")
        elif n and str(x.dtype) != m["dtype"]:
            problems.append(f"dtype {x.dtype}, manifest says {m['dtype']}")
        elif n and x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            problems.append("non-finite input values")
    if n and (int(y.max()) >= int(m["num_classes"]) or int(y.min()) < -1):
        bad = int(y.max()) if int(y.max()) >= int(m["num_classes"]) else int(y.min())
        problems.append(f"label {bad} out of range for {m['num_classes']} classes")
    bad_keys = [k for k in keys if not k.startswith(f"{split}_")]
    if bad_keys:
        problems.append(f"key {bad_keys[0]} does not belong to split '{split}'")
    dup = seen.intersection(keys)
    if dup:
        problems.append(f"{len(dup)} sample key(s) also in another shard, e.g. {sorted(dup)[0]}")
    seen.update(keys)
    return problems, n


def _check_images(blobs: np.ndarray, keys: list[str]) -> list[str]:
    """Every encoded image decodes with Pillow (fully: a truncated JPEG opens but fails to load)."""
    from PIL import Image

    def check(item: tuple[str, bytes]) -> Optional[str]:
        key, blob = item
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for damaged data
            return f"{key}: {type(e).__name__}: {e}"
        return None

    # Pillow releases the GIL while decoding, so threads check a shard's images side by side.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="distill-verify") as ex:
        bad = [r for r in ex.map(check, zip(keys, blobs)) if r is not None]
    if not bad:
        return []
    return [f"{len(bad)} image(s) not decodable, e.g. {bad[0]}"]


def verify_dataset(uri: str, progress: bool = True) -> dict:
    """Check every shard of the dataset at `uri`: sha256, size, decodability, counts, shapes, labels.

    Returns {"uri", "checked", "damaged", "damaged_shards": [paths], "problems": {path: why},
    "samples": {split: intact samples}, "expected": {split: manifest count}, "ok"}.
    """
    from tqdm import tqdm

    root = dataset_root(uri)
    m = read_manifest(root)
    jobs = [(split, e) for split in m["splits"] for e in split_entries(root, split, m)]
    problems: dict[str, str] = {}
    samples = {split: 0 for split in m["splits"]}
    expected = {split: int(info["num_samples"]) for split, info in m["splits"].items()}
    for split, info in m["splits"].items():
        total = sum(int(s["num_samples"]) for s in info["shards"])
        if total != int(info["num_samples"]):
            problems[MANIFEST] = (f"split {split}: shards hold {total} samples but num_samples is "
                                  f"{info['num_samples']}")
    seen: dict[str, set] = {split: set() for split in m["splits"]}
    bar = tqdm(total=len(jobs), desc=f"verify {_basename(root)}", unit="shard", file=sys.stderr,
               disable=not progress, leave=False)
    with bar:
        for (split, entry), fut in prefetch(lambda j: storage.read_bytes(j[1]["uri"]), jobs, workers=4):
            try:
                data = fut.result()
            except FileNotFoundError:
                problems[entry["path"]] = "missing"
            except OSError as e:
                problems[entry["path"]] = f"unreadable ({type(e).__name__}: {e})"
            else:
                found, n = _check_shard(data, entry, split, m, seen[split])
                if found:
                    problems[entry["path"]] = "; ".join(found)
                else:
                    samples[split] += n
            bar.update(1)
    damaged = [name for name in problems]
    return {"uri": root, "checked": len(jobs), "damaged": len(damaged), "damaged_shards": damaged,
            "problems": problems, "samples": samples, "expected": expected, "ok": not damaged}
