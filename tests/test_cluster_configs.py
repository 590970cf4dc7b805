"""cluster/: the launcher YAMLs, the KubeRay RayJob and the README commands stay launchable.

What is checked is what breaks a launch or leaks a secret: Ray's own schema and defaults pass,
the worker group really has GPUs and sane autoscaling bounds, every node installs this package with
the same Ray as the submitting machine, every node runs with token auth and gets the token from a
file or a Kubernetes Secret (never a literal), and the job's `distill run` command line is a valid
config of this project.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
TOKEN_LIKE = re.compile(r"\b[0-9a-f]{32,}\b|RAY_AUTH_TOKEN\s*=\s*\S")


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _workers(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(name)
    assert cfg["provider"]["type"] == name.split(".")[0]
    prepared = prepare_config(cfg)  # fills the provider's defaults, as `ray up` does
    validate_config(prepared)       # Ray's JSON schema + its consistency checks


@pytest.mark.parametrize("name", LAUNCHER)
def test_cpu_head_and_autoscaling_gpu_workers(name):
    cfg = _load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU", 0) > 0 and head["resources"].get("GPU", 0) == 0
    gpu_groups = {k: v for k, v in _workers(cfg).items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_groups, "no worker group advertises a GPU"
    for group in gpu_groups.values():
        assert 0 <= group["min_workers"] <= group["max_workers"] <= cfg["max_workers"]
        assert group["resources"].get("CPU", 0) >= 1
    if name == "gcp.yaml":
        for group in gpu_groups.values():
            acc = group["node_config"]["guestAccelerators"]
            assert sum(a["acceleratorCount"] for a in acc) == group["resources"]["GPU"]
            # GPU VMs must not live-migrate: GCE refuses them otherwise
            assert any(s.get("onHostMaintenance") == "TERMINATE" for s in group["node_config"]["scheduling"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_every_node_installs_this_package_with_the_submitters_ray(name):
    cfg = _load(name)
    mounts = cfg["file_mounts"]
    project_mounts = [remote for remote, local in mounts.items() if local == "."]
    assert len(project_mounts) == 1, "the project itself must be mounted on the nodes"
    remote = project_mounts[0]
    setup = cfg["setup_commands"]  # run on head and workers alike
    assert any(re.search(rf"pip install .*{re.escape(remote)}\s*$", c) for c in setup), setup
    pins = [m.group(1) for c in setup for m in [re.search(r"ray\[[^\]]*\]==([\w.]+)", c)] if m]
    assert pins == [ray.__version__], "cluster Ray must match the Ray that submits jobs"
    assert {".venv", "runs", ".git"} <= set(cfg["rsync_exclude"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_token_auth_on_every_node_from_a_mounted_file(name):
    cfg = _load(name)
    text = (CLUSTER / name).read_text()
    assert not TOKEN_LIKE.search(text), "a token must never be written into the config"
    # the token file travels like the project: local -> head -> each worker
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert len(start) == 1, key
        before = start[0].split("ray start")[0]
        assert "export RAY_AUTH_MODE=token" in before, f"{key}: ray start must run with token auth"
    head = [c for c in cfg["head_start_ray_commands"] if "ray start" in c][0]
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in [c for c in cfg["worker_start_ray_commands"] if "ray start" in c][0]


# ---------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------

def _containers(job: dict) -> list[tuple[str, dict]]:
    spec = job["spec"]
    cl = spec["rayClusterSpec"]
    out = [("head", c) for c in cl["headGroupSpec"]["template"]["spec"]["containers"]]
    for g in cl["workerGroupSpecs"]:
        out += [(g["groupName"], c) for c in g["template"]["spec"]["containers"]]
    out += [("submitter", c) for c in spec["submitterPodTemplate"]["spec"]["containers"]]
    out.append(("autoscaler", {"env": cl["autoscalerOptions"]["env"], "image": None}))
    return out


def test_rayjob_shape_and_gpu_worker_group():
    job = _load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cl = spec["rayClusterSpec"]
    assert cl["rayVersion"] == ray.__version__
    assert cl["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in cl["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for who, c in _containers(job):
        if c.get("image"):
            assert f"ray{ray.__version__}" in c["image"], f"{who}: image must carry the Ray version"
    docker = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in docker
    assert re.search(r"pip install[^\n]* \.(\s|$)", docker), "the image must install this package"


def test_rayjob_token_comes_from_a_secret_everywhere():
    job = _load("kuberay-rayjob.yaml")
    assert not TOKEN_LIKE.search((CLUSTER / "kuberay-rayjob.yaml").read_text())
    secrets = set()
    for who, c in _containers(job):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", who
        tok = env.get("RAY_AUTH_TOKEN")
        assert tok and "value" not in tok, f"{who}: the token must come from a Secret, not a literal"
        ref = tok["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, "every component must use the same Secret"


def test_rayjob_entrypoint_is_a_valid_distill_run():
    job = _load("kuberay-rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["distill", "run"]
    image_path = Path(argv[2])
    assert image_path.is_absolute()
    # cluster/Dockerfile copies configs/ to /home/ray/distill/configs
    local = ROOT / image_path.relative_to("/home/ray/distill")
    cfg = load_config(str(local), argv[3:])  # raises UserError on any bad override
    assert cfg.output_dir.startswith("s3://"), "the cluster is deleted after the job: outputs must be remote"
    assert cfg.teacher.use_gpu and cfg.specialists.gpus_per_specialist >= 1


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------

def _readme_commands(prefix: str) -> list[list[str]]:
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    cmds = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(prefix):
                cmds.append(shlex.split(line))
    return cmds


def test_readme_submit_commands_are_valid_configs():
    from pipeline.submit import prepare

    cmds = _readme_commands("distill submit ")
    assert cmds, "cluster/README.md shows no `distill submit` command"
    for argv in cmds:
        rest = argv[2:]
        config = rest[0]
        overrides = [a for a in rest[1:] if "=" in a and not a.startswith("-")]
        env_names = [rest[i + 1] for i, a in enumerate(rest) if a == "--env"]
        environ = {n: "x" for n in env_names}
        entry, _ = prepare(str(ROOT / config), overrides, env_passthrough=env_names, environ=environ)
        assert "python -m pipeline.cli run" in entry


def test_readme_names_every_cluster_file_and_the_token_sources():
    text = (CLUSTER / "README.md").read_text()
    for name in ("aws.yaml", "gcp.yaml", "kuberay-rayjob.yaml", "Dockerfile", "runtime_env.md"):
        assert name in text, name
    for fact in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token", "401", "403"):
        assert fact in text, fact
