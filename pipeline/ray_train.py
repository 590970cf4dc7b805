"""Data-parallel training on Ray Train (v2): the launcher and the per-worker loop that teacher and
student share.

`fit` builds the `TorchTrainer` from the config's scaling fields and points Ray Train's storage at
the stage folder (local path or `s3://`), so every epoch's checkpoint lives next to the stage's
other files. `train_loop` is the function each worker runs: ordinary PyTorch around
`pipeline.training`; its only Ray calls are `get_context`, `get_checkpoint`, `prepare_model` and
`report`. Teacher and student differ only in what they read and what they minimise, which the loop
takes as two optional callables in its config (`load_train`, `make_loss`).

Fault tolerance comes from Ray Train itself, as verified on Ray 2.60 with Train v2:
- every `ray.train.report(..., checkpoint=...)` is registered by the controller, which then writes
  `checkpoint_manager_snapshot.json` into `{storage}/{name}/`;
- when a worker dies, `FailureConfig(max_failures)` restarts the whole worker group and
  `ray.train.get_checkpoint()` in the new workers returns the latest registered checkpoint;
- a new `TorchTrainer.fit()` with the same `RunConfig(name, storage_path)` loads that snapshot, so
  `get_checkpoint()` again returns the latest checkpoint: an interrupted stage rerun resumes.
The run name therefore carries the stage fingerprint: a rerun with the same config resumes, a
changed config starts a fresh run instead of resuming someone else's weights.

Checkpoint folder (written by rank 0 every `checkpoint_every` epochs and at the end):
    model.pt, model.json   `pipeline.models.save_checkpoint`, loadable with `load_checkpoint`
    best/model.pt, .json   the weights of the best val epoch so far (kept in memory between
                           checkpoints, so an improving epoch costs no Ray Train report)
    trainer.pt             optimizer and LR-scheduler state (tensors only, `weights_only=True`)
    trainer.json           epoch, early-stopping state, per-epoch history, epochs where runs started
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from pipeline import storage
from pipeline.errors import UserError

TRAINER_STATE = "trainer.pt"
TRAINER_META = "trainer.json"
BEST_DIR = "best"
SCORE = "val_error"

# Fault injection for the reliability tests (and for anyone who wants to see recovery work):
# JSON such as {"stop_after_epoch": 2, "epoch_sleep": 1.0}; read by the driver in `fit` only.
FAULT_ENV = "DISTILL_FAULT_INJECT"


class TrainingFailed(RuntimeError):
    """Ray Train gave up (worker errors beyond `max_failures`); exit code 1, not a user error."""


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------

def scaling_config(scaling: Any):
    """`ScalingConfig` from a `ScalingFields`-like object (num_workers, use_gpu, cpus_per_worker).

    Train v2's controller actor reserves no CPU (and `trainer_resources` is deprecated), so on a
    2-CPU laptop two 1-CPU workers fit.
    """
    from ray.train import ScalingConfig

    resources = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        resources["GPU"] = 1.0
    return ScalingConfig(num_workers=int(scaling.num_workers), use_gpu=bool(scaling.use_gpu),
                         resources_per_worker=resources)


def check_resources(scaling: Any, where: str) -> None:
    """UserError when a local Ray can never hold the worker group (instead of waiting forever).

    Only for a Ray this process started: a cluster joined by address may autoscale to fit.
    """
    import ray

    node = ray._private.worker._global_node
    if node is None or not getattr(node, "head", False):  # joined an existing cluster
        return

    total = ray.cluster_resources()
    need_cpu = float(scaling.cpus_per_worker) * int(scaling.num_workers)
    have_cpu = float(total.get("CPU", 0))
    problems = []
    if need_cpu > have_cpu:
        problems.append(f"{scaling.num_workers} workers x {scaling.cpus_per_worker} CPU = {need_cpu:g} CPUs "
                        f"but the Ray cluster has {have_cpu:g}; lower {where}.num_workers or "
                        f"{where}.cpus_per_worker (or raise ray.num_cpus)")
    if scaling.use_gpu and int(scaling.num_workers) > float(total.get("GPU", 0)):
        problems.append(f"{where}.use_gpu is true with {scaling.num_workers} workers but the Ray cluster has "
                        f"{total.get('GPU', 0):g} GPUs; set {where}.use_gpu=false or add GPU nodes")
    if problems:
        raise UserError("; ".join(problems))


def worker_uri(uri: str) -> str:
    """`uri` as a worker must see it: Ray Train workers run in their own working directory, so a
    relative local path is made absolute (remote URIs are unchanged)."""
    return uri if storage.is_remote(uri) else storage.get_fs(uri)[1]


def fault_injection() -> dict:
    raw = os.environ.get(FAULT_ENV, "")
    if not raw:
        return {}
    try:
        hooks = json.loads(raw)
    except ValueError:
        raise UserError(f"{FAULT_ENV}={raw!r} is not JSON; e.g. '{{\"stop_after_epoch\": 2}}'") from None
    if not isinstance(hooks, dict):
        raise UserError(f"{FAULT_ENV} must be a JSON object")
    return hooks


def fit(train_fn: Callable[[dict], None], loop_config: dict, scaling: Any, storage_uri: str, name: str,
        max_failures: int, keep: int = 1):
    """Run `train_fn` on a data-parallel worker group; returns Ray Train's `Result`.

    scaling: object with num_workers, use_gpu, cpus_per_worker (a `ScalingFields` config section).
    storage_uri: folder (local or s3://) that holds the run `name`; rerunning with the same name
        resumes from its latest checkpoint.
    max_failures: worker-group restarts from the latest checkpoint (-1: unlimited).
    keep: checkpoints kept besides the latest, ranked by lowest `val_error` (the best model survives
        however long the run).
    Raises TrainingFailed when Ray Train gives up.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    fs, path = storage.pyarrow_fs(storage_uri)
    if not storage.is_remote(storage_uri):
        os.makedirs(path, exist_ok=True)
    check_latest_checkpoint(storage_uri, name)
    config = dict(loop_config)
    hooks = fault_injection()
    if hooks:
        config["_fault"] = hooks
    run_config = RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=int(max_failures)),
        checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=SCORE,
                                           checkpoint_score_order="min"),
        # Ray Train's per-report INFO lines drown the loop's own progress lines.
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    trainer = TorchTrainer(train_fn, train_loop_config=config, scaling_config=scaling_config(scaling),
                           run_config=run_config)
    # Train v2 (2.60) installs a SIGINT handler for the rest of the process that aborts the run and
    # lets fit() end as a failure (exit 1, no message). Keep Python's: Ctrl-C raises
    # KeyboardInterrupt here and the CLI reports "interrupted" (exit 130) and shuts Ray down.
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = lambda controller: None
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingFailed(f"Ray Train run '{name}' failed after {max_failures} restart(s) allowed: {e}") from e


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's record of the run's checkpoints


