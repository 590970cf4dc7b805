"""Stage `student`: the distilled student and its hard-label baseline, trained with Ray Train.

What distillation bought is only visible beside a control, so the stage trains two students of the
same architecture with the same budget (epochs, batch size, optimizer, schedule, early stopping on
val) and evaluates both on test:

* baseline   hard labels of the `train` split only (cross-entropy);
* distilled  the KD loss of Hinton et al. (2015) on the transfer set,
             alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1), with p the teacher's targets:
             `student.target` picks the ensemble's log-probabilities or the generalist's logits.
             T, alpha (and lr) come from `tune/best.json` when the tune stage ran and
             `student.use_tuned` is set, else from `student.T` / `student.alpha`.

Where the teacher's targets come from (`student.mode`):
* cached  (default) each Ray Train worker reads its shards of the soft-target cache joined with the
          inputs (`pipeline.cache.load_joined`); the teacher never runs;
* online  the teacher ensemble (`pipeline.teacher_ensemble`) runs on every batch; for comparison,
          and for runs without a cache. Both give the same loss on the same batch (tested).

Both students run through `pipeline.ray_train` (the teacher's launcher and per-worker loop, with
checkpoint/resume and `student.num_workers` data-parallel workers); only what a worker loads and
what it minimises differ, passed as `load_train` / `make_loss`. The tune stage trains the same
student with the same batching and loss in-process (`train_student`), one Tune trial per (T, alpha).

A student whose inputs did not change is not trained again: its checkpoint's model.json records the
fingerprint of what it was trained from and its test metrics. So changing T or alpha (or rerunning
tune) retrains only the distilled student; the baseline is reused.

Writes under `student/`:
    baseline/, distilled/  checkpoints (`pipeline.models.save_checkpoint`; extra: fingerprint, metrics)
    export/                the distilled student as state dict, TorchScript, torch.export and ONNX
                           (`pipeline.export`)
    metrics.json           {"baseline": {test_error, test_errors, params, ...},
                            "distilled": {test_error, test_errors, params, T, alpha, lr, target, mode, ...},
                            "teacher": {...}, "latency_ms_per_batch": {"student": ms, "generalist": ms,
                            "ensemble": ms, ...}, "latency": {...details}, "export": {...}}
    ray/                   Ray Train runs (resumed when the stage is rerun with the same config)
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np

from pipeline import storage
from pipeline.config import Config, section_fingerprint
from pipeline.errors import UserError

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
    from pipeline.runner import marker_fingerprint

    s = cfg.student
    upstream = [marker_fingerprint(cfg, "data"), marker_fingerprint(cfg, "teacher")]
    if s.mode == "cached":
        upstream.append(marker_fingerprint(cfg, "targets"))
    else:
        upstream.append(marker_fingerprint(cfg, "specialists"))
    if _tune_applies(cfg):
        upstream.append(marker_fingerprint(cfg, "tune"))
    # Worker count and restarts change how, not what, it trains; they stay out.
    return section_fingerprint("student-v1", learning_slice(cfg), s.T, s.alpha, s.mode, s.use_tuned,
                               cfg.tune.enabled, cfg.seed, upstream)


def baseline_fingerprint(cfg: Config) -> str:
    """The baseline ignores T, alpha, target and tune: changing them resumes (and skips) its run."""
    from pipeline.runner import marker_fingerprint

    s = cfg.student
    return section_fingerprint("baseline-v1", s.model.spec(), s.train_dict(), cfg.seed,
                               marker_fingerprint(cfg, "data"))


def hyperparameters(cfg: Config) -> dict:
    """{"T", "alpha", "lr", "source"} for the distilled student: tune's best, or the config's."""
    from pipeline.runner import log
    from pipeline.stages.tune import read_best

    s = cfg.student
    if _tune_applies(cfg):
        best = read_best(cfg)
        if best is not None:
            return {"T": float(best["T"]), "alpha": float(best["alpha"]), "lr": float(best["lr"]),
                    "source": "tune", "tune_val_error": best.get("val_error")}
        log("student: tune is enabled but tune/best.json does not exist yet (run `distill stage tune` or "
            "`distill run`); using student.T / student.alpha")
    return {"T": float(s.T), "alpha": float(s.alpha), "lr": float(s.lr), "source": "config"}


# ------------------------------------------------------------------------------------------------
# The job: plain, picklable settings every worker or trial needs


def student_job(cfg: Config, epochs: Optional[int] = None, manifest: Optional[dict] = None) -> dict:
    from pipeline.data import shards

    s = cfg.student
    if manifest is None:
        manifest = shards.read_manifest(cfg.stage_uri("data"))
    train = s.train_dict()
    if epochs is not None:
        train["epochs"] = int(epochs)
    return {
        "data_uri": cfg.stage_uri("data"),
        "cache_uri": cfg.stage_uri("targets"),
        "transfer_split": cfg.data.transfer_split,
        "target": s.target,
        "model": s.model.spec(),
        "input_shape": [int(v) for v in manifest["input_shape"]],
        "num_classes": int(manifest["num_classes"]),
        "train": train,
        "epochs": int(train["epochs"]),
        "seed": int(cfg.seed),
        "cpus": s.cpus_per_worker,
        "gpus": 1 if s.use_gpu else 0,
    }


# ------------------------------------------------------------------------------------------------
# Data and losses (used by Ray Train workers, Tune trials, tests and bench)


def load_transfer(job: dict, with_targets: bool, shard_indices: Optional[list[int]] = None) -> dict:
    """Training arrays: {"x", "y" (if labelled), targets...}.

    with_targets: the transfer set joined with its cached targets ("teacher" (N, C), or the top-k
    fields "teacher_topk_idx" / "teacher_topk_val" / "teacher_tail"); otherwise the transfer split's
    inputs and labels only (online distillation computes targets per batch).
    """
    from pipeline import cache
    from pipeline.data import shards

    if with_targets:
        j = cache.load_joined(job["cache_uri"], which=job["target"], shard_indices=shard_indices,
                              data_uri=job["data_uri"])
        out = {k: j[k] for k in ("x", "teacher", "teacher_topk_idx", "teacher_topk_val", "teacher_tail") if k in j}
        if j.get("y") is not None:
            out["y"] = np.asarray(j["y"], dtype=np.int64)
        if int(j["num_classes"]) != int(job["num_classes"]):
            raise UserError(f"{job['cache_uri']}: the cache has {j['num_classes']} classes but the dataset "
                            f"{job['num_classes']}; run `distill targets regen CONFIG`")
        return out
    x, y, _ = shards.load_split(job["data_uri"], job["transfer_split"], shard_indices=shard_indices)
    out = {"x": x}
    if y is not None and len(y) and (np.asarray(y) >= 0).all():
        out["y"] = np.asarray(y, dtype=np.int64)
    return out


def load_eval_split(data_uri: str, split: str) -> dict:
    from pipeline.data import shards

    x, y, _ = shards.load_split(data_uri, split)
    if y is None or len(y) == 0:
        raise UserError(f"{data_uri}: split '{split}' is empty or unlabelled; the student needs labelled "
                        f"val (early stopping) and test (evaluation) splits")
    return {"x": x, "y": np.asarray(y, dtype=np.int64)}


def dense_teacher(batch: dict, num_classes: int):
    """The batch's teacher targets as dense (B, C) logits / log-probabilities (top-k: tail spread)."""
    from pipeline.cache import topk_to_dense

    if "teacher" in batch:
        return batch["teacher"]
    return topk_to_dense(batch["teacher_topk_idx"], batch["teacher_topk_val"], batch["teacher_tail"], num_classes)


