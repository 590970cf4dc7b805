"""The targets stage on Ray Data: regeneration cases, the CLI, SIGKILL mid-write, S3.

These run the product path (Ray Data: read tasks -> `TargetsWorker` model replicas -> the
`ShardAssembler` writer, or the `distill` CLI in a subprocess that starts its own Ray), so they are
marked slow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import cache, storage
from pipeline.cli import main as cli_main
from pipeline.stages import targets

from _targets_helpers import make_config, replace_shard, write_dataset, write_teacher

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_targets(cache_uri, fmt=None):
    """The cache's ensemble targets joined with their inputs, read (without Ray) by the per-shard
    reader the production Ray Data read tasks run: checksums checked, keys compared."""
    from pipeline import datasets

    parts = [datasets._read_one(it) for it in datasets.cache_items(cache_uri, "ensemble", fmt=fmt)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _write_yaml(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f)
    return str(path)


def test_regen_cases_on_ray(ray_local, tmp_path):
    cfg = make_config(str(tmp_path / "run"), num_actors=2)
    write_dataset(cfg.stage_uri("data"), [40] * 6)
    write_teacher(cfg)
    cache_uri = cfg.stage_uri("targets")

    seen = []
    started = time.time()
    fresh = targets.regenerate(cfg, progress=False, on_shard=lambda e, s, t: seen.append((e["name"], s, t)))
    assert (fresh["checked"], fresh["rewritten"], fresh["kept"]) == (6, 6, 0)
    assert cache.verify_cache(cache_uri)["damaged"] == 0
    # Each shard is reported once as it arrives, with the replica's own timings (what bench_cache reads).
    assert sorted(name for name, _, _ in seen) == [f"train-{i:06d}" for i in range(6)]
    for _, seconds, timing in seen:
        assert seconds > 0 and timing["infer"] > 0 and timing["write"] >= 0
        assert started < timing["finished_at"] <= time.time()
        # The replicas' start-up, for the job's timeline: constructor began after the call, before
        # the shard was written; import and checkpoint-loading seconds measured.
        assert started < timing["replica_started_at"] < timing["finished_at"]
        assert timing["replica_import_s"] >= 0 and timing["replica_load_s"] > 0
    assert len({t["worker"] for _, _, t in seen}) == 1  # one writer puts every shard back together
    # Ray Data wrote what the in-process writer writes (same teacher, same inputs).
    local = make_config(str(tmp_path / "run"), uri=str(tmp_path / "local_cache"))
    targets.regenerate(local, progress=False, use_ray=False, write_marker=False)
    a, b = _read_targets(cache_uri), _read_targets(str(tmp_path / "local_cache"))
    assert list(a["key"]) == list(b["key"])
    np.testing.assert_allclose(a["teacher"].astype(np.float32), b["teacher"].astype(np.float32), atol=2e-3)

    t0 = time.perf_counter()
    same = targets.regenerate(cfg, progress=False)
    assert (same["rewritten"], same["kept"]) == (0, 6)
    assert time.perf_counter() - t0 < 5.0

    replace_shard(cfg.stage_uri("data"), "train", 4, seed=1234)
    one = targets.regenerate(cfg, progress=False)
    assert (one["rewritten"], one["kept"], one["rewritten_shards"]) == (1, 5, ["train-000004"])

    write_teacher(cfg, seed=5)
    new = targets.regenerate(cfg, progress=False)
    assert (new["rewritten"], new["stale"]) == (6, 6)
    assert cache.verify_cache(cache_uri)["damaged"] == 0


def test_warm_worker_hook_is_opt_in_and_imports_the_teacher(monkeypatch):
    """ensure_ray's worker_process_setup_hook (pipeline.raysetup.warm_worker) is off unless
    DISTILL_WARM_WORKERS=1, and the hook loads torch and the teacher's modules."""
    from pipeline import raysetup

    monkeypatch.delenv("DISTILL_WARM_WORKERS", raising=False)
    assert raysetup._warm_runtime_env() is None
    monkeypatch.setenv("DISTILL_WARM_WORKERS", "1")
    assert raysetup._warm_runtime_env() == {"worker_process_setup_hook": "pipeline.raysetup.warm_worker"}
    raysetup.warm_worker()
    assert "torch" in sys.modules and "pipeline.teacher_ensemble" in sys.modules


