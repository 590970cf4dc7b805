"""Runs stages in order, skipping the ones that are up to date.

A stage is up to date when its marker `{stage}/_stage.json` exists and records the fingerprint the
stage computes now (its config slice plus the fingerprints of the stages it reads). The marker is
written last, after every file of the stage, so a stage interrupted half-way is rerun (and resumes
from its own checkpoints where it has them). Per-stage wall times are kept in the markers and
gathered into `summary.json` by the report stage.

`--force` reruns a stage from scratch (`clear_resume_state`). One run at a time per output_dir: the
process running stages holds `{output_dir}/.distill-lock.json` (`output_lock`), which names it.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Iterable, Iterator, Optional

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.layout import (LOCK, REPORT_FILE, RESUME_STATE, STAGES, SUMMARY_FILE, marker_uri, read_marker, run_file,
                             write_marker)
from pipeline.log import log

def stage_module(stage: str):
    return importlib.import_module(f"pipeline.stages.{stage}")


def run_stage(cfg: Config, stage: str, force: bool = False) -> dict:
    mod = stage_module(stage)
    fp = mod.fingerprint(cfg)
    marker = read_marker(cfg, stage)
    if not force and marker and marker.get("fingerprint") == fp:
        log(f"stage {stage}: up to date ({cfg.stage_uri(stage)}), skipped")
        return {"skipped": True, "seconds": marker.get("seconds", 0.0)}
    if force:
        clear_resume_state(cfg, stage)
    if getattr(mod, "NEEDS_RAY", False):
        from pipeline.raysetup import ensure_ray

        ensure_ray(cfg)
    log(f"stage {stage}: running -> {cfg.stage_uri(stage)}")
    t0 = time.perf_counter()
    # Stages that do more under --force than rerun (data: checksum every shard) take `force`.
    takes_force = "force" in inspect.signature(mod.run).parameters
    result = (mod.run(cfg, force=force) if takes_force else mod.run(cfg)) or {}
    seconds = time.perf_counter() - t0
    write_marker(cfg, stage, fp, seconds)
    log(f"stage {stage}: done in {seconds:.1f}s")
    return {"skipped": False, "seconds": seconds, **result}


# What a stage resumes from when rerun (layout.RESUME_STATE): Ray Train runs (teacher, student) and
# Tune experiments (specialists, tune) under `{stage}/ray`. `--force` must retrain, not resume a
# finished run ("run already complete"), so it removes them first.
def clear_resume_state(cfg: Config, stage: str) -> None:
    """For `--force`: drop the stage's marker (an interrupted forced run is then not "up to date")
    and the Ray Train/Tune state it would resume from. Only folders this project writes."""
    storage.remove(marker_uri(cfg, stage))
    for sub in RESUME_STATE.get(stage, ()):
        uri = storage.join(cfg.stage_uri(stage), sub)
        if storage.exists(uri):
            log(f"stage {stage}: --force, removing the checkpoints it would resume from ({uri})")
            storage.remove(uri, recursive=True)


def run_pipeline(cfg: Config, only: Optional[Iterable[str]] = None, force: bool = False) -> dict:
    stages = list(only) if only else [s for s in STAGES if s != "tune" or cfg.tune.enabled]
    results = {}
    t0 = time.perf_counter()
    with output_lock(cfg.output_dir):
        # Buckets the stages read or write besides output_dir: named now, not in a traceback later.
        for key, uri in (("data.source", cfg.data.source), ("data.uri", cfg.data.uri),
                         ("targets.uri", cfg.targets.uri)):
            if uri:
                storage.require_bucket(uri, key)
        for stage in stages:
            results[stage] = run_stage(cfg, stage, force=force)
    if not only or "report" in stages:
        print_headline(cfg)
        log(f"finished in {time.perf_counter() - t0:.1f}s; report at {run_file(cfg, REPORT_FILE)}")
    return results


def print_headline(cfg: Config) -> None:
    """The table a user came for, on stdout at the end of `distill run`."""
    from pipeline.stages.report import headline_table

    try:
        summary = storage.read_json(run_file(cfg, SUMMARY_FILE))
    except (FileNotFoundError, ValueError):
        return
    print(headline_table(summary), flush=True)


# ---------------------------------------------------------------------------------------------
# One run per output_dir
# ---------------------------------------------------------------------------------------------

def check_output_dir(out: str) -> None:
    """UserError when `out` cannot hold a run: a file, below a file, or not writable (local)."""
    if storage.is_remote(out):
        return  # the lock's exclusive create is the probe (missing bucket, wrong endpoint)
    path = storage.get_fs(out)[1]
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"output_dir {path} is a file, not a folder; set output_dir to a folder "
                        "(new or one of an earlier run), e.g. output_dir=runs/myrun")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"output_dir {path}: {parent} is a file, so no folder can be made below it; "
                        "set output_dir to a path under a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir {path} cannot be created ({e.strerror}); choose a folder you "
                        "can write to, or fix the permissions of its parent") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {path} is not writable; choose a folder you can write to, or "
                        "fix its permissions")


# The holder rewrites its lock every LOCK_HEARTBEAT_S; a lock of another host whose heartbeat is
# older than LOCK_STALE_S is from a run that is gone (a killed job driver, a replaced head pod).
LOCK_HEARTBEAT_S = 60.0
LOCK_STALE_S = 600.0


def _age_s(stamp: Optional[str]) -> Optional[float]:
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(str(stamp))).total_seconds()
    except (TypeError, ValueError):
        return None


def _holder_alive(holder: dict) -> bool:
    """False when the holder ran on this host and its pid is gone (or is this process), or ran
    elsewhere and its heartbeat stopped more than LOCK_STALE_S ago."""
    if holder.get("host") != socket.gethostname():
        age = _age_s(holder.get("heartbeat_at") or holder.get("started_at"))
        return age is None or age < LOCK_STALE_S
    pid = int(holder.get("pid") or 0)
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Create `uri` holding `data` unless it exists (True when created). Local: O_EXCL; S3: a
    conditional PUT (If-None-Match: *), which S3 and moto honour atomically."""
    fs, path = storage.get_fs(uri)
    if storage.is_remote(uri):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"output_dir {os.path.dirname(path)} is not writable ({e.strerror}); choose "
                            "a folder you can write to, or fix its permissions") from None
        raise
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read_lock(uri: str) -> Optional[dict]:
    try:
        holder = json.loads(storage.read_bytes(uri).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}  # a torn or foreign file: held by someone unknown
    return holder if isinstance(holder, dict) else {}


