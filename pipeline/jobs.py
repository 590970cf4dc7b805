"""Typed hand-offs from the driver to the processes that train: what a stage resolves from the config
once, on the driver, and ships to Ray Train workers, Tune trials or an in-process run.

Frozen dataclasses rather than dicts: a misspelt field fails where the job is built, not as a
KeyError inside a worker on another node, and every field is documented here once. They hold only
plain data (and, for distillation online, the `TeacherSpec` naming the checkpoints), so they pickle
to workers cheaply; nothing here imports torch or Ray.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Distill:
    """The soft term of a distilled student's loss (`pipeline.losses.make_loss`).

    T, alpha: temperature and weight of the soft term (`losses.kd_loss`).
    target: "ensemble" (generalist + specialists) or "generalist": which cached target, or which
        output of the online teacher, the student learns from.
    mode: "cached" (targets read from the cache with each batch) or "online" (the teacher ensemble
        runs on every batch, `teacher` names its checkpoints).
    """

    T: float
    alpha: float
    target: str = "ensemble"
    mode: str = "cached"
    teacher: Any = None  # pipeline.teacher_ensemble.TeacherSpec when mode == "online"


@dataclass(frozen=True)
class StudentJob:
    """Everything a student's training needs, resolved from the config (`stages.student.student_job`):
    the three students of the student stage, Tune trials and the benches share it.

    data_uri, cache_uri: the dataset and the soft-target cache (as workers must see them).
    transfer_split: the split the cached targets cover (`data.transfer_split`).
    target: the cache target a distilled student reads by default ("ensemble").
    model, input_shape, num_classes: what `pipeline.models.build_model` takes.
    manifest, augment: the dataset's manifest and the student's augmentation (image views).
    train: the student's TrainConfig as a dict; epochs: its epochs.
    cpus, gpus: resources of one training process; loader: `data.loader` as a dict.
    """

    data_uri: str
    cache_uri: str
    transfer_split: str
    target: str
    model: dict
    input_shape: tuple
    num_classes: int
    manifest: dict
    augment: Optional[dict]
    train: dict
    epochs: int
    seed: int
    cpus: int
    gpus: float
    loader: dict

    def replace(self, **changes: Any) -> "StudentJob":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainJob:
    """What every Ray Train worker of a data-parallel run gets (`pipeline.ray_train.train_loop`).

    name: label of the progress lines ("teacher", "student-distilled").
    model, input_shape, num_classes: what `pipeline.models.build_model` takes.
    train: TrainConfig dict (epochs, global batch_size, optimizer, lr, schedule, checkpoint_every,
        checkpoint_every_steps, precision, ...).
    seed: seeds init, shuffling, dropout and jitter (per epoch and rank, so resumes repeat them).
    loader: `data.loader` as a dict (chunk_rows, shuffle_rows, prefetch_chunks, ...).
    distill: None for hard labels, else the soft term of the loss.
    steps_per_epoch, local_bs, start_epoch, val_keep: filled by `ray_train.data_parallel_job` from
        the shard plan: optimizer steps per epoch (the same on every rank), per-rank batch, the epoch
        the driver started the streams at, and the ranks that keep their small val share in memory.
    fault: test-only fault injection (`DISTILL_FAULT_INJECT`, docs/reliability.md).
    """

    name: str
    model: dict
    input_shape: tuple
    num_classes: int
    train: dict
    seed: int
    loader: dict = field(default_factory=dict)
    distill: Optional[Distill] = None
    steps_per_epoch: int = 0
    local_bs: int = 0
    start_epoch: int = 0
    val_keep: tuple = ()
    fault: dict = field(default_factory=dict)

    def replace(self, **changes: Any) -> "TrainJob":
        return dataclasses.replace(self, **changes)




@dataclass(frozen=True)
class SpecialistsJob:
    """What every specialist trial gets (`pipeline.stages.specialists`, one Ray Tune trial each; the
    trial's own index m comes from Tune's param space).

    data_uri, teacher_uri, out_uri: the dataset, the generalist the specialists start from, and the
        specialists/ folder (specialist m writes `spec_{m:03d}/` there).
    subsets, class_names, fingerprints: per specialist, its class ids, their names and the
        fingerprint a finished specialist records (a restarted trial skips finished work).
    train_cfg: the specialists' TrainConfig as a dict; seed: the global seed (trial m uses seed*1000+m).
    cpus, gpus: one trial's resources; loader: `data.loader` as a dict; manifest: the dataset's.
    class_counts: train samples per class (f, the subset's natural share, for the dustbin correction).
    fail: test-only failure injection (`DISTILL_TEST_FAIL_SPECIALISTS`), else None.
    """

    data_uri: str
    teacher_uri: str
    out_uri: str
    subsets: list
    class_names: list
    fingerprints: list
    train_cfg: dict
    seed: int
    cpus: float
    gpus: float
    loader: dict
    manifest: dict
    class_counts: list
    fail: Optional[dict] = None


@dataclass(frozen=True)
class TargetsJob:
    """What the targets stage's Ray Data pipeline ships to its read tasks, model replicas and writers
    (`pipeline.stages.targets`).

    cache_uri, data_uri: where the cache is written and the dataset it is computed from.
    batch_size, threads, gpus, precision: rows per model call and one replica's resources.
    layout: `pipeline.cache.Layout` fields (num_classes, dtype, top_k).
    teacher: `pipeline.teacher_ensemble.TeacherSpec` fields (checkpoints, top_n, method, iters).
    tasks: the shards to (re)write, from the regen plan (`pipeline.cache.regen`); names: shard index
        -> cache shard name.
    carry_inputs: whether the inputs travel on to the writers (a format that holds them, WebDataset).
    """

    cache_uri: str
    data_uri: str
    batch_size: int
    threads: int
    gpus: float
    precision: str
    layout: dict
    teacher: dict
    tasks: list
    names: dict
    carry_inputs: bool