def test_timeline_columns_never_reach_the_cache(tmp_path):
    """The replicas' timing columns (_infer_s, _started_at, ...) travel to the writer but only the
    layout's fields, keys and labels are written: two in-process runs give byte-identical shards."""
    shas = []
    for name in ("a", "b"):
        cfg = make_config(str(tmp_path / "run"), uri=str(tmp_path / name))
        if name == "a":
            write_dataset(cfg.stage_uri("data"), [30, 25])
            write_teacher(cfg)
        targets.regenerate(cfg, progress=False, use_ray=False, write_marker=False)
        manifest = storage.read_json(cache.manifest_uri(str(tmp_path / name)))
        shas.append([f["sha256"] for e in manifest["shards"] for f in e["files"].values()])
        for e in manifest["shards"]:
            cols = pq.read_schema(os.path.join(str(tmp_path / name), e["files"]["parquet"]["path"])).names
            assert not [c for c in cols if c.startswith("_")], cols
    assert shas[0] == shas[1] and len(shas[0]) == 2


def test_a_damaged_input_shard_is_named_in_the_read_tasks_and_a_rerun_finishes(ray_local, tmp_path):
    """Input checksums are checked by the Ray Data read tasks (the driver hashes no input shard):
    a flipped byte in an input shard stops the job with a UserError naming that shard; what was
    written is kept, and after the repair only the rest is written."""
    from pipeline.errors import UserError

    cfg = make_config(str(tmp_path / "run"), num_actors=2)
    data = cfg.stage_uri("data")
    write_dataset(data, [40] * 5)
    write_teacher(cfg)
    path = os.path.join(data, "train-000003.tar")
    blob = bytearray(open(path, "rb").read())
    blob[600] ^= 0x01
    open(path, "wb").write(bytes(blob))
    with pytest.raises(UserError, match=r"train-000003\.tar: sha256 differs"):
        targets.regenerate(cfg, progress=False)
    assert cache.MANIFEST_NAME not in storage.listdir(cfg.stage_uri("targets"))
    written = len(storage.listdir(storage.join(cfg.stage_uri("targets"), cache.PARTS_DIR)))
    assert written < 5
    replace_shard(data, "train", 3, seed=77)  # repaired (new bytes, checksum recorded)
    r = targets.regenerate(cfg, progress=False)
    assert (r["kept"], r["rewritten"]) == (written, 5 - written)
    assert cache.verify_cache(cfg.stage_uri("targets"))["damaged"] == 0


