"""The seeds harness (pipeline/seeds.py, docs/seeds.md): the summary maths on hand-written
summary.json files, the command-line errors, and one end-to-end run at two seeds on tiny data."""
from __future__ import annotations

import json
import math
import os

import pytest

from pipeline import seeds as seeds_mod
from pipeline.seeds import COMPARISONS, MODELS, mean_sd, parse_seeds, summarise
from pipeline.errors import UserError

from _data_helpers import run_cli

# Three hand-made runs. Test errors (fractions) per model and seed:
#                       seed 0  seed 1  seed 2
#   generalist           0.30    0.28    0.32
#   ensemble             0.28    0.29    0.29
#   student_baseline     0.40    0.36    0.38
#   distilled_generalist 0.34    0.33    0.35
#   distilled            0.33    0.34    0.32
ERRORS = {
    "generalist": (0.30, 0.28, 0.32),
    "ensemble": (0.28, 0.29, 0.29),
    "student_baseline": (0.40, 0.36, 0.38),
    "student_distilled_generalist": (0.34, 0.33, 0.35),
    "student_distilled": (0.33, 0.34, 0.32),
}
TEST_N = 100


def _summary(i: int, seed: int) -> dict:
    models = {}
    for key, errs in ERRORS.items():
        e = {"test_error": errs[i], "test_errors": round(errs[i] * TEST_N), "params": 1000 + len(key)}
        if key.startswith("student_distilled"):
            e.update(T=2.0 + i, alpha=0.5)
        if key == "ensemble":
            e["num_specialists"] = 4 - i
        models[key] = e
    return {"dataset": {"name": "synthetic", "num_classes": 12, "train": 900, "val": 100, "test": TEST_N},
            "models": models, "tune": {"trials": 1}, "timings_s": {"total": 10.0 + seed}}


def _write_runs(root, seeds=(0, 1, 2)) -> str:
    for i, s in enumerate(seeds):
        d = root / f"seed-{s}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(_summary(i, s)))
    return str(root)


def test_mean_and_sample_sd_by_hand():
    # mean(0.30, 0.28, 0.32) = 0.30; squared deviations 0, 4e-4, 4e-4: sample variance 8e-4 / 2
    # = 4e-4, sd 0.02 (the population sd would be 0.0163).
    got = mean_sd([0.30, 0.28, 0.32])
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(0.30)
    assert got["sd"] == pytest.approx(0.02)
    # None values are left out; one value has a mean but no sd; none has neither.
    assert mean_sd([0.1, None, 0.3]) == {"mean": pytest.approx(0.2), "sd": pytest.approx(math.sqrt(0.02)), "n": 2}
    assert mean_sd([0.25]) == {"mean": 0.25, "sd": None, "n": 1}
    assert mean_sd([None]) == {"mean": None, "sd": None, "n": 0}