def with_soft_targets(arrays: dict, T: float, chunk: int = 65536) -> dict:
    """`arrays` with dense cached targets replaced by "teacher_log_p": float32 log softmax(teacher / T),
    computed once for a run at temperature T instead of at every step (`losses.teacher_log_probs`).
    Top-k targets are left as they are (densifying them is what top-k avoids). The loss from
    `make_loss("cached", T, ...)` must then use the same T."""
    import torch

    from pipeline.losses import teacher_log_probs

    if "teacher" not in arrays:
        return arrays
    teacher = arrays["teacher"]
    out = np.empty(teacher.shape, dtype=np.float32)
    for s in range(0, len(teacher), chunk):
        out[s:s + chunk] = teacher_log_probs(torch.from_numpy(np.asarray(teacher[s:s + chunk])), T).numpy()
    return {**{k: v for k, v in arrays.items() if k != "teacher"}, "teacher_log_p": out}


def make_loss(kind: str, T: float = 1.0, alpha: float = 0.0, num_classes: int = 0, target: str = "ensemble",
              ensemble: Any = None) -> Callable:
    """loss_fn(student_logits, batch) for `pipeline.training.train_one_epoch`.

    kind: "hard" (cross-entropy with batch["y"]), "cached" (KD against the batch's cached targets) or
    "online" (KD against `ensemble(batch["x"])`, a `TeacherEnsemble`, run on every batch).
    """
    import torch
    import torch.nn.functional as F

    from pipeline.losses import kd_loss, kd_loss_from_log_probs

    if kind == "hard":
        return lambda logits, batch: F.cross_entropy(logits, batch["y"].long())
    if kind == "cached":
        def cached(logits, batch):
            if "teacher_log_p" in batch:  # prepared by `with_soft_targets` at this T
                return kd_loss_from_log_probs(logits, batch["teacher_log_p"], batch.get("y"), T, alpha)
            return kd_loss(logits, dense_teacher(batch, num_classes), batch.get("y"), T, alpha)

        return cached
    if kind == "online":
        if ensemble is None:
            raise ValueError("online distillation needs the teacher ensemble")
        which = 1 if target == "ensemble" else 0

        def online(logits, batch):
            with torch.no_grad():
                teacher = ensemble(batch["x"])[which].to(logits.device)
            return kd_loss(logits, teacher, batch.get("y"), T, alpha)

        return online
    raise ValueError(f"unknown loss kind {kind!r}")


