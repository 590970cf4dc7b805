"""Faults and bad inputs an adversarial user tries (issue 16), each ending in a repaired state or
exit 2 with one paragraph naming the file or key and the fix, never a traceback or a leak.

Fast tests (no Ray): config files and values, output_dir that cannot hold a run, the output_dir
lock (local and S3), missing buckets and unreachable S3 endpoints, truncated archives, cache
manifests that lost shards, a damaged dataset shard under `--force`, an unloadable checkpoint.
Slow tests (a few small Ray jobs): no credential in any file under the run's Ray temp dir, a stale
`ray_current_cluster`, Ctrl-C, `stage teacher --force`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from _data_helpers import run_cli
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from pipeline import layout, runner, storage
from pipeline.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
TINY_DATA = ["data.synthetic.train=200", "data.synthetic.test=40", "data.shard_size=100"]


def _expect_2(capsys, argv, *needles):
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (code, out, err[-2000:])
    # stages log progress lines first; the error is the last paragraph
    assert "distill: error: " in err and "Traceback" not in err, err
    msg = err.split("distill: error: ", 1)[1]
    for needle in needles:
        assert needle in msg, err
    return msg


def _yaml(tmp_path, text: str | bytes, name="c.yaml") -> str:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


# ------------------------------------------------------------------------------------------------
# Config: bad files and values are refused at load, before any stage runs

def test_config_file_that_is_a_directory_or_not_utf8_or_empty(tmp_path, capsys):
    _expect_2(capsys, ["config", "show", tmp_path], f"config file '{tmp_path}' is a directory")
    bad = _yaml(tmp_path, b"teacher:\n  epochs: \xff\xfe\n")
    _expect_2(capsys, ["run", bad], f"config file '{bad}' is not UTF-8 text")
    empty = _yaml(tmp_path, "", "empty.yaml")
    _expect_2(capsys, ["config", "show", empty], f"config file '{empty}' is empty")
    # `{}` says "all defaults" on purpose
    assert run_cli(["config", "show", _yaml(tmp_path, "{}\n", "all.yaml")], capsys)[0] == 0


def test_duplicate_top_level_key_is_refused(tmp_path, capsys):
    dup = _yaml(tmp_path, "teacher:\n  epochs: 2\nseed: 1\nteacher:\n  lr: 0.1\n")
    _expect_2(capsys, ["config", "show", dup], "key 'teacher' appears twice (lines 1 and 4)")


@pytest.mark.parametrize("override,needle", [
    ("tune.T=[0,-1]", "tune.T.0: value 0 is invalid: Input should be greater than 0"),
    ("tune.alpha=[2]", "tune.alpha.0: value 2 is invalid: Input should be less than or equal to 1"),
    ("tune.T=[]", "tune.T: value [] is invalid"),
    ("teacher.epochs=true", "teacher.epochs: value true is invalid: Input should be a valid integer"),
    ("student.model.hidden=[-5]", "student.model.hidden.0: value -5 is invalid"),
    ("teacher.model.channels=[0]", "teacher.model.channels.0: value 0 is invalid"),
    ("teacher.model={arch: resnet, depth: 9}", "model.depth: 9 is not valid for resnet"),
])
def test_values_that_used_to_fail_only_later_are_refused_at_load(override, needle, capsys):
    _expect_2(capsys, ["config", "show", QUICKSTART, override], needle)


# ------------------------------------------------------------------------------------------------
# output_dir

def test_output_dir_that_cannot_hold_a_run(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    cfg = _yaml(tmp_path, "{}\n")
    _expect_2(capsys, ["run", cfg, f"output_dir={afile}"], f"output_dir {afile} is a file, not a folder")
    _expect_2(capsys, ["stage", "data", cfg, f"output_dir={afile}/sub"],
              f"output_dir {afile}/sub: {afile} is a file")
    assert afile.read_text() == "mine\n"
    if os.geteuid() == 0:  # root writes through file modes; /sys refuses everyone
        ro = "/sys/distill-test-read-only/run"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        ro = str(tmp_path / "ro" / "run")
    _expect_2(capsys, ["stage", "data", cfg, f"output_dir={ro}"], f"output_dir {ro}", "write")
    if os.geteuid() != 0:
        os.chmod(tmp_path / "ro", 0o755)
        (tmp_path / "ro2").mkdir()
        os.chmod(tmp_path / "ro2", 0o555)
        _expect_2(capsys, ["stage", "data", cfg, f"output_dir={tmp_path / 'ro2'}"], "is not writable")
        os.chmod(tmp_path / "ro2", 0o755)


_HOLDER = """
import sys, time
from pipeline import runner
runner.acquire_output_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock(out: str) -> subprocess.Popen:
    """Another process holding the output_dir lock, as a second `distill run` would see it."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, out], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_second_run_on_one_output_dir_is_refused_naming_the_holder(where, tmp_path, capsys, request):
    out = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_bucket") + "/run"
    cfg = _yaml(tmp_path, "{}\n")
    holder = _hold_lock(out)
    try:
        lock = json.loads(storage.read_bytes(storage.join(out, layout.LOCK)))
        err = _expect_2(capsys, ["stage", "data", cfg, f"output_dir={out}", *TINY_DATA],
                        f"output_dir {out} is in use by another distill run",
                        f"host {socket.gethostname()}, pid {holder.pid}, started {lock['started_at']}")
        assert "delete " + storage.join(out, layout.LOCK) in err
        assert not storage.exists(storage.join(out, "data"))  # nothing of the second run was written
        _expect_2(capsys, ["targets", "regen", cfg, f"output_dir={out}"], "is in use by another distill run")
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing it (SIGKILL): on this host its pid is gone, so a new run
    # takes the lock over, runs, and releases it.
    code, _, err = run_cli(["stage", "data", cfg, f"output_dir={out}", *TINY_DATA], capsys)
    assert code == 0, err
    assert f"taking over the lock of a run that is gone (host {socket.gethostname()}, pid {holder.pid}" in err
    assert not storage.exists(storage.join(out, layout.LOCK))


def _other_host_lock(out, age_s: float) -> None:
    from datetime import datetime, timedelta, timezone

    beat = (datetime.now(timezone.utc) - timedelta(seconds=age_s)).isoformat(timespec="seconds")
    out.mkdir(exist_ok=True)
    (out / layout.LOCK).write_text(json.dumps({"host": "elsewhere-node", "pid": 1, "token": "t",
                                               "started_at": "2026-01-01T00:00:00+00:00", "heartbeat_at": beat}))


def test_a_lock_of_another_host_is_taken_over_only_when_its_heartbeat_stopped(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, "{}\n")
    _other_host_lock(out, age_s=30)  # renewed 30 s ago: that run is alive
    _expect_2(capsys, ["stage", "data", cfg, f"output_dir={out}"],
              "host elsewhere-node, pid 1, started 2026-01-01T00:00:00+00:00", "taken over once its heartbeat")
    assert json.loads((out / layout.LOCK).read_text())["host"] == "elsewhere-node"
    _other_host_lock(out, age_s=runner.LOCK_STALE_S + 60)  # a killed job driver, a replaced head pod
    code, _, err = run_cli(["stage", "data", cfg, f"output_dir={out}", *TINY_DATA], capsys)
    assert code == 0 and "taking over the lock of a run that is gone (host elsewhere-node" in err, err
    assert not (out / layout.LOCK).exists()


def test_the_lock_heartbeat_is_renewed_while_a_run_lasts(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "LOCK_HEARTBEAT_S", 0.2)
    out = str(tmp_path / "run")
    with runner.output_lock(out) as me:
        first = json.loads(storage.read_bytes(storage.join(out, layout.LOCK)))["heartbeat_at"]
        time.sleep(1.6)
        now = json.loads(storage.read_bytes(storage.join(out, layout.LOCK)))
        assert now["token"] == me["token"] and now["heartbeat_at"] > first
    assert not storage.exists(storage.join(out, layout.LOCK))


# ------------------------------------------------------------------------------------------------
# S3: a missing bucket or an unreachable endpoint

@pytest.mark.s3
def test_missing_bucket_and_wrong_endpoint(s3_server, tmp_path, capsys, monkeypatch):
    cfg = _yaml(tmp_path, "{}\n")
    for argv in (["run", cfg], ["stage", "data", cfg]):
        _expect_2(capsys, [*argv, "output_dir=s3://no-such-bucket-distill/run"],
                  "output_dir s3://no-such-bucket-distill/run: bucket 'no-such-bucket-distill' does not exist",
                  "create it")
    for key in ("data.uri", "targets.uri"):
        _expect_2(capsys, ["stage", "data", cfg, f"output_dir={tmp_path / 'run'}", f"{key}=s3://no-such-bucket-distill/x"],
                  f"{key} s3://no-such-bucket-distill/x: bucket 'no-such-bucket-distill' does not exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on discard
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for argv in (["run", cfg, "output_dir=s3://some-bucket/run"], ["stage", "teacher", cfg, "output_dir=s3://some-bucket/run"],
                 ["data", "verify", "s3://some-bucket/data"]):
        err = _expect_2(capsys, argv, "cannot reach the S3 endpoint", "http://127.0.0.1:9", "AWS_ENDPOINT_URL")
        assert TEST_SECRET_KEY not in err and TEST_ACCESS_KEY not in err


# ------------------------------------------------------------------------------------------------
# Damaged inputs

def test_truncated_npz_is_named(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((40, 2)), y_train=np.arange(40) % 3,
             x_test=np.zeros((10, 2)), y_test=np.arange(10) % 3)
    whole = (tmp_path / "d.npz").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 30):
        (tmp_path / "cut.npz").write_bytes(whole[:cut])
        _expect_2(capsys, ["data", "ingest", tmp_path / "cut.npz", tmp_path / "out", "--format", "npz"],
                  f"{tmp_path / 'cut.npz'}: truncated or damaged npz file", "again")


def _flip(path, offset):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_data_stage_force_rewrites_a_damaged_shard(tmp_path, capsys):
    from pipeline.data.shards import verify_dataset

    out = tmp_path / "run"
    cfg = _yaml(tmp_path, "{}\n")
    argv = ["stage", "data", cfg, f"output_dir={out}", *TINY_DATA]
    assert run_cli(argv, capsys)[0] == 0
    shard = out / "data" / "train-000001.tar"
    _flip(shard, 3000)
    assert verify_dataset(str(out / "data"), progress=False)["damaged_shards"] == ["train-000001.tar"]
    code, _, err = run_cli([*argv, "--force"], capsys)
    assert code == 0, err
    assert "train-000001.tar is damaged" in err and "nothing to do" not in err
    assert verify_dataset(str(out / "data"), progress=False)["ok"]


def test_data_uri_with_a_damaged_shard_under_force_is_named(tmp_path, tiny_synthetic, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_synthetic, ds)
    _flip(ds / "val-000000.tar", 1000)
    before = (ds / "val-000000.tar").read_bytes()
    _expect_2(capsys, ["stage", "data", _yaml(tmp_path, "{}\n"), f"output_dir={tmp_path / 'run'}",
                       f"data.uri={ds}", "--force"],
              f"data.uri {ds}: 1 damaged shard(s) (val-000000.tar: sha256 mismatch", "distill data ingest")
    assert (ds / "val-000000.tar").read_bytes() == before  # a shared dataset is not touched


@pytest.fixture
def cache_run(tmp_path):
    """A run directory with a 3-shard dataset, a generalist + 2 specialists and their cache."""
    from _targets_helpers import make_config, write_dataset, write_teacher
    from pipeline.stages import targets

    cfg = make_config(str(tmp_path / "run"))
    write_dataset(cfg.stage_uri("data"), [30, 30, 17])
    write_teacher(cfg)
    targets.regenerate(cfg, progress=False, use_ray=False)
    return cfg


def _edit_manifest(cache_uri, edit):
    path = os.path.join(cache_uri, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    edit(m)
    with open(path, "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize("how", ["truncated", "emptied", "truncated_and_recounted"])
def test_targets_verify_fails_a_cache_that_lost_shards(cache_run, how, capsys):
    cache_uri = cache_run.stage_uri("targets")
    assert run_cli(["targets", "verify", cache_uri], capsys)[0] == 0

    def edit(m):
        m["shards"] = [] if how == "emptied" else m["shards"][:2]
        if how == "truncated_and_recounted":
            m["num_shards"] = len(m["shards"])
            m["num_samples"] = sum(s["num_samples"] for s in m["shards"])

    _edit_manifest(cache_uri, edit)
    code, out, err = run_cli(["targets", "verify", cache_uri, "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["damaged"] >= 1, report
    lost = ["train-000002.tar"] if how != "emptied" else ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for src in lost:
        assert f"no cache shard covers source shard {src}" in report["problems"][f"(source {src})"]
    code, out, _ = run_cli(["targets", "verify", cache_uri], capsys)
    assert code == 1 and "DAMAGED (source train-000002.tar)" in out and "targets regen" in out


def test_targets_manifest_without_num_classes(cache_run, capsys):
    cache_uri = cache_run.stage_uri("targets")
    _edit_manifest(cache_uri, lambda m: m.pop("num_classes"))
    _expect_2(capsys, ["targets", "verify", cache_uri],
              f"{os.path.join(cache_uri, 'manifest.json')}: 'num_classes' is missing", "targets regen")
    _edit_manifest(cache_uri, lambda m: m.update(num_classes=6, shards="all"))
    _expect_2(capsys, ["targets", "verify", cache_uri], "'shards' is \"all\", not a list")


def _fake_run(tmp_path, weights: bytes) -> tuple[str, str]:
    """A Ray Train run folder whose snapshot names a latest checkpoint holding `weights`."""
    import torch

    from pipeline import ray_train

    run = tmp_path / "ray" / "teacher-abc"
    ck = run / "checkpoint_2026-01-01_00-00-00.000000"
    ck.mkdir(parents=True)
    (run / ray_train.SNAPSHOT).write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": ck.name, "metrics": {}}}))
    (ck / "model.pt").write_bytes(weights)
    torch.save({"optimizer": {}, "scheduler": {}}, ck / ray_train.TRAINER_STATE)
    (ck / ray_train.TRAINER_META).write_text(json.dumps({"epoch": 3}))
    return str(tmp_path / "ray"), str(ck / "model.pt")


def test_an_unloadable_latest_checkpoint_is_named_before_ray_train_retries(tmp_path):
    import io

    import torch

    from pipeline import ray_train

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    good = buf.getvalue()
    storage_uri, weights = _fake_run(tmp_path / "good", good)
    ray_train.check_latest_checkpoint(storage_uri, "teacher-abc")  # loadable: no complaint
    ray_train.check_latest_checkpoint(storage_uri, "teacher-new")  # fresh run: nothing to check
    storage_uri, weights = _fake_run(tmp_path / "bad", good[: len(good) // 2])
    with pytest.raises(UserError) as e:
        ray_train.check_latest_checkpoint(storage_uri, "teacher-abc")
    msg = str(e.value)
    assert msg.startswith(f"{weights}: the latest checkpoint of this stage cannot be loaded")
    assert f"delete {storage_uri}/teacher-abc" in msg and "--force" in msg
    os.remove(weights)
    with pytest.raises(UserError, match="model.pt: missing from the latest checkpoint"):
        ray_train.check_latest_checkpoint(storage_uri, "teacher-abc")


def test_the_stream_resumes_where_ray_train_resumes_not_at_an_unregistered_checkpoint(tmp_path):
    """A worker stopped just after uploading a checkpoint leaves a folder Ray Train never recorded;
    the workers restore the recorded one, so the driver must start the data stream there too (it
    once started an epoch later, and the resumed run failed with 'ran out of rows')."""
    import io

    import torch

    from pipeline import ray_train

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    storage_uri, _ = _fake_run(tmp_path, buf.getvalue())
    assert ray_train.latest_position(storage_uri, "teacher-abc") == (4, 0)
    newer = tmp_path / "ray" / "teacher-abc" / "checkpoint_2026-01-01_00-00-09.000000"
    newer.mkdir()
    (newer / ray_train.TRAINER_META).write_text(json.dumps({"epoch": 4}))
    assert ray_train.latest_position(storage_uri, "teacher-abc") == (4, 0)
    assert ray_train.latest_position(storage_uri, "teacher-new") == (0, 0)
    (tmp_path / "ray" / "teacher-abc" / ray_train.SNAPSHOT).write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": newer.name}}))
    assert ray_train.latest_position(storage_uri, "teacher-abc") == (5, 0)


# ------------------------------------------------------------------------------------------------
# submit: a job whose working dir vanished

@pytest.mark.parametrize("log", [
    "shell-init: error retrieving current directory: getcwd: cannot access parent directories: No such file or directory",
    "sh: 0: getcwd() failed: No such file or directory",
    "Intel oneMKL FATAL ERROR: Cannot load /tmp/ray/session_x/runtime_resources/pip/x/libtorch_cpu.so.",
])
def test_submit_names_the_likely_cause_of_a_vanished_working_dir(log):
    from pipeline.submit import vanished_working_dir_hint

    hint = vanished_working_dir_hint("some output\n" + log + "\nmore output\n")
    assert hint and "--temp-dir" in hint and "cluster/README.md" in hint
    assert vanished_working_dir_hint("FileNotFoundError: No such file or directory: 'x.yaml'\n") is None


@pytest.mark.slow
@pytest.mark.cluster
def test_submit_prints_the_cause_when_a_real_job_shows_a_vanished_working_dir(tmp_path, monkeypatch):
    """Through a real token-authenticated Ray head and the Jobs API: a job that dies with the
    oneMKL message gets the hint; a job that fails otherwise does not."""
    import io

    from _raycluster import new_cluster
    from pipeline import submit as S

    cluster = new_cluster()
    try:
        cluster.start_head(num_cpus=1, object_store_mb=100)
        monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
        dying = ("python -c \"import sys; print('Intel oneMKL FATAL ERROR: Cannot load "
                 "/tmp/ray/session_x/runtime_resources/working_dir_files/x/libtorch_cpu.so.', flush=True); "
                 "sys.exit(1)\"")
        out, err = io.StringIO(), io.StringIO()
        assert S.submit_entrypoint(cluster.dashboard_url, dying, {}, timeout_s=120, out=out, err=err) == 1
        assert "FAILED" in err.getvalue() and "its own `ray start --temp-dir" in err.getvalue(), err.getvalue()
        out, err = io.StringIO(), io.StringIO()
        assert S.submit_entrypoint(cluster.dashboard_url, "python -c 'import sys; sys.exit(3)'", {},
                                   timeout_s=120, out=out, err=err) == 1
        assert "FAILED" in err.getvalue() and "--temp-dir" not in err.getvalue()
    finally:
        cluster.stop()


# ------------------------------------------------------------------------------------------------
# Slow: small Ray jobs

TINY_RUN = """\
seed: 0
data:
  format: synthetic
  shard_size: 200
  synthetic: {num_classes: 6, num_groups: 2, train: 800, test: 200, dim: 16}
