"""`configs/imagefolder.yaml` as shipped, run end to end on a tiny folder of real images.

The folder is Fashion-MNIST written as JPEG and PNG files of 32-48 px, greyscale and RGB mixed
(`_image_helpers.write_fashion_folder`). Only sizes are overridden (epochs, shard size, tune off):
the models, the augmentation sections and the stage settings are the file's own, so a change to
the config that breaks any stage on encoded images fails here. The accuracy figure on 4,000 / 1,000
images is in the README; this test checks that every stage runs and what each one writes.
"""
from __future__ import annotations

import json
import os

import pytest

from _data_helpers import run_cli
from _image_helpers import HAVE_FASHION, write_fashion_folder
from pipeline import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "imagefolder.yaml")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist is not installed")]


def test_imagefolder_config_runs_every_stage_on_a_tiny_folder(tmp_path, ray_local, capsys):
    src = tmp_path / "imgs"
    counts = write_fashion_folder(src, n_train=300, n_test=100)
    out = tmp_path / "run"
    code, _, err = run_cli(["run", CONFIG, f"data.source={src}", f"output_dir={out}", "data.shard_size=100",
                            "teacher.epochs=2", "specialists.epochs=1", "student.epochs=1", "tune.enabled=false",
                            "ray.num_cpus=2", "ray.object_store_memory_mb=150"], capsys)
    assert code == 0, err[-4000:]

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["encoding"] == "image"
    assert manifest["splits"]["test"]["num_samples"] == counts["test"]
    # The shards hold the files' encoded bytes: about the size of the images plus tar headers,
    # not the decoded pixels (32x32 to 48x48, up to 3 channels: several KB each).
    shard_bytes = sum(p.stat().st_size for p in (out / "data").rglob("*.tar"))
    assert shard_bytes < 2 * counts["bytes"] + 1536 * (counts["train"] + counts["test"])

    summary = json.loads((out / "summary.json").read_text())
    for key in ("generalist", "ensemble", "student_baseline", "student_distilled_generalist", "student_distilled"):
        err_k = summary["models"][key]["test_error"]
        assert isinstance(err_k, float) and 0.0 <= err_k <= 1.0, (key, err_k)
    # Every test image was scored (errors are whole counts of the 100), and the cache covers every
    # training sample (the transfer set), one row per sample.
    assert round(summary["models"]["generalist"]["test_error"] * counts["test"], 6).is_integer()
    cache = json.loads((out / "targets" / "manifest.json").read_text())
    assert sum(int(s["num_samples"]) for s in cache["shards"]) == manifest["splits"]["train"]["num_samples"]
    assert len(layout.read_subsets(str(out / "cluster"))) == 3  # the file's cluster.num_specialists
    assert (out / "report.md").exists()
