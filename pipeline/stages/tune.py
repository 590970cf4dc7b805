"""Stage `tune`: search the distillation temperature T and soft weight alpha with Ray Tune.

Hinton et al. (2015) report that T matters (MNIST: every T above 8 was alike with 300+ units per
layer, T of 2.5-4 was best with 30 units) and that a low weight on the hard term works best, so both
are searched per student rather than fixed. Because the cache stores raw logits / log-probabilities
(never probabilities at one T), every trial reads the same cache and the teacher never runs again.

How it runs:
* One Tune *function trainable* per (T, alpha[, lr]) point. Each trial trains the student in-process
  on the training core (`pipeline.stages.student.train_in_process`: the same loss, batching,
  optimizer and schedule the final student gets), reporting the val error after every epoch through
  `ray.tune.report`. We chose the in-trial loop over launching a Ray Train `TorchTrainer` inside each
  trial (the Train v2 way to tune a trainer): a student is small enough for one worker,
  and a trainer per trial would add a controller actor and a worker group (seconds of start-up each)
  to trials that themselves take seconds. Multi-worker students still train through Ray Train in the
  student stage; only the search is single-worker per trial.
* ASHA (`tune.scheduler: asha`, time attribute `epoch`, metric `val_error`, mode min, grace period
  from config) stops trials that are behind their peers at each rung; `fifo` runs every trial out.
* Trials always read the cache, also when `student.mode` is online (only the final student may run
  the teacher every step): searching T/alpha with the teacher in the loop would multiply its cost.
* Search space from config: grid (`tune.grid_search` over T x alpha [x lr], `num_samples` repeats
  with different seeds) or random (`tune.choice` over the same lists, `num_samples` trials).
* Every trial streams the cache joined with its inputs through Ray Data (`pipeline.datasets`),
  exactly as the student stage's workers do; the driver loads no data and no trial holds the
  transfer set, so the search scales with the cache like the final student does.
* The experiment lives in `tune/ray/tune-{fingerprint}`; a rerun after a crash restores it
  (`Tuner.restore`): finished trials are kept, unfinished ones run again.

Writes under `tune/`:
    results.csv   one row per trial: trial_id, T, alpha, lr, seed, val_error (best epoch), last_val_error,
                  epochs_run, status (completed | stopped (ASHA or patience) | error)
    heatmap.png   best val error over the (T, alpha) grid, the best cell outlined
    best.json     {"T", "alpha", "lr", "val_error", "trial_id"}: the student stage uses it
    metrics.json  {"trials": n, "best": {...}, "search", "scheduler", "seconds"}
"""
from __future__ import annotations

import csv
import io
import math
import time

import numpy as np

from pipeline import storage
from pipeline.config import Config, section_fingerprint
from pipeline.errors import UserError
from pipeline.jobs import StudentJob
from pipeline.layout import BEST_FILE, METRICS_FILE, marker_fingerprint

NEEDS_RAY = True
RESULTS_FILE = "results.csv"
HEATMAP_FILE = "heatmap.png"
CSV_COLUMNS = ("trial_id", "T", "alpha", "lr", "seed", "val_error", "last_val_error", "epochs_run", "status")


def fingerprint(cfg: Config) -> str:
    from pipeline.stages.student import learning_slice

    return section_fingerprint("tune-v1", cfg.tune, learning_slice(cfg), cfg.seed,
                               marker_fingerprint(cfg, "targets"), marker_fingerprint(cfg, "data"))




# ------------------------------------------------------------------------------------------------
# Search space


def _check(cfg: Config) -> list[str]:
    tc = cfg.tune
    problems = []
    if not tc.T or any(t <= 0 for t in tc.T):
        problems.append(f"tune.T: {tc.T} must be a non-empty list of temperatures > 0, e.g. [2, 4, 8]")
    if not tc.alpha or any(not 0 <= a <= 1 for a in tc.alpha):
        problems.append(f"tune.alpha: {tc.alpha} must be a non-empty list of weights in [0, 1], e.g. [0.5, 0.9]")
    if tc.lr is not None and (not tc.lr or any(lr <= 0 for lr in tc.lr)):
        problems.append(f"tune.lr: {tc.lr} must be a non-empty list of learning rates > 0, or unset")
    return problems


