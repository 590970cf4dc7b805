"""Raw data -> WebDataset shards + `manifest.json` (`distill data ingest`, and the `data` stage).

Shards are written as they are filled, so memory does not grow with the dataset: each format's
loader gives either in-memory arrays (the small array formats below), a list of files read per
shard in parallel (`folder`), or a generator that yields blocks (`synthetic`). The rest is shared:
checks (label range, shapes, dtypes), a stratified seeded val split carved from train when the
source has none (on labels and indices only; for a generated source, on the fly from class counts
of a first pass over its labels), a seeded shuffle of train and val (so every shard holds a mix
of classes), and the atomic, resumable write of shards and manifest.

Loaders live in `pipeline.data.sources` (re-exported here). Formats (`--format`):
  idx        MNIST-format files (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
             `t10k-...`) in one folder: MNIST, Fashion-MNIST, KMNIST. An optional `class_names.txt`
             (one name per line) names the classes and fixes their number.
  cifar      the CIFAR-10 / CIFAR-100 "python version" tarballs. These hold Python pickles: use only
             tarballs from a trusted source (the official download). They are the only pickles this
             project ever reads, and even they go through an unpickler that refuses every global
             except the few numpy needs to rebuild an array.
  npz        a NumPy archive with `x_train, y_train, x_test, y_test` (optional `x_val, y_val`,
             `class_names`), loaded with `allow_pickle=False`.
  folder     class-per-folder images, local or s3://: `SOURCE/{train,test[,val]}/CLASS/*`, or
             `SOURCE/CLASS/*` (then test is carved like val). Any sizes and modes. Images are kept
             encoded: JPEG/PNG/WebP files are stored byte for byte as `{key}.jpg|png|webp` members
             (other formats Pillow reads are re-encoded once as PNG); every file is decoded once
             first, and all unreadable ones are named together (exit 2, nothing written).
  digits     scikit-learn's bundled 8x8 digits (no download); test carved from it.
  synthetic  seeded vectors with confusable class groups (`SyntheticGenerator`), groups in the
             manifest; generated block by block from per-block seeds.

Inputs are stored as uint8 images (N, C, H, W) (models map them to [-1, 1]), float32 vectors
(N, D) for synthetic data (manifest `"encoding": "npy"`), or encoded images (`"encoding": "image"`,
decoded at training time by `pipeline.transforms`). Sample keys are `{split}_{index:08d}`.

Atomicity and reruns: every shard is published whole (temp file + rename locally, one PUT on S3);
the manifest goes last and is removed first when the folder is being rewritten, so a manifest
always describes complete shards. Shard bytes are deterministic, so a rerun after an interruption
keeps the shards already written (same sha256), writes the rest and never duplicates a sample; a
rerun of a finished ingest with the same settings does nothing.

Foreign files: ingest only ever removes or overwrites files it wrote itself, i.e. the shards listed
in its own previous `manifest.json` or in the journal (`.distill-ingest.json`) an unfinished ingest
left behind. A `manifest.json` that distill did not write, or a shard-named file it would overwrite
without having written it, stops the ingest with exit 2 before anything is written.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Union

import numpy as np

from pipeline import storage
from pipeline.config import FORMATS, SyntheticConfig
from pipeline.data.shards import (FORMAT_VERSION, MANIFEST, SHARD_RE, SPLITS, encode_image_shard, encode_shard,
                                  prefetch, sample_key, shard_name)
from pipeline.data.sources import DEFAULT_TEST_FRACTION, FILE_LOADERS, ImageBatch, RawData, _check_labels
from pipeline.data.synthetic import load_synthetic, synthetic_config
from pipeline.errors import UserError
from pipeline.log import log

# --format -> loader (the format names themselves are `pipeline.config.FORMATS`).
LOADERS = {**FILE_LOADERS, "synthetic": load_synthetic}

# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

def _take_count(n: int, fraction: float) -> int:
    """How many of a class's `n` samples a stratified carve takes (a singleton stays)."""
    if n <= 1:
        return 0
    return min(max(int(round(fraction * n)), 1), n - 1)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken) sorted index arrays; about `fraction` of every class is taken (seeded).

    A class with a single sample stays in `kept`.
    """
    rng = np.random.default_rng(seed)
    taken = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        taken.append(rng.permutation(idx)[:_take_count(len(idx), fraction)])
    take = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[take] = False
    return np.flatnonzero(mask), take


class StreamingCarve:
    """The stratified seeded carve of `stratified_split`, for a stream of label blocks.

    Given the class counts of the whole stream (a first pass over labels only), it takes exactly
    `_take_count(n_c, fraction)` samples of every class c, each subset of that size equally likely,
    holding only per-class counters: in each block, the number taken from class c is drawn from the
    hypergeometric law of "how many of the still-to-take fall in this block", then that many of the
    block's class-c samples are chosen at random. Same seed and same blocks, same choice.
    """

    def __init__(self, class_counts: np.ndarray, fraction: float, seed: int):
        counts = np.asarray(class_counts, dtype=np.int64)
        self.remaining = counts.copy()
        self.to_take = np.array([_take_count(int(n), fraction) for n in counts], dtype=np.int64)
        self.targets = self.to_take.copy()
        self.rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(7,)))

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """Boolean mask over the block: True where the sample is carved out."""
        mask = np.zeros(len(y), dtype=bool)
        for c in np.unique(y):
            pos = np.flatnonzero(y == c)
            b, rem, want = len(pos), int(self.remaining[c]), int(self.to_take[c])
            if b > rem:
                raise RuntimeError(f"StreamingCarve: class {c} has more samples than its count says")
            k = int(self.rng.hypergeometric(want, rem - want, b)) if want and rem > want else (b if want else 0)
            if k:
                mask[pos[self.rng.choice(b, size=k, replace=False)]] = True
            self.to_take[c] -= k
            self.remaining[c] -= b
        return mask


def split_indices(labels: dict[str, np.ndarray], val_fraction: float, seed: int,
                  test_fraction: float = DEFAULT_TEST_FRACTION) -> dict[str, tuple[str, np.ndarray]]:
    """train/val/test as (source split, indices into it): carve test (sources with one pool) and
    val (sources without) from train, stratified and seeded; then shuffle train and val with the
    seed. Test keeps the source order. Only labels and indices are held, never inputs."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    if "all" in labels:
        keep, take = stratified_split(labels["all"], test_fraction, seed + 1)
        out["train"], out["test"] = ("all", keep), ("all", take)
    else:
        out["train"], out["test"] = ("train", np.arange(len(labels["train"]))), ("test", np.arange(len(labels["test"])))
        if "val" in labels:
            out["val"] = ("val", np.arange(len(labels["val"])))
    if "val" not in out:
        src, idx = out["train"]
        keep, take = stratified_split(labels[src][idx], val_fraction, seed)
        out["train"], out["val"] = (src, idx[keep]), (src, idx[take])
    rng = np.random.default_rng(seed)
    for s in ("train", "val"):
        src, idx = out[s]
        out[s] = (src, idx[rng.permutation(len(idx))])
    return {s: out[s] for s in SPLITS}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

