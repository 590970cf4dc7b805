"""The student stage: distilled and baseline students through Ray Train, the tune -> student hand-off,
online vs cached distillation, and the exported model."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from pipeline import cache, layout, losses, models, runner, storage
from pipeline.errors import UserError
from pipeline.losses import kd_loss
from pipeline.stages import student
from pipeline.teacher_ensemble import TeacherEnsemble, resolve_from_config

from _student_helpers import build_run, tiny_config


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A hand-made dataset, an untrained teacher with two specialists and its float32 cache (no Ray)."""
    from _targets_helpers import make_config, write_dataset, write_teacher
    from pipeline.stages import targets

    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("student-small") / "run")
    cfg = make_config(root, dtype="float32")
    write_dataset(cfg.stage_uri("data"), [40, 40])
    write_teacher(cfg)
    targets.regenerate(cfg, progress=False, use_ray=False)
    return cfg


def _joined(job: dict, target: str) -> dict:
    """The cache joined with its inputs, read without Ray by the same per-shard reader the
    streaming path uses (`pipeline.datasets`)."""
    from pipeline import datasets

    parts = [datasets._read_one(e) for e in student.train_entries(job, "cached", target)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "key"}


def _batch(data: dict, n: int = 32) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v[:n])) for k, v in data.items()}


@pytest.mark.parametrize("target", ["ensemble", "generalist"])
def test_online_and_cached_give_the_same_loss_on_the_same_batch(small_cache, target):
    cfg = small_cache.model_copy(deep=True)
    cfg.student.target = target
    job = student.student_job(cfg)
    data = _joined(job, target)
    batch = _batch(data)
    ensemble = TeacherEnsemble(resolve_from_config(cfg))
    torch.manual_seed(0)
    logits = torch.randn(len(batch["x"]), job.num_classes, requires_grad=True)
    cached = losses.make_loss("cached", 3.0, 0.7, job.num_classes)(logits, batch)
    online_fn = losses.make_loss("online", 3.0, 0.7, job.num_classes, target, ensemble)
    online = online_fn(logits, {k: v for k, v in batch.items() if k != "teacher"})
    torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-5)
    # ... and it is the KD loss against what the teacher says about these inputs, not a constant.
    g, e = ensemble(batch["x"])
    want = kd_loss(logits, e if target == "ensemble" else g, batch["y"], 3.0, 0.7)
    torch.testing.assert_close(cached, want, rtol=1e-5, atol=1e-5)
    other = losses.make_loss("cached", 1.0, 0.7, job.num_classes)(logits, batch)
    assert abs(float(other.detach()) - float(cached.detach())) > 1e-4


def test_top_k_cache_gives_the_loss_of_its_dense_reconstruction(small_cache, tmp_path):
    from pipeline.stages import targets

    cfg = small_cache.model_copy(deep=True)
    cfg.targets.uri = str(tmp_path / "topk")
    cfg.targets.top_k = 2
    targets.regenerate(cfg, progress=False, use_ray=False, write_marker=False)
    job = student.student_job(cfg)
    data = _joined(job, "ensemble")
    assert "teacher" not in data and data["teacher_topk_idx"].shape[1] == 2
    batch = _batch(data)
    logits = torch.randn(len(batch["x"]), job.num_classes)
    got = losses.make_loss("cached", 2.0, 0.5, job.num_classes)(logits, batch)
    dense = cache.topk_to_dense(batch["teacher_topk_idx"], batch["teacher_topk_val"], batch["teacher_tail"],
                                job.num_classes)
    torch.testing.assert_close(got, kd_loss(logits, dense, batch["y"], 2.0, 0.5))
    assert torch.isfinite(got)


