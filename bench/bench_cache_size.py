"""What the soft-target cache costs on disk: bytes per sample of each layout and format.

Writes one real cache shard (`pipeline.cache.write_cache_shard`, labelled, keys as the dataset's
`train_00000123`) per class count C in (10, 1,000, 15,000) and layout:

  dense_float16   the generalist's logits and the ensemble's log-probabilities, C float16 each;
  top64_float16   per target the 64 largest log-probabilities (float16), their class indices
                  (int16 while C <= 32,767, else int32) and the float32 log tail mass
                  (k = C - 1 where C <= 64, recorded as `k`);

in Parquet (zstd) and WebDataset (tar: per sample a `.cls` member and one `.targets.npy` member
for all targets; the dataset's inputs, which a self-contained tar also carries, are left out: they
are the dataset's own size). Teacher outputs are random logits (normal, scale 4): float16
mantissas of trained nets' outputs compress about as badly, so Parquet's figures are close to real.

Reported: bytes/sample, and what 100 million samples cost (decimal GB), for every cell.

    .venv/bin/python bench/bench_cache_size.py --out bench/results_cache_size.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import cache  # noqa: E402

from _common import emit  # noqa: E402  (bench/ is on sys.path when run as a script)

CLASSES = (10, 1000, 15000)
TOP_K = 64
SAMPLES = 100_000_000


def teacher_outputs(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.normal(scale=4.0, size=(n, c)).astype(np.float32)
    z = logits.astype(np.float64)
    logprobs = (z - z.max(1, keepdims=True))
    logprobs -= np.log(np.exp(logprobs).sum(1, keepdims=True))
    return logits, logprobs.astype(np.float32)


def measure(c: int, n: int, folder: str, rng: np.random.Generator) -> dict:
    logits, logprobs = teacher_outputs(rng, n, c)
    keys = [f"train_{i:08d}" for i in range(n)]
    labels = rng.integers(0, c, n)
    k = min(TOP_K, c - 1)
    out = {}
    for name, layout in (("dense_float16", cache.Layout(c, "float16")),
                         (f"top{TOP_K}_float16", cache.Layout(c, "float16", k))):
        fields = layout.encode(logits, logprobs)
        files = cache.write_cache_shard(folder, f"c{c}_{name}-000000", ["parquet", "webdataset"], layout, keys,
                                        labels, fields)
        cell = {"k": k} if layout.top_k is not None else {}
        cell["record_bytes"] = layout.record_dtype().itemsize  # the raw targets of one sample
        for fmt in ("parquet", "webdataset"):
            per = files[fmt]["bytes"] / n
            cell[fmt] = {"bytes_per_sample": round(per, 1), "gb_per_100M_samples": round(per * SAMPLES / 1e9, 1)}
        out[name] = cell
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2000, help="samples per shard (C = 15,000 uses a quarter)")
    ap.add_argument("--quick", action="store_true", help="fewer samples per shard")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    n = 200 if args.quick else args.samples
    rng = np.random.default_rng(0)
    result = {"format_version": cache.FORMAT_VERSION, "samples_per_shard": n,
              "extrapolated_samples": SAMPLES, "labelled": True, "inputs_included": False}
    with tempfile.TemporaryDirectory() as folder:
        for c in CLASSES:
            result[f"C{c}"] = measure(c, max(50, n // 4) if c > 5000 else n, folder, rng)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
