"""Minibatches for training workers, read straight from dataset shards (local or s3://).

Each Ray Train worker (or Tune trial, or specialist) gets a disjoint subset of a split's shards
(`shards_for_worker`) and iterates over it with `ShardBatchReader`: shard order and sample order are
shuffled per epoch from (seed, epoch), so a rerun or a restored worker sees the same batches. Shards
are decoded whole into arrays (`shards.decode_shard`: one header parse, one copy), never sample by
sample, and kept decoded in memory while they fit under `cache_bytes`, so epochs after the first
read nothing. Larger inputs are streamed a few shards at a time, with the next shard's bytes fetched
in a background thread while the current ones are consumed.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.data.shards import decode_shard, prefetch, read_manifest, split_entries
from pipeline.errors import UserError

DEFAULT_CACHE_BYTES = 1 << 30  # decoded shards kept in memory per reader (1 GiB)


def shards_for_worker(shard_list: Sequence, rank: int, world_size: int) -> list:
    """The shards worker `rank` of `world_size` reads: every world_size-th, starting at rank.

    Disjoint across ranks, together covering the list; UserError when there are fewer shards than
    workers (some worker would get nothing).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if len(shard_list) < world_size:
        raise UserError(
            f"the split has {len(shard_list)} shard(s) but {world_size} workers read it; every worker needs "
            "at least one shard. Re-ingest with a smaller data.shard_size (e.g. "
            "`data.shard_size=1000`) or use fewer workers"
        )
    return list(shard_list[rank::world_size])


