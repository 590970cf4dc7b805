"""The one data path: Ray Data datasets over dataset shards and soft-target caches.

Every stage that reads samples — teacher and students (Ray Train workers, through
`TorchTrainer(datasets=...)` and `get_dataset_shard(...).iter_torch_batches`), Tune trials,
specialists, and split-wide inference — reads them through the datasets built here, so memory per
process is bounded by batch size, prefetch and shuffle buffers, never by the dataset
(docs/data.md, "Streaming").

How a dataset is built. A dataset is a list of *read items*, one per shard (and, for training,
one per (pass, shard), see `training_stream`), turned into a Ray Data dataset with `from_items`
and expanded by `map_batches(_read_shards)`: each item becomes the shard's rows, decoded in one
vectorised step (`pipeline.data.shards.decode_shard`), in CPU tasks that run beside the training
workers (on a cluster: on any node, CPU nodes included). The reading task checks the shard's bytes
against the manifest's sha256 before decoding, so no stage ever trains on, or evaluates, a damaged
shard: `ShardChecksumError` names the shard and the fix.

Rows have the columns
    x        the stored input (npy datasets: an (..) array per row; image datasets: absent, see image)
    image    encoded image bytes (image datasets; decoded by `pipeline.transforms` downstream)
    y        int64 label (-1: unlabelled)
    key      the sample's stable key
    epoch    the pass the row belongs to (training streams only; seeds per-epoch augmentation)
and, for joined cache datasets, the teacher's targets: `teacher` (dense (C,) logits or
log-probabilities) or `teacher_topk_idx`, `teacher_topk_val`, `teacher_tail` (top-k caches).

Training streams span every epoch in one dataset: the shard order of pass e is a permutation
seeded by (seed, e) and the rows of a shard are shuffled with a seed of (seed, e, shard), then
mixed across shards by the consumer's local shuffle buffer. One stream for the whole run means
Ray Data starts once, not once per epoch, and a resume restarts it at the checkpointed pass.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.errors import UserError

# Ray Data read tasks: logical CPUs each. 0 lets them run next to training workers that hold every
# CPU of a small machine (they still use real CPU time); on a cluster set `data.read_cpus: 1` so
# Ray places them by free CPUs (CPU-only nodes included).
DEFAULT_READ_CPUS = 0.0
DEFAULT_READ_CONCURRENCY = 2


class ShardChecksumError(UserError):
    """A shard's bytes differ from the sha256 its manifest records (damaged or replaced)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_sha(data: bytes, want: Optional[str], uri: str, fix: str) -> None:
    if want and _sha256(data) != want:
        raise ShardChecksumError(f"{uri}: sha256 differs from its manifest (the shard is damaged or was replaced); "
                                 f"{fix}")


def _shuffle_rows(cols: dict[str, np.ndarray], seed: Optional[Sequence[int]]) -> dict[str, np.ndarray]:
    if seed is None:
        return cols
    n = len(cols["key"])
    perm = np.random.default_rng([int(s) for s in seed]).permutation(n)
    return {k: v[perm] for k, v in cols.items()}


def _data_columns(data: bytes, name: str) -> dict[str, np.ndarray]:
    from pipeline.data import shards

    x, y, keys = shards.decode_shard(data, name=name)
    cols: dict[str, np.ndarray] = {"key": np.asarray(keys, dtype=object), "y": np.asarray(y, dtype=np.int64)}
    if x.dtype == object:  # encoded images: bytes per sample
        cols["image"] = x
    else:
        cols["x"] = x
    return cols