def test_summary_of_three_hand_written_runs(tmp_path):
    out = _write_runs(tmp_path / "runs")
    s = seeds_mod.write_seeds_summary(out, [0, 1, 2])
    assert s["seeds"] == [0, 1, 2]
    m = s["models"]
    assert set(m) == set(MODELS)
    assert m["generalist"]["test_error"] == [0.30, 0.28, 0.32]
    assert m["generalist"]["test_errors"] == [30, 28, 32]
    # ensemble: mean (0.28 + 0.29 + 0.29) / 3 = 0.28667; deviations -0.00667, +0.00333, +0.00333:
    # sum of squares 6.667e-5, / 2 -> 3.333e-5, sd 0.005774.
    assert m["ensemble"]["mean"] == pytest.approx(0.286667, abs=1e-6)
    assert m["ensemble"]["sd"] == pytest.approx(0.0057735, abs=1e-6)
    assert m["ensemble"]["num_specialists"] == [4, 3, 2]
    assert m["student_baseline"]["mean"] == pytest.approx(0.38) and m["student_baseline"]["sd"] == pytest.approx(0.02)
    assert m["student_distilled"]["mean"] == pytest.approx(0.33) and m["student_distilled"]["sd"] == pytest.approx(0.01)
    assert m["student_distilled"]["T"] == [2.0, 3.0, 4.0]

    c = {(x["better"], x["worse"]): x for x in s["comparisons"]}
    assert list(c) == list(COMPARISONS)
    # ensemble - generalist: -0.02, +0.01, -0.03 -> mean -0.01333; deviations -0.00667, +0.02333,
    # -0.01667: squares 4.44e-5 + 5.444e-4 + 2.778e-4 = 8.667e-4, / 2 -> 4.333e-4, sd 0.020817. Better at 2 of 3 seeds.
    eg = c[("ensemble", "generalist")]
    assert eg["difference"] == pytest.approx([-0.02, 0.01, -0.03])
    assert eg["mean"] == pytest.approx(-0.013333, abs=1e-6)
    assert eg["sd"] == pytest.approx(0.020817, abs=1e-6)
    assert eg["better_at"] == 2 and eg["holds_at_every_seed"] is False
    assert eg["se"] == pytest.approx(0.020817 / math.sqrt(3), abs=1e-6)
    # distilled - baseline: -0.07, -0.02, -0.06 -> mean -0.05; deviations -0.02, +0.03, -0.01:
    # sum of squares 1.4e-3, / 2 -> 7e-4, sd 0.026458. Better at every seed.
    db = c[("student_distilled", "student_baseline")]
    assert db["difference"] == pytest.approx([-0.07, -0.02, -0.06])
    assert db["mean"] == pytest.approx(-0.05)
    assert db["sd"] == pytest.approx(math.sqrt(7e-4))
    assert db["holds_at_every_seed"] is True and db["better_at"] == 3
    # distilled - distilled from the generalist: -0.01, +0.01, -0.03 -> mean -0.01, sd 0.02.
    dg = c[("student_distilled", "student_distilled_generalist")]
    assert dg["mean"] == pytest.approx(-0.01) and dg["sd"] == pytest.approx(0.02)
    assert dg["holds_at_every_seed"] is False and dg["better_at"] == 2

    # The files: JSON equal to what was returned, the report's tables, a PNG.
    on_disk = json.loads((tmp_path / "runs" / "seeds_summary.json").read_text())
    assert on_disk["comparisons"][1]["mean"] == pytest.approx(-0.05)
    assert on_disk["runs"]["1"] == os.path.join(out, "seed-1")
    report = (tmp_path / "runs" / "seeds_report.md").read_text()
    assert "| generalist | 30.00 (30) | 28.00 (28) | 32.00 (32) | 30.00 ± 2.00 |" in report
    assert "| baseline" not in report.split("Paired")[0]  # model rows use the long labels
    assert "| distilled (ensemble) − baseline | -7.00 | -2.00 | -6.00 | -5.00 ± 2.65 | yes |" in report
    assert "| ensemble − generalist | -2.00 | +1.00 | -3.00 | -1.33 ± 2.08 | no (2 of 3) |" in report
    png = (tmp_path / "runs" / "seeds.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_missing_model_is_left_out_of_its_statistics_and_the_ordering_is_not_claimed():
    runs = {s: _summary(i, s) for i, s in enumerate((0, 1, 2))}
    runs[1]["models"]["student_distilled_generalist"]["test_error"] = None  # an older run: not trained
    s = summarise(runs)
    g = s["models"]["student_distilled_generalist"]
    assert g["n"] == 2 and g["mean"] == pytest.approx(0.345)
    dg = next(c for c in s["comparisons"] if c["worse"] == "student_distilled_generalist")
    assert dg["difference"][1] is None and dg["n"] == 2
    assert dg["mean"] == pytest.approx(-0.02)  # (-0.01 - 0.03) / 2
    runs = {s: _summary(0, s) for s in (0, 1)}  # distilled beats the baseline at both...
    runs[1]["models"]["student_baseline"]["test_error"] = None  # ...but one is unknown
    db = next(c for c in summarise(runs)["comparisons"] if c["worse"] == "student_baseline")
    assert db["better_at"] == 1 and db["holds_at_every_seed"] is False


def test_seeds_summary_command_rebuilds_from_the_seed_folders(tmp_path, capsys):
    out = _write_runs(tmp_path / "runs", seeds=(3, 7, 11))
    (tmp_path / "runs" / "seed-12").mkdir()  # not finished: no summary.json, not found
    (tmp_path / "runs" / "seedling").mkdir()
    code, stdout, err = run_cli(["seeds-summary", out], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "runs" / "seeds_summary.json").read_text())
    assert s["seeds"] == [3, 7, 11]
    assert s["models"]["generalist"]["test_error"] == [0.30, 0.28, 0.32]
    assert "| seed 3 | seed 7 | seed 11 |" in stdout and "30.00 ± 2.00" in stdout
    code, _, _ = run_cli(["seeds-summary", out, "--seeds", "3,11"], capsys)
    assert code == 0
    s = json.loads((tmp_path / "runs" / "seeds_summary.json").read_text())
    assert s["seeds"] == [3, 11] and s["models"]["generalist"]["mean"] == pytest.approx(0.31)
    code, _, err = run_cli(["seeds-summary", out, "--seeds", "3,12"], capsys)
    assert code == 2 and "seed-12/summary.json does not exist" in err and "Traceback" not in err
    (tmp_path / "runs" / "seed-7" / "summary.json").write_text("{not json")
    code, _, err = run_cli(["seeds-summary", out], capsys)
    assert code == 2 and "seed-7/summary.json is not valid JSON" in err
    code, _, err = run_cli(["seeds-summary", str(tmp_path / "empty")], capsys)
    assert code == 2 and "is not a folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["seeds-summary", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no seed-N folder" in err


@pytest.mark.parametrize("text, needle", [
    ("", "--seeds: no seeds given"),
    ("0,,1", "--seeds '0,,1': an empty item"),
    ("0,x", "'x' is not a non-negative integer"),
    ("-1", "'-1' is not a non-negative integer"),
    ("1.5", "'1.5' is not a non-negative integer"),
    ("0,1,0", "seed 0 is given twice"),
])
def test_bad_seeds_values_exit_2_naming_the_flag(text, needle, tmp_path, capsys):
    code, out, err = run_cli(["run", "configs/quickstart.yaml", f"--seeds={text}", f"output_dir={tmp_path / 'r'}"],
                             capsys)
    assert code == 2, err
    assert needle in err and "--seeds" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before anything is written
    with pytest.raises(UserError):
        parse_seeds(text)


