"""Memory does not grow with the data: a student trained on the streaming path over a dataset
several times larger than its memory budget keeps its process's memory within that budget.

The process's resident memory is sampled every 20 ms while `train_in_process` trains one epoch over
a 120 MiB training split read through Ray Data (the same path as Ray Train workers and Tune trials
use), with small loader buffers. Loading the split whole (the old path decoded every shard into one
array, then copied it) would add at least the split's size; the budget is a quarter of it.
`bench/bench_memory.py` measures a whole `distill run` at two sizes the same way (summed PSS of every
process) for the README.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from pipeline import storage

DIM = 1024
TRAIN = 32_000  # 0.9 of it is train after the val carve: ~118 MB of float32 inputs


def _rss() -> int:
    """This process's private resident memory (RssAnon). Ray's object store (RssShmem: shared pages
    of a fixed-size store) and mapped libraries (RssFile) do not grow with the data."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _ingest(path: str, train: int) -> str:
    from pipeline.data.ingest import ingest

    ingest("", path, "synthetic", val_fraction=0.1, shard_size=2000, seed=0, progress=False,
           synthetic_overrides={"num_classes": 8, "num_groups": 4, "train": train, "test": 200, "dim": DIM,
                                "difficulty": 1.0, "seed": 0})
    return path


@pytest.mark.slow
def test_streamed_training_memory_stays_under_a_budget_smaller_than_the_data(tmp_path, ray_local):
    from pipeline.config import Config
    from pipeline.stages import student

    def job_for(data: str) -> dict:
        cfg = Config.model_validate({
            "output_dir": str(tmp_path / "run"), "data": {"uri": data},
            "student": {"model": {"arch": "mlp", "hidden": [16]}, "epochs": 1, "batch_size": 256},
        })
        cfg.data.loader.chunk_rows = 512
        cfg.data.loader.shuffle_rows = 1024
        cfg.data.loader.group_rows = 1024
        return student.student_job(cfg)

    # A warm-up run on a small split: imports, Ray Data's executor and torch's allocator are in place.
    student.train_in_process(job_for(_ingest(str(tmp_path / "small"), 4000)), "hard", epochs=1, seed=0)
    data = _ingest(str(tmp_path / "data"), TRAIN)
    manifest = storage.read_json(storage.join(data, "manifest.json"))
    train_bytes = manifest["splits"]["train"]["num_samples"] * DIM * 4
    job = job_for(data)

    base = _rss()
    peak = {"rss": base}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _rss())
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        _, history = student.train_in_process(job, "hard", epochs=1, seed=0)
    finally:
        stop.set()
        th.join()
    grown = peak["rss"] - base
    assert history and history[0]["samples_per_s"] > 0
    assert train_bytes > 100e6
    assert grown < 0.25 * train_bytes, (f"training over {train_bytes / 1e6:.0f} MB of inputs grew this process by "
                                       f"{grown / 1e6:.0f} MB: the split is being held in memory")
    print(f"streamed {train_bytes / 1e6:.0f} MB of inputs; process memory grew {grown / 1e6:.0f} MB "
          f"(pid {os.getpid()})")
