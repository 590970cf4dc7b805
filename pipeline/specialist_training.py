"""Training one specialist (Hinton et al. 2015, section 5.2), as a plain function any launcher can call.

The specialists stage runs one of these per class subset in parallel (one Ray Tune trial each), but
nothing here imports Ray: the launcher passes the data as streams (`epoch_chunks`, `val_batches`), a
`report` callback for per-epoch metrics, and resume state goes to a folder of its own
(`spec_{m:03d}/_resume/`, the training core's `TrainState`) instead of Tune's checkpoint folders, so a retried trial *and* a rerun of the whole stage (new Tune experiment) both continue from
the last finished epoch.

What a specialist is:
* the generalist with its head swapped for |S| + 1 outputs (S's classes in order, then the dustbin),
  the rows of S copied from the generalist (`pipeline.models.replace_head`);
* trained on the training core (`pipeline.training.run_epochs`) with cross-entropy on batches half
  from S and half from the rest, cut from the streamed training split
  (`specialists.dustbin.half_subset_stream`); one epoch is one pass over S's training examples;
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

import math
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from pipeline import storage
from pipeline.log import log
from pipeline.layout import METRICS_FILE, RESUME_DIR
from pipeline.models import (
    count_params,
    load_checkpoint,
    read_checkpoint_meta,
    replace_head,
    save_checkpoint,
)
from pipeline.training import TrainState, prepare_inputs, run_epochs
from specialists.dustbin import (
    DustbinMapper,
    dustbin_correction,
    half_subset_steps,
    half_subset_stream,
)


# TrainConfig keys that change what a specialist learns (resources and combination settings do not).
TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
              "schedule", "max_norm", "jitter", "patience")


def is_complete(out_uri: str, fingerprint: str) -> bool:
    """True when `out_uri` holds a finished specialist trained with exactly these inputs."""
    try:
        meta = read_checkpoint_meta(out_uri)
    except Exception:  # missing, unreadable or wrong format: train it again
        return False
    return meta.get("extra", {}).get("fingerprint") == fingerprint


class TaskCounts:
    """Streaming counts of a specialist's |S| + 1 task on natural data: errors of the corrected
    specialist, errors among S's own classes on examples of S, and the generalist's errors on the
    task (its probabilities collapsed onto S + dustbin). O(1) memory whatever the split's size."""

    def __init__(self, mapper: DustbinMapper, correction: float):
        self.table = torch.as_tensor(mapper.table)
        self.subset = torch.as_tensor(mapper.subset)
        self.size = len(mapper.subset)
        self.correction = float(correction)
        self.n = self.errors = self.n_inside = self.subset_errors = 0

    def add(self, logits: torch.Tensor, y_global: torch.Tensor) -> None:
        y = self.table.to(y_global.device)[y_global.long()]
        z = logits.float().clone()
        z[:, -1] += self.correction
        self.errors += int((z.argmax(1) != y).sum())
        self.n += len(y)
        inside = y < self.size
        if inside.any():
            self.n_inside += int(inside.sum())
            self.subset_errors += int((logits[inside, :self.size].argmax(1) != y[inside]).sum())

    def add_generalist(self, g_logits: torch.Tensor, y_global: torch.Tensor) -> None:
        y = self.table.to(y_global.device)[y_global.long()]
        logp = torch.log_softmax(g_logits.double(), 1)
        mask = torch.ones(logp.shape[1], dtype=torch.bool, device=logp.device)
        mask[self.subset] = False
        dust = (torch.logsumexp(logp[:, mask], 1, keepdim=True) if mask.any()
                else torch.full((len(logp), 1), -math.inf, dtype=logp.dtype, device=logp.device))
        task = torch.cat([logp[:, self.subset.to(logp.device)], dust], 1)
        self.errors += int((task.argmax(1) != y).sum())
        self.n += len(y)

    @property
    def error(self) -> float:
        return self.errors / self.n if self.n else math.nan

    @property
    def subset_error(self) -> float:
        return self.subset_errors / self.n_inside if self.n_inside else math.nan


