"""The teacher stage on Ray Train: trains on tiny synthetic data with 2 CPU workers, survives a
SIGKILLed worker, resumes an interrupted run at the next epoch, and skips itself when up to date."""
from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time

import pytest

from pipeline import layout, ray_train, runner, storage

from _reference import plain_error
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.stages import teacher

EPOCHS = 5
# tiny_synthetic has 12 classes in 4 groups of 3 near-indistinguishable classes: chance is 91.7 %
# error, and a model that only knows the groups errs 66.7 %. A few epochs of a small MLP reach ~50 %.
GOOD = 0.62


def _cfg(tmp_path, data_uri: str, **teacher) -> Config:
    t = {"model": {"arch": "mlp", "hidden": [128, 128]}, "epochs": EPOCHS, "batch_size": 64, "lr": 0.003,
         "num_workers": 2, "cpus_per_worker": 1, "max_failures": 2}
    t.update(teacher)
    return Config.model_validate({"output_dir": str(tmp_path / "run"), "data": {"format": "synthetic", "uri": data_uri},
                                  "teacher": t})


def _train_worker_pids() -> list[int]:
    """PIDs of this session's Ray Train worker processes (children of our raylet only: other Ray
    instances on the machine are not ours to kill)."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            pid = int(stat.split("/")[2])
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != raylet:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    pids.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _run_folder(cfg: Config) -> str:
    return os.path.join(cfg.stage_uri("teacher"), "ray", teacher.RUN_PREFIX + teacher.fingerprint(cfg))


# ------------------------------------------------------------------------------------------------
# fast: no Ray


def test_fingerprint_follows_the_teacher_section(tmp_path):
    base = _cfg(tmp_path, "d")
    assert teacher.fingerprint(base) == teacher.fingerprint(_cfg(tmp_path, "d"))
    assert teacher.fingerprint(base) != teacher.fingerprint(_cfg(tmp_path, "d", epochs=EPOCHS + 1))
    assert teacher.fingerprint(base) != teacher.fingerprint(_cfg(tmp_path, "d", model={"arch": "mlp", "hidden": [8]}))
    # How often checkpoints are written does not change the model: a finished stage stays done.
    assert teacher.fingerprint(base) == teacher.fingerprint(_cfg(tmp_path, "d", checkpoint_every=5))


def test_more_workers_than_shards_is_a_user_error(tmp_path, tiny_synthetic):
    cfg = _cfg(tmp_path, tiny_synthetic, num_workers=64)
    with pytest.raises(UserError, match="teacher.num_workers"):
        teacher._check_data(cfg, storage.read_json(os.path.join(tiny_synthetic, "manifest.json")))


def test_bad_fault_injection_json_is_a_user_error(monkeypatch):
    monkeypatch.setenv(ray_train.FAULT_ENV, "{not json")
    with pytest.raises(UserError, match=ray_train.FAULT_ENV):
        ray_train.fault_injection()


# ------------------------------------------------------------------------------------------------
# Ray Train


@pytest.mark.slow
def test_teacher_stage_trains_writes_its_files_and_is_skipped_when_done(tmp_path, tiny_synthetic, ray_local):
    from pipeline import models
    from pipeline.data import shards

    # No periodic checkpoints (checkpoint_every > epochs): the one checkpoint, at the end, must still
    # carry the best epoch's weights, which is what the stage reads.
    cfg = _cfg(tmp_path, tiny_synthetic, patience=10, checkpoint_every=100)
    res = runner.run_stage(cfg, "teacher")
    out = cfg.stage_uri("teacher")
    for name in ("model.pt", "model.json", "metrics.json", "_stage.json"):
        assert os.path.exists(os.path.join(out, name)), name
    m = storage.read_json(os.path.join(out, "metrics.json"))
    assert [e["epoch"] for e in m["epochs"]] == list(range(EPOCHS))
    assert all(set(e) >= {"epoch", "train_loss", "val_error", "seconds"} for e in m["epochs"])
    assert m["epochs"][-1]["train_loss"] < m["epochs"][0]["train_loss"]
    assert m["starts"] == [0] and m["num_workers"] == 2
    assert m["test_error"] < GOOD, m["test_error"]
    assert m["test_samples"] == 400 and m["test_errors"] == round(m["test_error"] * 400)
    assert 0 <= m["best_epoch"] < EPOCHS and m["wall_time_s"] > 0
    assert m["best_val_error"] == min(e["val_error"] for e in m["epochs"])
    assert res["test_error"] == m["test_error"]

    # The written teacher is the best-val checkpoint and scores what metrics.json says.
    model, meta = models.load_checkpoint(out)
    assert meta["params"] == m["params"] == models.count_params(model)
    assert meta["extra"]["epoch"] == m["best_epoch"]

    x, y, _ = shards.load_split(tiny_synthetic, "test")
    assert plain_error(model, x, y)["test_errors"] == m["test_errors"]
    # ... and it holds the weights of the best epoch: on val it scores exactly that epoch's error,
    # although only the last epoch was checkpointed.
    xv, yv, _ = shards.load_split(tiny_synthetic, "val")
    assert abs(plain_error(model, xv, yv)["test_error"] - m["best_val_error"]) < 1e-6
    # One checkpoint (the last), carrying the best weights in best/; the latest is the one Ray kept.
    run = _run_folder(cfg)
    assert os.path.exists(os.path.join(run, "checkpoint_manager_snapshot.json"))
    kept = [p for p in glob.glob(os.path.join(run, "checkpoint_*")) if os.path.isdir(p)]
    assert len(kept) == 1 and os.path.exists(os.path.join(kept[0], "best", "model.pt")), kept
    with open(os.path.join(kept[0], "trainer.json")) as f:
        assert json.load(f)["epoch"] == EPOCHS - 1

    t0 = time.perf_counter()
    again = runner.run_stage(cfg, "teacher")
    assert again["skipped"] and time.perf_counter() - t0 < 5


@pytest.mark.slow
def test_killed_worker_does_not_fail_the_stage(tmp_path, tiny_synthetic, ray_local, monkeypatch):
    epochs = 6
    cfg = _cfg(tmp_path, tiny_synthetic, epochs=epochs, max_failures=2)
    # Slow epochs down so the kill lands mid-run, after the first checkpoint is registered.
    monkeypatch.setenv(ray_train.FAULT_ENV, json.dumps({"epoch_sleep": 1.5}))
    snapshot = os.path.join(_run_folder(cfg), "checkpoint_manager_snapshot.json")
    killed: list[int] = []

    def kill_one_worker():
        deadline = time.time() + 300
        while not os.path.exists(snapshot) and time.time() < deadline:
            time.sleep(0.1)
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    runner.run_stage(cfg, "teacher")
    killer.join(timeout=5)
    assert killed, "no Ray Train worker process was found to kill"
    m = storage.read_json(os.path.join(cfg.stage_uri("teacher"), "metrics.json"))
    assert [e["epoch"] for e in m["epochs"]] == list(range(epochs))
    # The replacement worker group started from a checkpoint, not from scratch.
    assert len(m["starts"]) == 2 and m["starts"][0] == 0 and 0 < m["starts"][1] < epochs, m["starts"]
    assert m["test_error"] < GOOD
    assert layout.read_marker(cfg, "teacher") is not None


@pytest.mark.slow
def test_interrupted_stage_resumes_at_the_next_epoch_and_a_changed_config_starts_over(
        tmp_path, tiny_synthetic, ray_local, monkeypatch):
    cfg = _cfg(tmp_path, tiny_synthetic, epochs=EPOCHS, max_failures=0)
    stop_after = 1
    monkeypatch.setenv(ray_train.FAULT_ENV, json.dumps({"stop_after_epoch": stop_after}))
    with pytest.raises(ray_train.TrainingFailed):
        runner.run_stage(cfg, "teacher")
    out = cfg.stage_uri("teacher")
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert layout.read_marker(cfg, "teacher") is None

    monkeypatch.delenv(ray_train.FAULT_ENV)
    runner.run_stage(cfg, "teacher")
    m = storage.read_json(os.path.join(out, "metrics.json"))
    assert m["starts"] == [0, stop_after + 1]
    assert [e["epoch"] for e in m["epochs"]] == list(range(EPOCHS))
    assert m["test_error"] < GOOD

    # Another model must not resume this run's checkpoints: it starts at epoch 0 in a new run folder.
    old = _run_folder(cfg)
    cfg2 = _cfg(tmp_path, tiny_synthetic, epochs=2, model={"arch": "mlp", "hidden": [32]})
    runner.run_stage(cfg2, "teacher")
    m2 = storage.read_json(os.path.join(out, "metrics.json"))
    assert m2["starts"] == [0] and m2["model"]["hidden"] == [32] and len(m2["epochs"]) == 2
    assert not os.path.exists(old) and os.path.exists(_run_folder(cfg2))


@pytest.mark.slow
@pytest.mark.s3
def test_teacher_stage_writes_to_s3(tiny_synthetic, ray_local, s3_bucket):
    """output_dir on S3: Ray Train checkpoints, model and metrics all land in the bucket."""
    from pipeline import models

    cfg = Config.model_validate({"output_dir": f"{s3_bucket}/run", "data": {"format": "synthetic", "uri": tiny_synthetic},
                                 "teacher": {"model": {"arch": "mlp", "hidden": [128, 128]}, "epochs": 3,
                                             "batch_size": 64, "lr": 0.003, "num_workers": 2}})
    runner.run_stage(cfg, "teacher")
    out = cfg.stage_uri("teacher")
    assert out.startswith("s3://")
    m = storage.read_json(storage.join(out, "metrics.json"))
    assert [e["epoch"] for e in m["epochs"]] == [0, 1, 2] and m["test_error"] < 0.8
    model, meta = models.load_checkpoint(out)
    assert meta["params"] == m["params"]
    run = storage.join(out, "ray", teacher.RUN_PREFIX + teacher.fingerprint(cfg))
    entries = storage.listdir(run)
    assert "checkpoint_manager_snapshot.json" in entries
    assert any(e.startswith("checkpoint_2") for e in entries)
    assert layout.read_marker(cfg, "teacher")["fingerprint"] == teacher.fingerprint(cfg)


@pytest.mark.slow
def test_a_damaged_shard_stops_training_and_is_named(tmp_path, tiny_synthetic, ray_local):
    """The read tasks check every shard's sha256 against the manifest while streaming: a shard whose
    bytes changed (same size, so a size check would not see it) ends the stage with a UserError
    naming it, instead of being trained on."""
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(tiny_synthetic, data)
    victim = os.path.join(data, "train-000002.tar")
    with open(victim, "r+b") as f:
        f.seek(2000)
        b = f.read(1)
        f.seek(2000)
        f.write(bytes([b[0] ^ 0xFF]))
    cfg = _cfg(tmp_path, data, epochs=1, max_failures=0)
    with pytest.raises(UserError) as e:
        runner.run_stage(cfg, "teacher")
    assert "train-000002.tar" in str(e.value) and "sha256" in str(e.value)
    assert not os.path.exists(os.path.join(cfg.stage_uri("teacher"), "model.json"))
