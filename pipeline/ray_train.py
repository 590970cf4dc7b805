"""Data-parallel training on Ray Train (v2): the launcher and the per-worker loop that teacher and
student share.

`fit` builds the `TorchTrainer` from the config's scaling fields and points Ray Train's storage at
the stage folder (local path or `s3://`), so every epoch's checkpoint lives next to the stage's
other files. `train_loop` is the function each worker runs: ordinary PyTorch around
`pipeline.training`; its only Ray calls are `get_context`, `get_checkpoint`, `prepare_model` and
`report`. Teacher and students differ only in what they read (the datasets handed to the trainer) and what
they minimise (`TrainJob.distill`, turned into a loss by `pipeline.losses.make_loss`); the driver
hands every worker one typed `pipeline.jobs.TrainJob`.

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
import os
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

from pipeline import storage
from pipeline.errors import UserError
from pipeline.jobs import TrainJob

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


def fit(job: TrainJob, scaling: Any, storage_uri: str, name: str, max_failures: int, keep: int = 1,
        datasets: Optional[dict] = None):
    """Run `train_loop` for `job` on a data-parallel worker group; returns Ray Train's `Result`.

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
    hooks = fault_injection()
    if hooks:
        # The run's folder: an injected stop waits there for Ray Train to record its checkpoint.
        job = job.replace(fault={**hooks, "_storage": storage_uri, "_name": name})
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
    trainer = TorchTrainer(train_loop, train_loop_config={"job": job}, scaling_config=scaling_config(scaling),
                           run_config=run_config, datasets=datasets or None,
                           dataset_config=dataset_config() if datasets else None)
    # Train v2 (2.60) installs a SIGINT handler for the rest of the process that aborts the run and
    # lets fit() end as a failure (exit 1, no message). Keep Python's: Ctrl-C raises
    # KeyboardInterrupt here and the CLI reports "interrupted" (exit 130) and shuts Ray down.
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = lambda controller: None
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        from pipeline.inference import _user_error_in

        # Bad input found by a worker (a shard whose sha256 differs from its manifest, keys that do
        # not match the cache) is the user's to fix, not a crash: exit 2 with the worker's message.
        user = _user_error_in(e)
        if user is not None:
            raise UserError(str(user)) from None
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
# Shared by driver and workers
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


def balanced_shards(entries: Sequence[dict], world_size: int, allow_empty: bool = False) -> list[list[dict]]:
    """Disjoint per-rank lists of shard entries with sample counts as even as the shards allow
    (largest shard first to the least-loaded rank), each list in manifest order. Deterministic, so a
    restarted worker group reads what the first one read. UserError when a training rank would get
    no shard (allow_empty: evaluation splits, where a rank without shards contributes nothing)."""
    if len(entries) < world_size and not allow_empty:
        raise UserError(
            f"the split has {len(entries)} shard(s) but {world_size} workers read it; every worker needs "
            "at least one shard. Re-ingest with a smaller data.shard_size (e.g. `data.shard_size=1000`) "
            "or use fewer workers")
    load = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    order = sorted(range(len(entries)), key=lambda i: (-int(entries[i]["num_samples"]), i))
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        out[r].append(i)
        load[r] += int(entries[i]["num_samples"])
    return [[entries[i] for i in sorted(idx)] for idx in out]


def steps_per_epoch(per_rank: Sequence[Sequence[dict]], local_bs: int) -> int:
    """Optimizer steps per epoch: the smallest rank's full minibatches (every rank takes as many)."""
    from pipeline import datasets

    smallest = min(datasets.num_samples(r) for r in per_rank)
    if smallest < local_bs:
        raise UserError(f"a training worker has {smallest} samples but the per-worker batch is {local_bs}; "
                        "lower batch_size or num_workers, or re-ingest with more samples per shard")
    return smallest // local_bs