def acquire_output_lock(out: str) -> dict:
    """Take `{out}/.distill-lock.json` for this process; UserError naming the holder when another
    live run has it. A lock left by a dead process on this host is taken over."""
    check_output_dir(out)
    uri = storage.join(out, LOCK)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
          "started_at": now, "heartbeat_at": now,
          "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
    data = _lock_bytes(me)
    storage.require_bucket(out, "output_dir")
    for _ in range(3):
        try:
            if _create_exclusive(uri, data):
                return me
        except FileNotFoundError as e:
            raise UserError(f"output_dir {out} cannot be written ({e}); check the bucket name and "
                            "that it exists") from None
        except PermissionError as e:
            raise UserError(f"output_dir {out} is not writable ({e}); use a location your credentials "
                            "may write, or fix the bucket policy") from None
        holder = _read_lock(uri)
        if holder is None:
            continue  # released between our create and read: try again
        if _holder_alive(holder) and holder.get("pid") != os.getpid():
            who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                   f"{holder.get('started_at', '?')}" + (f", `{holder['command']}`" if holder.get("command") else "")
                   if holder else "an unreadable lock file")
            stale = ""
            if holder and holder.get("host") != socket.gethostname():
                stale = (f" (a lock of another host is taken over once its heartbeat, renewed every "
                         f"{LOCK_HEARTBEAT_S:.0f} s, is {LOCK_STALE_S / 60:.0f} min old)")
            raise UserError(
                f"output_dir {out} is in use by another distill run ({who}); two runs in one output_dir "
                f"would train into the same checkpoints. Wait for it to finish, use another output_dir, "
                f"or, if that run is gone, delete {uri}{stale}")
        log(f"taking over the lock of a run that is gone (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {holder.get('started_at')}, last heartbeat {holder.get('heartbeat_at', '?')})")
        storage.remove(uri)
    raise UserError(f"output_dir {out}: could not take the lock {uri} (another run keeps taking it); "
                    "wait for the other run to finish")


def _lock_bytes(me: dict) -> bytes:
    return (json.dumps(me, indent=2) + "\n").encode()


def _heartbeat(out: str, me: dict, stop: threading.Event) -> None:
    """Renew the lock's heartbeat_at while the run lasts (only while the lock is still ours)."""
    uri = storage.join(out, LOCK)
    while not stop.wait(LOCK_HEARTBEAT_S):
        try:
            holder = _read_lock(uri)
            if not holder or holder.get("token") != me["token"]:
                log(f"warning: the lock {uri} is no longer this run's; another run may be writing here")
                return
            me["heartbeat_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            storage.write_bytes_atomic(uri, _lock_bytes(me))
        except Exception:  # noqa: BLE001 - a missed heartbeat (network blip) is retried next time
            continue


def release_output_lock(out: str, me: dict) -> None:
    """Remove the lock if it is still ours (never someone else's)."""
    uri = storage.join(out, LOCK)
    with contextlib.suppress(Exception):
        holder = _read_lock(uri)
        if holder and holder.get("token") == me["token"]:
            storage.remove(uri)


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[dict]:
    """Hold the output_dir lock around a block; re-entrant within one process."""
    if out in _HELD:
        yield _HELD[out]
        return
    me = acquire_output_lock(out)
    _HELD[out] = me
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(out, me, stop), name="distill-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield me
    finally:
        stop.set()
        beat.join(timeout=30)
        _HELD.pop(out, None)
        release_output_lock(out, me)


_HELD: dict[str, dict] = {}
