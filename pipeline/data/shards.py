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

Tars and .npy members are read by `pipeline.data.tario`, the project's one tar reader (the
soft-target cache's WebDataset shards are read with it too).
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
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.errors import UserError
from pipeline.data.tario import (LABEL_EXT, MAX_LABEL_CHARS, ShardError, decode_npy, index_regular_tar,
                                 tar_members)
from pipeline.tarfast import BLOCK as _BLOCK, headers as _headers, npy_header, padded as _padded

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
INPUT_EXT = "input.npy"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ENCODINGS = ("npy", "image")
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9]+)-(?P<index>\d{6})\.tar$")
DTYPES = ("uint8", "float32")


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
# Decoding (the tar and .npy reading itself is `pipeline.data.tario`)
# ---------------------------------------------------------------------------------------------

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