def _cache_columns(item: dict) -> dict[str, np.ndarray]:
    """A cache shard joined with its input shard (Parquet) or on its own (WebDataset), keys checked."""
    from pipeline import cache

    uri = item["cache_uri"]
    data = storage.read_bytes(uri)
    _check_sha(data, item.get("cache_sha256"), uri,
               f"run `distill targets verify {item['cache_root']}` and `distill targets regen CONFIG`")
    arrays = cache.read_shard(data, item["fmt"])
    layout = cache.Layout(**item["layout"])
    cols = {k: np.asarray(v) for k, v in cache.select_targets(arrays, item["which"], layout).items()}
    keys = np.asarray(arrays["keys"], dtype=object)
    if len(keys) != int(item["num_samples"]):
        raise UserError(f"{uri}: {len(keys)} rows but the cache manifest says {item['num_samples']}; run "
                        f"`distill targets verify {item['cache_root']}` and `distill targets regen CONFIG`")
    if "inputs" in arrays and item.get("source_uri") is None:
        cols.update({"key": keys, "y": np.asarray(arrays["labels"], dtype=np.int64), "x": arrays["inputs"]})
        return cols
    src = storage.read_bytes(item["source_uri"])
    _check_sha(src, item.get("source_sha256"), item["source_uri"],
               "run `distill data verify` on the dataset, re-ingest it, then `distill targets regen CONFIG`")
    data_cols = _data_columns(src, item["source_uri"])
    if len(data_cols["key"]) != len(keys) or not np.array_equal(data_cols["key"], keys):
        raise UserError(f"{item['source_uri']}: its keys do not match cache shard {uri} (the dataset changed "
                        "or the cache is damaged); run `distill targets regen CONFIG`")
    cols.update(data_cols)
    return cols


def _read_one(shard: dict) -> dict[str, np.ndarray]:
    if shard.get("cache_uri"):
        cols = _cache_columns(shard)
    else:
        data = storage.read_bytes(shard["uri"])
        _check_sha(data, shard.get("sha256"), shard["uri"],
                   f"run `distill data verify {shard['root']}` and re-ingest (or `distill stage data CONFIG --force`)")
        cols = _data_columns(data, shard["uri"])
    return cols


