"""Connect to Ray the same way from the CLI, the tests and a submitted job.

An empty `ray.address` starts a local Ray sized for the config (laptops, CI); a set address joins an
existing cluster (`auto` inside a Ray job). Only launchers in `pipeline/` call this: models, losses
and `specialists/` never touch Ray.
"""
from __future__ import annotations

import os

from pipeline.config import Config


def ensure_ray(cfg: Config | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = (cfg.ray.address if cfg else "") or os.environ.get("RAY_ADDRESS", "")
    # Progress bars from Ray Data/Tune are noise in logs of long runs; our stages print their own.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=cfg.ray.num_cpus if cfg else None,
        object_store_memory=(cfg.ray.object_store_memory_mb if cfg else 256) * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=True,
    )
