"""Stage `student`: three students of one architecture and budget, trained with Ray Train.

What distillation bought is only visible beside controls, so the stage trains three students with the
same architecture and budget (epochs, batch size, optimizer, schedule, early stopping on val) and
evaluates each on test (docs/method.md, "Three students"):

* baseline              hard labels of the `train` split only (cross-entropy): what distillation bought;
* distilled_generalist  the KD loss against the generalist's cached logits: the single-teacher
                        distillation of the paper's section 3;
* distilled             the KD loss against the generalist + specialists ensemble's cached
                        log-probabilities: beside distilled_generalist, what the specialists bought
                        once distilled back into one net (the question the paper left open).

The KD loss is alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1) (`pipeline.losses.kd_loss`),
with the teacher's softmax at T computed per batch on the device. T, alpha (and lr) come from
`tune/best.json` when the tune stage ran and `student.use_tuned` is set, else from `student.T` /
`student.alpha`; tune searches them for the student of `student.target` (default: the ensemble), and
both distilled students use the same values, so they differ only in their teacher.

Where the teacher's targets come from (`student.mode`):
* cached  (default) each Ray Train worker streams its shards of the soft-target cache joined with the
          inputs (`pipeline.datasets.cache_items`, keys checked, sha256 verified while read);
          the teacher never runs;
* online  the teacher ensemble (`pipeline.teacher_ensemble`) runs on every batch; for comparison,
          and for runs without a cache. Both give the same loss on the same batch (tested).

All three run on the training core through `pipeline.ray_train` (the teacher's launcher and
per-worker loop, with checkpoint/resume and `student.num_workers` data-parallel workers, each
streaming its own shards through Ray Data); only what a worker reads and what it minimises differ.
The tune stage trains the same student with the same core, data path and loss in its trials
(`train_in_process`).

A student whose inputs did not change is not trained again: its checkpoint's model.json records the
fingerprint of what it was trained from and its test metrics. So changing T or alpha (or rerunning
tune) retrains only the distilled students; the baseline is reused.

Writes under `student/`:
    baseline/, distilled_generalist/, distilled/   checkpoints (`pipeline.models.save_checkpoint`;
                           extra: fingerprint, metrics)
    export/                the distilled student as state dict, TorchScript, torch.export and ONNX
                           (`pipeline.export`)
    metrics.json           {"baseline": {test_error, test_errors, params, ...},
                            "distilled_generalist": {...}, "distilled": {test_error, test_errors,
                            params, T, alpha, lr, target, mode, ...}, "specialists_gain",
                            "teacher": {...}, "latency_ms_per_batch": {"student": ms, "generalist": ms,
                            "ensemble": ms, ...}, "latency": {...details}, "export": {...}}
    ray/                   Ray Train runs (resumed when the stage is rerun with the same config)
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Optional

from pipeline import storage
from pipeline.config import Config, section_fingerprint
from pipeline.errors import UserError
from pipeline.jobs import Distill, StudentJob, TrainJob
from pipeline.layout import METRICS_FILE, marker_fingerprint, read_metrics, read_tune_best

NEEDS_RAY = True
LATENCY_BATCH = 256
LATENCY_RUNS = 20
# One intra-op thread: a stable figure on a shared machine, and the same footing for every model.
LATENCY_THREADS = 1


# ------------------------------------------------------------------------------------------------
# Fingerprints and hyperparameters


def learning_slice(cfg: Config) -> dict:
    """What decides what a student learns, apart from T/alpha (tune shares it with this stage)."""
    s = cfg.student
    return {"model": s.model.spec(), "train": s.train_dict(), "target": s.target,
            "transfer_split": cfg.data.transfer_split}


def _tune_applies(cfg: Config) -> bool:
    return cfg.tune.enabled and cfg.student.use_tuned


def fingerprint(cfg: Config) -> str:
    s = cfg.student
    upstream = [marker_fingerprint(cfg, "data"), marker_fingerprint(cfg, "teacher")]
    if s.mode == "cached":
        upstream.append(marker_fingerprint(cfg, "targets"))
    else:
        upstream.append(marker_fingerprint(cfg, "specialists"))
    if _tune_applies(cfg):
        upstream.append(marker_fingerprint(cfg, "tune"))
    # Worker count and restarts change how, not what, it trains; they stay out.
    return section_fingerprint("student-v2", learning_slice(cfg), s.T, s.alpha, s.mode, s.use_tuned,
                               cfg.tune.enabled, cfg.seed, upstream)


def baseline_fingerprint(cfg: Config) -> str:
    """The baseline ignores T, alpha, target and tune: changing them resumes (and skips) its run."""
    s = cfg.student
    return section_fingerprint("baseline-v2", s.model.spec(), s.train_dict(), cfg.seed,
                               marker_fingerprint(cfg, "data"))


def distilled_fingerprint(cfg: Config, which: str) -> str:
    """A distilled student's run: the stage's inputs and which teacher it learns from."""
    return section_fingerprint(fingerprint(cfg), TARGET_OF[which])


def hyperparameters(cfg: Config) -> dict:
    """{"T", "alpha", "lr", "source"} for the distilled student: tune's best, or the config's."""
    from pipeline.log import log

    s = cfg.student
    if _tune_applies(cfg):
        best = read_tune_best(cfg)
        if best is not None:
            return {"T": float(best["T"]), "alpha": float(best["alpha"]), "lr": float(best["lr"]),
                    "source": "tune", "tune_val_error": best.get("val_error")}
        log("student: tune is enabled but tune/best.json does not exist yet (run `distill stage tune` or "
            "`distill run`); using student.T / student.alpha")
    return {"T": float(s.T), "alpha": float(s.alpha), "lr": float(s.lr), "source": "config"}


# ------------------------------------------------------------------------------------------------
# The job: plain, picklable settings every worker or trial needs

STUDENTS = ("baseline", "distilled_generalist", "distilled")
# What each distilled student learns from (cached target field).
TARGET_OF = {"distilled": "ensemble", "distilled_generalist": "generalist"}


def student_job(cfg: Config, epochs: Optional[int] = None, manifest: Optional[dict] = None) -> StudentJob:
    from pipeline.data import shards
    from pipeline.stages.teacher import model_input_shape

    s = cfg.student
    if manifest is None:
        manifest = shards.read_manifest(cfg.stage_uri("data"))
    train = s.train_dict()
    if epochs is not None:
        train["epochs"] = int(epochs)
    return StudentJob(
        data_uri=cfg.stage_uri("data"),
        cache_uri=cfg.stage_uri("targets"),
        transfer_split=cfg.data.transfer_split,
        target=s.target,
        model=s.model.spec(),
        input_shape=tuple(model_input_shape(s.augment, manifest)),
        manifest=manifest,
        augment=s.augment.model_dump() if s.augment is not None else None,
        num_classes=int(manifest["num_classes"]),
        train=train,
        epochs=int(train["epochs"]),
        seed=int(cfg.seed),
        cpus=int(s.cpus_per_worker),
        gpus=1 if s.use_gpu else 0,
        loader=cfg.data.loader.model_dump(),
    )


# ------------------------------------------------------------------------------------------------
# Data and losses (used by Ray Train workers, Tune trials, tests and bench)


def train_entries(job: StudentJob, kind: str, target: Optional[str] = None) -> list[dict]:
    """What a student streams (`pipeline.datasets`): the cache joined with its inputs (cached
    distillation), or the dataset's shards (hard labels: train; online distillation: the transfer set)."""
    from pipeline import datasets

    if kind == "cached":
        return datasets.cache_items(job.cache_uri, target or job.target, data_uri=job.data_uri)
    split = "train" if kind == "hard" else job.transfer_split
    return datasets.split_items(job.data_uri, split)