class ShardBatchReader:
    """Seeded, per-epoch shuffled minibatches (x, y) over a list of shard URIs.

    uris          shard URIs (local or s3://), e.g. `shards_for_worker(shard_uris(data, "train"), r, w)`
    batch_size    samples per batch
    seed          with the epoch, fixes shard order and sample order
    shuffle       False: shards and samples in the given order (evaluation)
    drop_last     drop a final batch smaller than batch_size
    cache_bytes   keep decoded shards in memory up to this many bytes. When all shards fit (judged
                  from their file sizes, which bound the decoded size), every epoch shuffles all
                  samples together; otherwise shards are streamed and samples shuffled within
                  windows of `stream_shards` shards
    max_samples   cap every epoch at this many samples (see `from_split(..., equal=True)`): workers
                  of one data-parallel job must take the same number of steps
    counts/sizes  per-shard sample counts and file sizes, if known (the manifest has them); saves
                  a metadata request per shard

    The batches depend only on (uris, seed, epoch, sizes, settings), never on what is cached, so a
    restarted worker resumes with exactly the batches it would have seen.
    """

    def __init__(self, uris: Sequence[str], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 stream_shards: int = 2, max_samples: Optional[int] = None,
                 counts: Optional[Sequence[int]] = None, sizes: Optional[Sequence[int]] = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.uris = list(uris)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.cache_bytes = int(cache_bytes)
        self.stream_shards = max(1, int(stream_shards))
        self.max_samples = None if max_samples is None else int(max_samples)
        self.counts = list(counts) if counts is not None else None
        self.sizes = list(sizes) if sizes is not None else None
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_bytes = 0

    @classmethod
    def from_split(cls, data_uri: str, split: str, batch_size: int, seed: int = 0, rank: int = 0,
                   world_size: int = 1, equal: bool = True, **kwargs) -> "ShardBatchReader":
        """A reader over worker `rank`'s shards of `split` of the dataset at `data_uri`.

        equal=True caps every worker's epoch at the smallest worker's sample count (from the
        manifest), so data-parallel workers take the same number of steps; which samples are left
        out changes from epoch to epoch because the order is reshuffled.
        """
        manifest = read_manifest(data_uri)
        entries = split_entries(data_uri, split, manifest)
        mine = shards_for_worker(entries, rank, world_size)
        cap = kwargs.pop("max_samples", None)
        if equal and world_size > 1:
            smallest = min(sum(e["num_samples"] for e in shards_for_worker(entries, r, world_size))
                           for r in range(world_size))
            cap = smallest if cap is None else min(cap, smallest)
        sizes = [e["size"] for e in mine] if all("size" in e for e in mine) else None
        return cls([e["uri"] for e in mine], batch_size, seed=seed, max_samples=cap,
                   counts=[e["num_samples"] for e in mine], sizes=sizes, **kwargs)

    @property
    def num_samples(self) -> Optional[int]:
        """Samples per epoch (None if unknown: pass `counts`, or call `load_all` once)."""
        if self.counts is None or any(c is None for c in self.counts):
            return None
        n = sum(self.counts)
        return min(n, self.max_samples) if self.max_samples is not None else n

    def num_batches(self) -> Optional[int]:
        n = self.num_samples
        if n is None:
            return None
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def all_in_memory(self) -> bool:
        """Whether every decoded shard fits `cache_bytes` (then epochs after the first read nothing)."""
        if self.sizes is None:
            fs_sizes = prefetch(storage.size, self.uris, workers=4)
            self.sizes = [fut.result() for _, fut in fs_sizes]
        return sum(self.sizes) <= self.cache_bytes

    # -- loading ------------------------------------------------------------------------------

    def _decode(self, i: int, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        x, y, _ = decode_shard(data, name=self.uris[i])
        nbytes = x.nbytes + y.nbytes
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[i] = (x, y)
            self._cached_bytes += nbytes
        if self.counts is None:
            self.counts = [None] * len(self.uris)  # type: ignore[list-item]
        self.counts[i] = len(y)
        return x, y

    def _shards(self, order: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Decoded shards in `order`, from the cache or fetched a couple of shards ahead."""
        todo = [i for i in order if i not in self._cache]
        fetched = prefetch(lambda i: storage.read_bytes(self.uris[i]), todo, workers=2, window=2)
        try:
            for i in order:
                if i in self._cache:
                    yield self._cache[i]
                else:
                    j, fut = next(fetched)
                    assert j == i
                    yield self._decode(i, fut.result())
        finally:
            fetched.close()

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample in shard order (no shuffle), e.g. for evaluation."""
        parts = list(self._shards(range(len(self.uris))))
        if not parts:
            return np.zeros((0,), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        # concatenate copies, also of a single shard: callers get arrays they may modify
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # -- batches ------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Minibatches (x, y) of one epoch; the same (seed, epoch) always gives the same batches."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        order = rng.permutation(len(self.uris)) if self.shuffle else np.arange(len(self.uris))
        window = len(self.uris) if self.all_in_memory else self.stream_shards
        budget = self.max_samples if self.max_samples is not None else math.inf
        bs = self.batch_size
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        left_x: Optional[np.ndarray] = None  # samples of the last window that did not fill a batch
        left_y: Optional[np.ndarray] = None
        taken = 0  # samples handed out or waiting in left_x

        def mix() -> tuple[np.ndarray, np.ndarray]:
            nonlocal taken
            if len(pending) > 1:
                x, y = np.concatenate([p[0] for p in pending]), np.concatenate([p[1] for p in pending])
            else:  # copy even so: batches must never be views of cached shards a caller could modify
                x, y = pending[0] if self.shuffle else (pending[0][0].copy(), pending[0][1].copy())
            pending.clear()
            if self.shuffle:
                perm = rng.permutation(len(y))
                x, y = x[perm], y[perm]
            if taken + len(y) > budget:
                x, y = x[:int(budget - taken)], y[:int(budget - taken)]
            taken += len(y)
            if left_x is not None and len(left_y):
                x, y = np.concatenate([left_x, x]), np.concatenate([left_y, y])
            return x, y

        for shard in self._shards(order.tolist()):
            pending.append(shard)
            if len(pending) < window:
                continue
            x, y = mix()
            full = len(y) // bs * bs
            for s in range(0, full, bs):
                yield x[s:s + bs], y[s:s + bs]
            left_x, left_y = x[full:], y[full:]
            if taken >= budget:
                break
        if pending and taken < budget:
            x, y = mix()
            left_x, left_y = x, y
        if left_x is not None and len(left_y):
            full = len(left_y) // bs * bs
            for s in range(0, full, bs):
                yield left_x[s:s + bs], left_y[s:s + bs]
            if len(left_y) > full and not self.drop_last:
                yield left_x[full:], left_y[full:]