JOURNAL = ".distill-ingest.json"
_OWNER = "pipeline.data.ingest"
# Temp names of `storage.write_bytes_atomic` (mkstemp: ".tmp-" + 8 random chars + "-" + name).
_TMP_RE = re.compile(r"^\.tmp-[A-Za-z0-9_]+-(?:[A-Za-z0-9]+-\d{6}\.tar|" + re.escape(MANIFEST) + "|"
                     + re.escape(JOURNAL) + ")$")


def _list_sizes(uri: str) -> dict[str, int]:
    fs, path = storage.get_fs(uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") != "directory":
            out[name] = int(e.get("size") or 0)
    return out


def shards_present(out: str, manifest: dict) -> bool:
    sizes = _list_sizes(out)
    for info in manifest.get("splits", {}).values():
        for s in info.get("shards", []):
            if s["path"] not in sizes or ("size" in s and sizes[s["path"]] != s["size"]):
                return False
    return True


def _normalise_source(source: str, fmt: str) -> str:
    if fmt in ("digits", "synthetic"):
        return ""
    return source if storage.is_remote(source) else os.path.abspath(source)


def _check_arrays(raw: RawData, name: str) -> tuple[list[int], str]:
    """Input shape and dtype shared by every split of an in-memory source; labels in range."""
    shape, dtype = None, None
    for s, (x, y) in raw.splits.items():
        if x.dtype not in (np.uint8, np.float32):
            raise UserError(f"{name}: split {s} has inputs of dtype {x.dtype}; expected uint8 or float32")
        if shape is None:
            shape, dtype = x.shape[1:], x.dtype
        elif x.shape[1:] != shape or x.dtype != dtype:
            raise UserError(f"{name}: split {s} has inputs {x.dtype}{list(x.shape[1:])} but others have "
                            f"{dtype}{list(shape)}; all splits must match")
    assert shape is not None and dtype is not None
    return [int(v) for v in shape], str(np.dtype(dtype))


def _is_own_manifest(m: Any) -> bool:
    return (isinstance(m, dict) and isinstance(m.get("created_by"), str) and _OWNER in m["created_by"]
            and isinstance(m.get("splits"), dict))


def _own_manifest(out: str) -> Optional[dict]:
    """The manifest distill wrote into `out` earlier, None if there is none; UserError for a
    `manifest.json` that distill did not write (it is never replaced)."""
    muri = storage.join(out, MANIFEST)
    try:
        raw = storage.read_bytes(muri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        m = None
    if not _is_own_manifest(m):
        raise UserError(
            f"{muri}: this {MANIFEST} was not written by `distill data ingest` (it has no created_by "
            f"'... ({_OWNER})'), so ingest will not replace it or touch the files beside it. Ingest into "
            "another (new or empty) folder, or move that file away if the folder is meant for this dataset"
        )
    return m


def _own_journal(out: str) -> set[str]:
    """Shard names an earlier, unfinished ingest into `out` recorded as its own (empty if none)."""
    juri = storage.join(out, JOURNAL)
    try:
        j = json.loads(storage.read_bytes(juri).decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return set()
    except (ValueError, UnicodeDecodeError):
        j = None
    if not (isinstance(j, dict) and _OWNER in str(j.get("created_by", "")) and isinstance(j.get("shards"), list)):
        raise UserError(f"{juri}: not the journal `distill data ingest` writes; move it away and ingest again")
    return {str(n) for n in j["shards"]}


def ingest(source: str, out: str, fmt: str, val_fraction: float = 0.1, shard_size: int = 5000,
           seed: int = 0, synthetic_overrides: Union[None, SyntheticConfig, dict, list] = None,
           test_fraction: float = DEFAULT_TEST_FRACTION, progress: bool = True) -> dict:
    """Read `source` in format `fmt` and write shards + manifest.json to `out` (local or s3://).

    Returns the manifest. If `out` already holds a complete dataset ingested with the same
    settings, nothing is written. Raises UserError for bad input (named file, what is wrong, fix).
    Files in `out` that distill did not write are never removed or overwritten.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    if not 0 < float(val_fraction) < 0.9:
        raise UserError(f"--val-fraction {val_fraction}: must be > 0 and < 0.9")
    if not 0 < float(test_fraction) < 0.9:
        raise UserError(f"test_fraction {test_fraction}: must be > 0 and < 0.9")
    if int(shard_size) < 1:
        raise UserError(f"--shard-size {shard_size}: must be at least 1")
    if fmt != "synthetic" and synthetic_overrides:
        raise UserError("--synthetic settings apply only to --format synthetic")
    syn = synthetic_config(synthetic_overrides) if fmt == "synthetic" else None
    if fmt not in ("digits", "synthetic") and (not source or source == "-"):
        raise UserError(f"SOURCE is empty; --format {fmt} needs the path or URI of the raw data")
    shard_size = int(shard_size)
    params = {"source": _normalise_source(source, fmt), "format": fmt, "val_fraction": float(val_fraction),
              "shard_size": shard_size, "seed": int(seed),
              "test_fraction": float(test_fraction) if fmt in ("digits", "folder") else None,
              "synthetic": syn.model_dump() if syn else None}
    muri = storage.join(out, MANIFEST)
    existing = _own_manifest(out)
    if existing is not None and existing.get("ingest") == params and shards_present(out, existing):
        log(f"{out} already holds this dataset ({MANIFEST} matches, all shards present); nothing to do")
        return existing
    ours = _own_journal(out)
    if existing is not None:
        ours |= {s["path"] for info in existing["splits"].values() for s in info.get("shards", [])}

    t0 = time.perf_counter()
    raw = LOADERS[fmt](source, synthetic=syn)
    plan = _plan(raw, float(val_fraction), int(seed), float(test_fraction), source or fmt)
    counts = {s: int(plan.class_counts[s].sum()) for s in SPLITS}
    for s in ("train", "test"):
        if counts[s] == 0:
            raise UserError(f"{source or fmt}: the {s} split is empty")
    log(f"read {raw.name} ({fmt}) in {time.perf_counter() - t0:.1f}s: "
         + ", ".join(f"{s} {counts[s]}" for s in SPLITS))

    planned = [shard_name(s, i) for s in SPLITS for i in range(-(-counts[s] // shard_size))]
    present = _list_sizes(out)
    foreign = [n for n in planned if n in present and n not in ours]
    if foreign:
        raise UserError(
            f"{out}: holds {len(foreign)} shard file(s) that distill did not write (not listed in its "
            f"{MANIFEST}), which this ingest would overwrite: {', '.join(foreign[:10])}"
            f"{' ...' if len(foreign) > 10 else ''}. Ingest into another (new or empty) folder, or move "
            "those files away"
        )
    storage.makedirs(out)
    storage.write_json_atomic(storage.join(out, JOURNAL), {
        "created_by": f"distill {_version()} ({_OWNER})",
        "shards": sorted((ours & set(present)) | set(planned))})
    if existing is not None:  # a manifest must only ever describe complete shards
        storage.remove(muri)
    t1 = time.perf_counter()
    total = len(planned)
    with _Publisher(out, present, total, progress) as pub:
        plan.write(pub, shard_size)
    entries, kept = pub.entries, pub.kept
    num_classes = len(raw.class_names)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": raw.name,
        "num_classes": num_classes,
        "class_names": raw.class_names,
        "class_groups": raw.class_groups,
        "encoding": raw.encoding,
        **raw.extra,
        "input_shape": plan.input_shape,
        "dtype": plan.dtype,
        "source_format": fmt,
        "splits": {
            s: {"num_samples": counts[s],
                "class_counts": [int(v) for v in plan.class_counts[s]],
                "shards": entries[s]}
            for s in SPLITS
        },
        "ingest": params,
        "created_by": f"distill {_version()} ({_OWNER})",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for s in SPLITS:
        assert sum(e["num_samples"] for e in entries[s]) == counts[s], (s, counts[s])
    storage.write_json_atomic(muri, manifest)
    _remove_stale(out, manifest, ours)
    storage.remove(storage.join(out, JOURNAL))
    log(f"wrote {total - kept} shard(s), kept {kept} already complete, in {time.perf_counter() - t1:.1f}s -> {out}")
    return manifest


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("distill")
    except Exception:  # noqa: BLE001 - running from a source tree without installed metadata
        return "dev"


def _encode(x: Any, y: np.ndarray, keys: list[str]) -> bytes:
    if isinstance(x, ImageBatch):
        return encode_image_shard(x.blobs, x.exts, y, keys)
    return encode_shard(x, y, keys)


class _Publisher:
    """Publishes encoded shards in order, a few at once in threads (disk writes, S3 PUTs), with at
    most `_IN_FLIGHT` shards held; keeps a shard already present with the same bytes (a resumed
    ingest) and records each shard's manifest entry."""

    _IN_FLIGHT = 4

    def __init__(self, out: str, present: dict[str, int], total: int, progress: bool):
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        self.out, self.present = out, present
        self.entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self.kept = 0
        self.pool = ThreadPoolExecutor(max_workers=self._IN_FLIGHT, thread_name_prefix="distill-put")
        self.pending: collections.deque = collections.deque()
        self.bar = tqdm(total=total, desc="ingest", unit="shard", file=sys.stderr, disable=not progress)

    def _put(self, uri: str, name: str, data: bytes, sha: str) -> bool:
        if self.present.get(name) == len(data):
            try:
                if storage.sha256_file(uri) == sha:
                    return False
            except FileNotFoundError:
                pass
        storage.write_bytes_atomic(uri, data)
        return True

    def _settle(self, fut) -> None:
        self.kept += 0 if fut.result() else 1
        self.bar.update(1)

    def submit(self, split: str, x: Any, y: np.ndarray) -> None:
        """Encode and publish the next shard of `split` (samples keyed from the split's running count)."""
        entries = self.entries[split]
        start = sum(e["num_samples"] for e in entries)
        data = _encode(x, y, [sample_key(split, j) for j in range(start, start + len(y))])
        name = shard_name(split, len(entries))
        sha = storage.sha256_bytes(data)
        entries.append({"path": name, "num_samples": int(len(y)), "sha256": sha, "size": len(data)})
        self.pending.append(self.pool.submit(self._put, storage.join(self.out, name), name, data, sha))
        while len(self.pending) >= self._IN_FLIGHT or (self.pending and self.pending[0].done()):
            self._settle(self.pending.popleft())

    def __enter__(self) -> "_Publisher":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        try:
            if exc_type is None:
                while self.pending:
                    self._settle(self.pending.popleft())
        finally:
            for fut in self.pending:
                fut.cancel()
            self.pool.shutdown(wait=True)
            self.bar.close()


class _Sink:
    """Fills the shards of one split from blocks of any size: a shard is encoded and published as
    soon as it is full, so at most one shard's worth of samples waits here."""

    def __init__(self, pub: _Publisher, split: str, shard_size: int):
        self.pub, self.split, self.size = pub, split, shard_size
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.n = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(y):
            self.xs.append(x)
            self.ys.append(y)
            self.n += len(y)
        while self.n >= self.size:
            self._flush(self.size)

    def _flush(self, n: int) -> None:
        x, y = np.concatenate(self.xs), np.concatenate(self.ys)
        self.pub.submit(self.split, x[:n], y[:n])
        self.xs, self.ys = ([x[n:]], [y[n:]]) if len(y) > n else ([], [])
        self.n = len(y) - n

    def close(self) -> None:
        if self.n:
            self._flush(self.n)


@dataclass
class _Plan:
    """What will be written: per split its class counts, and how to produce its shards in order."""

    input_shape: list[int]
    dtype: str
    class_counts: dict[str, np.ndarray]
    write: Callable[[_Publisher, int], None]


def _plan(raw: RawData, val_fraction: float, seed: int, test_fraction: float, where: str) -> _Plan:
    C = len(raw.class_names)
    if raw.stream is not None:
        return _stream_plan(raw, val_fraction, seed)
    for s, (_, y) in raw.splits.items():
        _check_labels(y, C, f"{where} ({s} split)")
    if raw.fetch is None:
        input_shape, dtype = _check_arrays(raw, where)
    else:
        input_shape, dtype = list(raw.input_shape), raw.dtype
    parts = split_indices({s: y for s, (_, y) in raw.splits.items()}, val_fraction, seed, test_fraction)
    class_counts = {s: np.bincount(raw.splits[src][1][idx], minlength=C) for s, (src, idx) in parts.items()}

    def write(pub: _Publisher, shard_size: int) -> None:
        jobs = [(s, lo) for s in SPLITS for lo in range(0, len(parts[s][1]), shard_size)]

        def produce(job: tuple[str, int]) -> tuple[Any, np.ndarray]:
            s, lo = job
            src, idx = parts[s]
            chunk = idx[lo:lo + shard_size]
            x_src, y_src = raw.splits[src]
            return (raw.fetch(x_src[chunk]) if raw.fetch is not None else x_src[chunk]), y_src[chunk]

        # The next shard is read (files, S3) while this one is encoded and published.
        for (s, _), fut in prefetch(produce, jobs, workers=2, window=2):
            x, y = fut.result()
            pub.submit(s, x, y)

    return _Plan(input_shape, dtype, class_counts, write)


def _stream_plan(raw: RawData, val_fraction: float, seed: int) -> _Plan:
    """A generated source (synthetic): a first pass over labels counts the classes, then one pass
    generates the blocks and carves val from train on the fly (StreamingCarve)."""
    gen, C = raw.stream, len(raw.class_names)
    pool = np.zeros(C, dtype=np.int64)
    for y in gen.labels("train"):
        pool += np.bincount(y, minlength=C)
    test_counts = np.zeros(C, dtype=np.int64)
    for y in gen.labels("test"):
        test_counts += np.bincount(y, minlength=C)
    carve_counts = StreamingCarve(pool, val_fraction, seed).targets
    class_counts = {"train": pool - carve_counts, "val": carve_counts, "test": test_counts}

    def write(pub: _Publisher, shard_size: int) -> None:
        carve = StreamingCarve(pool, val_fraction, seed)
        # Train and val shards fill side by side from one pass over the generated train pool; the
        # manifest lists each split's shards in order, so interleaved publishing is harmless.
        train, val = _Sink(pub, "train", shard_size), _Sink(pub, "val", shard_size)
        for x, y in gen.blocks("train"):
            taken = carve(y)
            train.add(x[~taken], y[~taken])
            val.add(x[taken], y[taken])
        train.close()
        val.close()
        test = _Sink(pub, "test", shard_size)
        for x, y in gen.blocks("test"):
            test.add(x, y)
        test.close()

    return _Plan(list(raw.input_shape), raw.dtype, class_counts, write)


def _remove_stale(out: str, manifest: dict, ours: set[str]) -> None:
    """Delete this project's own shards that the new manifest no longer lists (from the previous
    manifest or an unfinished ingest's journal) and temp files of a crashed write. Any other file,
    even one named like a shard, is left alone."""
    keep = {s["path"] for info in manifest["splits"].values() for s in info["shards"]}
    for name in storage.listdir(out):
        stale = name in ours and name not in keep and SHARD_RE.match(name) is not None
        if stale or _TMP_RE.match(name):
            storage.remove(storage.join(out, name))