def train_in_process(job: StudentJob, kind: str, T: float = 1.0, alpha: float = 0.0, lr: Optional[float] = None,
                     epochs: Optional[int] = None, seed: Optional[int] = None,
                     report: Optional[Callable[[dict], None]] = None, ensemble: Any = None,
                     device: Any = "cpu", target: Optional[str] = None) -> tuple[Any, list[dict]]:
    """Train one student in this process on the training core (Tune trials, bench, tests), streaming
    its data through Ray Data like a one-worker Ray Train run of the stage: (model at its best val
    epoch, history). Nothing is loaded whole. `report(row)` gets, after every epoch,
    {"epoch" (1-based), "train_loss", "val_error", "best_val_error", "samples_per_s", "seconds" (the
    epoch's, val pass included), "train_samples_per_s", "train_seconds" (its steps only: training
    throughput), "early_stopped"}."""
    import torch

    from pipeline import datasets, models, ray_train, training
    from pipeline.losses import make_loss

    tcfg = dict(job.train)
    if lr is not None:
        tcfg["lr"] = float(lr)
    epochs = int(epochs or job.epochs)
    tcfg["epochs"] = epochs
    seed = int(job.seed if seed is None else seed)
    loader = job.loader
    bs = int(tcfg["batch_size"])
    entries = train_entries(job, kind, target)
    steps = ray_train.steps_per_epoch([entries], bs)
    # A cached student sees the deterministic view its targets were computed on (docs/data.md).
    view = {"manifest": job.manifest, "augment": job.augment, "train": kind != "cached", "seed": seed}
    stream = datasets.training_stream(entries, 0, epochs, seed, loader["read_cpus"], loader["read_concurrency"],
                                      loader["group_rows"], view)
    val = datasets.from_items(datasets.group_items(datasets.split_items(job.data_uri, "val"), loader["group_rows"]),
                              loader["read_cpus"], loader["read_concurrency"], dict(view, train=False))
    torch.manual_seed(seed)
    model = models.build_model(job.model, job.input_shape, job.num_classes)
    state = training.TrainState(model, tcfg, steps, epochs, device)
    loss_fn = make_loss(kind, T, alpha, job.num_classes, target or job.target, ensemble)
    chunks = ray_train.chunk_iterator(stream.iterator(), loader, bs, seed, 0, device)
    batches = training.epoch_minibatches(chunks, bs, steps, 0, 0, seed, 0, window=int(loader["shuffle_rows"]) or bs,
                                         prepare=getattr(loss_fn, "prepare_chunk", None))
    history: list[dict] = []

    def on_epoch(st, row):
        out = {"epoch": row["epoch"] + 1, "train_loss": row["train_loss"], "val_error": row["val_error"],
               "best_val_error": st.meta["best_val_error"], "samples_per_s": row["samples_per_s"],
               "seconds": row["seconds"], "train_samples_per_s": row["train_samples_per_s"],
               "train_seconds": row["train_seconds"], "early_stopped": bool(st.meta["done"] and row["epoch"] + 1 < epochs)}
        history.append(out)
        if report is not None:
            report(out)

    val_bytes = sum(int(e.get("bytes") or 0) for e in datasets.split_items(job.data_uri, "val"))
    keep = val_bytes <= int(loader["materialize_mb"]) * (1 << 20)
    training.run_epochs(state, batches, loss_fn, evaluate=ray_train.val_evaluator(val.iterator(), device, keep=keep),
                        report=on_epoch, name=f"student-{kind}", seed=seed)
    model = state.model
    if state.best_state is not None:
        models.unwrap_model(model).load_state_dict(state.best_state)
    model.eval()
    return model, history


