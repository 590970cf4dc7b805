"""Training one specialist (Hinton et al. 2015, section 5.2), as a plain function any launcher can call.

The specialists stage runs one of these per class subset in parallel (one Ray Tune trial each), but
nothing here imports Ray: the launcher passes a `report` callback for per-epoch metrics, and resume
state goes to a URI of its own (`spec_{m:03d}/_resume/state.pt`) instead of Tune's checkpoint
folders, so a retried trial *and* a rerun of the whole stage (new Tune experiment) both continue from
the last finished epoch.

What a specialist is:
* the generalist with its head swapped for |S| + 1 outputs (S's classes in order, then the dustbin),
  the rows of S copied from the generalist (`pipeline.models.replace_head`);
* trained with cross-entropy on batches half from S and half from the rest
  (`specialists.dustbin.HalfSubsetSampler`); one epoch is one pass over S's training examples;
* early-stopped on val: after each epoch the *corrected* specialist (dustbin logit + log((1-f)/f),
  f = S's share of the natural training data) is scored on the natural val set over its own
  |S| + 1 labels. That is exactly the distribution it will be asked to model at inference, so the
  epoch with the lowest such error is kept. (Scoring on half/half val batches instead would reward
  the uncorrected prior and say nothing about the correction actually used.)

Saved: `model.pt` + `model.json` (pipeline.models.save_checkpoint) with
`extra = {"subset", "f", "dustbin_correction", "fingerprint", ...}`; the weights are the raw model,
the correction is ADDED to the dustbin (last) logit at inference. `metrics.json` beside them.
"""
from __future__ import annotations

import io
import math
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from pipeline import storage
from pipeline.models import (
    count_params,
    load_checkpoint,
    read_checkpoint_meta,
    replace_head,
    save_checkpoint,
)
from pipeline.training import (
    EarlyStopping,
    make_optimizer,
    make_scheduler,
    predict_logits,
    train_one_epoch,
)
from specialists.dustbin import (
    DustbinMapper,
    HalfSubsetSampler,
    dustbin_correction,
    subset_fraction,
)

RESUME_DIR = "_resume"
RESUME_FILE = "state.pt"
METRICS_FILE = "metrics.json"

# TrainConfig keys that change what a specialist learns (resources and combination settings do not).
TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
              "schedule", "max_norm", "jitter", "patience")


def spec_dirname(m: int) -> str:
    return f"spec_{int(m):03d}"


def is_complete(out_uri: str, fingerprint: str) -> bool:
    """True when `out_uri` holds a finished specialist trained with exactly these inputs."""
    try:
        meta = read_checkpoint_meta(out_uri)
    except Exception:  # missing, unreadable or wrong format: train it again
        return False
    return meta.get("extra", {}).get("fingerprint") == fingerprint


def _task_error(logits: torch.Tensor, labels: np.ndarray, correction: float) -> float:
    z = logits.clone()
    z[:, -1] += correction
    return float((z.argmax(1).numpy() != labels).mean())


def _subset_error(logits: torch.Tensor, labels: np.ndarray, size: int) -> float:
    """Error among S's own classes on examples of S (argmax over S only): the confusions it exists for."""
    inside = labels < size
    if not inside.any():
        return math.nan
    return float((logits[inside, :size].argmax(1).numpy() != labels[inside]).mean())


def _generalist_task_error(g_logits: torch.Tensor, subset: np.ndarray, labels: np.ndarray) -> float:
    """The generalist's error on the specialist's |S| + 1 task (its probabilities collapsed onto it)."""
    logp = torch.log_softmax(g_logits.double(), 1)
    mask = torch.ones(logp.shape[1], dtype=torch.bool)
    mask[torch.as_tensor(subset)] = False
    dust = torch.logsumexp(logp[:, mask], 1, keepdim=True) if mask.any() else torch.full((len(logp), 1), -math.inf)
    task = torch.cat([logp[:, torch.as_tensor(subset)], dust], 1)
    return float((task.argmax(1).numpy() != labels).mean())


