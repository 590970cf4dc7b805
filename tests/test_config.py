"""The config contract: every shipped YAML validates, overrides are typed, errors name the key."""
import glob
import os

import pytest

from pipeline.cli import main
from pipeline.config import Config, load_config
from pipeline.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_configs_folder_has_the_runnable_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert "quickstart.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # The keys scripts rely on (docs/contracts.md) are present and typed.
    assert cfg.data.format in ("idx", "cifar", "npz", "folder", "digits", "synthetic")
    assert cfg.teacher.epochs >= 1 and cfg.specialists.epochs >= 1 and cfg.student.epochs >= 1
    assert cfg.cluster.num_specialists >= 1 and cfg.tune.num_samples >= 1
    assert isinstance(cfg.ray.address, str)


def test_dotted_overrides_are_parsed_as_yaml_scalars():
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["teacher.epochs=3", "student.T=7.5", "output_dir=s3://bucket/run1", "tune.T=[1, 2]"])
    assert cfg.teacher.epochs == 3
    assert cfg.student.T == 7.5
    assert cfg.output_dir == "s3://bucket/run1"
    assert cfg.tune.T == [1.0, 2.0]
    assert cfg.stage_uri("teacher") == "s3://bucket/run1/teacher"


def test_all_problems_are_reported_at_once(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("teacher:\n  epochs: 0\n  bogus: 1\nstudent:\n  alpha: 2\n")
    with pytest.raises(UserError) as e:
        load_config(str(p), ["no_such.key=1"])
    msg = str(e.value)
    for key in ("no_such.key", "teacher.epochs", "teacher.bogus", "student.alpha"):
        assert key in msg
    assert "4 problem(s)" in msg


def test_config_show_unknown_key_exits_2_naming_it(capsys):
    rc = main(["config", "show", os.path.join(ROOT, "configs", "quickstart.yaml"), "no_such.key=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no_such.key" in err and "Traceback" not in err


def test_config_show_prints_resolved_config(capsys):
    rc = main(["config", "show", os.path.join(ROOT, "configs", "quickstart.yaml"), "teacher.epochs=2"])
    out = capsys.readouterr().out
    assert rc == 0
    import yaml

    shown = yaml.safe_load(out)
    assert shown["teacher"]["epochs"] == 2
    assert shown["data"]["format"] == "synthetic"


def test_missing_and_malformed_config_files_exit_2(tmp_path, capsys):
    assert main(["config", "show", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    assert main(["config", "show", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_source_required_for_file_formats():
    with pytest.raises(UserError, match="data.source"):
        load_config(None, ["data.format=idx"])


def test_local_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    # Ray Tune runs trials in their own working directories: a relative run directory must not
    # follow them there (`make demo` uses the relative default runs/quickstart).
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["output_dir=runs/x", "data.format=idx", "data.source=raw/mnist",
                             "targets.uri=cache"])
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.stage_uri("teacher") == str(tmp_path / "runs" / "x" / "teacher")
    assert cfg.data.source == str(tmp_path / "raw" / "mnist")
    assert cfg.stage_uri("targets") == str(tmp_path / "cache")
    s3 = load_config(None, ["output_dir=s3://bucket/run", "data.uri=s3://bucket/data"])
    assert s3.output_dir == "s3://bucket/run" and s3.stage_uri("data") == "s3://bucket/data"
    assert load_config(None, []).data.source == ""


def test_checkpoint_every_changes_no_fingerprint_at_any_depth(tmp_path):
    # How often a job checkpoints never changes what it computes, so no finished stage reruns when
    # it is raised; tune and student hash the student's training settings nested as {"train": ...}.
    from pipeline.stages import student, teacher, tune

    def cfg(**over):
        return load_config(None, [f"output_dir={tmp_path}", "data.format=synthetic",
                                  *[f"{k}={v}" for k, v in over.items()]])

    base = cfg()
    for stage in (teacher, tune, student):
        assert stage.fingerprint(base) == stage.fingerprint(cfg(**{"student.checkpoint_every": 7,
                                                                   "teacher.checkpoint_every": 3})), stage
    # ... while a setting that does change the result still does.
    assert tune.fingerprint(base) != tune.fingerprint(cfg(**{"student.lr": 0.5}))


def test_run_only_fields_stay_out_of_fingerprints_and_others_do_not():
    from pipeline.config import Config, fingerprint_dump, not_fingerprinted, section_fingerprint

    assert {"batch_size", "num_actors", "precision"} <= not_fingerprinted(type(Config().targets))
    a = Config()
    b = Config.model_validate({"targets": {"num_actors": 4, "batch_size": 64},
                               "teacher": {"checkpoint_every": 5}, "specialists": {"max_concurrent": 3}})
    c = Config.model_validate({"targets": {"dtype": "float32"}, "teacher": {"epochs": a.teacher.epochs + 1}})
    for sec in ("targets", "teacher", "specialists"):
        assert section_fingerprint(fingerprint_dump(getattr(a, sec))) == section_fingerprint(fingerprint_dump(getattr(b, sec))), sec
    assert section_fingerprint(fingerprint_dump(a.targets)) != section_fingerprint(fingerprint_dump(c.targets))
    assert section_fingerprint(a.teacher) != section_fingerprint(c.teacher)


def test_cluster_normalize_joins_the_fingerprint_only_when_set(tmp_path):
    # Runs made before cluster.normalize existed stay up to date; choosing "excess" reclusters.
    from pipeline.stages import cluster

    def cfg(*over):
        return load_config(None, [f"output_dir={tmp_path}", "data.format=synthetic", *over])

    base = cluster.fingerprint(cfg())
    assert cluster.fingerprint(cfg("cluster.normalize=correlation")) == base
    assert cluster.fingerprint(cfg("cluster.normalize=excess")) != base
    with pytest.raises(Exception, match="normalize"):
        cfg("cluster.normalize=bogus")