def _snapshot_checkpoint_dir(storage_uri: str, name: str) -> Optional[str]:
    """The checkpoint folder Ray Train's snapshot records as latest (a new fit restores it), or None."""
    try:
        raw = storage.read_bytes(storage.join(storage_uri, name, SNAPSHOT))
        latest = json.loads(raw.decode("utf-8")).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, ValueError, UnicodeDecodeError, AttributeError):
        return None  # damaged snapshots are reported by check_latest_checkpoint
    return latest.get("checkpoint_dir_name") or None


def latest_position(storage_uri: str, name: str) -> tuple[int, int]:
    """(next epoch, steps done in it) of the checkpoint a rerun of Ray Train run `name` resumes
    from, (0, 0) if none: where the driver starts the training stream, so a resumed run reads no
    data again.

    That is the checkpoint Ray Train's snapshot names, not the newest folder on storage: a worker
    stopped right after uploading a checkpoint leaves a folder Ray Train never registered, and the
    workers resume from the one before it (a stream started after that would skip an epoch)."""
    dir_name = _snapshot_checkpoint_dir(storage_uri, name)
    if dir_name is None:
        return (0, 0)
    try:
        meta = storage.read_json(storage.join(storage_uri, name, dir_name, TRAINER_META))
    except (FileNotFoundError, ValueError, OSError):
        return (0, 0)
    return (int(meta.get("epoch", -1)) + 1, int(meta.get("step") or 0))


def build_datasets(data: dict, loader: Any, seed: int, epochs: int, start_epoch: int,
                   transform: Optional[dict] = None) -> dict:
    """The Ray Data datasets a data-parallel job hands to `TorchTrainer(datasets=...)`:
    `train_{rank}` (one stream over the rank's shards for epochs start_epoch..epochs-1, see
    `pipeline.datasets.training_stream`) and `val_{rank}` (the rank's val shards; materialized in the
    object store when small, so epochs do not re-read them).

    transform: {"manifest", "augment", "train_view"} for image datasets or augmentation: training
    streams get the training view when train_view is true (the cached student's is false: it must see
    the view its targets were computed on), val always the deterministic one."""
    from pipeline import datasets

    out = {}
    tr = va = None
    if transform:
        tr = {"manifest": transform["manifest"], "augment": transform.get("augment"),
              "train": bool(transform.get("train_view", True)), "seed": seed}
        va = dict(tr, train=False)
    for r, shards in enumerate(data["train"]):
        out[f"train_{r}"] = datasets.training_stream(shards, start_epoch, epochs, seed, loader.read_cpus,
                                                     loader.read_concurrency, loader.group_rows, tr)
    for r, shards in enumerate(data.get("val") or []):
        if not shards:
            continue
        ds = datasets.from_items(datasets.group_items(shards, loader.group_rows), loader.read_cpus,
                                 loader.read_concurrency, va)
        if sum(int(s.get("bytes") or 0) for s in shards) <= loader.materialize_mb * (1 << 20):
            ds = ds.materialize()
        out[f"val_{r}"] = ds
    return out


def data_parallel_job(job: TrainJob, train_entries: Sequence[dict], val_entries: Sequence[dict], scaling: Any,
                      loader: Any, storage_uri: str, name: str,
                      transform: Optional[dict] = None) -> tuple[TrainJob, dict]:
    """(`job` with its shard plan filled in, datasets) for a `train_loop` run over shard entries
    (dataset shards from `pipeline.datasets.split_items`, or joined cache shards from `cache_items`):
    shards balanced over ranks, steps per epoch, the streams started where the run's newest
    checkpoint stands."""
    tcfg, seed = job.train, job.seed
    world = int(scaling.num_workers)
    local_bs = max(1, int(tcfg["batch_size"]) // world)
    train = balanced_shards(list(train_entries), world)
    val = balanced_shards(list(val_entries), world, allow_empty=True) if val_entries else []
    steps = steps_per_epoch(train, local_bs)
    start_epoch, _ = latest_position(storage_uri, name)
    ds = build_datasets({"train": train, "val": val}, loader, seed, int(tcfg["epochs"]),
                        min(start_epoch, int(tcfg["epochs"]) - 1), transform)
    small = int(loader.materialize_mb) * (1 << 20)
    keep = [r for r, shards in enumerate(val) if shards and sum(int(e.get("bytes") or 0) for e in shards) <= small]
    job = job.replace(steps_per_epoch=steps, local_bs=local_bs, start_epoch=start_epoch, val_keep=tuple(keep),
                      loader=loader.model_dump() if hasattr(loader, "model_dump") else dict(loader))
    return job, ds


def _await_recorded(fault: dict, position: tuple[int, int], timeout_s: float = 60.0) -> None:
    """An injected stop waits until Ray Train (which takes reports asynchronously) has recorded the
    checkpoint just reported: a stop after a committed checkpoint, not a race on the commit."""
    if not fault.get("_storage"):
        return
    deadline = time.monotonic() + timeout_s
    while latest_position(fault["_storage"], fault["_name"]) < position and time.monotonic() < deadline:
        time.sleep(0.2)


def dataset_config():
    """Every dataset is already one rank's own (`build_datasets`): Ray Train must not split them."""
    from ray.train import DataConfig

    # Ray Train replaces each dataset's execution options with its own, whose preserve_order is
    # off: blocks of pass e + 1 could then overtake pass e, and minibatches (and an exact resume)
    # depend on the epoch's row order.
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=[], execution_options=options)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------

