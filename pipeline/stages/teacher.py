"""Stage `teacher`: the generalist, trained on all classes with Ray Train (data-parallel).

Each Ray Train worker reads its own train/val shards (`pipeline.ray_train.train_loop`) and the
worker group checkpoints every epoch into `teacher/ray/teacher-{fingerprint}/`. A killed worker is
replaced and training continues from the last checkpoint (`teacher.max_failures`); an interrupted
stage, run again with the same config, continues from the same place. When the run is over the
driver takes the checkpoint with the lowest val error, measures it on the test split and writes

    teacher/model.pt, model.json   the generalist (`pipeline.models.load_checkpoint`)
    teacher/metrics.json           per-epoch train loss / val error, test_error, test_errors, params,
                                   wall time, best epoch, the epochs at which training (re)started
"""
from __future__ import annotations

import time

from pipeline import storage
from pipeline.config import Config, section_fingerprint
from pipeline.errors import UserError
from pipeline.jobs import TrainJob
from pipeline.layout import METRICS_FILE, marker_fingerprint

NEEDS_RAY = True
RUN_PREFIX = "teacher-"


def fingerprint(cfg: Config) -> str:
    return section_fingerprint(cfg.teacher, cfg.seed, marker_fingerprint(cfg, "data"))


def model_input_shape(augment, manifest: dict) -> list[int]:
    """What a stage's model takes: the manifest's input shape, or for images the view its
    `augment` section produces (`pipeline.transforms.output_shape`)."""
    from pipeline import datasets

    if not datasets.needs_transform(manifest, augment):
        return [int(s) for s in manifest["input_shape"]]
    from pipeline import transforms

    return [int(s) for s in transforms.output_shape(augment.model_dump() if hasattr(augment, "model_dump")
                                                    else augment, manifest)]


def transform_spec(augment, manifest: dict, train_view: bool = True) -> dict:
    """What `pipeline.ray_train.data_parallel_job` needs to decode/augment a stage's rows."""
    return {"manifest": manifest, "augment": augment.model_dump() if hasattr(augment, "model_dump") else augment,
            "train_view": train_view}


def train_job(cfg: Config, manifest: dict) -> TrainJob:
    """What every Ray Train worker needs to train the generalist (`pipeline.ray_train.train_loop`)."""
    tc = cfg.teacher
    return TrainJob(name="teacher", model=tc.model.spec(), input_shape=tuple(model_input_shape(tc.augment, manifest)),
                    num_classes=int(manifest["num_classes"]), train=tc.train_dict(), seed=int(cfg.seed))


def _check_data(cfg: Config, manifest: dict) -> None:
    data_uri = cfg.stage_uri("data")
    splits = manifest["splits"]
    missing = [s for s in ("train", "val", "test") if s not in splits]
    if missing:
        raise UserError(f"{data_uri}: the dataset has no {', '.join(missing)} split(s); re-ingest it with "
                        "`distill data ingest` (it carves val from train)")
    n_shards = len(splits["train"]["shards"])
    if n_shards < cfg.teacher.num_workers:
        raise UserError(f"teacher.num_workers: {cfg.teacher.num_workers} workers but {data_uri} has only "
                        f"{n_shards} train shard(s) and each worker reads its own; lower "
                        "teacher.num_workers or re-ingest with a smaller data.shard_size")


def evaluate_saved(cfg: Config, checkpoint_uri: str, data_uri: str, split: str, augment=None) -> dict:
    """{"test_error", "test_errors", "n"} of a saved checkpoint on a split, streamed through model
    replicas on Ray workers (`pipeline.inference`): the driver never runs a model over a split.
    Image datasets are decoded to the evaluation view of `augment` (the stage's own section)."""
    from pipeline import inference
    from pipeline.data import shards

    manifest = shards.read_manifest(data_uri)
    return inference.evaluate_checkpoint(checkpoint_uri, data_uri, split, **inference.options(cfg),
                                         transform=inference.eval_transform(cfg, manifest, augment))


def run(cfg: Config) -> dict:
    from pipeline import models, ray_train
    from pipeline.data import shards
    from pipeline.log import log

    t0 = time.perf_counter()
    tc = cfg.teacher
    data_uri = cfg.stage_uri("data")
    out = cfg.stage_uri("teacher")
    manifest = shards.read_manifest(data_uri)
    _check_data(cfg, manifest)
    ray_train.check_resources(tc, "teacher")

    ray_uri = storage.join(out, "ray")
    name = RUN_PREFIX + fingerprint(cfg)
    # Checkpoints of an earlier config must not be resumed (other model, other data); drop them.
    ray_train.remove_other_runs(ray_uri, name, RUN_PREFIX)
    from pipeline import datasets

    job, dsets = ray_train.data_parallel_job(
        train_job(cfg, manifest), datasets.split_items(data_uri, "train", manifest),
        datasets.split_items(data_uri, "val", manifest), tc, cfg.data.loader, ray_uri, name,
        transform_spec(tc.augment, manifest))
    log(f"teacher: {job.model['arch']} on {manifest['splits']['train']['num_samples']} train samples, "
        f"{tc.num_workers} Ray Train worker(s), {tc.epochs} epochs; checkpoints in {storage.join(ray_uri, name)}")
    result = ray_train.fit(job, tc, ray_uri, name, tc.max_failures, datasets=dsets)
    best, best_meta, _last, last_meta = ray_train.best_and_last(result)
    train_seconds = time.perf_counter() - t0

    with best.as_directory() as d:
        model, _ = models.load_checkpoint(d)
    params = models.count_params(model)
    best_epoch = int(best_meta["epoch"])
    best_val = best_meta["val_error"]
    extra = {"stage": "teacher", "epoch": best_epoch, "val_error": best_val}
    # Saved first (the replicas that score it read it from the run directory), then again with its
    # test error: the weights, and so their sha256 and every downstream fingerprint, do not change.
    models.save_checkpoint(out, model, job.model, job.input_shape, job.num_classes, extra=extra)
    ev = evaluate_saved(cfg, out, data_uri, "test", tc.augment)
    models.save_checkpoint(out, model, job.model, job.input_shape, job.num_classes,
                           extra={**extra, "test_error": ev["test_error"]})
    history = last_meta["history"]
    metrics = {
        "test_error": ev["test_error"],
        "test_errors": ev["test_errors"],
        "test_samples": ev["n"],
        "params": params,
        "best_epoch": best_epoch,
        "best_val_error": best_val,
        "epochs": history,
        "epochs_run": len(history),
        "early_stopped": len(history) < tc.epochs,
        "starts": last_meta.get("starts", []),
        "train_seconds": round(sum(e["seconds"] for e in history), 3),
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "num_workers": tc.num_workers,
        "model": models.resolve_spec(job.model),
        "ray_run": storage.join(ray_uri, name),
    }
    storage.write_json_atomic(storage.join(out, METRICS_FILE), metrics)
    log(f"teacher: test error {100 * ev['test_error']:.2f} % ({ev['test_errors']}/{ev['n']}), "
        f"best epoch {best_epoch + 1}, {params:,} params, {train_seconds:.0f}s in Ray Train")
    return {"test_error": ev["test_error"], "params": params}