def _read_shards(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_batches UDF: read items (one row each, batch_size=1) -> the rows of their shards.

    An item is a group of shards read by one task (`group_items`): Ray Data's cost per task
    (~10-20 ms on a busy 2-core machine) is paid per group, not per small shard."""
    import json

    parts = []
    for raw in batch["item"]:
        item = json.loads(raw)
        group = [_read_one(sh) for sh in item["shards"]]
        cols = group[0] if len(group) == 1 else {k: np.concatenate([g[k] for g in group]) for k in group[0]}
        cols = _shuffle_rows(cols, item.get("shuffle_seed"))
        if item.get("epoch") is not None:
            cols["epoch"] = np.full(len(cols["key"]), int(item["epoch"]), dtype=np.int64)
        parts.append(cols)
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# -------------------------------------------------------------------------------------------------
# Read items


def split_items(data_uri: str, split: str, manifest: Optional[dict] = None, verify: bool = True) -> list[dict]:
    """One entry per shard of `split`, in manifest order (group them into read items with
    `group_items` / `epoch_items`)."""
    from pipeline.data import shards

    root = shards.dataset_root(data_uri)
    entries = shards.split_entries(root, split, manifest)
    return [{"uri": e["uri"], "root": root, "sha256": e["sha256"] if verify else None,
             "num_samples": int(e["num_samples"]), "bytes": int(e.get("size") or 0), "shard": i}
            for i, e in enumerate(entries)]


def cache_items(cache_uri: str, which: str, data_uri: Optional[str] = None, fmt: Optional[str] = None,
                manifest: Optional[dict] = None, verify: bool = True) -> list[dict]:
    """One entry per cache shard (source order): the cache file, and for Parquet its input shard."""
    from dataclasses import asdict

    from pipeline import cache

    m = manifest or cache.read_manifest(cache_uri)
    layout = cache.layout_of(m)
    fmt = cache.pick_format(m, fmt, cache_uri)
    root = data_uri or m["dataset"]["uri"]
    items = []
    for i, e in enumerate(m["shards"]):
        info = e["files"][fmt]
        item = {"cache_uri": storage.join(cache_uri, info["path"]), "cache_root": cache_uri, "fmt": fmt,
                "cache_sha256": info.get("sha256") if verify else None, "which": which,
                "layout": asdict(layout), "num_samples": int(e["num_samples"]), "shard": i,
                "bytes": int(info.get("bytes") or 0),
                "source_uri": None, "source_sha256": None}
        if not cache.get_format(fmt).carries_inputs:  # joined with its input shard when read
            item["source_uri"] = storage.join(root, e["source"])
            item["source_sha256"] = e.get("source_sha256") if verify else None
        items.append(item)
    return items


DEFAULT_GROUP_ROWS = 16384


def group_items(shards: Sequence[dict], group_rows: int = DEFAULT_GROUP_ROWS, **extra) -> list[dict]:
    """Consecutive shards packed into read items of at least `group_rows` samples (a shard larger
    than that is an item of its own), in order."""
    items: list[dict] = []
    cur: list[dict] = []
    rows = 0
    for sh in shards:
        cur.append(sh)
        rows += int(sh["num_samples"])
        if rows >= group_rows:
            items.append(dict(extra, shards=cur, num_samples=rows))
            cur, rows = [], 0
    if cur:
        items.append(dict(extra, shards=cur, num_samples=rows))
    return items


def epoch_items(shards: Sequence[dict], epochs: Sequence[int], seed: int, shuffle: bool = True,
                group_rows: int = DEFAULT_GROUP_ROWS) -> list[dict]:
    """Read items for passes `epochs` over `shards`: per pass the shard order is permuted by
    (seed, epoch), shards are grouped (`group_items`) and each group's rows are shuffled with a seed
    of (seed, epoch, group). Deterministic: a resumed run gets the same passes."""
    out = []
    for e in epochs:
        order = np.random.default_rng([int(seed), int(e)]).permutation(len(shards)) if shuffle else range(len(shards))
        groups = group_items([shards[int(j)] for j in order], group_rows, epoch=int(e))
        for g, it in enumerate(groups):
            if shuffle:
                it["shuffle_seed"] = [int(seed), int(e), g]
            out.append(it)
    return out


# -------------------------------------------------------------------------------------------------
# Datasets


def needs_transform(manifest: Optional[dict], augment: Any = None) -> bool:
    """Whether rows need `pipeline.transforms` before a model sees them: encoded images always
    (decode), stored pixels when the stage configures augmentation."""
    if manifest is None:
        return False
    return manifest.get("encoding") == "image" or bool(augment)


def with_transform(ds, manifest: Optional[dict], augment: Any, train: bool, seed: int,
                   read_cpus: float = DEFAULT_READ_CPUS, concurrency: int = DEFAULT_READ_CONCURRENCY):
    """`ds` with decode/augmentation applied in CPU tasks of the data pipeline (`map_batches`):
    the training view (`train`: random crops/flips seeded per (seed, key, epoch)) or the
    deterministic view of evaluation and inference. A no-op for datasets that need none."""
    import ray.data

    if not needs_transform(manifest, augment):
        return ds
    from pipeline import transforms

    if hasattr(augment, "model_dump"):
        augment = augment.model_dump()
    fn = transforms.make_batch_transform(augment, manifest, train, int(seed))
    return ds.map_batches(lambda b: fn(b, None), batch_size=256, num_cpus=float(read_cpus),
                          compute=ray.data.TaskPoolStrategy(size=max(1, int(concurrency))))


def from_items(items: Sequence[dict], read_cpus: float = DEFAULT_READ_CPUS,
               concurrency: int = DEFAULT_READ_CONCURRENCY, transform: Optional[dict] = None):
    """A Ray Data dataset of the rows of `items` (read lazily, in order of the items).

    transform: {"manifest", "augment", "train", "seed"} to decode/augment rows (`with_transform`)."""
    import json

    import ray.data

    if not items:
        raise UserError("no shards to read (the split is empty)")
    rows = [{"item": json.dumps(it)} for it in items]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # Rows come out in the items' order whatever order the tasks finish in: batches (and so a
    # resumed run, and evaluation row order) are reproducible.
    ds.context.execution_options.preserve_order = True
    # Stages print their own progress; Ray Data's bars and per-execution banners (one per epoch and
    # val pass, from every worker) would bury it.
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    ds = ds.map_batches(_read_shards, batch_size=1, num_cpus=float(read_cpus),
                        compute=ray.data.TaskPoolStrategy(size=max(1, min(int(concurrency), len(rows)))),
                        zero_copy_batch=True)
    if transform:
        ds = with_transform(ds, transform.get("manifest"), transform.get("augment"), bool(transform.get("train")),
                            int(transform.get("seed") or 0), read_cpus, concurrency)
    return ds


def read_split(data_uri: str, split: str, *, verify: bool = True, manifest: Optional[dict] = None,
               read_cpus: float = DEFAULT_READ_CPUS, concurrency: int = DEFAULT_READ_CONCURRENCY,
               group_rows: int = DEFAULT_GROUP_ROWS):
    """The rows of one split, in shard order (evaluation and inference)."""
    return from_items(group_items(split_items(data_uri, split, manifest, verify), group_rows), read_cpus, concurrency)


def training_stream(shards: Sequence[dict], start_epoch: int, epochs: int, seed: int,
                    read_cpus: float = DEFAULT_READ_CPUS, concurrency: int = DEFAULT_READ_CONCURRENCY,
                    group_rows: int = DEFAULT_GROUP_ROWS, transform: Optional[dict] = None):
    """One dataset spanning passes start_epoch..epochs-1 over `shards` (see the module docstring)."""
    return from_items(epoch_items(shards, range(int(start_epoch), int(epochs)), seed, group_rows=group_rows),
                      read_cpus, concurrency, transform)


def num_samples(items: Sequence[dict]) -> int:
    return sum(int(it["num_samples"]) for it in items)


def class_counts(data_uri: str, split: str) -> Optional[np.ndarray]:
    """Per-class sample counts of a split when the dataset manifest records them, else None."""
    from pipeline.data import shards

    info = shards.read_manifest(data_uri)["splits"].get(split) or {}
    counts = info.get("class_counts")
    return None if counts is None else np.asarray(counts, dtype=np.int64)


def _collate_base():
    try:
        from ray.data.collate_fn import NumpyBatchCollateFn

        return NumpyBatchCollateFn
    except ImportError:  # an older Ray: a plain callable works there
        return object


_QUIETED = False


class Collate(_collate_base()):
    """`iter_torch_batches(collate_fn=...)`: numeric columns to torch tensors (on `device`, through
    pinned memory when it is a GPU), other columns (keys, image bytes) dropped unless `keep` names
    them. uint8 inputs stay uint8 until the device: the float conversion happens there."""

    def __init__(self, device: Any = "cpu", keep: Sequence[str] = (), drop: Sequence[str] = ()):
        self.device = device
        self.keep = tuple(keep)
        self.drop = tuple(drop)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        import warnings

        out: dict[str, Any] = {}
        cuda = str(self.device).startswith("cuda")
        global _QUIETED
        if not _QUIETED:
            # Ray hands out read-only views of its blocks; the tensors are never written in place
            # (minibatches are gathered copies), so torch's warning about that is noise. Once per
            # process: each filterwarnings call also resets every module's warning registry.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            _QUIETED = True
        for k, v in batch.items():
            if k in self.drop:
                continue
            if isinstance(v, np.ndarray) and v.dtype != object and v.dtype.kind in "biuf":
                t = torch.from_numpy(np.ascontiguousarray(v))
                if cuda:
                    t = t.pin_memory().to(self.device, non_blocking=True)
                out[k] = t
            elif k in self.keep:
                out[k] = v
        return out


# -------------------------------------------------------------------------------------------------
# Per-shard jobs: rows tagged with their shard and position (the targets stage writes one output
# shard per input shard, in the same order, from rows that went through any batch and replica)


def _read_tagged(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_batches UDF: items of one shard each -> the shard's rows plus `shard` (the shard's index
    in its split, `split_items`' "shard") and `row` (the row's position in the shard)."""
    import json

    parts = []
    for raw in batch["item"]:
        (sh,) = json.loads(raw)["shards"]
        try:
            cols = _read_one(sh)
        except FileNotFoundError:
            raise UserError(f"{sh['uri']}: input shard missing; run `distill data verify {sh['root']}` and "
                            "re-ingest") from None
        n = len(cols["key"])
        if n != int(sh["num_samples"]):
            raise UserError(f"{sh['uri']}: {n} samples, the dataset manifest says {sh['num_samples']}; run "
                            f"`distill data verify {sh['root']}`")
        cols["shard"] = np.full(n, int(sh["shard"]), dtype=np.int64)
        cols["row"] = np.arange(n, dtype=np.int64)
        parts.append(cols)
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def read_shards_tagged(shards: Sequence[dict], read_cpus: float = DEFAULT_READ_CPUS,
                       concurrency: int = DEFAULT_READ_CONCURRENCY):
    """The rows of `shards` (entries as `split_items` makes them), one read task per shard, each
    row tagged with `shard` and `row` (see `_read_tagged`); checksums checked in the read tasks."""
    import json

    import ray.data

    if not shards:
        raise UserError("no shards to read")
    rows = [{"item": json.dumps({"shards": [sh], "num_samples": int(sh["num_samples"])})} for sh in shards]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    return ds.map_batches(_read_tagged, batch_size=1, num_cpus=float(read_cpus),
                          compute=ray.data.TaskPoolStrategy(size=max(1, int(concurrency))), zero_copy_batch=True)
