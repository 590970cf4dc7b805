"""Split-wide inference on Ray workers, streaming: evaluation counts and clustering statistics.

No stage runs a model over a whole split on the driver. A split is read as a Ray Data dataset
(`pipeline.datasets.read_split`: CPU read tasks that check each shard's sha256), mapped by an actor
pool of `InferenceWorker`s (`map_batches`, `num_gpus` per actor on a GPU cluster) that load the
model once per actor, and each batch comes back as one small row of partial results (counts, sums)
that the driver adds up as they arrive. The driver holds O(C^2) numbers at most (the covariance
sums), never O(N).

What a worker computes per batch (`InferenceJob.stats`):

  errors     top-1 errors and labelled rows of one model: a generalist or student checkpoint, or
             the generalist of a teacher ensemble (`evaluate_checkpoint`);
  moments    sums for the covariance of the model's predicted probabilities: the row count n,
             sum_b p_b (C,) and sum_b p_b p_b^T (C, C), float64. Sums merge exactly (by
             addition) in any order, so the covariance does not depend on how rows were split
             into batches or actors (`covariance_from_moments`); the cluster stage clusters it;
  ensemble   the generalist + specialists `TeacherEnsemble` (the code that writes the soft-target
             cache) scored against the labels: ensemble and generalist errors, fixed / broken /
             changed predictions, the paper's Table 4 counts (test examples grouped by how many
             specialists cover their true class), and per specialist how often it is active and its
             own error on its task (its classes + dustbin) over every row (`finish_ensemble`).

The math is plain functions of torch tensors (`error_counts`, `moment_sums`, `ensemble_counts`,
`merge`), and `InferenceWorker` is a plain class: `run_local` runs it on a list of numpy batches
without Ray (tests), `run_on_ray` is the launcher. Models run on the worker's device: uint8 inputs
are copied as uint8 and scaled there, and `precision` "auto"/"bf16" autocasts the forward passes to
bf16 on CUDA (never on CPUs).

Encoded-image datasets: `transform` (the decode step of `pipeline.datasets.from_items`, evaluation
view) runs in CPU tasks before the replicas; any other `prepare` hook (a function of a numpy batch
dict returning one with an `x` column) runs as a CPU map stage there too.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from pipeline.errors import UserError

STATS = ("errors", "moments", "ensemble")
Batch = dict  # column name -> numpy array (Ray Data's "numpy" batch format)


@dataclass(frozen=True)
class InferenceJob:
    """What every worker of one inference job does (JSON-able: it travels to Ray actors).

    Exactly one of `checkpoint` (a model directory: generalist or student) and `teacher` (the
    fields of a `pipeline.teacher_ensemble.TeacherSpec`) names the model; "ensemble" needs `teacher`.
    """

    stats: tuple[str, ...]
    checkpoint: Optional[str] = None
    teacher: Optional[dict] = None
    batch_size: int = 1024
    gpus: float = 0.0
    threads: int = 1
    precision: str = "auto"

    def __post_init__(self) -> None:
        unknown = [s for s in self.stats if s not in STATS]
        if unknown or not self.stats:
            raise ValueError(f"stats must be a non-empty subset of {STATS}, got {self.stats}")
        if (self.checkpoint is None) == (self.teacher is None):
            raise ValueError("name exactly one model: checkpoint or teacher")
        if "ensemble" in self.stats and self.teacher is None:
            raise ValueError("the 'ensemble' statistics need a teacher (generalist + specialists)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stats"] = list(self.stats)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InferenceJob":
        return cls(**{**d, "stats": tuple(d["stats"])})


def teacher_job_fields(spec) -> dict:
    """A `TeacherSpec` as the `teacher` field of a job."""
    return {"generalist_uri": spec.generalist_uri, "generalist_meta": spec.generalist_meta,
            "specialist_uris": list(spec.specialist_uris), "specialist_metas": list(spec.specialist_metas),
            "top_n": spec.top_n, "method": spec.method, "iters": spec.iters}


# -------------------------------------------------------------------------------------------------
# Per-batch math (plain torch / numpy; merged on the driver by addition)


def _labels(y: Any, device: Any):
    import torch

    yt = torch.as_tensor(np.asarray(y, dtype=np.int64)).to(device)
    return yt, yt >= 0


def error_counts(logits, y) -> dict[str, np.ndarray]:
    """{"errors", "n"}: top-1 errors among the labelled rows (y >= 0) and how many there are."""
    yt, lab = _labels(y, logits.device)
    wrong = (logits.argmax(1) != yt) & lab
    return {"errors": np.int64(int(wrong.sum())), "n": np.int64(int(lab.sum()))}


def moment_sums(logits) -> dict[str, np.ndarray]:
    """{"mom_n", "mom_sum", "mom_cross"}: n, sum of p and sum of p p^T of p = softmax(logits),
    float64 (one matrix product on the model's device)."""
    import torch

    p = torch.softmax(logits.double(), dim=1)
    return {"mom_n": np.int64(p.shape[0]), "mom_sum": p.sum(0).cpu().numpy(),
            "mom_cross": (p.T @ p).cpu().numpy()}


def covariance_from_moments(total: dict[str, np.ndarray]) -> np.ndarray:
    """The (C, C) population covariance (np.cov(P, rowvar=False, bias=True)) from merged sums."""
    n = int(total["mom_n"])
    if n < 1:
        raise ValueError("no rows: the covariance needs at least one prediction")
    mean = np.asarray(total["mom_sum"], dtype=np.float64) / n
    cov = np.asarray(total["mom_cross"], dtype=np.float64) / n - np.outer(mean, mean)
    return (cov + cov.T) / 2.0


@dataclass(frozen=True)
class EnsembleLayout:
    """What `ensemble_counts` needs about the specialists: their subsets and dustbin corrections."""

    subsets: list
    corrections: list
    num_classes: int
    coverage: np.ndarray = field(init=False, repr=False)   # (C,) how many subsets hold class c
    task: np.ndarray = field(init=False, repr=False)       # (M, C) class -> specialist m's task label

    def __post_init__(self) -> None:
        cov = np.zeros(self.num_classes, dtype=np.int64)
        task = np.empty((len(self.subsets), self.num_classes), dtype=np.int64)
        for m, s in enumerate(self.subsets):
            s = np.asarray(s, dtype=np.int64)
            cov[s] += 1
            task[m] = len(s)  # the dustbin
            task[m, s] = np.arange(len(s))
        object.__setattr__(self, "coverage", cov)
        object.__setattr__(self, "task", task)


def ensemble_counts(y, generalist, log_q, active, spec_logits: Sequence, layout: EnsembleLayout) -> dict[str, np.ndarray]:
    """Counts over the labelled rows of one batch (all int64; keys "ens_*").

    Args:
        y: (B,) labels, -1 for unlabelled rows (skipped).
        generalist, log_q: (B, C) generalist logits and ensemble log-probabilities.
        active: (B, M) bool, which specialists are active (None without specialists).
        spec_logits: M tensors (B, |S^m| + 1): every specialist's raw logits on every row.
    """
    import torch

    dev = generalist.device
    yt, lab = _labels(y, dev)
    M = len(layout.subsets)
    yl = yt[lab]
    g_pred, e_pred = generalist.argmax(1)[lab], log_q.argmax(1)[lab]
    g_ok, e_ok = g_pred == yl, e_pred == yl
    covered = torch.as_tensor(layout.coverage, device=dev)[yl]
    bins = M + 1

    def per_cover(mask):
        return torch.bincount(covered[mask], minlength=bins).cpu().numpy().astype(np.int64)

    out = {
        "ens_n": np.int64(int(lab.sum())),
        "ens_errors": np.int64(int((~e_ok).sum())),
        "ens_generalist_errors": np.int64(int((~g_ok).sum())),
        "ens_changed": np.int64(int((e_pred != g_pred).sum())),
        "ens_fixed": np.int64(int((e_ok & ~g_ok).sum())),
        "ens_broken": np.int64(int((~e_ok & g_ok).sum())),
        "ens_cover_n": per_cover(torch.ones_like(g_ok)),
        "ens_cover_generalist_ok": per_cover(g_ok),
        "ens_cover_ensemble_ok": per_cover(e_ok),
        "ens_active_any": np.int64(0),
        "ens_spec_active": np.zeros(M, dtype=np.int64),
        "ens_spec_task_errors": np.zeros(M, dtype=np.int64),
    }
    if M and active is not None:
        act = active[lab]
        out["ens_active_any"] = np.int64(int(act.any(1).sum()))
        out["ens_spec_active"] = act.sum(0).cpu().numpy().astype(np.int64)
        task = torch.as_tensor(layout.task, device=dev)
        errs = []
        for m, z in enumerate(spec_logits):
            zc = z[lab].float().clone()
            zc[:, -1] += float(layout.corrections[m])
            errs.append(int((zc.argmax(1) != task[m][yl]).sum()))
        out["ens_spec_task_errors"] = np.asarray(errs, dtype=np.int64)
    return out


def merge(total: Optional[dict[str, np.ndarray]], part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add partial results key by key (exact for counts; float64 sums in any order)."""
    if total is None:
        return {k: np.array(v, copy=True) for k, v in part.items()}
    for k, v in part.items():
        total[k] = total[k] + v
    return total


def finish_errors(total: dict[str, np.ndarray], what: str = "") -> dict:
    """{"test_error", "test_errors", "n"} from merged `error_counts`."""
    n, errors = int(total["n"]), int(total["errors"])
    if n == 0:
        raise UserError(f"{what or 'the split'} has no labelled samples to evaluate on; ingest it with labels")
    return {"test_error": errors / n, "test_errors": errors, "n": n}


def table4_rows(cover_n: Sequence[int], generalist_ok: Sequence[int], ensemble_ok: Sequence[int]) -> list[dict]:
    """The paper's Table 4 from per-coverage counts (index k: examples whose true class k
    specialists cover; how many of them the generalist and the ensemble get right)."""
    rows = []
    for cov in range(len(cover_n)):
        k = int(cover_n[cov])
        if k == 0:
            continue
        gc, ec = int(generalist_ok[cov]), int(ensemble_ok[cov])
        rows.append({"covered_by": cov, "num_test_examples": k, "generalist_correct": gc, "ensemble_correct": ec,
                     "delta_correct": ec - gc, "generalist_accuracy": gc / k, "ensemble_accuracy": ec / k,
                     "relative_accuracy_change": (ec - gc) / gc if gc else None})
    return rows


def finish_ensemble(total: dict[str, np.ndarray], subsets: Sequence[Sequence[int]]) -> dict:
    """Merged `ensemble_counts` -> the specialists stage's test metrics (without per-file details)."""
    n = int(total["ens_n"])
    if n == 0:
        raise UserError("the test split has no labelled samples; the ensemble cannot be scored")
    e, g = int(total["ens_errors"]), int(total["ens_generalist_errors"])
    table = table4_rows(total["ens_cover_n"], total["ens_cover_generalist_ok"], total["ens_cover_ensemble_ok"])
    g_ok = n - g
    return {
        "test_error": e / n, "test_errors": e,
        "generalist_test_error": g / n, "generalist_test_errors": g,
        "num_test_examples": n, "num_specialists": len(subsets),
        "examples_with_active_specialist": int(total["ens_active_any"]),
        "predictions_changed": int(total["ens_changed"]),
        "fixed": int(total["ens_fixed"]), "broken": int(total["ens_broken"]),
        "relative_accuracy_change": ((n - e) - g_ok) / max(1.0, float(g_ok)),
        "table4": table,
        "specialist_active": [int(v) for v in total["ens_spec_active"]],
        "specialist_task_error": [int(v) / n for v in total["ens_spec_task_errors"]],
    }


# -------------------------------------------------------------------------------------------------
# The worker (a Ray Data actor, or a plain object in tests)


def device_for(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


class InferenceWorker:
    """Loads the job's model once; `worker(batch)` -> one row of partial results.

    batch: numpy columns `x` (inputs) and `y` (int64 labels, -1 unlabelled); other columns are
    ignored. The row: every statistic's arrays with a leading axis of length 1 (Ray Data rows).
    """

    def __init__(self, job: dict):
        import torch

        from pipeline.teacher_ensemble import TeacherEnsemble, TeacherSpec, autocast_dtype

        self.job = InferenceJob.from_dict(job) if isinstance(job, dict) else job
        torch.set_num_threads(max(1, int(self.job.threads)))
        self.device = torch.device(device_for(self.job.gpus))
        self.ensemble = None
        self.layout = None
        if self.job.teacher is not None:
            self.ensemble = TeacherEnsemble(TeacherSpec(**self.job.teacher), self.device, self.job.precision)
            self.model = self.ensemble.generalist
            if "ensemble" in self.job.stats:
                spec = self.ensemble.spec
                self.layout = EnsembleLayout(spec.subsets, spec.corrections, spec.num_classes)
        else:
            from pipeline.models import load_checkpoint

            self.model, _ = load_checkpoint(self.job.checkpoint, map_location=self.device)
        self.autocast = autocast_dtype(self.job.precision, self.device)

    def _logits(self, x):
        import torch

        from pipeline.teacher_ensemble import model_inputs

        with torch.no_grad():
            xt = model_inputs(x, self.device)
            if self.autocast is None:
                return self.model(xt).float()
            with torch.autocast(self.device.type, dtype=self.autocast):
                return self.model(xt).float()

    def partial(self, x, y) -> dict[str, np.ndarray]:
        """The job's statistics of one batch (not split further)."""
        stats = self.job.stats
        out: dict[str, np.ndarray] = {}
        if "ensemble" in stats:
            res = self.ensemble.outputs(x, all_specialists=True)
            g = res.generalist
            out.update(ensemble_counts(y, g, res.log_q, res.active, res.specialists, self.layout))
        else:
            g = self._logits(x)
        if "errors" in stats:
            out.update(error_counts(g, y))
        if "moments" in stats:
            out.update(moment_sums(g))
        return out

    def __call__(self, batch: Batch) -> Batch:
        x, y = batch["x"], batch["y"]
        total = None
        bs = max(1, int(self.job.batch_size))
        for start in range(0, len(y), bs):
            total = merge(total, self.partial(x[start:start + bs], y[start:start + bs]))
        if total is None:
            return {}
        return {k: np.asarray(v)[None] for k, v in total.items()}


def run_local(job: InferenceJob, batches: Iterable[Batch], prepare: Optional[Callable[[Batch], Batch]] = None,
              ) -> dict[str, np.ndarray]:
    """The job on numpy batches in this process, without Ray: what `run_on_ray` computes."""
    import torch

    threads = torch.get_num_threads()
    try:
        worker = InferenceWorker(job.to_dict())
        total = None
        for b in batches:
            row = worker(prepare(b) if prepare else b)
            if row:
                total = merge(total, {k: v[0] for k, v in row.items()})
    finally:
        torch.set_num_threads(threads)  # the worker sized torch for a replica, not for the caller
    if total is None:
        raise UserError("no rows to run the model on (the split is empty)")
    return total


# -------------------------------------------------------------------------------------------------
# Launcher (the only place this module touches Ray)


def fit_actors(wanted: int, cpus: float, gpus: float, what: str, on_cluster: Optional[bool] = None) -> int:
    """How many replicas to start. A local Ray cannot grow: never ask for more than its CPUs/GPUs
    hold (`ray.cluster_resources()`; a fixed pool that does not fit waits forever). On a cluster
    the autoscaler may add nodes, so the request stands."""
    import ray

    if on_cluster is None:
        on_cluster = bool(os.environ.get("RAY_ADDRESS")) or not _is_local_ray()
    if on_cluster:
        return max(1, int(wanted))
    res = ray.cluster_resources()
    fit = int(float(res.get("CPU", 0)) // cpus) if cpus > 0 else int(wanted)
    if gpus > 0:
        fit = min(fit, int(float(res.get("GPU", 0)) // gpus))
    if fit < 1:
        raise UserError(f"{what}: {cpus:g} CPU and {gpus:g} GPU per replica, but the local Ray has "
                        f"{res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs; lower the request (or set "
                        "ray.address to a cluster that has them)")
    return max(1, min(int(wanted), fit))


def _is_local_ray() -> bool:
    import ray

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - state API unavailable: assume a fixed-size cluster
        return True
    return len(nodes) <= 1 and not os.environ.get("RAY_ADDRESS")


def run_on_ray(job: InferenceJob, ds, *, actors: int = 1, cpus_per_actor: float = 0.5, rows: Optional[int] = None,
               blocks: Optional[int] = None, prepare: Optional[Callable[[Batch], Batch]] = None,
               what: str = "inference") -> dict[str, np.ndarray]:
    """Map `ds` (rows with `x`, `y`) through an actor pool of `InferenceWorker`s and add up their
    per-batch rows as they stream back."""
    import ray

    from pipeline.raysetup import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    n_actors = fit_actors(actors, cpus_per_actor, job.gpus, what)
    if rows is not None:
        n_actors = max(1, min(n_actors, math.ceil(rows / max(1, job.batch_size))))
    if blocks is not None:  # a replica takes whole read blocks: more replicas than blocks would idle
        n_actors = max(1, min(n_actors, int(blocks)))
    if prepare is not None:
        ds = ds.map_batches(prepare, batch_format="numpy", zero_copy_batch=True)
    out = ds.map_batches(
        InferenceWorker, fn_constructor_kwargs={"job": job.to_dict()}, batch_size=int(job.batch_size),
        batch_format="numpy", zero_copy_batch=True, compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=float(cpus_per_actor), num_gpus=float(job.gpus) or None,
    )
    total = None
    try:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            total = merge(total, {k: np.asarray(v).sum(axis=0) for k, v in batch.items()})
    except Exception as e:  # noqa: BLE001 - a UserError raised in a worker (damaged shard, bad checkpoint)
        user = _user_error_in(e)
        if user is not None:
            raise UserError(str(user)) from None
        raise
    if total is None:
        raise UserError(f"{what}: no rows to run the model on (the split is empty)")
    return total


def _user_error_in(exc: BaseException) -> Optional[BaseException]:
    """The UserError a Ray task raised, however Ray wrapped it. Ray Data re-raises a failed UDF as
    `RayTaskError(UserCodeException)` whose chain no longer holds the original exception, only its
    traceback text, so that text is searched too: the last "module.Class: message" line whose class
    is a UserError."""
    import importlib
    import re

    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    for mod, cls, msg in reversed(re.findall(r"^\s*((?:[A-Za-z_]\w*\.)+)?([A-Za-z_]\w*): (.+)$", str(exc), re.M)):
        try:
            found = getattr(importlib.import_module(mod.rstrip(".")), cls) if mod else None
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(found, type) and issubclass(found, UserError):
            return found(msg.strip())
    return None


def _threads(cpus: float) -> int:
    return max(1, math.ceil(float(cpus)))


def infer_split(job: InferenceJob, data_uri: str, split: str, *, actors: int = 1, cpus_per_actor: float = 0.5,
                prepare: Optional[Callable[[Batch], Batch]] = None, use_ray: bool = True,
                read_cpus: Optional[float] = None, read_concurrency: Optional[int] = None,
                transform: Optional[dict] = None) -> dict[str, np.ndarray]:
    """Run `job` over one split of the dataset at `data_uri` (streaming); merged partial results.

    transform: `pipeline.datasets.from_items`' decode step for encoded-image datasets
    ({"manifest", "augment", "train": False, "seed"}), run in CPU tasks before the replicas."""
    from pipeline import datasets

    items = datasets.split_items(data_uri, split)
    rows = datasets.num_samples(items)
    if rows == 0:
        raise UserError(f"{data_uri}: split '{split}' is empty; nothing to run the model on")
    if not use_ray:
        import json

        if transform:
            from pipeline import transforms

            aug = transform.get("augment")
            fn = transforms.make_batch_transform(aug.model_dump() if hasattr(aug, "model_dump") else aug,
                                                 transform.get("manifest"), bool(transform.get("train")),
                                                 int(transform.get("seed") or 0))
            user_prepare = prepare
            prepare = (lambda b: user_prepare(fn(b, None))) if user_prepare else (lambda b: fn(b, None))

        def batches():
            for it in datasets.group_items(items, 1):  # one shard at a time
                yield datasets._read_shards({"item": np.array([json.dumps(it)], dtype=object)})

        return run_local(job, batches(), prepare)
    kw = {}
    if read_cpus is not None:
        kw["read_cpus"] = float(read_cpus)
    if read_concurrency is not None:
        kw["concurrency"] = int(read_concurrency)
    groups = datasets.group_items(items)
    ds = datasets.from_items(groups, transform=transform, **kw)
    return run_on_ray(job, ds, actors=actors, cpus_per_actor=cpus_per_actor, rows=rows, blocks=len(groups),
                      prepare=prepare, what=f"inference on {split}")


def eval_transform(cfg, manifest: dict, augment: Any = None) -> Optional[dict]:
    """The `transform` argument for an encoded-image dataset (deterministic evaluation view of the
    model's `augment:` section, default the teacher's), or None for stored arrays."""
    if manifest.get("encoding") != "image":
        return None
    if augment is None:
        augment = getattr(cfg.teacher, "augment", None)
    return {"manifest": manifest, "augment": augment, "train": False, "seed": int(cfg.seed)}


def options(cfg) -> dict:
    """Keyword arguments of `evaluate_checkpoint` / `evaluate_ensemble` / `generalist_statistics`
    from a run's config (the `inference` section, and the data loader's read settings)."""
    inf = cfg.inference
    opts = {"num_gpus": inf.gpus_per_actor, "batch_size": inf.batch_size, "actors": inf.num_actors,
            "cpus_per_actor": inf.cpus_per_actor, "precision": inf.precision}
    loader = getattr(cfg.data, "loader", None)
    if loader is not None:
        opts["read_cpus"] = loader.read_cpus
        opts["read_concurrency"] = loader.read_concurrency
    return opts


def evaluate_checkpoint(checkpoint_uri_or_dir: str, data_uri: str, split: str, *, num_gpus: float = 0,
                        batch_size: int = 1024, actors: int = 1, cpus_per_actor: float = 0.5,
                        precision: str = "auto", prepare: Optional[Callable[[Batch], Batch]] = None,
                        use_ray: bool = True, read_cpus: Optional[float] = None,
                        read_concurrency: Optional[int] = None, transform: Optional[dict] = None) -> dict:
    """Top-1 error of one checkpoint (generalist or student) on a split, on Ray workers:
    {"test_error": fraction, "test_errors": count, "n": labelled samples}."""
    from pipeline import storage

    if not storage.exists(storage.join(checkpoint_uri_or_dir, "model.json")):
        raise UserError(f"{checkpoint_uri_or_dir}: no checkpoint (model.json) to evaluate; run the stage that "
                        "writes it first")
    job = InferenceJob(stats=("errors",), checkpoint=checkpoint_uri_or_dir, batch_size=batch_size, gpus=num_gpus,
                       threads=_threads(cpus_per_actor), precision=precision)
    total = infer_split(job, data_uri, split, actors=actors, cpus_per_actor=cpus_per_actor, prepare=prepare,
                        use_ray=use_ray, read_cpus=read_cpus, read_concurrency=read_concurrency,
                        transform=transform)
    return finish_errors(total, f"{data_uri} split '{split}'")


def generalist_statistics(checkpoint_uri: str, data_uri: str, split: str, *, num_gpus: float = 0,
                          batch_size: int = 1024, actors: int = 1, cpus_per_actor: float = 0.5,
                          precision: str = "auto", prepare: Optional[Callable[[Batch], Batch]] = None,
                          use_ray: bool = True, read_cpus: Optional[float] = None,
                          read_concurrency: Optional[int] = None, transform: Optional[dict] = None) -> dict:
    """What the cluster stage needs from one pass of the generalist over `split`:
    {"covariance": (C, C) float64, "rows": N, "errors": top-1 errors, "n": labelled rows}."""
    job = InferenceJob(stats=("errors", "moments"), checkpoint=checkpoint_uri, batch_size=batch_size, gpus=num_gpus,
                       threads=_threads(cpus_per_actor), precision=precision)
    total = infer_split(job, data_uri, split, actors=actors, cpus_per_actor=cpus_per_actor, prepare=prepare,
                        use_ray=use_ray, read_cpus=read_cpus, read_concurrency=read_concurrency,
                        transform=transform)
    return {"covariance": covariance_from_moments(total), "rows": int(total["mom_n"]),
            "errors": int(total["errors"]), "n": int(total["n"])}


def evaluate_ensemble(spec, data_uri: str, split: str, *, num_gpus: float = 0, batch_size: int = 1024,
                      actors: int = 1, cpus_per_actor: float = 0.5, precision: str = "auto",
                      prepare: Optional[Callable[[Batch], Batch]] = None, use_ray: bool = True,
                      read_cpus: Optional[float] = None, read_concurrency: Optional[int] = None,
                      transform: Optional[dict] = None) -> dict:
    """The teacher ensemble (`TeacherSpec`) against the generalist alone on a split: see
    `finish_ensemble` for the keys."""
    job = InferenceJob(stats=("ensemble",), teacher=teacher_job_fields(spec), batch_size=batch_size, gpus=num_gpus,
                       threads=_threads(cpus_per_actor), precision=precision)
    total = infer_split(job, data_uri, split, actors=actors, cpus_per_actor=cpus_per_actor, prepare=prepare,
                        use_ray=use_ray, read_cpus=read_cpus, read_concurrency=read_concurrency,
                        transform=transform)
    return finish_ensemble(total, spec.subsets)