def check_latest_checkpoint(storage_uri: str, name: str) -> None:
    """UserError naming the file when the checkpoint a resumed run would start from cannot be
    loaded. Otherwise every worker group restart fails on it the same way, `max_failures` times,
    and Ray Train's final error names neither the file nor the fix."""
    import torch

    from pipeline import models

    run = storage.join(storage_uri, name)
    snap_uri = storage.join(run, SNAPSHOT)
    fix = (f"delete {run} to train this stage from scratch (or rerun the stage with --force, which "
           "does that)")
    try:
        raw = storage.read_bytes(snap_uri)
    except FileNotFoundError:
        return  # a fresh run
    try:
        latest = json.loads(raw.decode("utf-8")).get("latest_checkpoint_result") or {}
        dir_name = latest.get("checkpoint_dir_name")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{snap_uri}: Ray Train's checkpoint record of this stage is damaged (not JSON); "
                        f"{fix}") from None
    if not dir_name:
        return
    folder = storage.join(run, dir_name)
    for fname in (models.WEIGHTS_FILE, TRAINER_STATE, TRAINER_META):
        uri = storage.join(folder, fname)
        try:
            data = storage.read_bytes(uri)
            if fname.endswith(".json"):
                meta = json.loads(data.decode("utf-8"))
                int(meta["epoch"])
            else:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"{uri}: missing from the latest checkpoint of this stage, which a rerun "
                            f"resumes from; {fix}") from None
        except Exception as e:  # noqa: BLE001 - whatever torch/json make of damaged bytes
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"{uri}: the latest checkpoint of this stage cannot be loaded ({why}), so "
                            f"resuming from it would fail on every retry; {fix}") from None