def param_space(cfg: Config) -> dict:
    """The Tune search space: grid over the lists (x seeds for repeats), or choices for random search."""
    from ray import tune

    tc = cfg.tune
    lrs = tc.lr if tc.lr is not None else [cfg.student.lr]
    if tc.search == "grid":
        space = {"T": tune.grid_search(list(tc.T)), "alpha": tune.grid_search(list(tc.alpha))}
        space["lr"] = tune.grid_search(list(lrs)) if len(lrs) > 1 else lrs[0]
        # Repeats of a grid differ only by seed; the seed is part of the grid so they are distinct.
        space["seed"] = tune.grid_search([cfg.seed + r for r in range(tc.num_samples)]) if tc.num_samples > 1 else cfg.seed
        return space
    return {"T": tune.choice(list(tc.T)), "alpha": tune.choice(list(tc.alpha)),
            "lr": tune.choice(list(lrs)) if len(lrs) > 1 else lrs[0], "seed": cfg.seed}


def num_trials(cfg: Config) -> int:
    tc = cfg.tune
    if tc.search == "random":
        return tc.num_samples
    return len(tc.T) * len(tc.alpha) * len(tc.lr or [None]) * tc.num_samples


# ------------------------------------------------------------------------------------------------
# The trial (runs in a Ray worker)


def _trainable(config: dict, job: "StudentJob") -> None:
    import torch
    from ray import tune

    from pipeline.stages.student import train_in_process

    torch.set_num_threads(max(1, int(job.cpus)))
    device = "cuda" if job.gpus > 0 and torch.cuda.is_available() else "cpu"

    def report(row: dict) -> None:
        tune.report({"val_error": row["val_error"], "best_val_error": row["best_val_error"],
                     "epoch": row["epoch"], "train_loss": row["train_loss"],
                     "samples_per_s": row["samples_per_s"], "early_stopped": row.get("early_stopped", False)})

    # The trial streams the cache joined with its inputs through Ray Data, like the student stage's
    # workers: the driver loads no data and no trial holds the transfer set.
    train_in_process(job, kind="cached", T=float(config["T"]), alpha=float(config["alpha"]),
                     lr=float(config["lr"]), epochs=job.epochs, seed=int(config["seed"]), report=report,
                     device=device)


def _log_callback(total: int):
    from ray.tune import Callback

    from pipeline.log import log

    class _Log(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            c = trial.config
            log(f"tune: trial {trial.trial_id} T={c['T']:g} alpha={c['alpha']:g} lr={c['lr']:g} "
                f"epoch {result['epoch']}: val error {result['val_error']:.4f} "
                f"(best {result['best_val_error']:.4f})")

        def on_trial_complete(self, iteration, trials, trial, **info):
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            log(f"tune: trial {trial.trial_id} finished ({done}/{total})")

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"tune: trial {trial.trial_id} failed; see its error.txt under tune/ray")

    return _Log()


# ------------------------------------------------------------------------------------------------
# Driver


def run(cfg: Config) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipeline.log import log
    from pipeline.stages.student import student_job

    problems = _check(cfg)
    if problems:
        raise UserError("tune config has problem(s):\n  - " + "\n  - ".join(problems))
    tc = cfg.tune
    out = cfg.stage_uri("tune")
    epochs = tc.epochs or cfg.student.epochs
    job = student_job(cfg, epochs=epochs)
    # Checked here, before any trial starts: each trial streams the cache itself (the driver loads
    # no data), so a missing or unreadable cache would otherwise fail every trial separately.
    from pipeline import datasets

    datasets.cache_items(job.cache_uri, job.target, data_uri=job.data_uri)
    job = job.replace(cpus=int(tc.cpus_per_trial), gpus=tc.gpus_per_trial)
    n = num_trials(cfg)
    t0 = time.perf_counter()

    log(f"tune: {n} trial(s), {tc.search} search over T={tc.T} alpha={tc.alpha}"
        + (f" lr={tc.lr}" if tc.lr else "") + f", {epochs} epoch(s) each, scheduler {tc.scheduler}, "
        f"{tc.max_concurrent} at once ({tc.cpus_per_trial} CPU, {tc.gpus_per_trial} GPU each); each trial "
        "streams the cache through Ray Data")
    trainable = tune.with_resources(tune.with_parameters(_trainable, job=job),
                                    {"cpu": tc.cpus_per_trial, "gpu": tc.gpus_per_trial})
    if tc.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(tc.grace_period, epochs),
                                  reduction_factor=2)
    else:
        scheduler = FIFOScheduler()
    fs, path = storage.pyarrow_fs(storage.join(out, "ray"))
    name = f"tune-{fingerprint(cfg)}"
    exp_path = f"{path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        log(f"tune: resuming the interrupted experiment {name} (finished trials are kept)")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric="val_error", mode="min", scheduler=scheduler,
                num_samples=1 if tc.search == "grid" else tc.num_samples,
                max_concurrent_trials=tc.max_concurrent,
                search_alg=BasicVariantGenerator(random_state=cfg.seed) if tc.search == "random" else None,
            ),
            run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, verbose=0,
                                      callbacks=[_log_callback(n)]),
        )
    grid = tuner.fit()
    rows = trial_rows(grid, epochs)
    ok = [r for r in rows if r["status"] != "error" and r["val_error"] is not None]
    if not ok:
        errs = "; ".join(str(r.error).strip().splitlines()[-1][:200] for r in grid if r.error is not None)
        raise RuntimeError(f"tune: all {len(rows)} trials failed ({errs}); logs under {storage.join(out, 'ray', name)}")
    best = min(ok, key=lambda r: (r["val_error"], -r["epochs_run"], r["trial_id"]))
    best_doc = {"T": best["T"], "alpha": best["alpha"], "lr": best["lr"], "val_error": best["val_error"],
                "trial_id": best["trial_id"], "seed": best["seed"]}
    seconds = time.perf_counter() - t0

    storage.write_bytes_atomic(storage.join(out, RESULTS_FILE), results_csv(rows).encode())
    storage.write_bytes_atomic(storage.join(out, HEATMAP_FILE), heatmap_png(rows, best))
    storage.write_json_atomic(storage.join(out, BEST_FILE), best_doc)
    metrics = {
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped": sum(r["status"] == "stopped" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "best": best_doc,
        "search": tc.search, "scheduler": tc.scheduler, "epochs": epochs, "target": cfg.student.target,
        "seconds": round(seconds, 3),
    }
    storage.write_json_atomic(storage.join(out, METRICS_FILE), metrics)
    log(f"tune: best T={best['T']:g} alpha={best['alpha']:g} lr={best['lr']:g} "
        f"val error {best['val_error']:.4f} over {len(rows)} trials in {seconds:.1f}s")
    return {"trials": len(rows), "best": best_doc}


