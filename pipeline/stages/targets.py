"""Stage `targets`: the soft-target cache, written by Ray Data batch inference, regenerated shard by shard.

The teacher (generalist + specialists, `pipeline.teacher_ensemble`) runs once over the transfer
set, and every student and tuning trial reads its outputs from the cache (`pipeline.cache` holds the
format). The work unit is one input shard -> one cache shard:

1. the driver plans (`pipeline.cache.plan_regen`): each input shard's desired fingerprint is
   compared with the cache's records and files (checksums included), so only stale, missing or
   damaged shards are rewritten; a cache that is up to date costs one hash per file and no Ray;
2. the shards to (re)write become a Ray Dataset of work items (`ray.data.from_items`) mapped by
   an actor pool of `ShardWriter`s (`map_batches(..., concurrency=targets.num_actors,
   num_cpus=targets.cpus_per_actor, num_gpus=targets.gpus_per_actor, batch_size=1)`): each actor
   loads the teacher once, then per shard reads the input shard, runs the teacher in batches of
   `targets.batch_size`, writes the cache shard atomically in each format and its `_parts/` entry;
3. the driver collects the entries, deletes files no shard owns, writes `metrics.json` (counts,
   write throughput, bytes per sample) and `manifest.json` last.

Crash safety (DESIGN.md): before the first shard is rewritten the manifest (and the runner's stage
marker) are removed, so an interrupted job reads as "incomplete"; shard files appear only complete
(`storage.put_file_atomic`), each shard's `_parts/` entry follows its files, and a rerun keeps every
shard whose entry and checksums are intact. This holds on S3 too: one PUT per file.

`distill targets regen CONFIG` calls `regenerate`; the stage's `run` is the same call, so running
the stage on a fresh directory and regenerating are one code path.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np

from pipeline import storage
from pipeline.config import Config, section_fingerprint
from pipeline.errors import UserError

NEEDS_RAY = True
# Execution settings do not change a single stored value; they stay out of the fingerprint so that
# resizing the actor pool does not invalidate the cache or the stages that read it.
_NOT_FINGERPRINTED = {"batch_size", "num_actors", "cpus_per_actor", "gpus_per_actor"}
METRICS_FILE = "metrics.json"


def fingerprint(cfg: Config) -> str:
    """Config slice + upstream markers + what the cache actually depends on (checkpoint and input
    shard checksums), so retraining the teacher with an identical config still reruns this stage."""
    from pipeline.runner import marker_fingerprint

    try:
        teacher_fp = _teacher(cfg).fingerprints()["teacher_fingerprint"]
    except (UserError, ValueError, KeyError, FileNotFoundError):  # upstream not (validly) there yet
        teacher_fp = None
    try:
        from pipeline.data.shards import split_entries

        sources = [[e["path"], e["sha256"]] for e in split_entries(cfg.stage_uri("data"), cfg.data.transfer_split)]
    except UserError:
        sources = None
    sc = cfg.specialists
    return section_fingerprint(
        "targets-v1", cfg.targets.model_dump(exclude=_NOT_FINGERPRINTED), cfg.data.transfer_split,
        [sc.top_n, sc.combine_method, sc.combine_iters],
        *(marker_fingerprint(cfg, s) for s in ("data", "teacher", "cluster", "specialists")),
        teacher_fp, sources,
    )


def run(cfg: Config) -> dict:
    report = regenerate(cfg, progress=True, write_marker=False)
    return {k: report[k] for k in ("checked", "rewritten", "kept", "num_samples", "bytes_per_sample")}


def _teacher(cfg: Config):
    from pipeline.teacher_ensemble import resolve_from_config

    return resolve_from_config(cfg)


# --------------------------------------------------------------------------------------------------
# The per-shard work (runs in a Ray actor, or in-process with use_ray=False)


def _device(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


class ShardWriter:
    """Ray Data actor: loads the teacher once, then turns work items into cache shards.

    Each input row {"task": JSON} (see `pipeline.cache.ShardPlan.task`) yields a row {"entry": JSON}:
    the shard's manifest entry, or {"error": message, "user_error": bool} for a shard that failed
    (the others go on; the driver reports every failure).
    """

    def __init__(self, job: dict):
        import torch

        from pipeline.cache import Layout
        from pipeline.teacher_ensemble import TeacherEnsemble, TeacherSpec

        threads = max(1, int(job.get("threads") or 1))
        torch.set_num_threads(threads)
        self.job = job
        self.layout = Layout(**job["layout"])
        self.ensemble = TeacherEnsemble(TeacherSpec(**job["teacher"]), device=_device(job.get("gpus", 0)))

    def __call__(self, batch: dict) -> dict:
        out = []
        for raw in batch["task"]:
            task = json.loads(str(raw))
            try:
                entry = write_shard(self.ensemble, self.layout, self.job, task)
            except UserError as e:
                entry = {"name": task["name"], "error": str(e), "user_error": True}
            except Exception as e:  # noqa: BLE001 - reported by the driver with the shard's name
                entry = {"name": task["name"], "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                         "user_error": False}
            out.append(json.dumps(entry))
        return {"entry": np.array(out, dtype=object)}


def write_shard(ensemble, layout, job: dict, task: dict) -> dict:
    """Input shard -> teacher outputs -> cache shard files + `_parts/` entry; returns the entry."""
    from pipeline import cache
    from pipeline.data.shards import ShardError, decode_shard

    t0 = time.perf_counter()
    src = task["source_uri"]
    try:
        data = storage.read_bytes(src)
    except FileNotFoundError:
        raise UserError(f"{src}: input shard missing; run `distill data verify {job['data_uri']}`") from None
    if storage.sha256_bytes(data) != task["source_sha256"]:
        raise UserError(f"{src}: sha256 differs from the dataset manifest (damaged or replaced); "
                        f"run `distill data verify {job['data_uri']}`")
    try:
        x, y, keys = decode_shard(data, name=task["source"])
    except ShardError as e:
        raise UserError(f"{src}: {e}") from None
    if len(keys) != int(task["num_samples"]):
        raise UserError(f"{src}: {len(keys)} samples, the dataset manifest says {task['num_samples']}")
    t_read = time.perf_counter()
    gen, ens = ensemble.predict(x, int(job["batch_size"]))
    t_infer = time.perf_counter()
    try:
        fields = layout.encode(gen, ens)
    except ValueError as e:
        raise UserError(f"cache shard {task['name']} (input {task['source']}): {e}") from None
    files = cache.write_cache_shard(
        job["cache_uri"], task["name"], task["write_formats"], layout, keys, y, fields, inputs=x,
        metadata={"source": task["source"], "fingerprint": task["fingerprint"]},
    )
    entry = cache.entry_from_task(task, {**task.get("kept_files", {}), **files})
    cache.write_part(job["cache_uri"], entry)
    t_end = time.perf_counter()
    # Seconds of each phase, plus which replica did it and when it finished (its own clock): what a
    # benchmark needs to tell a replica's steady rate from the pool's start-up.
    entry["_timing"] = {"read": t_read - t0, "infer": t_infer - t_read, "write": t_end - t_infer,
                        "worker": f"{socket.gethostname()}:{os.getpid()}", "finished_at": time.time()}
    return entry


# --------------------------------------------------------------------------------------------------
# Planning and regeneration (driver)


def _plan(cfg: Config):
    from pipeline import cache
    from pipeline.data.shards import read_manifest, split_entries

    data_uri = cfg.stage_uri("data")
    split = cfg.data.transfer_split
    dm = read_manifest(data_uri)
    entries = split_entries(data_uri, split, dm)
    if not entries:
        raise UserError(f"{data_uri}: split '{split}' has no shards; set data.transfer_split to a split with data")
    teacher = _teacher(cfg)
    if teacher.num_classes != int(dm["num_classes"]):
        raise UserError(f"{teacher.generalist_uri}: the generalist has {teacher.num_classes} classes but the dataset "
                        f"{data_uri} has {dm['num_classes']}; re-run the teacher stage on this dataset")
    t = cfg.targets
    layout = cache.Layout(teacher.num_classes, t.dtype, t.top_k)
    formats = cache.formats_from_setting(t.format)
    fps = teacher.fingerprints()
    desired = []
    for i, e in enumerate(entries):
        name = e["path"].rsplit("/", 1)[-1]
        name = name[: -len(".tar")] if name.endswith(".tar") else name
        desired.append({
            "name": name, "index": i, "source": e["path"], "source_uri": e["uri"],
            "source_sha256": e["sha256"], "num_samples": int(e["num_samples"]),
            "fingerprint": cache.shard_fingerprint(fps["teacher_fingerprint"], e["sha256"], t.dtype, t.top_k),
        })
    root = data_uri if storage.is_remote(data_uri) else os.path.abspath(data_uri)
    dataset = {"uri": root, "split": split, "name": dm.get("name"), "input_shape": dm.get("input_shape"),
               "input_dtype": dm.get("dtype"), "num_classes": int(dm["num_classes"])}
    return teacher, layout, formats, fps, desired, dataset


def _check_destination(cache_uri: str, data_uri: str, old_manifest) -> None:
    """Regen deletes files it does not own: never let it loose on a folder that is not a cache."""
    from pipeline import cache

    def norm(u: str) -> str:
        return u.rstrip("/") if storage.is_remote(u) else os.path.realpath(storage.get_fs(u)[1])

    if norm(cache_uri) == norm(data_uri):
        raise UserError(f"targets.uri: {cache_uri} is the dataset's folder; the cache needs a folder of its own "
                        "(unset targets.uri to use {output_dir}/targets)")
    if isinstance(old_manifest, dict) and old_manifest.get("kind") != cache.KIND:
        raise UserError(f"{cache.manifest_uri(cache_uri)}: a manifest.json that is not a soft-target cache's is "
                        "already there; point targets.uri at an empty folder or an existing cache")


def _available_actors(cfg: Config, wanted: int) -> int:
    """A local Ray cannot grow: never ask for more replicas than its CPUs/GPUs hold (a fixed pool
    that does not fit would wait forever). On a cluster the autoscaler may add nodes, so trust the config."""
    import ray

    t = cfg.targets
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return wanted
    res = ray.cluster_resources()
    fit = int(res.get("CPU", 1) // t.cpus_per_actor)
    if t.gpus_per_actor > 0:
        fit = min(fit, int(res.get("GPU", 0) // t.gpus_per_actor))
    if fit < 1:
        raise UserError(f"targets.cpus_per_actor={t.cpus_per_actor}, gpus_per_actor={t.gpus_per_actor}: the local Ray "
                        f"has {res.get('CPU', 0)} CPUs and {res.get('GPU', 0)} GPUs, not enough for one replica")
    return max(1, min(wanted, fit))


def _execute(cfg: Config, job: dict, tasks: list[dict], use_ray: bool, progress: bool):
    """Yield each task's result entry as it completes."""
    if not use_ray:
        import torch

        threads = torch.get_num_threads()
        try:
            writer = ShardWriter(job)
            for t in tasks:
                yield json.loads(writer({"task": [json.dumps(t)]})["entry"][0])
        finally:
            torch.set_num_threads(threads)  # the writer sized torch for a replica, not for the caller
        return
    import ray

    from pipeline.raysetup import ensure_ray

    ensure_ray(cfg)
    t = cfg.targets
    actors = _available_actors(cfg, min(t.num_actors, len(tasks)))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"task": json.dumps(task)} for task in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(
        ShardWriter, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=t.cpus_per_actor,
        num_gpus=t.gpus_per_actor or None,
    )
    if progress:
        from pipeline.runner import log

        log(f"targets: {len(tasks)} shards on {actors} Ray Data actor(s) "
            f"({t.cpus_per_actor} CPU, {t.gpus_per_actor} GPU each)")
    for row in ds.iter_rows():
        yield json.loads(str(row["entry"]))