def _trainer_meta_in(folder: str) -> dict:
    with open(os.path.join(folder, TRAINER_META), encoding="utf-8") as f:
        return json.load(f)


def read_trainer_meta(checkpoint) -> dict:
    """`trainer.json` of a Ray Train checkpoint (epoch, history, starts, best...)."""
    with checkpoint.as_directory() as d:
        return _trainer_meta_in(d)


class _Subfolder:
    """A folder inside a Ray Train checkpoint, opened like a checkpoint (`as_directory`)."""

    def __init__(self, checkpoint, sub: str):
        self.checkpoint, self.sub = checkpoint, sub

    @contextlib.contextmanager
    def as_directory(self):
        with self.checkpoint.as_directory() as d:
            yield os.path.join(d, self.sub)


def best_and_last(result) -> tuple[Any, dict, Any, dict]:
    """(best model, {"epoch", "val_error"} of it, latest checkpoint, its trainer.json) of a finished
    run. The best model is opened with `.as_directory()` like a checkpoint: the latest checkpoint's
    `best/` folder, or for runs without one (no val split, or checkpoints of an older version) the
    best-scoring checkpoint Ray Train kept."""
    last = result.checkpoint
    if last is None:
        raise TrainingFailed(f"Ray Train run at {result.path} finished without any checkpoint")
    from pipeline import models

    with last.as_directory() as d:  # one download of a remote checkpoint for both
        last_meta = _trainer_meta_in(d)
        carried = os.path.exists(os.path.join(d, BEST_DIR, models.META_FILE))
    if carried:
        epoch = int(last_meta["best_epoch"])
        val = next(e["val_error"] for e in last_meta["history"] if e["epoch"] == epoch)  # as recorded
        return _Subfolder(last, BEST_DIR), {"epoch": epoch, "val_error": val}, last, last_meta
    best = result.get_best_checkpoint(SCORE, "min") if result.best_checkpoints else None
    best_meta = read_trainer_meta(best) if best is not None else last_meta
    return (best if best is not None else last,
            {"epoch": int(best_meta["epoch"]), "val_error": best_meta["history"][-1]["val_error"]}, last, last_meta)


def remove_other_runs(storage_uri: str, keep_name: str, prefix: str) -> None:
    """Delete Ray Train run folders of earlier configs (`{prefix}*` other than `keep_name`)."""
    for entry in storage.listdir(storage_uri):
        if entry.startswith(prefix) and entry != keep_name:
            storage.remove(storage.join(storage_uri, entry), recursive=True)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------

def _progress(msg: str) -> None:
    # Ray forwards worker stderr to the driver's terminal, prefixed with the worker's name. Not
    # print(): Train v2 patches it into a logger *and* the stream, so each line would show twice.
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _quiet_ray_train_worker_logs() -> None:
    # Train v2 logs "Reporting training result ..." at INFO for every report of every rank, through a
    # logger named after its file, which `LoggingConfig(log_level)` does not reach (it filters
    # "ray.train.*" names only). Raise that one logger to WARNING so our progress lines stay readable.
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # a future Ray without this module: nothing to quiet
        pass


