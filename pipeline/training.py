"""The training-loop pieces every stage shares: optimizer, LR schedule, minibatches, one epoch, eval.

Teacher, specialists and student differ only in their data and their loss, so one loop serves all:
`train_one_epoch` takes `loss_fn(model_output, batch)` and a batch is a dict (`x`, optional `y`, and
any aligned extras such as cached teacher targets). Ray Train workers and Tune trials call these
functions inside their per-worker function; tests call them directly. Plain torch, no Ray.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models import apply_max_norm, jitter, prepare_inputs

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant", "onecycle")


def make_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """Optimizer from the `train:` config keys optimizer, lr, momentum, nesterov, weight_decay.

    Weight decay applies to weight matrices and conv kernels only; biases and BatchNorm scales are
    exempt (decaying them only shrinks the model's offsets and hurts, a standard choice).
    """
    name = cfg.get("optimizer", "adam")
    lr = float(cfg.get("lr", 1e-3))
    wd = float(cfg.get("weight_decay", 0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        momentum = float(cfg.get("momentum", 0.9))
        nesterov = bool(cfg.get("nesterov", False)) and momentum > 0
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise UserError(f"train.optimizer: {name!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: dict, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step LR schedule (call `.step()` after every optimizer step) from cfg["schedule"]:

    cosine    lr -> 0 along a half cosine over all steps;
    step      lr * gamma at each fraction of training in cfg["milestones"] (default 0.1 at 50 % and 75 %);
    constant  lr throughout;
    onecycle  warm up to lr over the first 30 % then anneal (torch's OneCycleLR; momentum cycles too).
    """
    name = cfg.get("schedule", "cosine")
    total = max(1, int(steps_per_epoch) * int(epochs))
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if name == "step":
        fractions = cfg.get("milestones") or [0.5, 0.75]
        milestones = sorted({max(1, int(round(f * total))) for f in fractions})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=float(cfg.get("gamma", 0.1)))
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total)
    raise UserError(f"train.schedule: {name!r} is not supported; choose one of {', '.join(SCHEDULES)}")


def _take(a: Any, idx: np.ndarray) -> Any:
    if isinstance(a, torch.Tensor):
        return a[torch.from_numpy(idx)]
    return a[idx]


def iterate_minibatches(
    x: Any,
    y: Any,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    extra: Optional[dict] = None,
    drop_last: bool = False,
) -> Iterator[dict]:
    """Yield dict batches {"x": (b, ...), "y": (b,) [if y is not None], **extra} from in-memory arrays.

    x, y and every array in `extra` (e.g. cached teacher targets) are numpy arrays or torch tensors with
    the same first dimension N; all are sliced with the same indices. With shuffle, the order is a
    permutation seeded by (seed, epoch): every epoch differs, and a resumed run sees the same order.
    """
    n = len(x)
    arrays = {"x": x}
    if y is not None:
        arrays["y"] = y
    arrays.update(extra or {})
    for k, a in arrays.items():
        if len(a) != n:
            raise ValueError(f"iterate_minibatches: {k!r} has {len(a)} rows but x has {n}")
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield {k: a[start : start + batch_size] for k, a in arrays.items()}
        else:
            idx = order[start : start + batch_size]
            yield {k: _take(a, idx) for k, a in arrays.items()}


def _to_device(v: Any, device: Any) -> Any:
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v) if v.flags.writeable else torch.from_numpy(v.copy())
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    return v


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, dict], torch.Tensor],
    scheduler: Optional[Any] = None,
    max_norm: Optional[float] = None,
    jitter_pixels: int = 0,
    device: Any = "cpu",
    log_every: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> dict:
    """One pass over `batches`; returns {"loss": mean per sample, "samples", "steps", "seconds", "lr"}.

    Each batch dict gets batch["x"] = prepare_inputs(x) on `device` (then jittered by up to
    `jitter_pixels`, with `generator` for reproducible shifts) and every other tensor moved to
    `device`; `loss_fn(model(batch["x"]), batch)` gives the scalar to minimise. After each optimizer
    step the max-norm constraint is applied (if set) and the scheduler stepped (per-step schedules).
    """
    model.train()
    t0 = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    steps = 0
    for batch in batches:
        batch = {k: _to_device(v, device) for k, v in batch.items()}
        x = prepare_inputs(batch["x"]).to(device, non_blocking=True)
        if jitter_pixels:
            x = jitter(x, jitter_pixels, generator)
        batch["x"] = x
        out = model(x)
        loss = loss_fn(out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if max_norm:
            apply_max_norm(model, max_norm)
        if scheduler is not None:
            scheduler.step()
        b = x.shape[0]
        # Accumulate on device: a .item() per step would force a host sync on GPUs.
        total += loss.detach().double() * b
        samples += b
        steps += 1
        if log_every and steps % log_every == 0:
            log.info("step %d loss %.4f lr %.3g", steps, float(loss), optimizer.param_groups[0]["lr"])
    mean = float(total) / samples if samples else math.nan
    return {
        "loss": mean,
        "samples": samples,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "lr": optimizer.param_groups[0]["lr"],
    }


def _batched_outputs(model: nn.Module, x: Any, batch_size: int, device: Any) -> Iterator[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = prepare_inputs(x[start : start + batch_size]).to(device, non_blocking=True)
                yield model(xb)
    finally:
        model.train(was_training)


def predict_logits(model: nn.Module, x: Any, batch_size: int = 1024, device: Any = "cpu") -> torch.Tensor:
    """(N, C) float32 CPU logits for inputs x (N, ...) numpy or torch; eval mode, no grad."""
    outs = [o.float().cpu() for o in _batched_outputs(model, x, batch_size, device)]
    if not outs:
        raise ValueError("predict_logits: no inputs")
    return torch.cat(outs)


def evaluate(model: nn.Module, x: Any, y: Any, batch_size: int = 1024, device: Any = "cpu") -> dict:
    """Top-1 error of `model` on (x, y): {"test_error": fraction, "test_errors": count, "n": N}.

    Only argmaxes are kept, so memory stays O(N) even for many classes.
    """
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().flatten()
    if len(y) != len(x):
        raise ValueError(f"evaluate: {len(x)} inputs but {len(y)} labels")
    preds = torch.cat([o.argmax(-1).cpu() for o in _batched_outputs(model, x, batch_size, device)])
    errors = int((preds != y).sum())
    n = len(y)
    return {"test_error": errors / n, "test_errors": errors, "n": n}


class EarlyStopping:
    """Stop when the validation error has not improved by more than `min_delta` for `patience` epochs.

    `step(val_error)` once per epoch returns True when training should stop; `improved` says whether
    this epoch is the new best (save a "best" checkpoint then). Its state is plain numbers, so it
    goes into a training checkpoint and a resumed run stops exactly where an uninterrupted one would.
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best = math.inf
        self.best_epoch = -1
        self.epoch = -1
        self.bad_epochs = 0
        self.improved = False

    def step(self, val_error: float) -> bool:
        self.epoch += 1
        val_error = float(val_error)
        self.improved = val_error < self.best - self.min_delta
        if self.improved:
            self.best, self.best_epoch, self.bad_epochs = val_error, self.epoch, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "epoch": self.epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.epoch = int(state["epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.improved = False
