"""Reading WebDataset-style tars and their .npy members: the project's one tar reader.

Belongs here: indexing a tar's members and decoding .npy payloads, for the dataset shards
(`pipeline.data.shards.decode_shard`) and the soft-target cache's WebDataset shards
(`pipeline.cache.webdataset.read_webdataset`). Both are tars of the same kind — per sample a
`KEY.cls` label and .npy members, every sample alike — so one reader keeps the header checks, the
damage handling (`ShardError`) and the no-pickle rule identical for both. It is its own module, not
part of `shards.py`, so that the cache reads tars without the dataset manifest code and `shards.py`
stays a readable size. Building headers for writing is `pipeline.tarfast`.

- `index_regular_tar`: the vectorised index of a tar whose samples all have the same members
  (what this project writes); every header is still checked.
- `tar_members`: member by member, for anything else (plain ustar headers read directly, the
  tarfile module for pax / GNU records); truncation and damage raise `ShardError`.
- `decode_npy` / `parse_npy_header`: many .npy members as one array, one header parse when they
  share it, never unpickled.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.tarfast import BLOCK as _BLOCK, USTAR_MAGIC as _USTAR, octal_values as _octal, padded as _padded

LABEL_EXT = "cls"  # WebDataset's label member: ASCII digits
MAX_LABEL_CHARS = 20  # a `.cls` member holds at most this many digits (every writer refuses more)


class ShardError(RuntimeError):
    """A shard whose bytes cannot be decoded as a dataset shard (damaged, truncated, foreign)."""


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