def worker_shard_indices(num_shards: int, rank: int, world_size: int, allow_empty: bool = False) -> list[int]:
    """Indices of the shards worker `rank` reads (`pipeline.data.readers.shards_for_worker`).

    allow_empty: for evaluation splits, fewer shards than workers is fine (a worker with none
    contributes nothing to the all-reduced counts); for training it is a UserError.
    """
    from pipeline.data import readers

    if allow_empty and num_shards < world_size:
        return list(range(num_shards))[rank::world_size]
    return list(readers.shards_for_worker(list(range(num_shards)), rank, world_size))


def load_worker_split(data_uri: str, split: str, rank: int, world_size: int,
                      allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """This worker's shards of `split`, decoded whole into memory: (x, y)."""
    from pipeline.data import shards

    entries = shards.split_entries(data_uri, split)
    mine = worker_shard_indices(len(entries), rank, world_size, allow_empty)
    x, y, _keys = shards.load_split(data_uri, split, shard_indices=mine)
    return x, y


def default_load_train(config: dict, rank: int, world_size: int) -> dict:
    x, y = load_worker_split(config["data_uri"], config.get("train_split", "train"), rank, world_size)
    return {"x": x, "y": y}


def default_load_val(config: dict, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    return load_worker_split(config["data_uri"], config.get("val_split", "val"), rank, world_size, allow_empty=True)


def cross_entropy_loss(config: dict):
    import torch.nn.functional as F

    def loss_fn(out, batch):
        return F.cross_entropy(out, batch["y"])

    return loss_fn


def _rank_batches(arrays: dict, local_bs: int, steps: int, seed: int, epoch: int, rank: int):
    """`steps` minibatches of `local_bs` rows drawn from this rank's arrays without replacement,
    reshuffling when they run out. Every rank takes the same number of steps (DDP all-reduces each
    one) even when its shards hold fewer samples than another rank's."""
    n = len(arrays["x"])
    rng = np.random.default_rng([int(seed), int(epoch), int(rank)])
    need = steps * local_bs
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    for s in range(steps):
        idx = order[s * local_bs:(s + 1) * local_bs]
        yield {k: a[idx] for k, a in arrays.items()}


def _with_progress(batches, label: str, steps: int, every_s: float = 30.0):
    """Pass batches through; every `every_s` seconds say how far into the epoch we are (long epochs
    on CPU would otherwise look hung)."""
    t0 = last = time.perf_counter()
    for i, batch in enumerate(batches):
        now = time.perf_counter()
        if now - last >= every_s:
            rate = i / (now - t0)
            _progress(f"{label} step {i}/{steps} ({rate:.1f} steps/s, ~{(steps - i) / max(rate, 1e-9):.0f}s left)")
            last = now
        yield batch


def _all_reduce(values: list[float], device: Any = "cpu") -> list[float]:
    """Element-wise sum over all workers (on `device`: NCCL only reduces GPU tensors)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _save_state(folder: str, model, spec, input_shape, num_classes, optimizer, scheduler, meta: dict,
                best_state: dict | None = None) -> None:
    import torch

    from pipeline import models

    models.save_checkpoint(folder, model, spec, input_shape, num_classes,
                           extra={"epoch": meta["epoch"], "val_error": meta["history"][-1]["val_error"]})
    if best_state is not None:
        models.save_checkpoint(os.path.join(folder, BEST_DIR), model, spec, input_shape, num_classes,
                               extra={"epoch": meta["best_epoch"], "val_error": meta["best_val_error"]},
                               state=best_state)
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buf)
    with open(os.path.join(folder, TRAINER_STATE), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(folder, TRAINER_META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def train_loop(config: dict) -> None:
    """Per-worker function of `fit`: supervised (or, via `make_loss`, distillation) training.

    config keys:
      name            label of the progress lines ("teacher")
      data_uri        dataset folder; train/val shards are split between workers by world rank
      model, input_shape, num_classes   what `pipeline.models.build_model` takes
      train           TrainConfig dict: epochs, batch_size (global), optimizer, lr, schedule,
                      weight_decay, momentum, nesterov, max_norm, jitter, patience, checkpoint_every
      seed            seeds init, shuffling, dropout and jitter (per epoch and rank, so resumes repeat)
      load_train      optional callable(config, rank, world_size) -> {"x", "y", ...aligned extras}
      load_val        optional callable(config, rank, world_size) -> (x, y)
      make_loss       optional callable(config) -> loss_fn(logits, batch); default cross-entropy
      eval_batch_size optional, default 1024
    """
    import ray.train
    import ray.train.torch
    import torch

    from pipeline import models, training

    _quiet_ray_train_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    name = config.get("name", "train")
    tcfg = dict(config["train"])
    epochs = int(tcfg["epochs"])
    seed = int(config.get("seed", 0))
    fault = config.get("_fault") or {}
    device = ray.train.torch.get_device()

    train_arrays = (config.get("load_train") or default_load_train)(config, rank, world)
    x_val, y_val = (config.get("load_val") or default_load_val)(config, rank, world)
    n_local = len(train_arrays["x"])
    if n_local == 0:
        raise RuntimeError(f"{name}: worker {rank} of {world} got no training samples; "
                           "use fewer workers or smaller shards")
    n_total, _ = _all_reduce([float(n_local), 0.0], device)
    local_bs = max(1, int(tcfg["batch_size"]) // world)
    steps = max(1, math.ceil(n_total / (local_bs * world)))

    torch.manual_seed(seed)
    spec = config["model"]
    model = models.build_model(spec, config["input_shape"], config["num_classes"])
    optimizer = training.make_optimizer(model, tcfg)
    scheduler = training.make_scheduler(optimizer, tcfg, steps, epochs)
    stopper = training.EarlyStopping(int(tcfg["patience"])) if tcfg.get("patience") else None
    meta: dict = {"epoch": -1, "history": [], "starts": [], "done": False, "best_epoch": -1,
                  "best_val_error": None, "steps_per_epoch": steps, "world_size": world}

    # The best val epoch's weights, kept on rank 0 between checkpoints and written into each one
    # (`best/`), so an improving epoch costs a CPU copy instead of a Ray Train report.
    best_state: dict | None = None
    carry_best = True
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = _trainer_meta_in(d)
            state = torch.load(os.path.join(d, models.WEIGHTS_FILE), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            best_file = os.path.join(d, BEST_DIR, models.WEIGHTS_FILE)
            if os.path.exists(best_file):
                best_state = torch.load(best_file, map_location="cpu", weights_only=True)
            elif meta.get("best_epoch", -1) == meta["epoch"]:
                best_state = {k: v.clone() for k, v in state.items()}
            elif meta.get("best_epoch", -1) >= 0:
                # A checkpoint of an older version, whose best epoch lives in a checkpoint of its own:
                # finish the run the old way (a report on every improvement).
                carry_best = False
            tstate = torch.load(os.path.join(d, TRAINER_STATE), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(tstate["optimizer"])
        scheduler.load_state_dict(tstate["scheduler"])
        if stopper is not None and meta.get("early_stopping"):
            stopper.load_state_dict(meta["early_stopping"])
    start = int(meta["epoch"]) + 1
    if meta.get("done") or start >= epochs:
        if rank == 0:
            _progress(f"[{name}] run already complete at epoch {meta['epoch']}; nothing to train")
        return
    meta["starts"].append(start)
    if rank == 0:
        how = f"resuming at epoch {start + 1}/{epochs} from checkpoint" if checkpoint else f"starting {epochs} epochs"
        _progress(f"[{name}] {how}: {world} worker(s), {int(n_total)} train samples, "
                  f"{steps} steps/epoch of {local_bs * world}, device {device}")

    model = ray.train.torch.prepare_model(model)
    loss_fn = (config.get("make_loss") or cross_entropy_loss)(config)
    eval_bs = int(config.get("eval_batch_size", 1024))
    jitter_gen = torch.Generator()

    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        # Seeded per (epoch, rank): a resumed run draws the dropout masks and shifts it would have.
        torch.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
        jitter_gen.manual_seed(seed * 7919 + epoch * 131 + rank)
        batches = _rank_batches(train_arrays, local_bs, steps, seed, epoch, rank)
        if rank == 0:
            batches = _with_progress(batches, f"[{name}] epoch {epoch + 1}/{epochs}", steps)
        stats = training.train_one_epoch(
            model, batches, optimizer, loss_fn,
            scheduler, max_norm=tcfg.get("max_norm"), jitter_pixels=int(tcfg.get("jitter") or 0),
            device=device, generator=jitter_gen)
        if len(x_val):
            ev = training.evaluate(models.unwrap_model(model), x_val, y_val, eval_bs, device)
            local_err, local_n = float(ev["test_errors"]), float(ev["n"])
        else:
            local_err, local_n = 0.0, 0.0
        loss_sum, samples, errs, nval = _all_reduce(
            [stats["loss"] * stats["samples"], float(stats["samples"]), local_err, local_n], device)
        train_loss = loss_sum / max(samples, 1.0)
        val_error = errs / nval if nval else float("nan")
        seconds = time.perf_counter() - t0
        if fault.get("epoch_sleep"):
            time.sleep(float(fault["epoch_sleep"]))

        stop = False
        if stopper is not None and nval:
            stop = stopper.step(val_error)
            meta["early_stopping"] = stopper.state_dict()
        improved = bool(nval) and (meta["best_val_error"] is None or val_error < meta["best_val_error"])
        if improved:
            meta["best_val_error"], meta["best_epoch"] = val_error, epoch
            if rank == 0 and carry_best:
                best_state = {k: v.detach().to("cpu", copy=True)
                              for k, v in models.unwrap_model(model).state_dict().items()}
        meta["epoch"] = epoch
        meta["history"].append({"epoch": epoch, "train_loss": round(train_loss, 6),
                                "val_error": round(val_error, 6) if nval else None,
                                "seconds": round(seconds, 3), "lr": stats["lr"]})
        meta["done"] = stop or epoch + 1 >= epochs
        # What Ray Train ranks checkpoints by (`SCORE`): the best val error so far when checkpoints
        # carry the best weights, so the latest checkpoint always ranks best and is the one kept.
        score = (meta["best_val_error"] if carry_best else val_error) if nval else float(-epoch)
        metrics = {"epoch": epoch, "train_loss": train_loss, SCORE: score, "done": meta["done"]}

        # A checkpoint at the end and every `checkpoint_every` epochs (how much a restart may redo);
        # each carries the best weights so far. Every rank sees the same all-reduced val error and
        # epoch, so all take the same branch.
        every = int(tcfg.get("checkpoint_every") or 1)
        save = meta["done"] or (epoch + 1) % every == 0 or (improved and not carry_best)
        # Epochs without a checkpoint are not reported either: a Ray Train report is a round trip
        # to the controller (measured ~2 s on 2 busy CPUs, against 0.05 s for a quickstart epoch).
        if save:
            with tempfile.TemporaryDirectory(prefix=f"{name}-ckpt-") as d:
                ckpt = None
                if rank == 0:
                    _save_state(d, model, spec, config["input_shape"], config["num_classes"],
                                optimizer, scheduler, meta, best_state if carry_best else None)
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=ckpt)
        if rank == 0:
            _progress(f"[{name}] epoch {epoch + 1}/{epochs} train_loss {train_loss:.4f} "
                      f"val_error {val_error:.4f} ({seconds:.1f}s)" + ("  early stop" if stop else ""))
        if fault.get("stop_after_epoch") is not None and epoch >= int(fault["stop_after_epoch"]) and not meta["done"]:
            raise RuntimeError(f"{FAULT_ENV}: stopping after epoch {epoch} as asked")
        if stop:
            break
