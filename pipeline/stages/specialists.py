"""Stage `specialists`: K specialists trained in parallel on Ray, then the ensemble scored on test.

Training (Hinton et al. 2015, section 5.2). One Ray Tune trial per class subset of
`cluster/specialists.json`, each reserving `specialists.cpus_per_specialist` CPUs and
`gpus_per_specialist` GPUs, at most `max_concurrent` at once. Tune is used as a parallel job runner
with per-trial fault tolerance: `FailureConfig(max_failures)` restarts a failed trial alone, the
others carry on. The trial body is `pipeline.specialist_training.train_specialist` (plain torch); it
keeps its own per-epoch resume state under `spec_{m:03d}/_resume/`, so a retried trial, or a rerun of
the stage after it gave up, continues from the last finished epoch. A specialist whose checkpoint
already exists with the same training fingerprint (subset, generalist weights, data, training
settings) is skipped: a rerun after a failure trains only the missing ones, and changing only
evaluation settings (`top_n`, `combine_*`) or resources retrains nothing.

Evaluation (section 5.4). Generalist logits and every specialist's dustbin-corrected logits on the
test split are combined by `specialists.combine.combine`; `metrics.json` holds the ensemble's
`test_error`, the generalist's, and the analogue of the paper's Table 4 (test examples grouped by how
many specialists cover their true class, with the accuracy change in each group).

Files (the contract `pipeline/teacher_ensemble.py` reads):
    specialists/spec_{m:03d}/model.pt, model.json (extra: subset, f, dustbin_correction, fingerprint)
    specialists/spec_{m:03d}/metrics.json
    specialists/metrics.json
    specialists/ray/            Tune experiment folders (logs of each attempt)
"""
from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any, Sequence

import numpy as np
import torch

from pipeline import storage
from pipeline.config import Config, fingerprint_dump, section_fingerprint
from pipeline.errors import UserError
from pipeline.jobs import SpecialistsJob
from pipeline.layout import METRICS_FILE, marker_fingerprint, spec_dirname
from pipeline.specialist_training import TRAIN_KEYS, is_complete

NEEDS_RAY = True
# Resources and scheduling do not change what a specialist learns: they are `config.run_only` fields.
# Test hooks (read in the driver, passed to the trials): specialists listed in FAIL_ENV raise after
# their first epoch; with FAIL_ONCE_ENV naming a folder they fail only once (a marker file per
# specialist remembers it), otherwise on every attempt.
FAIL_ENV = "DISTILL_TEST_FAIL_SPECIALISTS"
FAIL_ONCE_ENV = "DISTILL_TEST_FAIL_ONCE_DIR"


def fingerprint(cfg: Config) -> str:
    sc = fingerprint_dump(cfg.specialists)
    return section_fingerprint("specialists-v1", sc, cfg.seed, marker_fingerprint(cfg, "cluster"),
                               marker_fingerprint(cfg, "teacher"), marker_fingerprint(cfg, "data"))


def specialist_fingerprint(cfg: Config, subset: Sequence[int], teacher_sha: str) -> str:
    """Identity of one specialist's training inputs; stored in its model.json."""
    train = {k: getattr(cfg.specialists, k) for k in TRAIN_KEYS}
    return section_fingerprint("specialist-v2", train, [int(c) for c in subset], teacher_sha,
                               marker_fingerprint(cfg, "data"), cfg.seed)


def spec_uri(cfg: Config, m: int) -> str:
    return storage.join(cfg.stage_uri("specialists"), spec_dirname(m))


# ------------------------------------------------------------------------------------------------
# The trial body (runs in a Ray worker)


def train_class_counts(data_uri: str, num_classes: int) -> np.ndarray:
    """(C,) training samples per class: from the dataset manifest, else one labels-only streamed pass."""
    from pipeline import datasets

    counts = datasets.class_counts(data_uri, "train")
    if counts is None:
        counts = np.zeros(int(num_classes), dtype=np.int64)
        for b in datasets.read_split(data_uri, "train").select_columns(["y"]).iter_batches(batch_size=65536):
            y = np.asarray(b["y"])
            if (y < 0).any():
                raise UserError(f"{data_uri}: split 'train' has unlabelled samples; specialists train on labels")
            counts += np.bincount(y, minlength=int(num_classes))[: int(num_classes)]
    if counts.sum() == 0:
        raise UserError(f"{data_uri}: split 'train' is empty; the specialists need labelled train, val and test data")
    return np.asarray(counts, dtype=np.int64)