def trial_rows(grid, epochs: int) -> list[dict]:
    """One dict per trial of a Tune ResultGrid, in trial-id order (the CSV rows)."""
    rows = []
    for r in grid:
        c = r.config or {}
        hist = r.metrics_dataframe
        vals = [] if hist is None or "val_error" not in hist else [float(v) for v in hist["val_error"].dropna()]
        epochs_run = 0 if hist is None or "epoch" not in hist or hist.empty else int(hist["epoch"].max())
        if r.error is not None:
            status = "error"
        elif epochs_run < epochs:
            status = "stopped"
        else:
            status = "completed"
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id") or r.path.rstrip("/").rsplit("/", 1)[-1],
            "T": float(c.get("T")), "alpha": float(c.get("alpha")), "lr": float(c.get("lr")),
            "seed": int(c.get("seed", 0)),
            "val_error": min(vals) if vals else None,
            "last_val_error": vals[-1] if vals else None,
            "epochs_run": epochs_run,
            "status": status,
        })
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def results_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def heatmap_png(rows: list[dict], best: dict) -> bytes:
    """Val error over T (columns) x alpha (rows): the best trial of each cell (over lr and seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = sorted({r["T"] for r in rows})
    alphas = sorted({r["alpha"] for r in rows})
    grid = np.full((len(alphas), len(Ts)), np.nan)
    epochs_of = {}
    for r in rows:
        if r["val_error"] is None:
            continue
        i, j = alphas.index(r["alpha"]), Ts.index(r["T"])
        if math.isnan(grid[i, j]) or r["val_error"] < grid[i, j]:
            grid[i, j] = r["val_error"]
            # A trial ASHA stopped early shows its error when stopped: say so in its cell.
            epochs_of[i, j] = r["epochs_run"] if r["status"] == "stopped" else None
    fig, ax = plt.subplots(figsize=(1.2 * len(Ts) + 2.5, 0.8 * len(alphas) + 2.0))
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", origin="lower")
    ax.set_xticks(range(len(Ts)), [f"{t:g}" for t in Ts])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("soft-term weight alpha")
    finite = grid[np.isfinite(grid)]
    mid = float(np.mean(finite)) if finite.size else 0.0
    for i in range(len(alphas)):
        for j in range(len(Ts)):
            if np.isfinite(grid[i, j]):
                label = f"{grid[i, j]:.4f}"
                if epochs_of.get((i, j)):
                    label += f"\n(stopped at epoch {epochs_of[i, j]})"
                ax.text(j, i, label, ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] > mid else "black")
    bi, bj = alphas.index(best["alpha"]), Ts.index(best["T"])
    ax.add_patch(matplotlib.patches.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_title(f"val error (best: T={best['T']:g}, alpha={best['alpha']:g}, {best['val_error']:.4f})", fontsize=9)
    fig.colorbar(im, ax=ax, label="val error")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