def _forward(model, batches, device, fn) -> None:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                x = prepare_inputs(batch["x"].to(device, non_blocking=True))
                fn(model(x), batch["y"].to(device))
    finally:
        model.train(was)


def _save_resume(uri: str, state: TrainState, spec, input_shape, num_classes) -> None:
    """The run's state under `uri` (local or s3://), trainer.json last: a half-written folder is
    never taken for a complete one."""
    import os
    import tempfile

    from pipeline import training

    with tempfile.TemporaryDirectory(prefix="distill-spec-") as d:
        state.save(d, spec, input_shape, num_classes)
        names = [n for n in sorted(os.listdir(d)) if n != training.META_FILE]
        for n in names + [training.META_FILE]:
            path = os.path.join(d, n)
            if os.path.isdir(path):
                for sub in sorted(os.listdir(path)):
                    with open(os.path.join(path, sub), "rb") as f:
                        storage.write_bytes_atomic(storage.join(uri, n, sub), f.read())
            else:
                with open(path, "rb") as f:
                    storage.write_bytes_atomic(storage.join(uri, n), f.read())


def _load_resume(uri: str, state: TrainState, fingerprint: str) -> bool:
    import json
    import os
    import tempfile

    from pipeline import models, training

    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, training.META_FILE)))
    except (FileNotFoundError, ValueError, OSError):
        return False
    if meta.get("fingerprint") != fingerprint:
        return False
    try:
        with tempfile.TemporaryDirectory(prefix="distill-spec-") as d:
            for rel in (training.META_FILE, training.STATE_FILE, models.WEIGHTS_FILE, models.META_FILE):
                with open(os.path.join(d, rel), "wb") as f:
                    f.write(storage.read_bytes(storage.join(uri, rel)))
            best = storage.join(uri, "best", models.WEIGHTS_FILE)
            if storage.exists(best):
                os.makedirs(os.path.join(d, "best"))
                with open(os.path.join(d, "best", models.WEIGHTS_FILE), "wb") as f:
                    f.write(storage.read_bytes(best))
            state.load(d)
    except Exception:  # a damaged resume folder only costs the epochs it held
        return False
    return True