def test_cli_json_names_a_flipped_byte_and_regen_rewrites_exactly_it(ray_local, tmp_path, capsys):
    cfg = make_config(str(tmp_path / "run"), format="both")
    write_dataset(cfg.stage_uri("data"), [25] * 4)
    write_teacher(cfg)
    path = _write_yaml(cfg, tmp_path / "cfg.yaml")
    cache_uri = cfg.stage_uri("targets")

    assert cli_main(["targets", "regen", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["checked"], out["rewritten"], out["kept"], out["damaged"]) == (4, 4, 0, 0)
    assert cli_main(["targets", "regen", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rewritten"] == 0

    tar = os.path.join(cache_uri, "train-000002.tar")
    data = bytearray(open(tar, "rb").read())
    data[700] ^= 0x10  # inside the first member's payload
    open(tar, "wb").write(bytes(data))
    assert cli_main(["targets", "verify", cache_uri, "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["damaged_shards"] == ["train-000002"] and rep["checked"] == 4

    assert cli_main(["targets", "regen", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["rewritten"], out["damaged"], out["kept"]) == (1, 1, 3)
    assert cli_main(["targets", "verify", cache_uri]) == 0
    assert "0 damaged" in capsys.readouterr().out

    assert cli_main(["targets", "verify", str(tmp_path / "nowhere")]) == 2  # a clear UserError


def test_stage_through_the_runner_is_skipped_when_up_to_date(ray_local, tmp_path):
    from pipeline.layout import read_marker
    from pipeline.runner import run_stage

    cfg = make_config(str(tmp_path / "run"))
    write_dataset(cfg.stage_uri("data"), [30, 30])
    write_teacher(cfg)
    first = run_stage(cfg, "targets")
    assert not first["skipped"] and first["rewritten"] == 2 and first["num_samples"] == 60
    assert read_marker(cfg, "targets")["fingerprint"] == targets.fingerprint(cfg)
    assert run_stage(cfg, "targets")["skipped"]
    write_teacher(cfg, seed=9)  # retrained teacher, same config: the stage is stale again
    again = run_stage(cfg, "targets")
    assert not again["skipped"] and again["rewritten"] == 2


# ------------------------------------------------------------------------------------------------
# SIGKILL mid-write, locally and on S3


def _subprocess_env():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _visible_shards(cache_uri):
    return [n for n in storage.listdir(cache_uri) if n.endswith((".parquet", ".tar")) and not n.startswith(".")]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_mid_regeneration_leaves_only_complete_shards(where, tmp_path, request):
    if where == "s3":
        root = request.getfixturevalue("s3_bucket") + "/run"
    else:
        root = str(tmp_path / "run")
    cfg = make_config(root, format="both", num_actors=2)
    sizes = [1000] * 12
    write_dataset(cfg.stage_uri("data"), sizes)
    write_teacher(cfg, hidden=(256, 256))
    cfg_path = _write_yaml(cfg, tmp_path / "cfg.yaml")
    cache_uri = cfg.stage_uri("targets")
    parts = storage.join(cache_uri, cache.PARTS_DIR)

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "targets", "regen", cfg_path],
                            env=_subprocess_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not storage.listdir(parts):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no shard was written in time"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-job, as on a node failure
        proc.wait(timeout=30)
        time.sleep(2.0)  # let Ray workers notice; anything they still publish must be complete too
    finally:
        # Ray's own helper processes were started in this session: end exactly them.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    from conftest import TEST_SECRET_KEY

    assert TEST_SECRET_KEY not in proc.stderr.read().decode(errors="replace")  # credentials never printed
    names = storage.listdir(cache_uri)
    assert cache.MANIFEST_NAME not in names  # an interrupted job reads as incomplete
    shards = _visible_shards(cache_uri)
    done = storage.listdir(parts)
    assert 1 <= len(done) < len(sizes), "the kill must land mid-job for this test to mean anything"
    for name in shards:  # every visible shard file is complete and readable
        arrays = cache.load_cache_shard(storage.join(cache_uri, name))
        assert len(arrays["keys"]) == sizes[0]
        assert np.isfinite(arrays["generalist_logits"].astype(np.float32)).all()
    with pytest.raises(Exception, match="interrupted"):
        cache.read_manifest(cache_uri)

    # The rerun runs the writer in-process: what is under test is that the plan keeps the finished
    # shards and redoes the rest (a second Ray start in a subprocess would add ~20 s here).
    report = targets.regenerate(make_config(root, format="both"), progress=False, use_ray=False)
    assert report["kept"] >= len(done) and report["rewritten"] == len(sizes) - report["kept"]
    rep = cache.verify_cache(cache_uri)
    assert (rep["checked"], rep["damaged"], rep["orphans"]) == (len(sizes), 0, [])
    assert not [n for n in storage.listdir(cache_uri) if n.startswith(".tmp")]


# ------------------------------------------------------------------------------------------------
# S3 round trip (readers, damage detection), writer in-process


def test_s3_round_trip(s3_bucket, tmp_path):
    cfg = make_config(s3_bucket + "/run", format="both")
    write_dataset(cfg.stage_uri("data"), [20, 20, 11])
    write_teacher(cfg)
    r = targets.regenerate(cfg, progress=False, use_ray=False)
    assert r["rewritten"] == 3
    cache_uri = cfg.stage_uri("targets")
    assert cache_uri.startswith("s3://")
    assert cache.verify_cache(cache_uri)["damaged"] == 0

    local = make_config(str(tmp_path / "run"), format="both")
    write_dataset(local.stage_uri("data"), [20, 20, 11])
    write_teacher(local)
    targets.regenerate(local, progress=False, use_ray=False)
    for fmt in ("parquet", "webdataset"):
        s3 = _read_targets(cache_uri, fmt=fmt)
        loc = _read_targets(local.stage_uri("targets"), fmt=fmt)
        assert np.array_equal(s3["x"], loc["x"]) and np.array_equal(s3["y"], loc["y"])
        assert np.array_equal(s3["teacher"], loc["teacher"])

    key = storage.join(cache_uri, "train-000001.parquet")
    data = bytearray(storage.read_bytes(key))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes_atomic(key, bytes(data))
    rep = cache.verify_cache(cache_uri)
    assert rep["damaged_shards"] == ["train-000001"]
    r = targets.regenerate(cfg, progress=False, use_ray=False)
    assert (r["rewritten"], r["damaged"]) == (1, 1)
    assert cache.verify_cache(cache_uri)["damaged"] == 0
    assert pq.read_table(storage.open_read(key)).num_rows == 20


def test_idle_worker_processes_are_reused_while_the_cpus_are_held(ray_local):
    """With both CPUs held (two 1-CPU actors, as two specialist trials hold them), Ray's pool is over
    its soft limit, and by Ray's default an idle worker is killed after 1 s: each Ray Data pass would
    start new processes for its read tasks. ensure_ray keeps them (raysetup.IDLE_WORKER_KEEP_MS), so
    a zero-CPU task 2.5 s after another runs in the same process."""
    import time

    ray = ray_local

    @ray.remote(num_cpus=1)
    class Holder:
        def pid(self):
            return os.getpid()

    @ray.remote(num_cpus=0)
    def pid():
        return os.getpid()

    holders = [Holder.remote() for _ in range(2)]
    ray.get([h.pid.remote() for h in holders])
    first = ray.get(pid.remote())
    time.sleep(2.5)
    second = ray.get(pid.remote())
    for h in holders:
        ray.kill(h)
    assert second == first