def test_seeds_parse_and_conflicting_settings(tmp_path, capsys):
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds(" 5, 3 ") == [5, 3]  # the order given is the order run
    code, _, err = run_cli(["run", "configs/quickstart.yaml", "--seeds", "0,1", "seed=4",
                            f"output_dir={tmp_path / 'r'}"], capsys)
    assert code == 2 and "'seed=4' (command line) and --seeds both set the global seed" in err
    code, _, err = run_cli(["run", "configs/quickstart.yaml", "--seeds", "0,1", f"targets.uri={tmp_path / 'cache'}",
                            f"output_dir={tmp_path / 'r'}"], capsys)
    assert code == 2 and "targets.uri is set" in err
    code, _, err = run_cli(["run", "configs/quickstart.yaml", "--seeds", "0,1", "teacher.epochs=zero",
                            f"output_dir={tmp_path / 'r'}"], capsys)
    assert code == 2 and "teacher.epochs" in err  # the config is validated once, before any seed runs
    assert not (tmp_path / "r").exists()


TINY = """\
data:
  format: synthetic
  shard_size: 400
  synthetic: {num_classes: 6, num_groups: 2, train: 800, test: 200, dim: 16}
teacher:
  model: {arch: mlp, hidden: [32]}
  epochs: 2
  num_workers: 1
  checkpoint_every: 2
cluster: {num_specialists: 2}
specialists: {epochs: 1, cpus_per_specialist: 1, max_concurrent: 2}
targets: {format: parquet}
student:
  model: {arch: mlp, hidden: [16]}
  epochs: 2
  checkpoint_every: 2
  T: 2.0
  alpha: 0.5
tune: {enabled: false}
ray: {num_cpus: 2, object_store_memory_mb: 150}
"""


@pytest.mark.slow
def test_two_seeds_end_to_end_on_tiny_data(tmp_path, ray_local, capsys):
    """`distill run CONFIG --seeds 0,1` on tiny data: two ordinary run directories, a summary that
    agrees with each run's summary.json, and a rerun that skips every stage of both seeds. Tune is
    off (the students use student.T and alpha): each Ray Train or Tune job costs 10-20 s of start-up
    here, and the test runs eight of them (~4 min on 2 idle cores)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "runs"
    code, stdout, err = run_cli(["run", str(cfg), "--seeds", "0,1", f"output_dir={out}"], capsys)
    assert code == 0, err[-4000:]
    assert "seed 1/2: seed=0" in err and "seed 2/2: seed=1" in err
    runs = {}
    for s in (0, 1):
        d = out / f"seed-{s}"
        for stage in ("data", "teacher", "cluster", "specialists", "targets", "student", "report"):
            assert (d / stage / "_stage.json").exists(), (s, stage)
        assert (d / "report.md").exists()
        runs[s] = json.loads((d / "summary.json").read_text())
        assert json.loads((d / "teacher" / "metrics.json").read_text())["test_error"] == \
            runs[s]["models"]["generalist"]["test_error"]
    # The global seed reached the models: the two generalists' learning curves differ.
    curves = [json.loads((out / f"seed-{s}" / "teacher" / "metrics.json").read_text())["epochs"] for s in (0, 1)]
    strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in c] for c in curves]
    assert strip[0] != strip[1]

    s = json.loads((out / "seeds_summary.json").read_text())
    assert s["seeds"] == [0, 1]
    for key in MODELS:
        want = [runs[0]["models"][key]["test_error"], runs[1]["models"][key]["test_error"]]
        assert all(isinstance(w, float) for w in want), (key, want)
        assert s["models"][key]["test_error"] == want
        assert s["models"][key]["mean"] == pytest.approx(sum(want) / 2)
        assert s["models"][key]["sd"] == pytest.approx(abs(want[0] - want[1]) / math.sqrt(2))
    for c in s["comparisons"]:
        want = [runs[i]["models"][c["better"]]["test_error"] - runs[i]["models"][c["worse"]]["test_error"]
                for i in (0, 1)]
        assert c["difference"] == pytest.approx(want)
        assert c["holds_at_every_seed"] == all(w < 0 for w in want)
    assert (out / "seeds_report.md").read_text().count("| seed 0 | seed 1 |") == 2
    assert (out / "seeds.png").read_bytes()[:4] == b"\x89PNG"
    assert "mean ± sd" in stdout
    assert not (out / ".distill-lock.json").exists()

    # A rerun: every stage of both seeds is up to date, and the summary is the same.
    code, _, err = run_cli(["run", str(cfg), "--seeds", "0,1", f"output_dir={out}"], capsys)
    assert code == 0, err[-4000:]
    assert err.count("up to date") == 2 * 7 and "running ->" not in err
    again = json.loads((out / "seeds_summary.json").read_text())
    assert again["models"] == s["models"] and again["comparisons"] == s["comparisons"]
