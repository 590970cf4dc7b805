"""The tune stage: Ray Tune over T and alpha on a tiny cache, its files, and its search spaces."""
from __future__ import annotations

import csv
import io

import pytest

from pipeline import layout, runner, storage
from pipeline.errors import UserError
from pipeline.stages import tune as tune_stage

from _student_helpers import build_run, tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tune") / "run")
    build_run(tiny_config(root))
    return root


def _rows(cfg) -> list[dict]:
    text = storage.read_bytes(storage.join(cfg.stage_uri("tune"), "results.csv")).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_search_space_and_trial_count_follow_the_config():
    from ray import tune

    cfg = tiny_config("/tmp/unused", **{"tune.T": [1, 2, 4], "tune.alpha": [0.5, 0.9], "tune.num_samples": 2,
                                        "tune.lr": [0.001, 0.01]})
    space = tune_stage.param_space(cfg)
    assert tune_stage.num_trials(cfg) == 3 * 2 * 2 * 2
    assert space["T"] == tune.grid_search([1.0, 2.0, 4.0])
    assert space["seed"] == tune.grid_search([0, 1])  # repeats of the grid differ by seed
    rnd = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"search": "random", "num_samples": 5})})
    assert tune_stage.num_trials(rnd) == 5
    assert sorted(tune_stage.param_space(rnd)["T"].categories) == [1.0, 2.0, 4.0]


@pytest.mark.slow
def test_grid_with_asha_writes_csv_heatmap_and_best(ray_local, tiny_run):
    cfg = tiny_config(tiny_run, **{"tune.T": [1.0, 6.0], "tune.alpha": [0.3, 0.9], "tune.scheduler": "asha",
                                   "tune.grace_period": 1})
    res = runner.run_stage(cfg, "tune")
    assert not res["skipped"]
    rows = _rows(cfg)
    assert len(rows) == 4
    assert list(rows[0]) == list(tune_stage.CSV_COLUMNS)
    assert {(float(r["T"]), float(r["alpha"])) for r in rows} == {(1.0, 0.3), (1.0, 0.9), (6.0, 0.3), (6.0, 0.9)}
    for r in rows:
        assert r["status"] in ("completed", "stopped")
        assert 0.0 <= float(r["val_error"]) <= 1.0
        assert 1 <= int(r["epochs_run"]) <= 3
        assert float(r["val_error"]) <= float(r["last_val_error"])  # best epoch, never worse than the last
    # ASHA (reduction factor 2, grace 1) lets at most half of the trials past the first rung.
    assert sum(r["status"] == "completed" for r in rows) < 4

    best = storage.read_json(storage.join(cfg.stage_uri("tune"), "best.json"))
    assert best["val_error"] == min(float(r["val_error"]) for r in rows)
    assert (best["T"], best["alpha"]) in {(float(r["T"]), float(r["alpha"])) for r in rows
                                          if float(r["val_error"]) == best["val_error"]}
    assert best["lr"] == cfg.student.lr
    png = storage.read_bytes(storage.join(cfg.stage_uri("tune"), "heatmap.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    metrics = storage.read_json(storage.join(cfg.stage_uri("tune"), "metrics.json"))
    assert metrics["trials"] == 4 and metrics["best"]["T"] == best["T"]
    assert layout.read_tune_best(cfg) == best

    again = runner.run_stage(cfg, "tune")
    assert again["skipped"]


@pytest.mark.slow
def test_random_search_with_trials_reading_the_cache_themselves(ray_local, tiny_run, monkeypatch, tmp_path):
    # Every trial streams the cache from its URI (the driver hands trials no data).
    cfg = tiny_config(tiny_run, **{"tune.search": "random", "tune.num_samples": 3, "tune.T": [2.0, 3.0, 5.0],
                                   "tune.alpha": [0.5, 0.7], "tune.lr": [0.002, 0.004], "tune.scheduler": "fifo",
                                   "tune.epochs": 2})
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path / "other")})
    # Reuse the finished upstream stages of the tiny run through explicit data/targets URIs.
    cfg.data.uri = storage.join(tiny_run, "data")
    cfg.targets.uri = storage.join(tiny_run, "targets")
    tune_stage.run(cfg)
    rows = _rows(cfg)
    assert len(rows) == 3
    for r in rows:
        assert float(r["T"]) in (2.0, 3.0, 5.0) and float(r["alpha"]) in (0.5, 0.7)
        assert float(r["lr"]) in (0.002, 0.004)
        assert r["status"] == "completed" and int(r["epochs_run"]) == 2
    best = layout.read_tune_best(cfg)
    assert best["lr"] in (0.002, 0.004)


def test_bad_search_space_is_a_user_error(tmp_path):
    # refused when the config is loaded, before any upstream stage runs
    with pytest.raises(UserError) as e:
        tiny_config(str(tmp_path / "run"), **{"tune.T": [], "tune.alpha": [1.5]})
    assert "tune.T" in str(e.value) and "tune.alpha" in str(e.value)


def test_missing_cache_names_the_stage_to_run(tmp_path):
    from _specialists_helpers import ingest_synthetic

    cfg = tiny_config(str(tmp_path / "run"))
    ingest_synthetic(cfg)
    with pytest.raises(UserError) as e:
        tune_stage.run(cfg)
    assert "targets" in str(e.value)
