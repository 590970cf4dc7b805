"""The one training core every stage shares (docs/training.md): optimizer, LR schedule, early
stopping, `TrainState` (everything a run resumes from), `epoch_minibatches` (exact steps per epoch
cut from a stream), `train_step`, `run_epochs` (the loop) and `evaluate_batches`.

Teacher, specialists, the three students and Tune trials differ only in their data and their loss:
`run_epochs` takes `loss_fn(model_output, batch)`, and a batch is a dict (`x`, optional `y`, and any
aligned extras such as cached teacher targets). Ray Train workers and Tune trials call it inside
their per-worker function; tests call it directly on in-memory streams. Plain torch, no Ray.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models import apply_max_norm, jitter, prepare_inputs

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


# =================================================================================================
# The training core: one state object and one epoch loop for teacher, specialists and students
# (docs/architecture.md, "Training core"). Plain torch: the launchers (Ray Train workers, Tune
# trials, specialist trials) hand it a stream of minibatches and callbacks for evaluation,
# all-reduce and checkpointing.
# =================================================================================================

STATE_FILE = "trainer.pt"
META_FILE = "trainer.json"


def autocast_dtype(precision: str, device: Any) -> Optional[torch.dtype]:
    """bf16 under `precision` "bf16", or "auto" on a GPU; None (fp32) otherwise."""
    dev = torch.device(device)
    if precision == "bf16" or (precision == "auto" and dev.type == "cuda"):
        return torch.bfloat16
    return None


def _uses_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def setup_device(model: nn.Module, device: Any) -> nn.Module:
    """Move `model` to `device`; on a GPU conv nets go channels_last and matmuls may use TF32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if _uses_conv(model):
            return model.to(dev, memory_format=torch.channels_last)
    return model.to(dev)