def train_student(job: dict, data: dict, val: dict, kind: str, T: float = 1.0, alpha: float = 0.0,
                  lr: Optional[float] = None, epochs: Optional[int] = None, seed: Optional[int] = None,
                  report: Optional[Callable[[dict], None]] = None, ensemble: Any = None,
                  device: Any = "cpu") -> tuple[Any, list[dict]]:
    """Train one student in this process (Tune trials, bench, tests): (model at its best val epoch, history).

    Same model, optimizer, schedule, minibatches (`pipeline.ray_train._rank_batches` with one rank)
    and loss as a one-worker Ray Train run of the stage. `report(row)` gets, after every epoch,
    {"epoch" (1-based), "train_loss", "val_error", "best_val_error", "samples_per_s", "early_stopped"}.
    """
    import torch

    from pipeline import models, training
    from pipeline.ray_train import _rank_batches

    tcfg = dict(job["train"])
    if lr is not None:
        tcfg["lr"] = float(lr)
    epochs = int(epochs or job["epochs"])
    seed = int(job["seed"] if seed is None else seed)
    arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if kind == "hard" and "y" not in arrays:
        raise UserError("the transfer set is unlabelled: the hard-label baseline needs labels")
    if kind != "cached":
        arrays = {k: v for k, v in arrays.items() if k in ("x", "y")}
    else:
        arrays = with_soft_targets(arrays, T)
    n = len(arrays["x"])
    bs = int(tcfg["batch_size"])
    steps = max(1, math.ceil(n / bs))
    torch.manual_seed(seed)
    model = models.build_model(job["model"], job["input_shape"], job["num_classes"]).to(device)
    optimizer = training.make_optimizer(model, tcfg)
    scheduler = training.make_scheduler(optimizer, tcfg, steps, epochs)
    stopper = training.EarlyStopping(int(tcfg["patience"])) if tcfg.get("patience") else None
    loss_fn = make_loss(kind, T, alpha, job["num_classes"], job["target"], ensemble)
    gen = torch.Generator()
    best_err, best_state, history = math.inf, None, []
    for epoch in range(epochs):
        torch.manual_seed(seed * 1_000_003 + epoch * 1009)
        gen.manual_seed(seed * 7919 + epoch * 131)
        stats = training.train_one_epoch(model, _rank_batches(arrays, bs, steps, seed, epoch, 0), optimizer,
                                         loss_fn, scheduler, max_norm=tcfg.get("max_norm"),
                                         jitter_pixels=int(tcfg.get("jitter") or 0), device=device, generator=gen)
        ev = training.evaluate(model, val["x"], val["y"], 1024, device)
        err = float(ev["test_error"])
        if err < best_err:
            best_err = err
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stop = stopper.step(err) if stopper is not None else False
        row = {"epoch": epoch + 1, "train_loss": stats["loss"], "val_error": err, "best_val_error": best_err,
               "samples_per_s": stats["samples"] / max(stats["seconds"], 1e-9), "seconds": stats["seconds"],
               "early_stopped": stop}
        history.append(row)
        if report is not None:
            report(row)
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