def _streams(job: SpecialistsJob, seed: int, device: Any):
    """(epoch -> chunks of one shuffled pass over train, () -> val batches), both Ray Data streams:
    the trial never holds a split."""
    from pipeline import datasets

    loader = job.loader
    train = datasets.split_items(job.data_uri, "train")
    view = {"manifest": job.manifest, "augment": job.train_cfg.get("augment"), "train": True, "seed": seed}
    val = datasets.from_items(datasets.group_items(datasets.split_items(job.data_uri, "val"), loader["group_rows"]),
                              loader["read_cpus"], loader["read_concurrency"], dict(view, train=False))
    collate = datasets.Collate(device)

    def epoch_chunks(e: int):
        ds = datasets.training_stream(train, e, e + 1, seed, loader["read_cpus"], loader["read_concurrency"],
                                      loader["group_rows"], view)
        return ds.iter_torch_batches(batch_size=int(loader["chunk_rows"]), collate_fn=collate,
                                     prefetch_batches=int(loader["prefetch_chunks"]))

    val_entries = datasets.split_items(job.data_uri, "val")
    keep = sum(int(e.get("bytes") or 0) for e in val_entries) <= int(loader["materialize_mb"]) * (1 << 20)
    kept: list = []

    def val_batches():
        # A small val split is held after its first pass: each Ray Data pass costs ~0.3-1 s of start-up.
        if kept:
            return kept
        out = val.iter_torch_batches(batch_size=4096, collate_fn=collate)
        if keep:
            kept.extend(out)
            return kept
        return out

    return epoch_chunks, val_batches


def _maybe_fail(job: SpecialistsJob, m: int) -> None:
    hook = job.fail or {}
    if m not in hook.get("specialists", ()):
        return
    marker_dir = hook.get("once_dir")
    if marker_dir:
        marker = os.path.join(marker_dir, f"failed-{m}")
        if os.path.exists(marker):
            return
        os.makedirs(marker_dir, exist_ok=True)
        open(marker, "w").close()
    raise RuntimeError(f"specialist {m}: failure injected by the {FAIL_ENV} test hook")


def _trainable(config: dict, job: SpecialistsJob) -> None:
    import ray
    from ray import tune

    from pipeline.specialist_training import train_specialist

    m = int(config["m"])
    out_uri = storage.join(job.out_uri, spec_dirname(m))
    if is_complete(out_uri, job.fingerprints[m]):  # a restarted trial whose work is already saved
        tune.report({"m": m, "finished": True})
        return
    threads = max(1, int(job.cpus))
    torch.set_num_threads(threads)
    device = "cuda" if job.gpus > 0 and torch.cuda.is_available() else "cpu"
    seed = job.seed * 1000 + m
    epoch_chunks, val_batches = _streams(job, seed, device)

    def report(row: dict) -> None:
        tune.report({"m": m, **row})
        _maybe_fail(job, m)

    metrics = train_specialist(
        job.teacher_uri, job.subsets[m], epoch_chunks, val_batches, job.class_counts, job.train_cfg,
        out_uri, fingerprint=job.fingerprints[m], seed=seed, report=report, device=device,
        # node_id: which Ray node trained it (spread across the cluster; checked by test_multinode).
        extra={"index": m, "class_names": job.class_names[m],
               "node_id": ray.get_runtime_context().get_node_id()},
    )
    tune.report({"m": m, "finished": True, "val_error": metrics["val_error"], "epoch": metrics["epochs_run"] - 1,
                 "seconds_total": metrics["seconds"]})


