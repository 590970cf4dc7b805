"""Readers for training workers: disjoint shard subsets, seeded per-epoch shuffles that do not
depend on what is cached, every sample once per epoch, equal step counts across workers."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import storage
from pipeline.data import readers
from pipeline.data.readers import ShardBatchReader, shards_for_worker
from pipeline.data.shards import load_split, shard_uris
from pipeline.errors import UserError


def _rows(batches):
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return x, y


def _as_set(x):
    return sorted(r.tobytes() for r in x.reshape(len(x), -1))


@pytest.mark.parametrize("n,world", [(6, 1), (6, 2), (7, 3), (9, 4), (4, 4)])
def test_shards_for_worker_is_disjoint_and_covering(n, world):
    items = [f"s{i}" for i in range(n)]
    parts = [shards_for_worker(items, r, world) for r in range(world)]
    assert sorted(sum(parts, [])) == sorted(items)
    assert all(p for p in parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_fewer_shards_than_workers_is_a_user_error():
    with pytest.raises(UserError, match=r"1 shard\(s\) but 2 workers.*smaller data\.shard_size"):
        shards_for_worker(["only"], 1, 2)
    with pytest.raises(ValueError):
        shards_for_worker(["a", "b"], 2, 2)


@pytest.mark.parametrize("cache_bytes", [readers.DEFAULT_CACHE_BYTES, 0], ids=["in-memory", "streamed"])
def test_each_epoch_yields_every_sample_once_in_a_seeded_order(tiny_synthetic, cache_bytes):
    uris = shard_uris(tiny_synthetic, "train")
    x_all, y_all, _ = load_split(tiny_synthetic, "train")
    r = ShardBatchReader(uris, batch_size=64, seed=7, cache_bytes=cache_bytes)
    assert r.all_in_memory is (cache_bytes > 0)
    e0 = list(r.epoch_batches(0))
    e1 = list(r.epoch_batches(1))
    for batches in (e0, e1):
        assert [len(b[1]) for b in batches] == [64] * 16 + [56]
        x, y = _rows(batches)
        assert _as_set(x) == _as_set(x_all)
        assert sorted(y.tolist()) == sorted(y_all.tolist())
    assert not np.array_equal(_rows(e0)[0], _rows(e1)[0])  # reshuffled per epoch
    assert not np.array_equal(_rows(e0)[0], x_all)  # shuffled at all
    # a fresh reader (nothing cached, e.g. a restarted worker) gives the same batches for an epoch
    fresh = ShardBatchReader(uris, batch_size=64, seed=7, cache_bytes=cache_bytes)
    np.testing.assert_array_equal(_rows(list(fresh.epoch_batches(1)))[0], _rows(e1)[0])
    other_seed = ShardBatchReader(uris, batch_size=64, seed=8, cache_bytes=cache_bytes)
    assert not np.array_equal(_rows(list(other_seed.epoch_batches(1)))[0], _rows(e1)[0])


def test_in_memory_mode_mixes_samples_across_all_shards(tiny_synthetic):
    uris = shard_uris(tiny_synthetic, "train")
    first_shard = _as_set(load_split(tiny_synthetic, "train", shard_indices=[0])[0])
    batch = next(ShardBatchReader(uris, batch_size=200, seed=0).epoch_batches(0))[0]
    # 200 samples drawn from 1080: nearly all from other shards than any one shard
    assert len(set(_as_set(batch)) & set(first_shard)) < 100


def test_later_epochs_read_nothing_when_cached(tiny_synthetic, monkeypatch):
    r = ShardBatchReader(shard_uris(tiny_synthetic, "train"), batch_size=100, seed=0)
    list(r.epoch_batches(0))
    reads = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: (uri.endswith(".tar") and reads.append(uri)) or real(uri))
    assert sum(len(b[1]) for b in r.epoch_batches(1)) == 1080
    assert reads == []
    streamed = ShardBatchReader(shard_uris(tiny_synthetic, "train"), batch_size=100, seed=0, cache_bytes=0)
    list(streamed.epoch_batches(0))
    assert len(reads) == 6


def test_no_shuffle_keeps_shard_order_and_drop_last(tiny_synthetic):
    uris = shard_uris(tiny_synthetic, "val") + shard_uris(tiny_synthetic, "test")
    x_val, _, _ = load_split(tiny_synthetic, "val")
    x_test, _, _ = load_split(tiny_synthetic, "test")
    r = ShardBatchReader(uris, batch_size=100, shuffle=False, drop_last=True)
    batches = list(r.epoch_batches(5))
    assert [len(b[1]) for b in batches] == [100] * 5 and r.num_batches() == 5
    np.testing.assert_array_equal(_rows(batches)[0], np.concatenate([x_val, x_test])[:500])


def test_workers_of_one_job_take_the_same_number_of_steps(tiny_synthetic):
    # 3 workers over 6 train shards of 200, 200, 200, 200, 200, 80 samples: 400, 400, 280
    rs = [ShardBatchReader.from_split(tiny_synthetic, "train", batch_size=50, seed=1, rank=r, world_size=3)
          for r in range(3)]
    assert [r.num_samples for r in rs] == [280, 280, 280]
    steps = [len(list(r.epoch_batches(0))) for r in rs]
    assert steps == [r.num_batches() for r in rs] == [6, 6, 6]
    seen = [set(_as_set(_rows(list(r.epoch_batches(2)))[0])) for r in rs]
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    # what a capped worker leaves out changes from epoch to epoch
    a = set(_as_set(_rows(list(rs[0].epoch_batches(0)))[0]))
    b = set(_as_set(_rows(list(rs[0].epoch_batches(1)))[0]))
    assert a != b
    uneven = [ShardBatchReader.from_split(tiny_synthetic, "train", batch_size=50, rank=r, world_size=3, equal=False)
              for r in range(3)]
    assert [u.num_samples for u in uneven] == [400, 400, 280]


def test_load_all_returns_the_shards_in_order(tiny_synthetic):
    r = ShardBatchReader(shard_uris(tiny_synthetic, "test"), batch_size=10)
    x, y = r.load_all()
    ex, ey, _ = load_split(tiny_synthetic, "test")
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)


def test_modifying_a_batch_in_place_does_not_change_later_epochs(tiny_synthetic):
    r = ShardBatchReader(shard_uris(tiny_synthetic, "test")[:1], batch_size=50, shuffle=False)
    first = [x.copy() for x, _ in r.epoch_batches(0)]
    for x, _ in r.epoch_batches(1):
        x += 1000.0  # e.g. an in-place augmentation
    again = [x for x, _ in r.epoch_batches(2)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    x_all, _ = r.load_all()
    x_all[:] = 0
    np.testing.assert_array_equal(next(r.epoch_batches(3))[0], first[0])