def _train_job(cfg: Config, job: StudentJob, which: str, hp: Optional[dict]) -> tuple[TrainJob, list[dict]]:
    """(Ray Train job, training shard entries) of one student."""
    tj = TrainJob(name=f"student-{which}", model=job.model, input_shape=job.input_shape,
                  num_classes=job.num_classes, train=dict(job.train), seed=job.seed, loader=job.loader)
    if which == "baseline":
        return tj, train_entries(job, "hard")
    target = TARGET_OF[which]
    mode = cfg.student.mode
    teacher = None
    if mode != "cached":
        from pipeline.teacher_ensemble import resolve_from_config

        teacher = resolve_from_config(cfg)
    tj = tj.replace(train=dict(job.train, lr=hp["lr"]),
                    distill=Distill(T=hp["T"], alpha=hp["alpha"], target=target, mode=mode, teacher=teacher))
    return tj, train_entries(job, "cached" if mode == "cached" else "online", target)


def _train_and_evaluate(cfg: Config, job: StudentJob, tj: TrainJob, entries: list[dict], run_name: str,
                        prefix: str) -> tuple[Any, dict]:
    """One student through Ray Train, then on test: (model at its best val epoch, metrics entry).

    The Ray Train run lives in `student/ray/{run_name}`: rerunning an interrupted stage resumes it
    from its last checkpoint; runs of earlier configs (same prefix) are deleted.
    """
    from pipeline import datasets, models, ray_train
    from pipeline.stages.teacher import evaluate_saved

    t0 = time.perf_counter()
    ray_uri = storage.join(cfg.stage_uri("student"), "ray")
    ray_train.remove_other_runs(ray_uri, run_name, prefix)
    from pipeline.stages.teacher import transform_spec

    # A cached student sees the deterministic view its targets were computed on (docs/data.md).
    cached = tj.distill is not None and tj.distill.mode == "cached"
    view = transform_spec(cfg.student.augment, job.manifest, train_view=not cached)
    tj, dsets = ray_train.data_parallel_job(tj, entries, datasets.split_items(job.data_uri, "val"), cfg.student,
                                            cfg.data.loader, ray_uri, run_name, view)
    result = ray_train.fit(tj, cfg.student, ray_uri, run_name, cfg.student.max_failures, datasets=dsets)
    best, best_meta, _last, last_meta = ray_train.best_and_last(result)
    with best.as_directory() as d:
        model, _ = models.load_checkpoint(d)
    seconds = time.perf_counter() - t0
    # Scored from the student's folder by model replicas on Ray workers; `run` saves it there again
    # with this entry in its model.json.
    ckpt_uri = storage.join(cfg.stage_uri("student"), tj.name.split("-", 1)[1])
    models.save_checkpoint(ckpt_uri, model, tj.model, tj.input_shape, tj.num_classes,
                           extra={"stage": "student", "kind": tj.name, "evaluating": True})
    ev = evaluate_saved(cfg, ckpt_uri, job.data_uri, "test", cfg.student.augment)
    history = last_meta["history"]
    entry = {
        "test_error": ev["test_error"], "test_errors": ev["test_errors"], "test_samples": ev["n"],
        "params": models.count_params(model),
        "best_epoch": int(best_meta["epoch"]), "best_val_error": best_meta["val_error"],
        "epochs": history, "epochs_run": len(history), "starts": last_meta.get("starts", []),
        "train_seconds": round(sum(e["seconds"] for e in history), 3), "wall_time_s": round(seconds, 3),
        "lr": float(tj.train["lr"]),
    }
    return model, entry