def _log_callback():
    from ray.tune import Callback

    from pipeline.log import log

    class _Log(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "train_loss" not in result:
                return
            log(f"specialists: spec {result['m']} epoch {result['epoch']}: train loss {result['train_loss']:.4f}, "
                f"val error {result['val_error']:.4f} (best {result['best_val_error']:.4f})")

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"specialists: spec {trial.config.get('m')} failed (attempt {trial.num_failures}); "
                "Tune retries it if failures remain")

        def on_trial_complete(self, iteration, trials, trial, **info):
            log(f"specialists: spec {trial.config.get('m')} finished")

    return _Log()


# ------------------------------------------------------------------------------------------------
# Driver


def _check_resources(cfg: Config) -> None:
    """On a local Ray (no autoscaler to add nodes) a trial asking for more than exists would wait forever."""
    import ray

    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    sc = cfg.specialists
    for key, want, res in (("cpus_per_specialist", sc.cpus_per_specialist, "CPU"),
                           ("gpus_per_specialist", sc.gpus_per_specialist, "GPU")):
        if want > have.get(res, 0):
            raise UserError(f"specialists.{key}: {want} {res}(s) per specialist but the local Ray has "
                            f"{have.get(res, 0):g}; lower specialists.{key} (or run on a cluster with ray.address)")


