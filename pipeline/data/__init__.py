"""Datasets as WebDataset tar shards plus a `manifest.json`, local or on S3.

- `ingest`   raw data (IDX, CIFAR tarballs, npz, image folders, scikit-learn digits, or the seeded
             synthetic generator) -> shards + manifest, atomically and resumably;
- `shards`   the on-disk format: writing and decoding shards, the manifest, `verify_dataset`;
- `readers`  what training workers use: disjoint shard subsets per worker and seeded per-epoch
             shuffled minibatches, decoding whole shards into arrays (no per-sample Python loop).

Nothing here imports torch or ray, so the CLI's `data` commands start fast.
"""