# ------------------------------------------------------------------------------------------------
# Ray Train hooks (module-level so they pickle by reference)


def load_train_hard(config: dict, rank: int, world: int) -> dict:
    from pipeline import ray_train

    return ray_train.default_load_train(config, rank, world)


def load_train_cached(config: dict, rank: int, world: int) -> dict:
    from pipeline import cache, ray_train

    num_shards = len(cache.read_manifest(config["cache_uri"])["shards"])
    mine = ray_train.worker_shard_indices(num_shards, rank, world)
    return with_soft_targets(load_transfer(config, with_targets=True, shard_indices=mine), config["T"])


def load_train_online(config: dict, rank: int, world: int) -> dict:
    from pipeline import ray_train
    from pipeline.data import shards

    entries = shards.split_entries(config["data_uri"], config["transfer_split"])
    mine = ray_train.worker_shard_indices(len(entries), rank, world)
    return load_transfer(config, with_targets=False, shard_indices=mine)


def make_loss_cached(config: dict) -> Callable:
    return make_loss("cached", config["T"], config["alpha"], config["num_classes"])


def make_loss_online(config: dict) -> Callable:
    import ray.train.torch

    from pipeline.teacher_ensemble import TeacherEnsemble

    ensemble = TeacherEnsemble(config["teacher_spec"], device=ray.train.torch.get_device())
    return make_loss("online", config["T"], config["alpha"], config["num_classes"], config["target"], ensemble)


def _loop_config(cfg: Config, job: dict, which: str, hp: Optional[dict]) -> dict:
    lc = dict(job)
    lc.update({"name": f"student-{which}", "train_split": "train", "val_split": "val"})
    if which == "baseline":
        lc["load_train"] = load_train_hard
        return lc
    lc["train"] = dict(job["train"], lr=hp["lr"])
    lc.update({"T": hp["T"], "alpha": hp["alpha"]})
    if cfg.student.mode == "cached":
        lc.update({"load_train": load_train_cached, "make_loss": make_loss_cached})
    else:
        from pipeline.teacher_ensemble import resolve_from_config

        lc.update({"load_train": load_train_online, "make_loss": make_loss_online,
                   "teacher_spec": resolve_from_config(cfg)})
    return lc