def _parallel_slots(sc) -> int:
    """How many specialists the Ray cluster can train at once (its CPUs/GPUs, max_concurrent)."""
    import ray

    total = ray.cluster_resources()
    slots = int(float(total.get("CPU", 0)) // sc.cpus_per_specialist)
    if sc.gpus_per_specialist > 0:
        slots = min(slots, int(float(total.get("GPU", 0)) // sc.gpus_per_specialist))
    return min(slots, sc.max_concurrent) if sc.max_concurrent else slots


def read_manifest_dict(cfg: Config) -> dict:
    from pipeline.data.shards import read_manifest

    return read_manifest(cfg.stage_uri("data"))


def _num_classes(cfg: Config) -> int:
    from pipeline.data.shards import read_manifest

    return int(read_manifest(cfg.stage_uri("data"))["num_classes"])


def train_all(cfg: Config, subsets: list[list[int]], class_names: list[list[str]], todo: list[int],
              fingerprints: list[str]) -> dict:
    """Train specialists `todo` as parallel Tune trials; returns timing info. Raises if any fails."""
    from ray import tune

    from pipeline.log import log

    sc = cfg.specialists
    out = cfg.stage_uri("specialists")
    _check_resources(cfg)
    fail_list = os.environ.get(FAIL_ENV, "").strip()
    job = SpecialistsJob(
        data_uri=cfg.stage_uri("data"), teacher_uri=cfg.stage_uri("teacher"), out_uri=out,
        subsets=subsets, class_names=class_names, fingerprints=fingerprints,
        train_cfg=sc.train_dict(), seed=int(cfg.seed), cpus=sc.cpus_per_specialist, gpus=sc.gpus_per_specialist,
        loader=cfg.data.loader.model_dump(),
        manifest=read_manifest_dict(cfg),
        class_counts=train_class_counts(cfg.stage_uri("data"), _num_classes(cfg)).tolist(),
        fail={"specialists": [int(v) for v in fail_list.split(",") if v.strip()],
              "once_dir": os.environ.get(FAIL_ONCE_ENV) or None} if fail_list else None,
    )
    fs, path = storage.pyarrow_fs(storage.join(out, "ray"))
    trainable = tune.with_resources(tune.with_parameters(_trainable, job=job),
                                    {"cpu": sc.cpus_per_specialist, "gpu": sc.gpus_per_specialist})
    tuner = tune.Tuner(
        trainable,
        param_space={"m": tune.grid_search(todo)},
        # reuse_actors: a finished trial hands its worker process (torch already imported) to the
        # next one; without it each specialist pays seconds of process start-up. Only when
        # specialists queue for slots, though: when all run at once, a quick one would take over a
        # trial whose own process is still starting on another node, and the specialists would
        # train one after the other on one node (seen on two 1-CPU nodes: both trials in one
        # process) instead of side by side across the cluster.
        tune_config=tune.TuneConfig(max_concurrent_trials=sc.max_concurrent,
                                    reuse_actors=len(todo) > _parallel_slots(sc),
                                    trial_name_creator=lambda t: spec_dirname(t.config["m"]),
                                    trial_dirname_creator=lambda t: spec_dirname(t.config["m"])),
        run_config=tune.RunConfig(
            name=datetime.now().strftime("fit-%Y%m%d-%H%M%S-%f"), storage_path=path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=sc.max_failures),
            callbacks=[_log_callback()], verbose=0,
        ),
    )
    log(f"specialists: training {len(todo)} specialist(s) {todo} as Ray Tune trials "
        f"({sc.cpus_per_specialist} CPU, {sc.gpus_per_specialist} GPU each, max concurrent "
        f"{sc.max_concurrent or 'as resources allow'}, {sc.max_failures} retries each)")
    t0 = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - t0
    errors = {}
    for r in grid:
        if r.error is not None:
            errors[int(r.config["m"])] = r.error
    missing = [m for m in todo if not is_complete(spec_uri(cfg, m), fingerprints[m])]
    if missing:
        detail = "; ".join(f"spec {m}: {(str(errors.get(m, 'no checkpoint written')).strip().splitlines() or ['?'])[-1][:300]}"
                           for m in missing)
        raise RuntimeError(
            f"specialists {missing} failed after {sc.max_failures} retries each ({detail}). The other "
            f"specialists are saved; rerun the stage to train only the missing ones (logs under {storage.join(out, 'ray')})")
    return {"seconds": seconds, "trained": todo}


def run(cfg: Config) -> dict:
    from pipeline.data.shards import read_manifest
    from pipeline.models import checkpoint_fingerprint
    from pipeline.log import log
    from pipeline.stages.cluster import read_subsets

    if cfg.specialists.batch_size < 2:
        raise UserError(f"specialists.batch_size: {cfg.specialists.batch_size} cannot hold half subset, half other "
                        "examples; use at least 2 (e.g. 128)")
    subsets = read_subsets(cfg)
    teacher_uri = cfg.stage_uri("teacher")
    if not storage.exists(storage.join(teacher_uri, "model.json")):
        raise UserError(f"{teacher_uri}: no generalist checkpoint; run `distill stage teacher CONFIG` first")
    manifest = read_manifest(cfg.stage_uri("data"))
    num_classes = int(manifest["num_classes"])
    names = list(manifest.get("class_names") or [str(c) for c in range(num_classes)])
    for s in subsets:
        if min(s) < 0 or max(s) >= num_classes or len(set(s)) != len(s) or len(s) >= num_classes:
            raise UserError(f"{storage.join(cfg.stage_uri('cluster'), 'specialists.json')}: subset {s} is not a set of "
                            f"distinct classes in [0, {num_classes}) leaving some class for the dustbin; re-run the cluster stage")
    class_names = [[names[c] for c in s] for s in subsets]
    teacher_sha = checkpoint_fingerprint(teacher_uri)
    fps = [specialist_fingerprint(cfg, s, teacher_sha) for s in subsets]

    out = cfg.stage_uri("specialists")
    # Folders of specialists beyond K (an earlier run with more clusters) would be read as ensemble members.
    for name in storage.listdir(out):
        if name.startswith("spec_") and name[5:].isdigit() and int(name[5:]) >= len(subsets):
            storage.remove(storage.join(out, name), recursive=True)
    todo = [m for m in range(len(subsets)) if not is_complete(spec_uri(cfg, m), fps[m])]
    skipped = [m for m in range(len(subsets)) if m not in todo]
    if skipped:
        log(f"specialists: {skipped} already trained with the same inputs, kept")
    timing = train_all(cfg, subsets, class_names, todo, fps) if todo else {"seconds": 0.0, "trained": []}

    metrics = evaluate_on_test(cfg, subsets, class_names)
    metrics["training"] = {"trained": timing["trained"], "skipped": skipped, "wall_seconds": timing["seconds"],
                           "cpus_per_specialist": cfg.specialists.cpus_per_specialist,
                           "gpus_per_specialist": cfg.specialists.gpus_per_specialist,
                           "max_concurrent": cfg.specialists.max_concurrent}
    storage.write_json_atomic(storage.join(out, METRICS_FILE), metrics)
    log(f"specialists: test error generalist {metrics['generalist_test_error']:.4f} -> ensemble "
        f"{metrics['test_error']:.4f} ({metrics['num_specialists']} specialists)")
    return {"test_error": metrics["test_error"], "generalist_test_error": metrics["generalist_test_error"],
            "num_specialists": metrics["num_specialists"], "trained": timing["trained"]}


# ------------------------------------------------------------------------------------------------
# Evaluation


def table4(y: np.ndarray, subsets: Sequence[Sequence[int]], num_classes: int,
           generalist_correct: np.ndarray, ensemble_correct: np.ndarray) -> list[dict]:
    """The paper's Table 4 for in-memory results: test examples grouped by how many specialists
    cover their true class (the streaming evaluation builds the same rows from merged counts)."""
    from pipeline.inference import EnsembleLayout, table4_rows

    covered = EnsembleLayout([list(s) for s in subsets], [0.0] * len(subsets), num_classes).coverage[np.asarray(y)]
    bins = len(subsets) + 1
    return table4_rows(np.bincount(covered, minlength=bins),
                       np.bincount(covered[np.asarray(generalist_correct, bool)], minlength=bins),
                       np.bincount(covered[np.asarray(ensemble_correct, bool)], minlength=bins))


def evaluate_on_test(cfg: Config, subsets: list[list[int]], class_names: list[list[str]]) -> dict:
    """Generalist vs generalist + specialists on the test split (see module doc).

    Runs on Ray workers (`pipeline.inference.evaluate_ensemble`, settings from `inference:`), with
    the `TeacherEnsemble` that writes the soft-target cache: the reported ensemble error and the
    cached targets come from the same code. Per-batch counts are merged; nothing of size N is held.
    """
    from pipeline import inference
    from pipeline.log import log
    from pipeline.teacher_ensemble import resolve_from_config

    sc = cfg.specialists
    data_uri = cfg.stage_uri("data")
    spec = resolve_from_config(cfg)
    if spec.subsets != [[int(c) for c in s] for s in subsets]:
        raise UserError(f"{cfg.stage_uri('specialists')}: the specialists' subsets differ from the cluster stage's; "
                        "re-run `distill stage specialists CONFIG`")
    log(f"specialists: scoring the ensemble on the test split ({len(subsets)} specialists, Ray workers)")
    from pipeline.data.shards import read_manifest

    res = inference.evaluate_ensemble(spec, data_uri, "test", **inference.options(cfg),
                                      transform=inference.eval_transform(cfg, read_manifest(data_uri)))
    n = res["num_test_examples"]
    per_spec = []
    for m, meta in enumerate(spec.specialist_metas):
        try:
            train_metrics = storage.read_json(storage.join(spec_uri(cfg, m), METRICS_FILE))
        except FileNotFoundError:
            train_metrics = {}
        per_spec.append({
            "index": m, "dir": spec_dirname(m), "subset": subsets[m], "class_names": class_names[m],
            "f": meta["extra"]["f"], "dustbin_correction": spec.corrections[m],
            "val_error": train_metrics.get("val_error"), "generalist_val_error": train_metrics.get("generalist_val_error"),
            "best_epoch": train_metrics.get("best_epoch"), "epochs_run": train_metrics.get("epochs_run"),
            "seconds": train_metrics.get("seconds"), "resumed_from_epoch": train_metrics.get("resumed_from_epoch"),
            "test_task_error": res["specialist_task_error"][m],
            "active_test_examples": res["specialist_active"][m],
            "params": meta["params"], "node_id": train_metrics.get("node_id"),
        })
    generalist_params = int(spec.generalist_meta["params"])
    out = {k: v for k, v in res.items() if k not in ("specialist_task_error", "specialist_active")}
    out.update({
        "num_test_examples": n,
        "params": generalist_params + sum(int(m["params"]) for m in spec.specialist_metas),
        "generalist_params": generalist_params,
        "top_n": sc.top_n, "combine_method": sc.combine_method, "combine_iters": sc.combine_iters,
        "specialists": per_spec,
    })
    return out
