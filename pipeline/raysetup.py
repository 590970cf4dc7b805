"""Connect to Ray the same way from the CLI, the tests and a submitted job.

An empty `ray.address` starts a local Ray sized for the config (laptops, CI); a set address joins an
existing cluster (`auto` inside a Ray job). Only launchers in `pipeline/` call this: models, losses
and `specialists/` never touch Ray.
"""
from __future__ import annotations

import os
import sys

from pipeline.config import Config


def _token_mode_for_existing_cluster() -> None:
    """Joining a token-authenticated cluster: Ray's driver sends the token only when
    RAY_AUTH_MODE=token is set, even when RAY_AUTH_TOKEN or ~/.ray/auth_token holds it (otherwise
    ray.init fails with InvalidAuthToken). Turn token mode on when a token is there and the user
    chose no mode; a token-mode driver joins a cluster without auth too (both checked on Ray 2.60).
    Must run before `import ray`: Ray reads RAY_AUTH_MODE into its config when it is imported."""
    from pipeline.submit import AUTH_MODE_ENV, resolve_auth_token

    if not os.environ.get(AUTH_MODE_ENV) and resolve_auth_token() is not None:
        os.environ[AUTH_MODE_ENV] = "token"


def ensure_ray(cfg: Config | None = None) -> None:
    address = (cfg.ray.address if cfg else "") or os.environ.get("RAY_ADDRESS", "")
    if address and "ray" not in sys.modules:
        _token_mode_for_existing_cluster()
    import ray

    if ray.is_initialized():
        return
    # Progress bars from Ray Data/Tune are noise in logs of long runs; our stages print their own.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=cfg.ray.num_cpus if cfg else None,
        object_store_memory=(cfg.ray.object_store_memory_mb if cfg else 256) * 1024 * 1024,
        # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner polls every
        # second; without it every Ray Train job logs "Failed to query Ray Train Controller actor
        # state" once a second. It also gives users the usual dashboard on 127.0.0.1:8265.
        include_dashboard=True,
        log_to_driver=True,
    )
