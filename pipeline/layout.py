"""The run directory: every fixed name under `output_dir`, the stage order, and their readers.

A run directory (docs/contracts.md, "Run directory") holds one folder per stage plus a few files at
the top. Every module that reads or writes one of these names gets it from here, so renaming a file
or adding a stage is a change in this one module. What is *inside* a stage's folder beyond these
names belongs to the stage (its checkpoints, plots, Ray state).

This module imports only the standard library, `storage` and `errors`: stages, the runner, the
report and the CLI all import it, so it must not import any of them (tests/test_architecture.py
fails on any import cycle).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Optional

from pipeline import storage
from pipeline.errors import UserError

if TYPE_CHECKING:  # typing only: config imports nothing from here at run time either
    from pipeline.config import Config

# The stages, in the order `distill run` executes them. tune runs before student: it searches T and
# alpha on the cache, and the final students use its best. This is the one copy of the order; the
# CLI's choices, the runner and the report's upstream list all derive from it.
STAGES = ("data", "teacher", "cluster", "specialists", "targets", "tune", "student", "report")

# Top-level files.
LOCK = ".distill-lock.json"      # held by the process running stages (runner.output_lock)
SUMMARY_FILE = "summary.json"    # the report stage's machine-readable summary
REPORT_FILE = "report.md"        # ... and its human-readable report

# Files inside stage folders.
MARKER = "_stage.json"           # written last by the runner: {"stage", "fingerprint", "seconds", ...}
METRICS_FILE = "metrics.json"    # every stage's figures (the report reads these)
MANIFEST_FILE = "manifest.json"  # data/ (and a cache's) shard list with sha256 and counts
SUBSETS_FILE = "specialists.json"  # cluster/: the class subsets, one per specialist
BEST_FILE = "best.json"          # tune/: {"T", "alpha", "lr", "val_error", "trial_id"}
META_FILE = "model.json"         # beside every checkpoint's model.pt: architecture and sha256
RESUME_DIR = "_resume"           # a specialist's mid-training state (TrainState folder)
RAY_DIR = "ray"                  # Ray Train / Tune experiment state a rerun resumes from

# What `--force` removes before rerunning a stage (runner.clear_resume_state): only these folders,
# which this project writes.
RESUME_STATE = {"teacher": (RAY_DIR,), "student": (RAY_DIR,), "tune": (RAY_DIR,), "specialists": (RAY_DIR,)}


def stage_uri(cfg: "Config", stage: str) -> str:
    """Where a stage's folder is: `{output_dir}/{stage}`, except data and targets, which may live
    elsewhere (`data.uri`, `targets.uri`) so several runs share one dataset or cache."""
    if stage == "data" and cfg.data.uri:
        return cfg.data.uri
    if stage == "targets" and cfg.targets.uri:
        return cfg.targets.uri
    return storage.join(cfg.output_dir, stage)


def stage_file(cfg: "Config", stage: str, name: str) -> str:
    return storage.join(stage_uri(cfg, stage), name)


def run_file(cfg: "Config", name: str) -> str:
    return storage.join(cfg.output_dir, name)


def spec_dirname(m: int) -> str:
    """Specialist m's folder under specialists/ (spec_000, spec_001, ...)."""
    return f"spec_{int(m):03d}"


def spec_uri(cfg: "Config", m: int) -> str:
    return storage.join(stage_uri(cfg, "specialists"), spec_dirname(m))


# ------------------------------------------------------------------------------------------------
# Readers. Two kinds, on purpose: `read_json_or_none` for files whose absence is a normal state
# (a stage not yet run: the report shows a dash), `read_json_required` for files a stage needs
# (absent or damaged: a UserError that names the file and the command that writes it).

def read_json_or_none(uri: str) -> Optional[Any]:
    try:
        return storage.read_json(uri)
    except (FileNotFoundError, ValueError):
        return None


def read_json_required(uri: str, missing: str, rerun: str) -> Any:
    """JSON at `uri`; UserError "{uri}: {missing}" when absent, or naming `rerun` when unparsable."""
    try:
        return storage.read_json(uri)
    except FileNotFoundError:
        raise UserError(f"{uri}: {missing}") from None
    except ValueError as e:
        raise UserError(f"{uri}: not valid JSON ({e}); re-run {rerun}") from None


def read_metrics(cfg: "Config", stage: str) -> dict:
    """A stage's metrics.json ({} when the stage has not run or the file is unreadable)."""
    doc = read_json_or_none(stage_file(cfg, stage, METRICS_FILE))
    return doc if isinstance(doc, dict) else {}


# ------------------------------------------------------------------------------------------------
# Stage markers

def marker_uri(cfg: "Config", stage: str) -> str:
    return stage_file(cfg, stage, MARKER)


def read_marker(cfg: "Config", stage: str) -> Optional[dict]:
    m = read_json_or_none(marker_uri(cfg, stage))
    return m if isinstance(m, dict) else None


def marker_fingerprint(cfg: "Config", stage: str) -> Optional[str]:
    """The fingerprint a finished stage recorded (None if it has not finished)."""
    m = read_marker(cfg, stage)
    return m.get("fingerprint") if m else None


def write_marker(cfg: "Config", stage: str, fingerprint: str, seconds: float) -> None:
    storage.write_json_atomic(
        marker_uri(cfg, stage),
        {"stage": stage, "fingerprint": fingerprint, "seconds": round(seconds, 3),
         "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )


# ------------------------------------------------------------------------------------------------
# Hand-offs between stages that are read without importing the stage that wrote them (which would
# import torch or Ray, or make an import cycle).

def read_subsets(cluster_uri: str) -> list[list[int]]:
    """cluster/specialists.json: the class subsets (one list of class ids per specialist)."""
    uri = storage.join(cluster_uri, SUBSETS_FILE)
    doc = read_json_required(uri, "no class subsets yet; run `distill stage cluster CONFIG` first",
                             "the cluster stage")
    subsets = doc.get("subsets") if isinstance(doc, dict) else None
    if not isinstance(subsets, list) or not all(isinstance(s, list) and s for s in subsets):
        raise UserError(f"{uri}: 'subsets' must be a list of non-empty lists of class indices; re-run the cluster stage")
    return [[int(c) for c in s] for s in subsets]


def read_tune_best(cfg: "Config") -> Optional[dict]:
    """tune/best.json, or None when the tune stage has not finished."""
    uri = stage_file(cfg, "tune", BEST_FILE)
    try:
        best = storage.read_json(uri)
    except FileNotFoundError:
        return None
    except ValueError:
        raise UserError(f"{uri}: not valid JSON; rerun `distill stage tune CONFIG`") from None
    if not isinstance(best, dict) or not {"T", "alpha", "lr"} <= set(best):
        raise UserError(f"{uri}: lacks T/alpha/lr; rerun `distill stage tune CONFIG`")
    return best