def regenerate(cfg: Config, progress: bool = True, write_marker: bool = True, use_ray: bool = True,
               on_shard: Optional[Callable[[dict, float, dict], None]] = None) -> dict:
    """Bring the cache at `cfg.stage_uri("targets")` up to date with the teacher and the data.

    Rewrites exactly the shards whose fingerprint differs, whose record or file is missing, or
    whose file fails its checksum (only the formats that need it), deletes files no shard owns,
    then writes `manifest.json`. Returns {"checked", "rewritten", "kept", "missing", "stale",
    "damaged", "removed", "num_samples", "bytes_per_sample", "seconds", "uri", "rewritten_shards",
    "damaged_shards"}. `write_marker` also records the targets stage as done for `distill run` (the
    runner writes it itself when it runs the stage). `use_ray=False` runs the writer in-process
    (debugging, tests of the format); the product path is Ray Data. `on_shard(entry, seconds,
    timing)` is called as each shard arrives (seconds since the writers were launched; timing: the
    writer's own read/infer/write seconds for it, its "worker" and the wall-clock "finished_at"),
    e.g. for benchmarks.
    """
    from pipeline import cache
    from pipeline.runner import log, marker_uri

    t0 = time.perf_counter()
    say = log if progress else (lambda msg: None)
    cache_uri = cfg.stage_uri("targets")
    teacher, layout, formats, fps, desired, dataset = _plan(cfg)
    try:
        old_manifest = storage.read_json(cache.manifest_uri(cache_uri))
    except (FileNotFoundError, ValueError):
        old_manifest = None
    _check_destination(cache_uri, dataset["uri"], old_manifest)
    plans = cache.plan_regen(cache_uri, desired, formats)
    todo = [p for p in plans if p.write_formats]
    counts = {s: sum(p.status == s for p in plans) for s in ("kept", "missing", "stale", "damaged")}
    say(f"targets: {len(plans)} shards checked in {cache_uri}: {counts['kept']} up to date, "
        f"{counts['stale']} stale, {counts['missing']} missing, {counts['damaged']} damaged")
    for p in plans:
        if p.status == "damaged":
            say(f"targets: {p.name} damaged: {'; '.join(p.problems)}")

    new_entries: dict[str, dict] = {}
    work_seconds = 0.0
    if todo:
        # From here until the new manifest, the cache reads as incomplete (and the stage as not done).
        storage.remove(cache.manifest_uri(cache_uri))
        storage.remove(marker_uri(cfg, "targets"))
        storage.makedirs(cache_uri)
        job = {
            "cache_uri": cache_uri, "data_uri": dataset["uri"], "batch_size": cfg.targets.batch_size,
            "threads": cfg.targets.cpus_per_actor, "gpus": cfg.targets.gpus_per_actor,
            "layout": {"num_classes": layout.num_classes, "dtype": layout.dtype, "top_k": layout.top_k},
            "teacher": {"generalist_uri": teacher.generalist_uri, "generalist_meta": teacher.generalist_meta,
                        "specialist_uris": teacher.specialist_uris, "specialist_metas": teacher.specialist_metas,
                        "top_n": teacher.top_n, "method": teacher.method, "iters": teacher.iters},
        }
        failures: list[dict] = []
        samples = 0
        t_work = time.perf_counter()
        for entry in _execute(cfg, job, [p.task() for p in todo], use_ray, progress):
            if "error" in entry:
                failures.append(entry)
                say(f"targets: {entry['name']} FAILED: {entry['error'].splitlines()[0]}")
                continue
            timing = entry.pop("_timing", {})
            new_entries[entry["name"]] = entry
            if on_shard is not None:
                on_shard(entry, time.perf_counter() - t_work, timing)
            samples += entry["num_samples"]
            rate = samples / max(time.perf_counter() - t_work, 1e-9)
            say(f"targets: {len(new_entries)}/{len(todo)} shards written ({entry['name']}, {entry['num_samples']} "
                f"samples; read {timing.get('read', 0):.2f}s infer {timing.get('infer', 0):.2f}s "
                f"write {timing.get('write', 0):.2f}s; {rate:.0f} samples/s overall)")
        work_seconds = time.perf_counter() - t_work
        if failures:
            lines = [f"{f['name']}: {f['error']}" for f in failures]
            msg = (f"targets: {len(failures)} of {len(todo)} shards failed (the {len(new_entries)} written are kept; "
                   "fix the cause and rerun `distill targets regen CONFIG`):\n  " + "\n  ".join(lines))
            if all(f.get("user_error") for f in failures):
                raise UserError(msg)
            raise RuntimeError(msg)

    entries = []
    for p in plans:
        entry = new_entries.get(p.name) or p.entry(p.kept_files)
        entries.append(entry)
    orphans = cache.orphan_files(cache_uri, [p.name for p in plans], formats)
    for rel in orphans:
        storage.remove(storage.join(cache_uri, rel))
    if orphans:
        say(f"targets: removed {len(orphans)} file(s) no shard owns: {', '.join(orphans[:5])}"
            + (" ..." if len(orphans) > 5 else ""))
    manifest = cache.build_manifest(layout=layout, formats=formats, fingerprints=fps, dataset=dataset,
                                    shards=entries, extra={"teacher": {"generalist": teacher.generalist_uri,
                                                                       "specialists": teacher.specialist_uris,
                                                                       "top_n": teacher.top_n,
                                                                       "method": teacher.method,
                                                                       "iters": teacher.iters}})
    if todo or cache.manifest_core(manifest) != cache.manifest_core(old_manifest):
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        written = sum(int(e["num_samples"]) for e in new_entries.values())
        storage.write_json_atomic(storage.join(cache_uri, METRICS_FILE), {
            "num_samples": manifest["num_samples"], "num_shards": manifest["num_shards"], "formats": formats,
            "dtype": layout.dtype, "top_k": layout.top_k, "rewritten": len(todo), "kept": counts["kept"],
            "removed": len(orphans), "samples_written": written, "seconds": manifest["seconds"],
            "write_samples_per_s": round(written / work_seconds, 1) if work_seconds else None,
            "bytes_per_sample": cache.describe_bytes(manifest), "teacher_fingerprint": fps["teacher_fingerprint"],
        })
        storage.write_json_atomic(cache.manifest_uri(cache_uri), manifest)
    else:
        manifest = old_manifest or manifest
    seconds = time.perf_counter() - t0
    if write_marker:
        from pipeline.runner import marker_fingerprint

        fp = fingerprint(cfg)
        # A no-op regen leaves the marker (and the stage's recorded time) alone when it is current.
        if todo or orphans or marker_fingerprint(cfg, "targets") != fp:
            storage.write_json_atomic(marker_uri(cfg, "targets"), {
                "stage": "targets", "fingerprint": fp, "seconds": round(seconds, 3),
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "by": "targets regen",
            })
    report = {
        "uri": cache_uri,
        "checked": len(plans),
        "rewritten": len(todo),
        "kept": counts["kept"],
        "missing": counts["missing"],
        "stale": counts["stale"],
        "damaged": counts["damaged"],
        "removed": len(orphans),
        "num_samples": int(manifest["num_samples"]),
        "bytes_per_sample": cache.describe_bytes(manifest),
        "seconds": round(seconds, 3),
        "rewritten_shards": [p.name for p in todo],
        "damaged_shards": [p.name for p in plans if p.status == "damaged"],
    }
    say(f"targets: {report['rewritten']} rewritten, {report['kept']} kept, {report['removed']} removed "
        f"in {seconds:.1f}s -> {cache_uri}")
    return report