def _all_reduce(values: list[float], device: Any = "cpu") -> list[float]:
    """Element-wise sum over all workers (on `device`: NCCL only reduces GPU tensors)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _loss_for(job: TrainJob, device: Any):
    """loss_fn(logits, batch) of `job`: cross-entropy, or the KD loss against cached targets or an
    online teacher ensemble built on this worker's device."""
    from pipeline.losses import make_loss

    d = job.distill
    if d is None:
        return make_loss("hard")
    if d.mode == "cached":
        return make_loss("cached", d.T, d.alpha, job.num_classes)
    from pipeline.teacher_ensemble import TeacherEnsemble

    return make_loss("online", d.T, d.alpha, job.num_classes, d.target, TeacherEnsemble(d.teacher, device=device))


def chunk_iterator(it, loader: dict, local_bs: int, seed: int, rank: int, device: Any):
    """Large chunks of a rank's training stream, as torch tensors on `device`."""
    from pipeline import datasets

    # No Ray local shuffle buffer: its order depends on where the stream started, so a resumed run
    # would see other batches. Rows are shuffled per read group by Ray Data's tasks and in windows
    # aligned to the epoch's start by `training.epoch_minibatches`, both seeded.
    chunk = max(int(local_bs), int(loader["chunk_rows"]) // int(local_bs) * int(local_bs))
    return it.iter_torch_batches(batch_size=chunk, collate_fn=datasets.Collate(device),
                                 prefetch_batches=int(loader["prefetch_chunks"]))


def val_evaluator(it, device: Any, batch_size: int = 4096, keep: bool = False):
    """evaluate(model) -> (errors, n) over this rank's val iterator (None: no val shards).

    keep: hold the batches after the first pass (for val shares under `data.loader.materialize_mb`):
    each pass over a Ray Data iterator costs ~0.3-1 s of start-up, more than a small model's epoch."""
    from pipeline import datasets, training

    if it is None:
        return lambda model: (0.0, 0.0)
    kept: list = []

    def batches():
        if kept:
            return kept
        out = it.iter_torch_batches(batch_size=batch_size, collate_fn=datasets.Collate(device))
        if not keep:
            return out
        kept.extend(out)
        return kept

    def evaluate(model):
        return training.evaluate_batches(model, batches(), device)

    return evaluate


def train_loop(config: dict) -> None:
    """Per-worker function of `fit`: supervised or distillation training on the one training core
    (`pipeline.training.TrainState` / `run_epochs`). config = {"job": TrainJob} (every field is
    documented on `pipeline.jobs.TrainJob`). Data: datasets `train_{rank}` and `val_{rank}`
    (`build_datasets`), read with `get_dataset_shard(...).iter_torch_batches`.
    """
    import ray.train
    import ray.train.torch
    import torch

    from pipeline import models, training

    _quiet_ray_train_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job: TrainJob = config["job"]
    name = job.name
    tcfg = dict(job.train)
    epochs = int(tcfg["epochs"])
    seed = int(job.seed)
    fault = dict(job.fault)
    device = ray.train.torch.get_device()
    steps = int(job.steps_per_epoch)
    local_bs = int(job.local_bs)

    torch.manual_seed(seed)
    spec = job.model
    model = models.build_model(spec, job.input_shape, job.num_classes)
    state = training.TrainState(model, tcfg, steps, epochs, device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state.load(d)
    if state.finished:
        if rank == 0:
            _progress(f"[{name}] run already complete at epoch {state.meta['epoch'] + 1}; nothing to train")
        return
    if state.next_epoch < min(int(job.start_epoch), epochs - 1):
        # The stream starts at the driver's resume position; a checkpoint older than that would
        # need rows the stream does not hold (see latest_position).
        raise RuntimeError(f"[{name}] the checkpoint restored is at epoch {state.next_epoch + 1} but the data "
                           f"stream starts at epoch {int(job.start_epoch) + 1}")
    if rank == 0:
        pos = f"epoch {state.next_epoch + 1}" + (f" step {state.meta['step']}" if state.meta.get("step") else "")
        how = f"resuming at {pos}/{epochs} from checkpoint" if checkpoint else f"starting {epochs} epochs"
        _progress(f"[{name}] {how}: {world} worker(s), {steps} steps/epoch of {local_bs * world}, device {device}")

    # DDP wraps the model after it is on its device and after the optimizer state was loaded there.
    state.model = ray.train.torch.prepare_model(state.model)
    loss_fn = _loss_for(job, device)
    train_it = ray.train.get_dataset_shard(f"train_{rank}")
    try:
        val_it = ray.train.get_dataset_shard(f"val_{rank}")
    except (KeyError, ValueError):
        val_it = None
    chunks = chunk_iterator(train_it, job.loader, local_bs, seed, rank, device)
    batches = training.epoch_minibatches(chunks, local_bs, steps, state.next_epoch, int(state.meta.get("step") or 0),
                                         seed, rank, window=int(job.loader["shuffle_rows"]) or local_bs,
                                         prepare=getattr(loss_fn, "prepare_chunk", None))

    def save(st: "training.TrainState", metrics: dict) -> None:
        # Every rank reports (Ray Train needs all); rank 0 attaches the checkpoint folder.
        with tempfile.TemporaryDirectory(prefix=f"{name}-ckpt-") as d:
            ckpt = None
            if rank == 0:
                st.save(d, spec, job.input_shape, job.num_classes)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({**metrics, SCORE: metrics["val_error"]}, checkpoint=ckpt)
        if fault.get("stop_after_epoch") is not None and not st.meta["done"] and "step" not in metrics \
                and st.meta["epoch"] >= int(fault["stop_after_epoch"]):
            _await_recorded(fault, (st.next_epoch, 0))
            raise RuntimeError(f"{FAULT_ENV}: stopping after epoch {st.meta['epoch']} as asked")
        if fault.get("stop_after_step") is not None and metrics.get("step") == int(fault["stop_after_step"]) \
                and not fault.get("_stopped"):
            _await_recorded(fault, (st.next_epoch, int(metrics["step"])))
            raise RuntimeError(f"{FAULT_ENV}: stopping at step {metrics['step']} as asked")

    def report(st, row):
        if fault.get("epoch_sleep"):
            time.sleep(float(fault["epoch_sleep"]))

    try:
        training.run_epochs(state, batches, loss_fn,
                            evaluate=val_evaluator(val_it, device, keep=rank in job.val_keep),
                            reduce=lambda v: _all_reduce(v, device), checkpoint=save, report=report,
                            log=_progress, name=name, seed=seed, rank=rank)
    except Exception as e:
        from pipeline.inference import _user_error_in

        # A read task's UserError (damaged shard, mismatched keys) arrives wrapped by Ray Data with
        # its message buried mid-traceback; raise it bare so it is the last line of the error the
        # driver sees (and `fit` turns it into exit 2).
        user = _user_error_in(e)
        if user is None:
            raise
        raise type(user)(str(user)) from None