def test_hyperparameters_come_from_tune_only_when_asked(tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), **{"student.T": 3.0, "student.alpha": 0.6})
    assert student.hyperparameters(cfg)["source"] == "config"  # tune has not run yet
    storage.write_json_atomic(storage.join(cfg.stage_uri("tune"), "best.json"),
                              {"T": 8.0, "alpha": 0.9, "lr": 0.01, "val_error": 0.1})
    hp = student.hyperparameters(cfg)
    assert (hp["T"], hp["alpha"], hp["lr"], hp["source"]) == (8.0, 0.9, 0.01, "tune")
    off = tiny_config(str(tmp_path / "run"), **{"student.T": 3.0, "student.alpha": 0.6, "student.use_tuned": False})
    assert (student.hyperparameters(off)["T"], student.hyperparameters(off)["alpha"]) == (3.0, 0.6)
    disabled = tiny_config(str(tmp_path / "run"), **{"student.T": 3.0, "tune.enabled": False})
    assert student.hyperparameters(disabled)["T"] == 3.0
    # The student's fingerprint follows tune's marker only when tune's result is used.
    fp = student.fingerprint(cfg)
    storage.write_json_atomic(layout.marker_uri(cfg, "tune"), {"fingerprint": "new-tune"})
    assert student.fingerprint(cfg) != fp
    fp_off = student.fingerprint(off)
    storage.write_json_atomic(layout.marker_uri(cfg, "tune"), {"fingerprint": "newer-tune"})
    assert student.fingerprint(off) == fp_off


def test_cached_mode_without_a_cache_says_what_to_do(tmp_path):
    from _specialists_helpers import ingest_synthetic
    from pipeline.data import shards

    cfg = tiny_config(str(tmp_path / "run"))
    ingest_synthetic(cfg)
    with pytest.raises(UserError) as e:
        student._check_inputs(cfg, shards.read_manifest(cfg.stage_uri("data")))
    assert "targets" in str(e.value) and "student.mode=online" in str(e.value)
    too_many = tiny_config(str(tmp_path / "run"), **{"student.num_workers": 50})
    with pytest.raises(UserError, match="student.num_workers"):
        student._check_inputs(too_many, shards.read_manifest(cfg.stage_uri("data")))


def test_export_round_trips(tmp_path):
    from pipeline import export

    torch.manual_seed(0)
    spec = {"arch": "mlp", "hidden": [8]}
    model = models.build_model(spec, (1, 6, 6), 4)
    meta = models.save_checkpoint(str(tmp_path / "ckpt"), model, spec, (1, 6, 6), 4)
    out = export.export_student(model, meta, str(tmp_path / "export"))
    assert set(out["files"]) == {"student.pt", "student.ts", "student.pt2", "student.onnx"}, out["onnx_error"]
    x = torch.rand(5, 1, 6, 6) * 2 - 1
    want = model.eval()(x)
    state = torch.load(str(tmp_path / "export" / "student.pt"), weights_only=True)
    rebuilt = models.build_model(spec, (1, 6, 6), 4)
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(rebuilt.eval()(x), want)
    ts = torch.jit.load(str(tmp_path / "export" / "student.ts"))
    torch.testing.assert_close(ts(x), want)
    program = torch.export.load(str(tmp_path / "export" / "student.pt2")).module()
    torch.testing.assert_close(program(x), want)
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(tmp_path / "export" / "student.onnx"))
    (got,) = ReferenceEvaluator(proto).run(None, {"x": x.detach().numpy()})
    np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-4, rtol=1e-3)
    assert storage.read_json(str(tmp_path / "export" / "model.json"))["params"] == meta["params"]
    lat = export.model_latency(model, (1, 6, 6), batch_size=16, runs=3)
    assert lat["ms_median"] > 0 and lat["batch_size"] == 16


# ------------------------------------------------------------------------------------------------
# The real stages on Ray


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("student") / "run")
    build_run(tiny_config(root))
    return root