def train_specialist(
    generalist_uri: str,
    subset: Sequence[int],
    epoch_chunks: Callable[[int], Iterable[dict]],
    val_batches: Callable[[], Iterable[dict]],
    class_counts: Sequence[int],
    train_cfg: dict,
    out_uri: str,
    *,
    fingerprint: str = "",
    seed: int = 0,
    extra: Optional[dict] = None,
    report: Optional[Callable[[dict], None]] = None,
    device: Any = "cpu",
) -> dict:
    """Train the specialist for `subset` on the training core, save its checkpoint under `out_uri`,
    return its metrics. Nothing is loaded whole: data come as streams.

    Args:
        generalist_uri: checkpoint directory of the generalist (teacher stage).
        subset: the specialist's classes S (global indices, the order of its outputs).
        epoch_chunks: epoch -> the training split's rows in that pass's shuffled order, as chunks of
            torch tensors ("x", global labels "y"), e.g. a Ray Data stream of one pass.
        val_batches: () -> the val split's batches ("x", "y"), streamed again for each evaluation.
        class_counts: (C,) training samples per class (the dataset manifest has them): f and the
            epoch's length come from these.
        train_cfg: TrainConfig keys (epochs, batch_size, optimizer, lr, schedule, patience, jitter,
            max_norm, checkpoint_every_steps is not used: a specialist resumes per epoch).
        out_uri: checkpoint directory to write (local or s3://); resume state lives below it.
        fingerprint: identity of the inputs; stored in model.json and checked on resume.
        seed: seeds batches (per epoch) and dropout, so a resumed run repeats an uninterrupted one.
        extra: more JSON for model.json's `extra` (e.g. class names, specialist index).
        report: called after each epoch with that epoch's metrics (after resume state is saved).
        device: torch device.
    """
    t0 = time.perf_counter()
    started_at = time.time()
    subset = np.asarray(subset, dtype=np.int64)
    counts = np.asarray(class_counts, dtype=np.int64)
    model, g_meta = load_checkpoint(generalist_uri, map_location="cpu")
    num_classes = int(g_meta["num_classes"])
    mapper = DustbinMapper(subset, num_classes)
    n_in = int(counts[subset].sum())
    n_total = int(counts.sum())
    f = n_in / max(1, n_total)
    correction = dustbin_correction(f)
    spec, input_shape = g_meta["spec"], g_meta["input_shape"]

    gen_counts = TaskCounts(mapper, correction)
    _forward(model.to(device), val_batches(), device, gen_counts.add_generalist)
    generalist_task_error = gen_counts.error

    replace_head(model, mapper.num_outputs, init_rows=torch.from_numpy(subset))
    epochs = int(train_cfg.get("epochs", 1))
    batch_size = int(train_cfg.get("batch_size", 128))
    if 0 < n_in < batch_size // 2:
        # A subset with fewer training rows than half a batch (small datasets): one step per epoch
        # of every subset row plus as many rest rows, instead of a half that can never be filled.
        log(f"specialist subset {subset.tolist()}: {n_in} training rows < half of batch_size {batch_size}; "
            f"using batches of {2 * n_in}")
        batch_size = 2 * n_in
    steps = half_subset_steps(n_in, batch_size)
    tcfg = dict(train_cfg, checkpoint_every=1, checkpoint_every_steps=None)
    torch.manual_seed(int(seed))
    state = TrainState(model, tcfg, steps, epochs, device)
    resume_uri = storage.join(out_uri, RESUME_DIR)
    resumed_from = None
    if _load_resume(resume_uri, state, fingerprint):
        resumed_from = state.next_epoch
        started_at = float(state.meta.get("started_at", started_at))
    state.meta["fingerprint"] = fingerprint
    state.meta["started_at"] = started_at
    last = {}

    def batches():
        for e in range(state.next_epoch, epochs):
            g = torch.Generator().manual_seed(int(seed) * 100_003 + e)
            for b in half_subset_stream(epoch_chunks(e), subset, batch_size, steps, n_in, n_total - n_in, g,
                                        num_classes):
                yield e, b

    def evaluate(m):
        c = TaskCounts(mapper, correction)
        _forward(m, val_batches(), device, c.add)
        last["subset_error"] = c.subset_error
        return float(c.errors), float(c.n)

    def checkpoint(st, metrics):
        _save_resume(resume_uri, st, spec, input_shape, num_classes)

    def on_epoch(st, row):
        if report is not None:
            report({**row, "best_val_error": st.meta["best_val_error"], "best_epoch": st.meta["best_epoch"]})

    def evaluate_and_note(m):
        out = evaluate(m)
        # the history row is written after evaluate: note the subset error for it
        state.meta.setdefault("_subset_errors", {})[str(state.next_epoch)] = last["subset_error"]
        return out

    loss_fn = lambda out, batch: torch.nn.functional.cross_entropy(out, batch["y"])  # noqa: E731
    run_epochs(state, batches(), loss_fn, evaluate=evaluate_and_note, checkpoint=checkpoint,
               report=on_epoch, name=f"specialist {extra.get('index', '') if extra else ''}".strip(), seed=seed)

    model = state.model
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    model.eval()
    subset_errors = state.meta.get("_subset_errors", {})
    history = [dict(h, val_subset_error=subset_errors.get(str(h["epoch"]))) for h in state.meta["history"]]
    best_epoch = int(state.meta["best_epoch"])
    best = next((h for h in history if h["epoch"] == best_epoch), {})
    metrics = {
        "subset": subset.tolist(),
        "num_outputs": mapper.num_outputs,
        "f": f,
        "dustbin_correction": correction,
        "val_error": best.get("val_error"),
        "val_subset_error": best.get("val_subset_error"),
        "generalist_val_error": generalist_task_error,
        "best_epoch": best_epoch,
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
    save_checkpoint(out_uri, model.cpu(), spec, input_shape, num_classes, extra={
        **(extra or {}), "subset": subset.tolist(), "f": f, "dustbin_correction": correction,
        "fingerprint": fingerprint, "val_error": metrics["val_error"], "best_epoch": best_epoch,
    })
    storage.remove(resume_uri, recursive=True)
    return metrics
