"""Stage `targets`: the soft-target cache, written by Ray Data batch inference, regenerated shard by shard.

The teacher (generalist + specialists, `pipeline.teacher_ensemble`) runs once over the transfer
set, and every student and tuning trial reads its outputs from the cache (`pipeline.cache` holds the
format). The work unit is one input shard -> one cache shard:

1. the driver plans (`pipeline.cache.plan_regen`): each input shard's desired fingerprint is
   compared with the cache's records and files (checksums included), so only stale, missing or
   damaged shards are rewritten; a cache that is up to date costs one hash per file and no Ray;
2. the shards to (re)write are one Ray Data pipeline, so reading, inference and writing overlap:
   read tasks (`pipeline.datasets.read_shards_tagged`: one CPU task per input shard, its sha256
   checked against the dataset manifest there, in the worker; each row tagged with its shard and
   position) -> an actor pool of `TargetsWorker` model replicas (`map_batches`, `targets.num_actors`
   of them, `targets.cpus_per_actor` / `gpus_per_actor` each, batches of `targets.batch_size`; the
   teacher loaded once per replica, top-k chosen on its device) -> one `ShardAssembler` that puts
   each shard's rows back in source order once all have arrived and writes the cache shard
   atomically in each format (`pipeline.cache.write_cache_shard`) and then its `_parts/` entry.
   Cache shards stay 1:1 with input shards, in the same order;
3. the driver collects the entries, deletes files no shard owns, writes `metrics.json` (counts,
   write throughput, bytes per sample) and `manifest.json` last.

Crash safety (docs/contracts.md, "Soft-target cache"): before the first shard is rewritten the manifest (and the runner's stage
marker) are removed, so an interrupted job reads as "incomplete"; shard files appear only complete
(`storage.put_file_atomic`), each shard's `_parts/` entry follows its files, and a rerun keeps every
shard whose entry and checksums are intact. This holds on S3 too: one PUT per file.

`distill targets regen CONFIG` calls `regenerate`; the stage's `run` is the same call, so running
the stage on a fresh directory and regenerating are one code path.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np

from pipeline import storage
from pipeline.config import Config, fingerprint_dump, section_fingerprint
from pipeline.errors import UserError
from pipeline.jobs import TargetsJob
from pipeline.layout import METRICS_FILE, marker_fingerprint

NEEDS_RAY = True
# Execution settings (batch size, actor pool, precision of the replicas) are `config.run_only`
# fields: resizing the actor pool does not invalidate the cache or the stages that read it.


def precision_tag(cfg: Config) -> Optional[str]:
    """"bf16" when the replicas autocast (a GPU per replica and precision auto/bf16): the stored
    values then differ from fp32 ones, so the fingerprints say so. None otherwise (CPUs always
    run fp32), which leaves the fingerprints of fp32 caches as they were."""
    t = cfg.targets
    return "bf16" if t.gpus_per_actor > 0 and t.precision in ("auto", "bf16") else None


def fingerprint(cfg: Config) -> str:
    """Config slice + upstream markers + what the cache actually depends on (checkpoint and input
    shard checksums), so retraining the teacher with an identical config still reruns this stage."""
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
        "targets-v1", fingerprint_dump(cfg.targets), cfg.data.transfer_split,
        [sc.top_n, sc.combine_method, sc.combine_iters],
        *(marker_fingerprint(cfg, s) for s in ("data", "teacher", "cluster", "specialists")),
        teacher_fp, sources, *([precision_tag(cfg)] if precision_tag(cfg) else []),
    )


def run(cfg: Config) -> dict:
    report = regenerate(cfg, progress=True, write_marker=False)
    return {k: report[k] for k in ("checked", "rewritten", "kept", "num_samples", "bytes_per_sample")}


def _teacher(cfg: Config):
    from pipeline.teacher_ensemble import resolve_from_config

    return resolve_from_config(cfg)


# --------------------------------------------------------------------------------------------------
# The pipeline's stages: read (pipeline.datasets) -> TargetsWorker replicas -> ShardAssembler


def encode_on_device(layout, generalist, log_q) -> dict[str, np.ndarray]:
    """`pipeline.cache.Layout.encode` on the teacher's device: the same fields (names, dtypes from
    `layout.fields()`, floors and refusals of non-finite values), with top-k chosen there so only
    k values per sample cross to the host. Raises ValueError as `Layout.encode` does."""
    import torch

    from pipeline import cache

    g = generalist.float()
    e = log_q.float()
    if g.ndim != 2 or g.shape[1] != layout.num_classes or e.shape != g.shape:
        raise ValueError(f"teacher outputs have shapes {tuple(g.shape)} and {tuple(e.shape)}; expected (N, {layout.num_classes})")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("the generalist produced non-finite logits (NaN or inf): the checkpoint is broken")
    e = e.clamp_min(cache.LOGP_FLOOR)  # exact zeros (log 0 = -inf) become a finite, negligible value
    if not bool(torch.isfinite(e).all()):
        raise ValueError("the ensemble produced NaN log-probabilities: a specialist checkpoint is broken")

    def tdtype(np_dtype):
        return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype

    fields = layout.fields()
    if layout.top_k is None:
        out = {}
        for t, v in (("generalist", g), ("ensemble", e)):
            name = cache.DENSE_FIELDS[t]
            arr = v.to(tdtype(fields[name][0]))
            if not bool(torch.isfinite(arr).all()):
                raise ValueError(f"{name} overflows {layout.dtype} (|value| > "
                                 f"{float(np.finfo(layout.np_dtype).max):g}); set targets.dtype=float32")
            out[name] = arr
        return {k: v.cpu().numpy() for k, v in out.items()}
    k = int(layout.top_k)
    out = {}
    for t, logp in (("generalist", torch.log_softmax(g, dim=1)), ("ensemble", e)):
        val, idx = torch.topk(logp, k, dim=1)  # sorted, largest first
        rest = logp.scatter(1, idx, float("-inf"))
        tail = torch.logsumexp(rest, dim=1).clamp_min(cache.LOGP_FLOOR)
        out[f"{t}_topk_idx"] = idx.to(tdtype(fields[f"{t}_topk_idx"][0]))
        out[f"{t}_topk_val"] = val.clamp_min(cache.LOGP_FLOOR).to(tdtype(fields[f"{t}_topk_val"][0]))
        out[f"{t}_tail"] = tail.to(tdtype(fields[f"{t}_tail"][0]))
    return {name: out[name].cpu().numpy() for name in fields}


class TargetsWorker:
    """Ray Data actor (a model replica): loads the teacher once, then turns batches of input rows
    (`x`, `y`, `key`, `shard`, `row`) into rows of cache fields, top-k chosen on its device. The
    inputs travel on only when a WebDataset file (self-contained: it holds them) is to be written."""

    def __init__(self, job: TargetsJob):
        started_at, t0 = time.time(), time.perf_counter()
        import torch

        from pipeline.cache import Layout
        from pipeline.inference import device_for
        from pipeline.teacher_ensemble import TeacherEnsemble, TeacherSpec

        imported = time.perf_counter()
        torch.set_num_threads(max(1, int(job.threads or 1)))
        self.job = job
        self.layout = Layout(**job.layout)
        self.ensemble = TeacherEnsemble(TeacherSpec(**job.teacher), device=device_for(job.gpus),
                                        precision=job.precision)
        # The replica's start-up, for the job's timeline (benchmarks): when its constructor began
        # (wall clock), seconds importing torch and the pipeline, seconds loading the checkpoints.
        self.setup = {"_started_at": started_at, "_import_s": imported - t0,
                      "_load_s": time.perf_counter() - imported}

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        x = batch["x"]
        n = len(batch["shard"])
        bs = max(1, int(self.job.batch_size))
        parts = []
        for start in range(0, n, bs):
            out = self.ensemble.outputs(x[start:start + bs])
            try:
                parts.append(encode_on_device(self.layout, out.generalist, out.log_q))
            except ValueError as e:
                names = sorted({self.job.names[str(int(i))] for i in batch["shard"][start:start + bs]})
                raise UserError(f"cache shard(s) {', '.join(names)}: {e}") from None
        fields = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        rows = {"shard": batch["shard"], "row": batch["row"], "key": batch["key"], "y": batch["y"], **fields}
        if self.job.carry_inputs:
            rows["x"] = x
        rows["_infer_s"] = np.full(n, (time.perf_counter() - t0) / max(1, n), dtype=np.float64)
        for k, v in self.setup.items():
            rows[k] = np.full(n, v, dtype=np.float64)
        return rows


class ShardAssembler:
    """Ray Data actor (one per job): gathers the rows of each input shard, in whatever batches and
    order they arrive, and once a shard is complete puts its rows back in source order and writes
    its cache shard (`pipeline.cache.write_cache_shard`, each file atomically, then its `_parts/`
    entry). Yields one row {"entry": JSON} per shard written. Only shards in flight are held."""

    def __init__(self, job: TargetsJob):
        from pipeline.cache import Layout

        self.job = job
        self.layout = Layout(**job.layout)
        self.tasks = {int(t["index"]): t for t in job.tasks}
        self.buffers: dict[int, list[dict]] = {}
        self.counts: dict[int, int] = {}
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        shard = np.asarray(batch["shard"])
        done = []
        for s in np.unique(shard):
            s = int(s)
            sel = np.flatnonzero(shard == s)
            self.buffers.setdefault(s, []).append({k: np.asarray(v)[sel] for k, v in batch.items()})
            self.counts[s] = self.counts.get(s, 0) + len(sel)
            if self.counts[s] >= int(self.tasks[s]["num_samples"]):
                done.append(s)
        entries = [json.dumps(self._write(s)) for s in done]
        return {"entry": np.array(entries, dtype=object)}

    def _write(self, s: int) -> dict:
        from pipeline import cache

        t0 = time.perf_counter()
        task = self.tasks[s]
        parts = self.buffers.pop(s)
        self.counts.pop(s)
        cols = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(cols["row"], kind="stable")
        if not np.array_equal(cols["row"][order], np.arange(int(task["num_samples"]))):
            raise RuntimeError(f"cache shard {task['name']}: rows arrived twice or not at all "
                               f"({len(order)} rows for {task['num_samples']} samples)")
        cols = {k: v[order] for k, v in cols.items()}
        fields = {name: cols[name] for name in self.layout.fields()}
        files = cache.write_cache_shard(
            self.job.cache_uri, task["name"], task["write_formats"], self.layout, [str(k) for k in cols["key"]],
            cols["y"], fields, inputs=cols.get("x"),
            metadata={"source": task["source"], "fingerprint": task["fingerprint"]},
        )
        entry = cache.entry_from_task(task, {**task.get("kept_files", {}), **files})
        cache.write_part(self.job.cache_uri, entry)
        # Seconds of this shard's inference (summed over its rows' batches) and writing, which
        # replica wrote it and when (its own clock): what a benchmark needs for steady rates.
        entry["_timing"] = {"infer": float(cols["_infer_s"].sum()), "write": time.perf_counter() - t0,
                            "worker": self.worker, "finished_at": time.time(),
                            "replica_started_at": float(cols["_started_at"].min()),
                            "replica_import_s": float(cols["_import_s"].max()),
                            "replica_load_s": float(cols["_load_s"].max())}
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
    tag = precision_tag(cfg)
    teacher_fp = fps["teacher_fingerprint"] + (f"+{tag}" if tag else "")
    desired = []
    for i, e in enumerate(entries):
        name = e["path"].rsplit("/", 1)[-1]
        name = name[: -len(".tar")] if name.endswith(".tar") else name
        desired.append({
            "name": name, "index": i, "source": e["path"], "source_uri": e["uri"],
            "source_sha256": e["sha256"], "num_samples": int(e["num_samples"]),
            "fingerprint": cache.shard_fingerprint(teacher_fp, e["sha256"], t.dtype, t.top_k),
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


def _read_entries(job: TargetsJob) -> list[dict]:
    """The input shards to read, as `pipeline.datasets.split_items` describes them (checked
    against their manifest sha256 by the read tasks, not here)."""
    return [{"uri": t["source_uri"], "root": job.data_uri, "sha256": t["source_sha256"],
             "num_samples": int(t["num_samples"]), "shard": int(t["index"])} for t in job.tasks]


def _eval_view(cfg: Config) -> Optional[dict]:
    """Decode settings for an encoded-image transfer set (the teacher's deterministic view), else None."""
    from pipeline.data.shards import read_manifest
    from pipeline.inference import eval_transform

    return eval_transform(cfg, read_manifest(cfg.stage_uri("data")))


def _execute(cfg: Config, job: TargetsJob, use_ray: bool, progress: bool):
    """Yield each written shard's entry as it completes: read -> model replicas -> assembler."""
    if not use_ray:
        import torch

        from pipeline import datasets

        threads = torch.get_num_threads()
        view = _eval_view(cfg)
        decode = None
        if view is not None:
            from pipeline import transforms

            aug = view["augment"]
            fn = transforms.make_batch_transform(aug.model_dump() if hasattr(aug, "model_dump") else aug,
                                                 view["manifest"], False, view["seed"])
            decode = lambda b: fn(b, None)  # noqa: E731
        try:
            worker, assembler = TargetsWorker(job), ShardAssembler(job)
            for sh in _read_entries(job):
                cols = datasets._read_tagged({"item": np.array([json.dumps({"shards": [sh]})], dtype=object)})
                cols = decode(cols) if decode else cols
                for start in range(0, len(cols["key"]), int(job.batch_size)):
                    rows = worker({k: v[start:start + int(job.batch_size)] for k, v in cols.items()})
                    for raw in assembler(rows)["entry"]:
                        yield json.loads(raw)
        finally:
            torch.set_num_threads(threads)  # the writer sized torch for a replica, not for the caller
        return
    import ray

    from pipeline import datasets
    from pipeline.inference import fit_actors
    from pipeline.raysetup import ensure_ray

    ensure_ray(cfg)
    t = cfg.targets
    actors = fit_actors(min(t.num_actors, len(job.tasks)), t.cpus_per_actor, t.gpus_per_actor,
                        f"targets.cpus_per_actor={t.cpus_per_actor:g}, gpus_per_actor={t.gpus_per_actor:g}",
                        on_cluster=bool(cfg.ray.address))
    ray.data.DataContext.get_current().enable_progress_bars = False
    loader = getattr(cfg.data, "loader", None)
    read_kw = {"read_cpus": loader.read_cpus, "concurrency": loader.read_concurrency} if loader is not None else {}
    ds = datasets.read_shards_tagged(_read_entries(job), **read_kw)
    view = _eval_view(cfg)
    if view is not None:  # encoded images: decoded (evaluation view) in CPU tasks before the replicas
        ds = datasets.with_transform(ds, view["manifest"], view["augment"], False, view["seed"],
                                     read_kw.get("read_cpus", datasets.DEFAULT_READ_CPUS),
                                     read_kw.get("concurrency", datasets.DEFAULT_READ_CONCURRENCY))
    ds = ds.map_batches(
        TargetsWorker, fn_constructor_kwargs={"job": job}, batch_size=int(t.batch_size), batch_format="numpy",
        zero_copy_batch=True, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=t.cpus_per_actor,
        num_gpus=t.gpus_per_actor or None,
    )
    # One assembler: every row of a shard must reach the same writer. It needs no reserved CPU
    # (writing is a small share of the work) so it never waits behind the replicas for a slot.
    ds = ds.map_batches(ShardAssembler, fn_constructor_kwargs={"job": job}, batch_size=None, batch_format="numpy",
                        zero_copy_batch=True, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    if progress:
        from pipeline.log import log

        log(f"targets: {len(job.tasks)} shards: read tasks -> {actors} model replica(s) "
            f"({t.cpus_per_actor} CPU, {t.gpus_per_actor} GPU each) -> 1 writer, on Ray Data")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for raw in batch["entry"]:
            yield json.loads(str(raw))


def regenerate(cfg: Config, progress: bool = True, write_marker: bool = True, use_ray: bool = True,
               on_shard: Optional[Callable[[dict, float, dict], None]] = None) -> dict:
    """Bring the cache at `cfg.stage_uri("targets")` up to date with the teacher and the data.

    Rewrites exactly the shards whose fingerprint differs, whose record or file is missing, or
    whose file fails its checksum (only the formats that need it), deletes files no shard owns,
    then writes `manifest.json`. Returns {"checked", "rewritten", "kept", "missing", "stale",
    "damaged", "removed", "num_samples", "bytes_per_sample", "seconds", "uri", "rewritten_shards",
    "damaged_shards"}. `write_marker` also records the targets stage as done for `distill run` (the
    runner writes it itself when it runs the stage). `use_ray=False` runs the same reader, replica
    and writer in-process, one after the other (debugging, tests of the format); the product path
    is the Ray Data pipeline. `on_shard(entry, seconds, timing)` is called as each shard arrives
    (seconds since the job was launched; timing: the replicas' inference seconds for its rows
    ("infer"), the writer's seconds ("write"), which writer ("worker") and the wall-clock
    "finished_at"), e.g. for benchmarks. A damaged or missing input shard, or a teacher producing
    non-finite values, stops the job with a UserError naming the shard; shards written before
    it are kept.
    """
    from pipeline import cache
    from pipeline.log import log
    from pipeline.layout import marker_uri

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
        tasks = [p.task() for p in todo]
        job = TargetsJob(
            cache_uri=cache_uri, data_uri=dataset["uri"], batch_size=int(cfg.targets.batch_size),
            threads=max(1, math.ceil(cfg.targets.cpus_per_actor)), gpus=cfg.targets.gpus_per_actor,
            precision=cfg.targets.precision,
            layout={"num_classes": layout.num_classes, "dtype": layout.dtype, "top_k": layout.top_k},
            teacher={"generalist_uri": teacher.generalist_uri, "generalist_meta": teacher.generalist_meta,
                     "specialist_uris": teacher.specialist_uris, "specialist_metas": teacher.specialist_metas,
                     "top_n": teacher.top_n, "method": teacher.method, "iters": teacher.iters},
            tasks=tasks, names={str(int(t["index"])): t["name"] for t in tasks},
            # Only formats that hold the inputs (WebDataset: self-contained) need them to travel on.
            carry_inputs=any(cache.get_format(f).carries_inputs for t in tasks for f in t["write_formats"]),
        )
        samples = 0
        t_work = time.perf_counter()
        try:
            for entry in _execute(cfg, job, use_ray, progress):
                timing = entry.pop("_timing", {})
                new_entries[entry["name"]] = entry
                if on_shard is not None:
                    on_shard(entry, time.perf_counter() - t_work, timing)
                samples += entry["num_samples"]
                rate = samples / max(time.perf_counter() - t_work, 1e-9)
                say(f"targets: {len(new_entries)}/{len(todo)} shards written ({entry['name']}, {entry['num_samples']} "
                    f"samples; infer {timing.get('infer', 0):.2f}s write {timing.get('write', 0):.2f}s; "
                    f"{rate:.0f} samples/s overall)")
        except Exception as e:
            from pipeline.inference import _user_error_in

            user = _user_error_in(e)
            if user is None:
                raise
            raise UserError(f"targets: {user} (the {len(new_entries)} of {len(todo)} shards written before this "
                            "are kept; fix the cause and rerun `distill targets regen CONFIG`)") from None
        work_seconds = time.perf_counter() - t_work
        missing = [p.name for p in todo if p.name not in new_entries]
        if missing:  # e.g. the writer was restarted and lost the rows it held
            raise RuntimeError(f"targets: {len(missing)} of {len(todo)} shards were not written ({', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}); the others are kept, rerun "
                               "`distill targets regen CONFIG` to finish")

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