def _check_student_files(cfg) -> dict:
    out = cfg.stage_uri("student")
    metrics = storage.read_json(storage.join(out, "metrics.json"))
    from pipeline.data import shards

    test_x, test_y, _ = shards.load_split(cfg.stage_uri("data"), "test")
    for which in student.STUDENTS:
        m = metrics[which]
        assert {"test_error", "test_errors", "params"} <= set(m)
        assert 0 <= m["test_error"] <= 1 and m["test_errors"] == round(m["test_error"] * len(test_y))
        model, meta = models.load_checkpoint(storage.join(out, which))
        assert meta["params"] == m["params"]
        # The saved checkpoint is the model that was evaluated.
        pred = model(models.prepare_inputs(test_x)).argmax(1).numpy()
        assert int((pred != test_y).sum()) == m["test_errors"]
    assert metrics["baseline"]["params"] == metrics["distilled"]["params"] == metrics["distilled_generalist"]["params"]
    assert metrics["distilled_generalist"]["target"] == "generalist" and metrics["distilled"]["target"] == "ensemble"
    assert metrics["specialists_gain"]["test_errors"] == (metrics["distilled_generalist"]["test_errors"]
                                                         - metrics["distilled"]["test_errors"])
    assert metrics["baseline"]["epochs_run"] <= cfg.student.epochs
    lat = metrics["latency_ms_per_batch"]
    assert {"student", "student_torchscript", "generalist", "ensemble"} <= set(lat)
    assert all(lat[k] > 0 for k in ("student", "generalist", "ensemble"))
    assert metrics["latency"]["student"]["batch_size"] == student.LATENCY_BATCH
    for name in ("student.pt", "student.ts", "student.pt2", "student.onnx", "model.json"):
        assert storage.exists(storage.join(out, "export", name)), name
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(out, "export", "student.pt"))), weights_only=True)
    model, _ = models.load_checkpoint(storage.join(out, "distilled"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v)
    return metrics


@pytest.mark.slow
def test_tune_then_student_uses_the_best_trial(ray_local, tiny_run):
    cfg = tiny_config(tiny_run, **{"tune.T": [1.0, 5.0], "tune.alpha": [0.5, 0.9], "tune.scheduler": "fifo"})
    res = runner.run_pipeline(cfg, only=["tune", "student"])
    assert not res["tune"]["skipped"] and not res["student"]["skipped"]
    assert res["tune"]["trials"] == 4
    best = storage.read_json(storage.join(cfg.stage_uri("tune"), "best.json"))
    metrics = _check_student_files(cfg)
    d = metrics["distilled"]
    assert (d["T"], d["alpha"], d["lr"]) == (best["T"], best["alpha"], best["lr"])
    assert d["hyperparameters_from"] == "tune" and d["mode"] == "cached" and d["target"] == "ensemble"
    assert metrics["baseline"]["lr"] == cfg.student.lr

    again = runner.run_pipeline(cfg, only=["tune", "student"])
    assert again["tune"]["skipped"] and again["student"]["skipped"]

    # Fixed T/alpha instead of tune's: the distilled student retrains, the baseline's finished Ray
    # Train run is reused (its inputs did not change), so its result is identical.
    fixed = tiny_config(tiny_run, **{"student.use_tuned": False, "student.T": 2.5, "student.alpha": 0.3})
    baseline_json = storage.read_bytes(storage.join(cfg.stage_uri("student"), "baseline", "model.json"))
    res = runner.run_stage(fixed, "student")
    assert not res["skipped"]
    m2 = storage.read_json(storage.join(fixed.stage_uri("student"), "metrics.json"))
    assert (m2["distilled"]["T"], m2["distilled"]["alpha"], m2["distilled"]["hyperparameters_from"]) == (2.5, 0.3, "config")
    assert m2["baseline"]["test_errors"] == metrics["baseline"]["test_errors"]
    assert m2["baseline"]["epochs"] == metrics["baseline"]["epochs"]
    assert storage.read_bytes(storage.join(cfg.stage_uri("student"), "baseline", "model.json")) == baseline_json


@pytest.mark.slow
def test_online_mode_runs_without_a_cache(ray_local, tiny_run, tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), **{"student.mode": "online", "student.target": "generalist",
                                                "student.epochs": 2, "tune.enabled": False, "student.T": 3.0})
    # Everything but the cache, from the finished tiny run.
    for stage in ("data", "teacher", "cluster", "specialists"):
        src, dst = os.path.join(tiny_run, stage), os.path.join(str(tmp_path / "run"), stage)
        import shutil

        shutil.copytree(src, dst)
    assert not storage.exists(cfg.stage_uri("targets"))
    res = runner.run_stage(cfg, "student")
    assert not res["skipped"]
    metrics = _check_student_files(cfg)
    assert metrics["distilled"]["mode"] == "online" and metrics["distilled_generalist"]["mode"] == "online"
    assert metrics["distilled"]["T"] == 3.0 and metrics["distilled"]["epochs_run"] == 2