def _reuse(ckpt_uri: str, run_fp: str) -> Optional[tuple[Any, dict]]:
    """(model, metrics entry) of a finished student trained with these exact inputs, else None."""
    from pipeline import models

    try:
        meta = models.read_checkpoint_meta(ckpt_uri)
    except UserError:
        return None
    extra = meta.get("extra") or {}
    if extra.get("fingerprint") != run_fp or not isinstance(extra.get("metrics"), dict):
        return None
    try:
        model, _ = models.load_checkpoint(ckpt_uri)
    except UserError:  # damaged weights: train again
        return None
    return model, extra["metrics"]


def _check_inputs(cfg: Config, manifest: dict) -> None:
    data_uri = cfg.stage_uri("data")
    splits = manifest["splits"]
    missing = [sp for sp in {"train", "val", "test", cfg.data.transfer_split} if sp not in splits]
    if missing:
        raise UserError(f"{data_uri}: the dataset has no {', '.join(sorted(missing))} split(s); the student needs "
                        "train (baseline), val (early stopping), test and the transfer split (data.transfer_split)")
    for split in {"train", cfg.data.transfer_split}:
        if len(splits[split]["shards"]) < cfg.student.num_workers:
            raise UserError(f"student.num_workers: {cfg.student.num_workers} workers but split '{split}' of "
                            f"{data_uri} has only {len(splits[split]['shards'])} shard(s) and each worker reads its "
                            "own; lower student.num_workers or re-ingest with a smaller data.shard_size")
    if cfg.student.mode == "cached":
        from pipeline import cache

        try:
            cm = cache.read_manifest(cfg.stage_uri("targets"))
        except UserError as e:
            raise UserError(f"{e} (or set student.mode=online to run the teacher at every step instead)") from None
        cached_split = (cm.get("dataset") or {}).get("split", cfg.data.transfer_split)
        if cached_split != cfg.data.transfer_split:
            raise UserError(f"{cfg.stage_uri('targets')}: the cache holds split '{cached_split}' but "
                            f"data.transfer_split is '{cfg.data.transfer_split}'; run `distill targets regen CONFIG`")