def _save_state(uri: str, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


def _load_state(uri: str, fingerprint: str) -> Optional[dict]:
    if not storage.exists(uri):
        return None
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception:  # a damaged resume file only costs the epochs it held
        return None
    return state if state.get("fingerprint") == fingerprint else None


def train_specialist(
    generalist_uri: str,
    subset: Sequence[int],
    x_train: Any,
    y_train: np.ndarray,
    x_val: Any,
    y_val: np.ndarray,
    train_cfg: dict,
    out_uri: str,
    *,
    fingerprint: str = "",
    seed: int = 0,
    extra: Optional[dict] = None,
    report: Optional[Callable[[dict], None]] = None,
    device: Any = "cpu",
    eval_batch_size: int = 1024,
) -> dict:
    """Train the specialist for `subset`, save its checkpoint under `out_uri`, return its metrics.

    Args:
        generalist_uri: checkpoint directory of the generalist (teacher stage).
        subset: the specialist's classes S (global indices, the order of its outputs).
        x_train, y_train: natural training data (inputs as stored, labels (N,) int).
        x_val, y_val: held-out data for early stopping.
        train_cfg: TrainConfig keys (epochs, batch_size, optimizer, lr, schedule, patience, jitter,
            max_norm, ...). `patience` None trains all epochs but still keeps the best val epoch.
        out_uri: checkpoint directory to write (local or s3://); resume state lives below it.
        fingerprint: identity of the inputs; stored in model.json and checked on resume.
        seed: seeds batches (per epoch) and dropout, so a resumed run repeats an uninterrupted one.
        extra: more JSON for model.json's `extra` (e.g. class names, specialist index).
        report: called after each epoch with that epoch's metrics (after resume state is saved).
        device: torch device.
    Returns:
        metrics dict (also written to `out_uri/metrics.json`).
    """
    t0 = time.perf_counter()
    started_at = time.time()
    subset = np.asarray(subset, dtype=np.int64)
    y_train = np.asarray(y_train).astype(np.int64, copy=False)
    y_val = np.asarray(y_val).astype(np.int64, copy=False)
    model, g_meta = load_checkpoint(generalist_uri, map_location=device)
    num_classes = int(g_meta["num_classes"])
    mapper = DustbinMapper(subset, num_classes)
    f = subset_fraction(y_train, subset)
    correction = dustbin_correction(f)
    yv = mapper(y_val)

    g_val_logits = predict_logits(model, x_val, eval_batch_size, device) if len(y_val) else None
    generalist_task_error = _generalist_task_error(g_val_logits, subset, yv) if g_val_logits is not None else math.nan
    del g_val_logits

    replace_head(model, mapper.num_outputs, init_rows=torch.from_numpy(subset))
    epochs = int(train_cfg.get("epochs", 1))
    batch_size = int(train_cfg.get("batch_size", 128))
    sampler = HalfSubsetSampler(y_train, subset, batch_size, seed=seed)
    optimizer = make_optimizer(model, train_cfg)
    scheduler = make_scheduler(optimizer, train_cfg, len(sampler), epochs)
    patience = train_cfg.get("patience")
    stopper = EarlyStopping(int(patience) if patience else epochs + 1)

    resume_uri = storage.join(out_uri, RESUME_DIR, RESUME_FILE)
    history: list[dict] = []
    best_state = None
    start_epoch = 0
    resumed_from = None
    state = _load_state(resume_uri, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stopper.load_state_dict(state["early_stopping"])
        best_state = state["best_model"]
        history = list(state["history"])
        start_epoch = resumed_from = int(state["epoch"]) + 1
        started_at = float(state.get("started_at", started_at))
    stopped = bool(state and state.get("stopped"))

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        for idx in sampler:
            idx = np.asarray(idx)
            yield {"x": x_train[idx], "y": torch.from_numpy(mapper(y_train[idx]))}

    def loss_fn(out: torch.Tensor, batch: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out, batch["y"])

    jitter_px = int(train_cfg.get("jitter") or 0)
    max_norm = train_cfg.get("max_norm")
    for epoch in range(start_epoch, epochs):
        if stopped:
            break
        torch.manual_seed(int(seed) * 100_003 + epoch)  # dropout masks: same with or without resume
        gen = torch.Generator().manual_seed(int(seed) * 100_003 + epoch)
        stats = train_one_epoch(model, batches(epoch), optimizer, loss_fn, scheduler,
                                max_norm=max_norm, jitter_pixels=jitter_px, device=device, generator=gen)
        logits = predict_logits(model, x_val, eval_batch_size, device)
        val_error = _task_error(logits, yv, correction)
        row = {"epoch": epoch, "train_loss": stats["loss"], "val_error": val_error,
               "val_subset_error": _subset_error(logits, yv, mapper.dustbin),
               "seconds": stats["seconds"], "lr": stats["lr"]}
        stopped = stopper.step(val_error)
        if stopper.improved:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history.append(row)
        _save_state(resume_uri, {
            "fingerprint": fingerprint, "epoch": epoch, "stopped": stopped,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "best_model": best_state, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "early_stopping": stopper.state_dict(),
            "history": history, "started_at": started_at,
        })
        if report is not None:
            report({**row, "best_val_error": stopper.best, "best_epoch": stopper.best_epoch})

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    best = history[stopper.best_epoch] if 0 <= stopper.best_epoch < len(history) else {}
    metrics = {
        "subset": subset.tolist(),
        "num_outputs": mapper.num_outputs,
        "f": f,
        "dustbin_correction": correction,
        "val_error": best.get("val_error"),
        "val_subset_error": best.get("val_subset_error"),
        "generalist_val_error": generalist_task_error,
        "best_epoch": stopper.best_epoch,
        "epochs_run": len(history),
        "early_stopped": len(history) < epochs,
        "resumed_from_epoch": resumed_from,
        "seconds": time.perf_counter() - t0,
        "started_at": started_at,  # of the first attempt, when this one resumed
        "finished_at": time.time(),
        "params": count_params(model),
        "history": history,
        **(extra or {}),
    }
    storage.write_json_atomic(storage.join(out_uri, METRICS_FILE), metrics)
    # model.json last: its presence (with this fingerprint) marks the specialist as done.
    save_checkpoint(out_uri, model.cpu(), g_meta["spec"], g_meta["input_shape"], num_classes, extra={
        **(extra or {}), "subset": subset.tolist(), "f": f, "dustbin_correction": correction,
        "fingerprint": fingerprint, "val_error": metrics["val_error"], "best_epoch": stopper.best_epoch,
    })
    storage.remove(storage.join(out_uri, RESUME_DIR), recursive=True)
    return metrics


def corrected_logits(model: torch.nn.Module, meta: dict, x: Any, batch_size: int = 1024, device: Any = "cpu") -> torch.Tensor:
    """(N, |S| + 1) logits of a saved specialist with its dustbin correction added (inference view)."""
    z = predict_logits(model, x, batch_size, device)
    z[:, -1] += float(meta["extra"]["dustbin_correction"])
    return z
