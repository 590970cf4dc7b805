"""scripts/gpu_check.py (the per-worker check for a GPU machine) runs on the CPU too: every check
passes there, so the script a GPU session runs is known to work before it gets a device."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_passes_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--quick", "--device", "cpu",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["failed"] == []
    assert doc["resume"]["all_on_param_device"] and doc["resume"]["optimizer_state_tensors"] > 0
    assert doc["augment"]["reproducible"] and doc["augment"]["differs_between_epochs"]
    assert {"mlp", "cnn", "resnet18", "vit"} <= set(doc["models"])
