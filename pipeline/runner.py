"""Runs stages in order, skipping the ones that are up to date.

A stage is up to date when its marker `{stage}/_stage.json` exists and records the fingerprint the
stage computes now (its config slice plus the fingerprints of the stages it reads). The marker is
written last, after every file of the stage, so a stage interrupted half-way is rerun (and resumes
from its own checkpoints where it has them). Per-stage wall times are kept in the markers and
gathered into `summary.json` by the report stage.
"""
from __future__ import annotations

import importlib
import sys
import time
from datetime import datetime, timezone
from typing import Iterable, Optional

from pipeline import storage
from pipeline.config import Config

# tune runs before student: it searches T/alpha on the cache, and the final student uses its best.
EXEC_ORDER = ("data", "teacher", "cluster", "specialists", "targets", "tune", "student", "report")
MARKER = "_stage.json"


def marker_uri(cfg: Config, stage: str) -> str:
    return storage.join(cfg.stage_uri(stage), MARKER)


def read_marker(cfg: Config, stage: str) -> Optional[dict]:
    uri = marker_uri(cfg, stage)
    try:
        return storage.read_json(uri)
    except (FileNotFoundError, ValueError):
        return None


def marker_fingerprint(cfg: Config, stage: str) -> Optional[str]:
    """The fingerprint a finished stage recorded (None if it has not finished)."""
    m = read_marker(cfg, stage)
    return m.get("fingerprint") if m else None


def stage_module(stage: str):
    return importlib.import_module(f"pipeline.stages.{stage}")


def log(msg: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[distill {stamp}] {msg}", file=sys.stderr, flush=True)


def run_stage(cfg: Config, stage: str, force: bool = False) -> dict:
    mod = stage_module(stage)
    fp = mod.fingerprint(cfg)
    marker = read_marker(cfg, stage)
    if not force and marker and marker.get("fingerprint") == fp:
        log(f"stage {stage}: up to date ({cfg.stage_uri(stage)}), skipped")
        return {"skipped": True, "seconds": marker.get("seconds", 0.0)}
    if getattr(mod, "NEEDS_RAY", False):
        from pipeline.raysetup import ensure_ray

        ensure_ray(cfg)
    log(f"stage {stage}: running -> {cfg.stage_uri(stage)}")
    t0 = time.perf_counter()
    result = mod.run(cfg) or {}
    seconds = time.perf_counter() - t0
    storage.write_json_atomic(
        marker_uri(cfg, stage),
        {"stage": stage, "fingerprint": fp, "seconds": round(seconds, 3),
         "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )
    log(f"stage {stage}: done in {seconds:.1f}s")
    return {"skipped": False, "seconds": seconds, **result}


def run_pipeline(cfg: Config, only: Optional[Iterable[str]] = None, force: bool = False) -> dict:
    stages = list(only) if only else [s for s in EXEC_ORDER if s != "tune" or cfg.tune.enabled]
    results = {}
    t0 = time.perf_counter()
    for stage in stages:
        results[stage] = run_stage(cfg, stage, force=force)
    if not only or "report" in stages:
        print_headline(cfg)
        log(f"finished in {time.perf_counter() - t0:.1f}s; report at {storage.join(cfg.output_dir, 'report.md')}")
    return results


def print_headline(cfg: Config) -> None:
    """The table a user came for, on stdout at the end of `distill run`."""
    from pipeline.stages.report import headline_table

    try:
        summary = storage.read_json(storage.join(cfg.output_dir, "summary.json"))
    except (FileNotFoundError, ValueError):
        return
    print(headline_table(summary), flush=True)