teacher:
  model: {arch: mlp, hidden: [32]}
  epochs: 2
  num_workers: 1
cluster: {num_specialists: 2}
specialists: {epochs: 1, cpus_per_specialist: 1, max_concurrent: 1}
targets: {format: parquet}
student:
  model: {arch: mlp, hidden: [16]}
  epochs: 2
tune: {T: [2.0], alpha: [0.5], epochs: 1, scheduler: fifo, max_concurrent: 1}
ray: {num_cpus: 2, object_store_memory_mb: 150}
"""


def _ray_tmpdir() -> str:
    # Ray's socket paths must stay under 107 characters: a short folder of its own under /tmp.
    return tempfile.mkdtemp(prefix="rr", dir="/tmp")


def _cli_env(ray_tmpdir: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_TMPDIR=ray_tmpdir, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    return env


def _processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds `marker` (what every process a run's Ray
    starts inherits: raylet, GCS, dashboard, agents, workers)."""
    pids = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    with open(f"/proc/{entry}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                            pids.append(int(entry))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_a_stale_ray_current_cluster_does_not_break_a_local_run():
    """A killed `ray start` leaves {RAY_TMPDIR}/ray/ray_current_cluster naming a dead cluster; a
    local run must start its own Ray anyway (a plain ray.init() tried to join it). One 1-CPU
    local Ray, ~20 s."""
    tmp = _ray_tmpdir()
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:1\n")
        code = ("from pipeline.config import Config\n"
                "from pipeline.raysetup import ensure_ray\n"
                "ensure_ray(Config.model_validate({'ray': {'num_cpus': 1, 'object_store_memory_mb': 100}}))\n"
                "import ray\n"
                "print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()), flush=True)\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_cli_env(tmp), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and "answer 42" in r.stdout, r.stderr[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.s3
def test_no_credential_in_any_file_ray_writes_during_an_s3_run(s3_bucket, tmp_path):
    """The whole pipeline (Ray Train, two Ray Tune stages, Ray Data) on S3 with the test
    credentials in the environment: every file under the run's Ray temp dir is free of them, and
    the Tune trials still read and write S3 (they inherit the driver's environment)."""
    cfg = _yaml(tmp_path, TINY_RUN)
    out = f"{s3_bucket}/run"
    tmp = _ray_tmpdir()
    try:
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", cfg, f"output_dir={out}"], cwd=ROOT,
                           env=_cli_env(tmp), capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-4000:]
        assert storage.exists(storage.join(out, "report.md"))
        assert storage.exists(storage.join(out, "specialists", "_stage.json"))
        assert storage.exists(storage.join(out, "tune", "_stage.json"))
        files = 0
        for folder, _, names in os.walk(tmp):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                files += 1
                with open(path, "rb") as f:
                    data = f.read()
                assert TEST_SECRET_KEY.encode() not in data, path
                assert TEST_ACCESS_KEY.encode() not in data, path
        assert files > 20  # the session's logs really were searched
        assert any("runtime_env_agent" in n for _, _, ns in os.walk(tmp) for n in ns)
        for text in (r.stdout, r.stderr):
            assert TEST_SECRET_KEY not in text and TEST_ACCESS_KEY not in text
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_ctrl_c_during_ray_train_says_interrupted_exits_130_and_leaves_no_ray_process(tmp_path):
    cfg = _yaml(tmp_path, TINY_RUN)
    tmp = _ray_tmpdir()
    env = _cli_env(tmp, DISTILL_FAULT_INJECT=json.dumps({"epoch_sleep": 1.0}))
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", cfg, f"output_dir={tmp_path / 'run'}",
                          "teacher.epochs=200"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "[teacher] epoch 1/200" in line:
                break
        assert any("[teacher] epoch 1/200" in x for x in lines), "".join(lines)[-3000:]
        assert _processes_with(f"RAY_TMPDIR={tmp}")  # Ray is up
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        rest, _ = p.communicate(timeout=120)
        text = "".join(lines) + rest
        assert p.returncode == 130, text[-3000:]
        assert "distill: interrupted" in text, text[-3000:]
        # No traceback of distill's own (Ray's actors, which get the terminal's SIGINT too, may log
        # theirs, prefixed with their name and pid).
        assert not [x for x in text.splitlines() if x.startswith("Traceback")], text[-3000:]
        deadline = time.time() + 60
        while _processes_with(f"RAY_TMPDIR={tmp}") and time.time() < deadline:
            time.sleep(1)
        assert not _processes_with(f"RAY_TMPDIR={tmp}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for pid in _processes_with(f"RAY_TMPDIR={tmp}"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def _teacher_snapshot(out: str) -> tuple[str, dict]:
    from pipeline.stages import teacher

    ray_dir = os.path.join(out, "teacher", "ray")
    (name,) = [n for n in os.listdir(ray_dir) if n.startswith(teacher.RUN_PREFIX)]
    with open(os.path.join(ray_dir, name, "checkpoint_manager_snapshot.json")) as f:
        return os.path.join(ray_dir, name), json.load(f)


@pytest.mark.slow
def test_stage_teacher_force_retrains_and_an_unloadable_checkpoint_is_named(tmp_path, tiny_synthetic, ray_local,
                                                                            capsys):
    out = str(tmp_path / "run")
    cfg = _yaml(tmp_path, f"""\
output_dir: {out}
data: {{format: synthetic, uri: {tiny_synthetic}}}
teacher: {{model: {{arch: mlp, hidden: [32]}}, epochs: 2, batch_size: 64, num_workers: 1, max_failures: 0}}
""")
    code, _, err = run_cli(["stage", "teacher", cfg], capsys)
    assert code == 0, err[-3000:]
    run, snap = _teacher_snapshot(out)
    first = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    code, _, err = run_cli(["stage", "teacher", cfg, "--force"], capsys)
    assert code == 0, err[-3000:]
    assert "up to date" not in err and "removing the checkpoints it would resume from" in err
    run, snap = _teacher_snapshot(out)
    latest = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert latest != first  # trained again, not "run already complete"
    with open(os.path.join(out, "teacher", "metrics.json")) as f:
        m = json.load(f)
    assert m["starts"] == [0] and m["epochs_run"] == 2

    # A damaged latest checkpoint under a run that would resume from it (stage marker gone, as
    # after an interrupted run): exit 2 naming the file, not max_failures retries and exit 1.
    weights = os.path.join(run, latest, "model.pt")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    os.remove(os.path.join(out, "teacher", layout.MARKER))
    _expect_2(capsys, ["stage", "teacher", cfg], f"{weights}: the latest checkpoint of this stage cannot be loaded",
              f"delete {run}", "--force")