# ------------------------------------------------------------------------------------------------
# Latency beside the teacher


def latencies(cfg: Config, student, input_shape) -> dict:
    """CPU ms per batch of LATENCY_BATCH for the student (eager and TorchScript) and the teacher."""
    import torch

    from pipeline import export, models

    out = {"student": export.model_latency(student, input_shape, LATENCY_BATCH, LATENCY_RUNS, LATENCY_THREADS)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still deployed
        ts = torch.jit.trace(models.unwrap_model(student).cpu().eval(), torch.zeros(2, *input_shape))
    out["student_torchscript"] = export.measure_latency(ts, input_shape, LATENCY_BATCH, LATENCY_RUNS,
                                                        threads=LATENCY_THREADS)
    teacher_uri = cfg.stage_uri("teacher")
    if storage.exists(storage.join(teacher_uri, models.META_FILE)):
        generalist, _ = models.load_checkpoint(teacher_uri)
        out["generalist"] = export.model_latency(generalist, input_shape, LATENCY_BATCH, LATENCY_RUNS,
                                                 LATENCY_THREADS)
        try:
            from pipeline.teacher_ensemble import TeacherEnsemble, resolve_from_config

            ens = TeacherEnsemble(resolve_from_config(cfg))
            out["ensemble"] = export.measure_latency(ens, input_shape, LATENCY_BATCH, max(5, LATENCY_RUNS // 2),
                                                     threads=LATENCY_THREADS)
            out["ensemble"]["num_specialists"] = len(ens.specialists)
        except UserError as e:  # no specialists (yet): report the generalist alone
            out["ensemble_error"] = str(e)
    return out


# ------------------------------------------------------------------------------------------------
# Stage entry


def run(cfg: Config) -> dict:
    from pipeline import export, models, ray_train
    from pipeline.data import shards
    from pipeline.log import log

    t0 = time.perf_counter()
    s = cfg.student
    out = cfg.stage_uri("student")
    data_uri = cfg.stage_uri("data")
    manifest = shards.read_manifest(data_uri)
    _check_inputs(cfg, manifest)
    ray_train.check_resources(s, "student")
    job = student_job(cfg, manifest=manifest)
    hp = hyperparameters(cfg)

    results: dict[str, dict] = {}
    trained = {}
    for which in STUDENTS:
        if which == "baseline":
            run_fp = baseline_fingerprint(cfg)
            what = "hard labels only"
        else:
            run_fp = distilled_fingerprint(cfg, which)
            what = (f"{s.mode} {TARGET_OF[which]} targets, T={hp['T']:g} alpha={hp['alpha']:g} lr={hp['lr']:g} "
                    f"(from {hp['source']})")
        ckpt_uri = storage.join(out, which)
        reused = _reuse(ckpt_uri, run_fp)
        if reused is not None:
            # Same inputs as a finished run (e.g. only T/alpha changed: the baseline stays valid).
            model, entry = reused
            log(f"student: {which} student is up to date in {ckpt_uri}, reused")
        else:
            log(f"student: training the {which} student ({what}), {s.num_workers} Ray Train worker(s), "
                f"{s.epochs} epochs")
            tj, entries = _train_job(cfg, job, which, hp)
            model, entry = _train_and_evaluate(cfg, job, tj, entries, f"{which}-{run_fp}", which + "-")
            if which != "baseline":
                entry.update({"T": hp["T"], "alpha": hp["alpha"], "target": TARGET_OF[which], "mode": s.mode,
                              "hyperparameters_from": hp["source"]})
                if "tune_val_error" in hp:
                    entry["tune_val_error"] = hp["tune_val_error"]
            # The evaluated entry rides in model.json: a rerun with the same inputs reuses both.
            models.save_checkpoint(ckpt_uri, model, job.model, job.input_shape, job.num_classes,
                                   extra={"stage": "student", "kind": which, "fingerprint": run_fp, "metrics": entry})
        results[which] = entry
        trained[which] = model
        log(f"student: {which} test error {100 * entry['test_error']:.2f} % ({entry['test_errors']}/"
            f"{entry['test_samples']}), {entry['params']:,} params")

    distilled = trained["distilled"]
    meta = models.read_checkpoint_meta(storage.join(out, "distilled"))
    exp = export.export_student(distilled, meta, storage.join(out, "export"))
    lat = latencies(cfg, distilled, job.input_shape)
    teacher_metrics = read_metrics(cfg, "teacher")
    spec_metrics = read_metrics(cfg, "specialists")
    b, d, dg = results["baseline"], results["distilled"], results["distilled_generalist"]
    metrics = {
        "baseline": b,
        "distilled": d,
        "distilled_generalist": dg,
        "teacher": {"generalist_test_error": teacher_metrics.get("test_error"),
                    "generalist_params": teacher_metrics.get("params"),
                    "ensemble_test_error": spec_metrics.get("test_error"),
                    "ensemble_params": spec_metrics.get("params")},
        "improvement": {"test_errors": b["test_errors"] - d["test_errors"],
                        "test_error": round(b["test_error"] - d["test_error"], 6)},
        # What the specialists bought once distilled (the question the paper left open).
        "specialists_gain": {"test_errors": dg["test_errors"] - d["test_errors"],
                             "test_error": round(dg["test_error"] - d["test_error"], 6)},
        # Median CPU ms per batch of LATENCY_BATCH, one number per model (the report's table);
        # `latency` has the details (p90, runs, threads).
        "latency_ms_per_batch": {k: v["ms_median"] for k, v in lat.items() if isinstance(v, dict)},
        "latency": lat,
        "export": {k: v["uri"] for k, v in exp["files"].items()} | {"onnx_error": exp["onnx_error"]},
        "num_workers": s.num_workers,
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }
    gp = teacher_metrics.get("params")
    if gp:
        metrics["teacher"]["params_ratio_generalist_to_student"] = round(gp / d["params"], 2)
    if "generalist" in lat:
        metrics["teacher"]["speedup_vs_generalist"] = round(lat["generalist"]["ms_median"] / lat["student"]["ms_median"], 2)
    if "ensemble" in lat:
        metrics["teacher"]["speedup_vs_ensemble"] = round(lat["ensemble"]["ms_median"] / lat["student"]["ms_median"], 2)
    storage.write_json_atomic(storage.join(out, METRICS_FILE), metrics)
    log(f"student: distilled {d['test_errors']} (from the generalist alone {dg['test_errors']}) vs baseline "
        f"{b['test_errors']} test errors "
        f"({'better' if d['test_errors'] < b['test_errors'] else 'NOT better'}); "
        f"student {lat['student']['ms_median']:.2f} ms / batch of {LATENCY_BATCH}"
        + (f", generalist {lat['generalist']['ms_median']:.2f} ms" if "generalist" in lat else "")
        + (f", ensemble {lat['ensemble']['ms_median']:.2f} ms" if "ensemble" in lat else ""))
    return {"baseline_test_error": b["test_error"], "distilled_test_error": d["test_error"],
            "T": d["T"], "alpha": d["alpha"]}