class TrainState:
    """Everything a run needs to continue where it stopped.

    model, optimizer, LR scheduler and early stopping, the best val epoch's weights (kept on the
    CPU), and `meta`: the position (`epoch` = last finished epoch, -1 before the first; `step` =
    optimizer steps already done inside epoch `epoch + 1`), per-epoch history, the epochs/steps at
    which runs (re)started, best epoch and val error, done. The optimizer is built after the model
    is on its device, and its saved state is loaded after that too: torch then puts every state
    tensor on its parameter's device (a resume on a GPU node used to crash on mixed devices).
    """

    def __init__(self, model: nn.Module, tcfg: dict, steps_per_epoch: int, epochs: int, device: Any = "cpu"):
        self.device = torch.device(device)
        self.model = setup_device(model, self.device)
        self.tcfg = dict(tcfg)
        self.epochs = int(epochs)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.optimizer = make_optimizer(self.model, self.tcfg)
        self.scheduler = make_scheduler(self.optimizer, self.tcfg, self.steps_per_epoch, self.epochs)
        patience = self.tcfg.get("patience")
        self.stopper = EarlyStopping(int(patience)) if patience else None
        self.best_state: Optional[dict] = None
        self.rng: Optional[dict] = None  # generator states of a mid-epoch checkpoint
        self.jitter_gen: Optional[torch.Generator] = None
        self.meta: dict = {"epoch": -1, "step": 0, "history": [], "starts": [], "done": False,
                           "best_epoch": -1, "best_val_error": None, "steps_per_epoch": self.steps_per_epoch}

    # -- position ---------------------------------------------------------------------------------

    @property
    def next_epoch(self) -> int:
        return int(self.meta["epoch"]) + 1

    @property
    def finished(self) -> bool:
        return bool(self.meta.get("done")) or self.next_epoch >= self.epochs

    # -- save / load ------------------------------------------------------------------------------

    def trainer_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        rng = {"torch": torch.get_rng_state()}
        if self.jitter_gen is not None:
            rng["jitter"] = self.jitter_gen.get_state()
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": rng}, buf)
        return buf.getvalue()

    def save(self, folder: str, spec: Optional[dict], input_shape: Sequence[int], num_classes: int,
             extra: Optional[dict] = None) -> None:
        """A local folder: model.pt/.json (loadable with `models.load_checkpoint`), best/ (the best
        val epoch's weights), trainer.pt (optimizer and schedule state, tensors only) and trainer.json."""
        import json
        import os

        from pipeline import models

        last_val = self.meta["history"][-1]["val_error"] if self.meta["history"] else None
        models.save_checkpoint(folder, self.model, spec, input_shape, num_classes,
                               extra={"epoch": self.meta["epoch"], "val_error": last_val, **(extra or {})})
        if self.best_state is not None:
            models.save_checkpoint(os.path.join(folder, "best"), self.model, spec, input_shape, num_classes,
                                   extra={"epoch": self.meta["best_epoch"], "val_error": self.meta["best_val_error"],
                                          **(extra or {})}, state=self.best_state)
        with open(os.path.join(folder, STATE_FILE), "wb") as f:
            f.write(self.trainer_bytes())
        meta = dict(self.meta)
        if self.stopper is not None:
            meta["early_stopping"] = self.stopper.state_dict()
        with open(os.path.join(folder, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)

    def load(self, folder: str) -> None:
        """Restore from a folder written by `save` (weights_only loads: tensors and plain data only)."""
        import json
        import os

        from pipeline import models

        with open(os.path.join(folder, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        meta.setdefault("step", 0)
        state = torch.load(os.path.join(folder, models.WEIGHTS_FILE), map_location="cpu", weights_only=True)
        models.unwrap_model(self.model).load_state_dict(state)
        best_file = os.path.join(folder, "best", models.WEIGHTS_FILE)
        if os.path.exists(best_file):
            self.best_state = torch.load(best_file, map_location="cpu", weights_only=True)
        elif meta.get("best_epoch", -1) == meta["epoch"] and meta["epoch"] >= 0:
            self.best_state = {k: v.clone() for k, v in state.items()}
        tstate = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        # The model is on its device already: load_state_dict moves each state tensor to its parameter's.
        self.optimizer.load_state_dict(tstate["optimizer"])
        self.scheduler.load_state_dict(tstate["scheduler"])
        rng = tstate.get("rng") or {}
        self.rng = rng if "torch" in rng and "jitter" in rng else None
        if self.stopper is not None and meta.get("early_stopping"):
            self.stopper.load_state_dict(meta["early_stopping"])
        self.meta = meta

    def optimizer_devices_ok(self) -> bool:
        """Every optimizer-state tensor lives on its parameter's device (checked by tests and gpu_check)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for v in self.optimizer.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.device != p.device:
                        return False
        return True


def epoch_minibatches(chunks: Iterable[dict], batch_size: int, steps_per_epoch: int, start_epoch: int,
                      skip_steps: int = 0, seed: int = 0, rank: int = 0,
                      window: int = 8192, prepare: Optional[Callable[[dict], dict]] = None,
                      ) -> Iterator[tuple[int, dict]]:
    """(epoch, minibatch) pairs cut from a stream of chunks (Ray Data batches with an `epoch`
    column, e.g. from `pipeline.datasets.training_stream`).

    Each epoch gives exactly `steps_per_epoch` minibatches of `batch_size` rows (every data-parallel
    rank the same count); rows of an epoch left over after that are dropped. Rows are shuffled in
    windows of `window` rows counted from the epoch's first row (seeded by seed, epoch, rank and
    window), so the minibatches depend only on the epoch's row order, never on where chunk
    boundaries fall: a stream restarted at `start_epoch` gives the same minibatches as the
    uninterrupted one. Rows of epochs before `start_epoch` are skipped (a worker group restarted
    inside one fit) and the first `skip_steps` minibatches of `start_epoch` are cut but not yielded
    (a mid-epoch resume). Memory: one window plus one chunk.

    prepare(chunk) -> chunk, row-wise, is applied once to every chunk that is used (the cached KD
    loss's `prepare_chunk`: teacher targets prepared per chunk on the device, not per step). Each
    window is gathered once in its shuffled order and split into minibatch views in one call per
    column.
    """
    bs = int(batch_size)
    W = max(int(window), bs)
    st = {"cur": int(start_epoch), "buf": None, "carry": None, "k": 0, "done": 0, "skip": int(skip_steps)}

    def cat(a, b):
        return b if a is None else {k: torch.cat([a[k], b[k]]) for k in b}

    def flush(rows):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + st["cur"] * 7919 + int(rank) * 131 + st["k"])
        st["k"] += 1
        n = len(rows["epoch"])
        perm = torch.randperm(n, generator=g).to(rows["epoch"].device)
        rows = cat(st["carry"], {k: v[perm] for k, v in rows.items()})
        n = len(rows["epoch"])
        take = min(n // bs, steps_per_epoch - st["done"])
        skip = min(st["skip"], take)
        st["skip"] -= skip
        st["done"] += skip
        keys = list(rows)
        parts = [rows[k][skip * bs:take * bs].split(bs) for k in keys]
        s = take * bs
        for i in range(take - skip):
            st["done"] += 1
            yield st["cur"], {k: p[i] for k, p in zip(keys, parts)}
        st["carry"] = {k: v[s:] for k, v in rows.items()} if s < n and st["done"] < steps_per_epoch else None

    def end_epoch():
        if st["buf"] is not None and len(st["buf"]["epoch"]):
            yield from flush(st["buf"])
        if st["done"] < steps_per_epoch:
            raise RuntimeError(f"epoch {st['cur']} ran out of rows after {st['done']} of {steps_per_epoch} "
                               f"steps of {bs}")

    for chunk in chunks:
        ep = chunk["epoch"]
        lo, hi = int(ep.min()), int(ep.max())
        if hi < st["cur"]:
            continue
        if prepare is not None:
            chunk = prepare(chunk)
            ep = chunk["epoch"]
        for e in range(lo, hi + 1):
            if e < st["cur"]:
                continue
            part = chunk if lo == hi else {k: v[ep == e] for k, v in chunk.items()}
            if not len(part["epoch"]):
                continue
            if e > st["cur"] + 1 and st["cur"] >= int(start_epoch) and st["done"] < steps_per_epoch:
                raise RuntimeError(f"rows of epoch {e} arrived while epoch {st['cur']} was incomplete: the stream "
                                   "is not in order (its execution options need preserve_order)")
            if e > st["cur"]:
                yield from end_epoch()
                st.update(cur=e, buf=None, carry=None, k=0, done=0)
            if st["done"] >= steps_per_epoch:
                continue
            buf = cat(st["buf"], part)
            while len(buf["epoch"]) >= W and st["done"] < steps_per_epoch:
                head = {k: v[:W] for k, v in buf.items()}
                buf = {k: v[W:] for k, v in buf.items()}
                yield from flush(head)
            st["buf"] = buf
    if st["done"] < steps_per_epoch:
        yield from end_epoch()


def train_step(model: nn.Module, batch: dict, state: "TrainState", loss_fn: Callable, *,
               jitter_pixels: int = 0, generator: Optional[torch.Generator] = None,
               amp_dtype: Optional[torch.dtype] = None, prepare: Optional[Callable] = None) -> torch.Tensor:
    """One optimizer step on `batch` (tensors already on the device); returns the detached loss.

    Inputs are converted on the device (uint8 -> float in `prepare_inputs`, or `prepare(x)`), then
    jittered (the paper's MNIST augmentation), under bf16 autocast when `amp_dtype` is set; the loss
    is computed in float32 from the logits."""
    x = batch["x"]
    x = prepare(x) if prepare is not None else prepare_inputs(x)
    if x.dim() == 4 and state.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    if jitter_pixels:
        x = jitter(x, jitter_pixels, generator)
    batch = dict(batch, x=x)
    if amp_dtype is not None:
        with torch.autocast(device_type=state.device.type, dtype=amp_dtype):
            out = model(x)
        out = out.float()
    else:
        out = model(x)
    loss = loss_fn(out, batch)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    if state.tcfg.get("max_norm"):
        apply_max_norm(model, state.tcfg["max_norm"])
    state.scheduler.step()
    return loss.detach()


def run_epochs(state: TrainState, batches: Iterator[tuple[int, dict]], loss_fn: Callable, *,
               evaluate: Optional[Callable[[nn.Module], tuple[float, float]]] = None,
               reduce: Callable[[list[float]], list[float]] = lambda v: v,
               checkpoint: Optional[Callable[[TrainState, dict], None]] = None,
               report: Optional[Callable[[TrainState, dict], None]] = None,
               log: Optional[Callable[[str], None]] = None, name: str = "train", seed: int = 0, rank: int = 0,
               prepare: Optional[Callable] = None, should_stop_now: Optional[Callable[[TrainState], bool]] = None,
               ) -> TrainState:
    """Train from `state`'s position to the end (or early stop), consuming `batches`
    (`epoch_minibatches` of a stream that starts at `state.next_epoch`).

    evaluate(model) -> (errors, n) on this rank's val share (summed over ranks by `reduce`); each
    epoch's best weights go to `state.best_state`. checkpoint(state, metrics) is called every
    `checkpoint_every` epochs, at the end, and every `checkpoint_every_steps` steps inside an epoch
    (metrics then has "step"); report(state, row) after every epoch, after its checkpoint. Every rank must call this with
    the same number of steps (DDP all-reduces each), which `epoch_minibatches` guarantees.
    """
    from pipeline import models

    tcfg = state.tcfg
    every = int(tcfg.get("checkpoint_every") or 1)
    every_steps = int(tcfg.get("checkpoint_every_steps") or 0)
    jitter_px = int(tcfg.get("jitter") or 0)
    amp = autocast_dtype(str(tcfg.get("precision") or "auto"), state.device)
    model = state.model
    steps = state.steps_per_epoch
    if state.finished:
        return state
    state.meta["starts"].append(state.next_epoch if not state.meta.get("step") else
                                [state.next_epoch, int(state.meta["step"])])
    it = iter(batches)
    while not state.finished:
        epoch = state.next_epoch
        t0 = time.perf_counter()
        model.train()
        # Seeded per (epoch, rank): a resumed run draws the dropout masks and shifts it would have;
        # a mid-epoch resume restores the generators' states saved with the step checkpoint.
        gen = torch.Generator()
        if state.meta.get("step") and state.rng is not None:
            torch.set_rng_state(state.rng["torch"])
            gen.set_state(state.rng["jitter"])
        else:
            torch.manual_seed(int(seed) * 1_000_003 + epoch * 1009 + int(rank))
            gen.manual_seed(int(seed) * 7919 + epoch * 131 + int(rank))
        state.jitter_gen = gen
        step = int(state.meta.get("step") or 0)
        partial = state.meta.get("partial") if step else None  # the interrupted epoch's running loss
        total = torch.full((), float(partial["loss_sum"]) if partial else 0.0, dtype=torch.float64,
                           device=state.device)
        samples = int(partial["samples"]) if partial else 0
        last_log = t0
        while step < steps:
            try:
                e, batch = next(it)
            except StopIteration:
                raise RuntimeError(f"[{name}] the data stream ended at epoch {epoch + 1} step {step}") from None
            if e != epoch:
                raise RuntimeError(f"[{name}] expected a batch of epoch {epoch}, got epoch {e}")
            loss = train_step(model, batch, state, loss_fn, jitter_pixels=jitter_px, generator=gen,
                              amp_dtype=amp, prepare=prepare)
            b = len(batch["x"])
            total.add_(loss, alpha=b)  # in float64 on the device: no host sync per step
            samples += b
            step += 1
            state.meta["step"] = step
            if log is not None and rank == 0 and time.perf_counter() - last_log >= 30.0:
                rate = step / (time.perf_counter() - t0)
                log(f"[{name}] epoch {epoch + 1}/{state.epochs} step {step}/{steps} "
                    f"({rate:.1f} steps/s, ~{(steps - step) / max(rate, 1e-9):.0f}s left)")
                last_log = time.perf_counter()
            if every_steps and step % every_steps == 0 and step < steps and checkpoint is not None:
                state.meta["partial"] = {"loss_sum": float(total), "samples": samples}
                checkpoint(state, {"epoch": epoch, "step": step, "train_loss": float(total) / max(samples, 1),
                                   "val_error": _score(state), "done": False})
            if should_stop_now is not None and should_stop_now(state):
                return state
        # -- end of epoch -----------------------------------------------------------------------
        train_seconds = time.perf_counter() - t0  # the steps (data waits included), not the val pass
        local_err, local_n = evaluate(models.unwrap_model(model)) if evaluate is not None else (0.0, 0.0)
        loss_sum, n_samples, errs, nval = reduce([float(total), float(samples), float(local_err), float(local_n)])
        train_loss = loss_sum / max(n_samples, 1.0)
        val_error = errs / nval if nval else float("nan")
        seconds = time.perf_counter() - t0
        stop = False
        if state.stopper is not None and nval:
            stop = state.stopper.step(val_error)
        improved = bool(nval) and (state.meta["best_val_error"] is None or val_error < state.meta["best_val_error"])
        if improved:
            state.meta["best_val_error"], state.meta["best_epoch"] = val_error, epoch
            state.best_state = {k: v.detach().to("cpu", copy=True)
                                for k, v in models.unwrap_model(model).state_dict().items()}
        state.meta["epoch"] = epoch
        state.meta["step"] = 0
        state.meta.pop("partial", None)
        row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_error": round(val_error, 6) if nval else None,
               "seconds": round(seconds, 3), "lr": state.optimizer.param_groups[0]["lr"],
               "samples_per_s": round(n_samples / max(seconds, 1e-9), 1),
               "train_seconds": round(train_seconds, 4),
               "train_samples_per_s": round(n_samples / max(train_seconds, 1e-9), 1)}
        state.meta["history"].append(row)
        state.meta["done"] = stop or epoch + 1 >= state.epochs
        if checkpoint is not None and (state.meta["done"] or (epoch + 1) % every == 0):
            checkpoint(state, {"epoch": epoch, "train_loss": train_loss, "val_error": _score(state),
                               "done": state.meta["done"]})
        if report is not None:  # after the checkpoint: a report that fails loses no finished epoch
            report(state, row)
        if log is not None and rank == 0:
            log(f"[{name}] epoch {epoch + 1}/{state.epochs} train_loss {train_loss:.4f} "
                f"val_error {val_error:.4f} ({seconds:.1f}s)" + ("  early stop" if stop else ""))
    return state


def _score(state: TrainState) -> float:
    """What checkpoints are ranked by: the best val error so far (the checkpoint carries the best
    weights), or minus the epoch when there is no val split (the latest ranks best)."""
    best = state.meta.get("best_val_error")
    return float(best) if best is not None else float(-state.meta["epoch"] - 1)


def evaluate_batches(model: nn.Module, batches: Iterable[dict], device: Any = "cpu",
                     prepare: Optional[Callable] = None, amp_dtype: Optional[torch.dtype] = None) -> tuple[int, int]:
    """(top-1 errors, samples) of `model` over streamed batches with "x" and "y"."""
    was = model.training
    model.eval()
    errors = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch["x"].to(device, non_blocking=True)
                x = prepare(x) if prepare is not None else prepare_inputs(x)
                if amp_dtype is not None:
                    with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype):
                        out = model(x)
                else:
                    out = model(x)
                y = batch["y"].to(device, non_blocking=True)
                errors += (out.argmax(-1) != y).sum()
                n += len(y)
    finally:
        model.train(was)
    return int(errors), n
