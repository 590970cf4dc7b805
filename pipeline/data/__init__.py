"""Datasets as WebDataset tar shards plus a `manifest.json`, local or on S3.

- `ingest`   raw data (IDX, CIFAR tarballs, npz, image folders, scikit-learn digits, or the seeded
             synthetic generator) -> shards + manifest, atomically and resumably;
- `shards`   the on-disk format: writing and decoding shards, the manifest, `verify_dataset`;
- `tario`    the one tar / .npy reader (dataset shards and the cache's WebDataset shards);
Stages read shards through `pipeline.datasets` (Ray Data streams whose tasks decode one shard group
at a time with `shards.decode_shard`, checking each shard's sha256).

Nothing here imports torch or ray, so the CLI's `data` commands start fast.
"""