def _train_and_evaluate(cfg: Config, lc: dict, run_name: str, prefix: str, test: dict) -> tuple[Any, dict]:
    """One student through Ray Train, then on test: (model at its best val epoch, metrics entry).

    The Ray Train run lives in `student/ray/{run_name}`: rerunning an interrupted stage resumes it
    from its last epoch; runs of earlier configs (same prefix) are deleted.
    """
    from pipeline import models, ray_train, training

    t0 = time.perf_counter()
    ray_uri = storage.join(cfg.stage_uri("student"), "ray")
    ray_train.remove_other_runs(ray_uri, run_name, prefix)
    result = ray_train.fit(ray_train.train_loop, lc, cfg.student, ray_uri, run_name, cfg.student.max_failures)
    best, best_meta, _last, last_meta = ray_train.best_and_last(result)
    with best.as_directory() as d:
        model, _ = models.load_checkpoint(d)
    seconds = time.perf_counter() - t0
    ev = training.evaluate(model, test["x"], test["y"], batch_size=1024)
    history = last_meta["history"]
    entry = {
        "test_error": ev["test_error"], "test_errors": ev["test_errors"], "test_samples": ev["n"],
        "params": models.count_params(model),
        "best_epoch": int(best_meta["epoch"]), "best_val_error": best_meta["val_error"],
        "epochs": history, "epochs_run": len(history), "starts": last_meta.get("starts", []),
        "train_seconds": round(sum(e["seconds"] for e in history), 3), "wall_time_s": round(seconds, 3),
        "lr": float(lc["train"]["lr"]),
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
    from pipeline.runner import log

    t0 = time.perf_counter()
    s = cfg.student
    out = cfg.stage_uri("student")
    data_uri = cfg.stage_uri("data")
    manifest = shards.read_manifest(data_uri)
    _check_inputs(cfg, manifest)
    ray_train.check_resources(s, "student")
    job = student_job(cfg, manifest=manifest)
    hp = hyperparameters(cfg)
    test = load_eval_split(data_uri, "test")

    results: dict[str, dict] = {}
    trained = {}
    for which in ("baseline", "distilled"):
        if which == "baseline":
            run_fp = baseline_fingerprint(cfg)
            what = "hard labels only"
        else:
            run_fp = fingerprint(cfg)
            what = (f"{s.mode} {s.target} targets, T={hp['T']:g} alpha={hp['alpha']:g} lr={hp['lr']:g} "
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
            model, entry = _train_and_evaluate(cfg, _loop_config(cfg, job, which, hp), f"{which}-{run_fp}",
                                               which + "-", test)
            if which == "distilled":
                entry.update({"T": hp["T"], "alpha": hp["alpha"], "target": s.target, "mode": s.mode,
                              "hyperparameters_from": hp["source"]})
                if "tune_val_error" in hp:
                    entry["tune_val_error"] = hp["tune_val_error"]
            # The evaluated entry rides in model.json: a rerun with the same inputs reuses both.
            models.save_checkpoint(ckpt_uri, model, job["model"], job["input_shape"], job["num_classes"],
                                   extra={"stage": "student", "kind": which, "fingerprint": run_fp, "metrics": entry})
        results[which] = entry
        trained[which] = model
        log(f"student: {which} test error {100 * entry['test_error']:.2f} % ({entry['test_errors']}/"
            f"{entry['test_samples']}), {entry['params']:,} params")

    distilled = trained["distilled"]
    meta = models.read_checkpoint_meta(storage.join(out, "distilled"))
    exp = export.export_student(distilled, meta, storage.join(out, "export"))
    lat = latencies(cfg, distilled, job["input_shape"])
    teacher_metrics = _read_json(storage.join(cfg.stage_uri("teacher"), "metrics.json"))
    spec_metrics = _read_json(storage.join(cfg.stage_uri("specialists"), "metrics.json"))
    b, d = results["baseline"], results["distilled"]
    metrics = {
        "baseline": b,
        "distilled": d,
        "teacher": {"generalist_test_error": teacher_metrics.get("test_error"),
                    "generalist_params": teacher_metrics.get("params"),
                    "ensemble_test_error": spec_metrics.get("test_error"),
                    "ensemble_params": spec_metrics.get("params")},
        "improvement": {"test_errors": b["test_errors"] - d["test_errors"],
                        "test_error": round(b["test_error"] - d["test_error"], 6)},
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
    storage.write_json_atomic(storage.join(out, "metrics.json"), metrics)
    log(f"student: distilled {d['test_errors']} vs baseline {b['test_errors']} test errors "
        f"({'better' if d['test_errors'] < b['test_errors'] else 'NOT better'}); "
        f"student {lat['student']['ms_median']:.2f} ms / batch of {LATENCY_BATCH}"
        + (f", generalist {lat['generalist']['ms_median']:.2f} ms" if "generalist" in lat else "")
        + (f", ensemble {lat['ensemble']['ms_median']:.2f} ms" if "ensemble" in lat else ""))
    return {"baseline_test_error": b["test_error"], "distilled_test_error": d["test_error"],
            "T": d["T"], "alpha": d["alpha"]}


def _read_json(uri: str) -> dict:
    try:
        doc = storage.read_json(uri)
        return doc if isinstance(doc, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}
