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


# Credentials Ray Tune (2.60, `ray.tune.execution.class_cache`) copies from the driver's environment
# into every trial actor's runtime_env, whose `env_vars` the runtime-env agent then writes in plain
# text to `runtime_env_agent.log` (mode 0644) under Ray's temp dir.
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


# How long an idle worker process of a local Ray is kept before Ray may kill it (Ray's default: 1 s).
IDLE_WORKER_KEEP_MS = 60_000


def keep_credentials_out_of_runtime_envs() -> None:
    """Take the AWS credential variables off Ray Tune's list of variables it propagates to trials.

    Nothing is lost: the workers of a local Ray are children of this process's raylet and inherit
    its environment (credentials included) without any runtime_env; on a cluster the nodes get S3
    access from their own environment, ~/.aws files or instance roles, and a `distill submit --env`
    value reaches every task of the job through the job's runtime_env (cluster/runtime_env.md)."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # Ray without Tune: nothing propagates them
        return
    names = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = type(names)(n for n in names if n not in _CREDENTIAL_VARS)


def warm_worker() -> None:
    """Ray `worker_process_setup_hook` of a local Ray: every worker process imports torch (and the
    teacher's modules) as it starts, while it waits in Ray's pool, so a model replica placed on it
    later (the targets stage's `TargetsWorker`, inference, training) finds them loaded instead of
    spending its first seconds importing. Opt-in (DISTILL_WARM_WORKERS=1): its gain is not yet
    measured against the memory every worker then holds (docs/inference.md)."""
    import torch  # noqa: F401

    import pipeline.teacher_ensemble  # noqa: F401


def _warm_runtime_env() -> dict | None:
    if os.environ.get("DISTILL_WARM_WORKERS", "0") not in ("1", "true", "yes"):
        return None
    return {"worker_process_setup_hook": "pipeline.raysetup.warm_worker"}


def ensure_ray(cfg: Config | None = None) -> None:
    address = (cfg.ray.address if cfg else "") or os.environ.get("RAY_ADDRESS", "")
    if address and "ray" not in sys.modules:
        _token_mode_for_existing_cluster()
    import ray

    keep_credentials_out_of_runtime_envs()
    if ray.is_initialized():
        return
    # Progress bars from Ray Data/Tune are noise in logs of long runs; our stages print their own.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ctrl-C must stop the run: Tune's own SIGINT handler instead ends the experiment "gracefully",
    # and the stage then reports its trials as failed. Without it the interrupt reaches us as
    # KeyboardInterrupt; the CLI says "interrupted", shuts Ray down and exits 130.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        # "local": always start a private Ray. A bare ray.init() first tries to join the cluster
        # named in {RAY_TMPDIR or /tmp}/ray/ray_current_cluster, which a killed `ray start` leaves
        # behind ("When connecting to an existing cluster, num_cpus ... must not be provided").
        address="local",
        num_cpus=cfg.ray.num_cpus if cfg else None,
        object_store_memory=(cfg.ray.object_store_memory_mb if cfg else 256) * 1024 * 1024,
        # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner polls every
        # second; without it every Ray Train job logs "Failed to query Ray Train Controller actor
        # state" once a second. It also gives users the usual dashboard on 127.0.0.1:8265.
        include_dashboard=True,
        log_to_driver=True,
        runtime_env=_warm_runtime_env(),
        # Ray kills a worker process that has been idle for 1 s once the pool holds more workers than
        # CPUs, which it always does while trials or Ray Train workers hold the CPUs. Every Ray Data
        # pass (one per specialist epoch) then starts new processes for its read tasks, each spending
        # seconds of CPU on imports next to the training. Kept for a minute, they are reused:
        # K = 2 specialists of 1024 x 1024 went from 90 s to 61 s one after the other and from 80 s
        # to 40 s side by side (docs/performance.md).
        _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    )
