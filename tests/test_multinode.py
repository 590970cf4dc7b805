"""Multi-node Ray: `distill submit` to a two-node token-authenticated cluster, results on S3.

The cluster is real: a head and a worker node started with `ray start` on this machine, each with
1 CPU, both registered as 127.0.0.1 (tests/_raycluster.py, loopback mode), token authentication on.
The outputs go to a local S3 server (moto, conftest's `s3_server`). The nodes are started *without*
the S3 settings, as on a cluster whose nodes know nothing of the bucket: a run succeeds only if
`distill submit --env` hands them to the job, which passes them to its workers on both nodes.

- test_submit_quickstart_to_two_nodes_lands_in_s3: the quickstart (shrunk by overrides) submitted
  with `distill submit`; every stage's marker, summary.json and report.md land in the bucket, the
  specialists are trained on both nodes, and submitting again skips every stage.
- test_worker_node_killed_mid_stage_recovers: the same run resubmitted with the distilled student's
  own T/alpha (only that student and the report rerun), trained by two Ray Train workers, one per
  node. Once Ray Train has registered its first checkpoint in the bucket, the worker node is
  SIGKILLed (every process of it) and a fresh node joins. Ray Train restarts the worker group, the
  student resumes after that checkpoint instead of at epoch 0, and the run completes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _raycluster import new_cluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.s3, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = "configs/quickstart.yaml"
STAGES = ("data", "teacher", "cluster", "specialists", "targets", "tune", "student", "report")
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
# Everything that could tell a node where S3 is or how to sign in; the job must bring these itself.
NODE_DROPS = S3_ENV + ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN")

# The quickstart, small enough for 2 CPUs: 17 shards of 100 samples, 2 teacher epochs (2 Ray Train
# workers, one per node), 2 specialists of 1 epoch (one Tune trial per node), 2 tune trials of 1
# epoch, students of 3 epochs.
SMALL = [
    "data.synthetic.train=1200", "data.synthetic.test=400", "data.shard_size=100",
    "teacher.epochs=2", "cluster.num_specialists=2", "specialists.epochs=1",
    "student.epochs=3", "tune.T=[2.0]", "tune.alpha=[0.5,0.9]", "tune.epochs=1",
]


def _distill() -> list[str]:
    script = Path(sys.executable).parent / "distill"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


class Submission:
    """One `distill submit` in a subprocess, its output in a file (read it on failure)."""

    def __init__(self, cluster, log: Path, overrides: list[str], extra_env: dict | None = None):
        self.log = log
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
        env["RAY_AUTH_TOKEN"] = cluster.token
        env.update(extra_env or {})
        passthrough = [*S3_ENV, *(extra_env or {})]
        cmd = [*_distill(), "submit", QUICKSTART, "--address", cluster.dashboard_url, *overrides]
        for name in passthrough:
            cmd += ["--env", name]
        self.t0 = time.monotonic()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def wait(self, timeout_s: float) -> tuple[int, str, float]:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            raise AssertionError(f"distill submit still running after {timeout_s}s:\n{self.tail()}") from None
        return code, self.log.read_text(errors="replace"), time.monotonic() - self.t0

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _s3fs():
    import s3fs

    return s3fs.S3FileSystem(
        key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"],
                       "region_name": os.environ["AWS_DEFAULT_REGION"]},
        use_listings_cache=False, skip_instance_cache=True)


def _read_json(fs, key: str) -> dict:
    with fs.open(key, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    """A bucket on the local S3 server and a two-node token cluster on 127.0.0.1 (1 CPU each)."""
    import boto3

    bucket = f"distill-multinode-{os.getpid()}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name=os.environ["AWS_DEFAULT_REGION"])
    client.create_bucket(Bucket=bucket)
    cluster = new_cluster(loopback=True)
    cluster.env_drop = NODE_DROPS
    try:
        cluster.start_head(num_cpus=1, object_store_mb=150)
        cluster.start_worker(num_cpus=1, object_store_mb=150)
        yield {"cluster": cluster, "bucket": bucket, "logs": tmp_path_factory.mktemp("multinode")}
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def quickstart_run(two_nodes):
    """The quickstart submitted once to the two-node cluster (the tests below share its bucket)."""
    cluster, bucket = two_nodes["cluster"], two_nodes["bucket"]
    nodes = {n["node_id"]: n for n in cluster.node_states() if n["state"] == "ALIVE"}
    sub = Submission(cluster, two_nodes["logs"] / "submit-1.log", [f"output_dir=s3://{bucket}/run", *SMALL])
    code, out, seconds = sub.wait(1200)
    return {"code": code, "out": out, "seconds": seconds, "nodes_at_submit": nodes,
            "run": f"{bucket}/run", **two_nodes}


def test_submit_quickstart_to_two_nodes_lands_in_s3(quickstart_run):
    from conftest import TEST_SECRET_KEY

    r = quickstart_run
    cluster, out = r["cluster"], r["out"]
    assert r["code"] == 0, out[-6000:]
    assert "SUCCEEDED" in out
    # Credentials travel to the job, never into its output.
    assert cluster.token not in out and TEST_SECRET_KEY not in out

    fs, run = _s3fs(), r["run"]
    for stage in STAGES:
        marker = _read_json(fs, f"{run}/{stage}/_stage.json")
        assert marker["stage"] == stage and marker["fingerprint"]
    summary = _read_json(fs, f"{run}/summary.json")
    assert summary["dataset"]["num_classes"] == 12
    assert summary["dataset"]["train"] + summary["dataset"].get("val", 0) == 1200
    assert summary["dataset"]["test"] == 400
    for model in ("generalist", "ensemble", "student_baseline", "student_distilled_generalist", "student_distilled"):
        assert 0.0 <= summary["models"][model]["test_error"] <= 1.0, model
    assert summary["tune"]["trials"] == 2
    report = fs.cat_file(f"{run}/report.md").decode("utf-8")
    assert "student" in report.lower()
    assert TEST_SECRET_KEY not in report and TEST_SECRET_KEY not in json.dumps(summary)

    # The teacher's data-parallel workers needed both CPUs, so both nodes; so did the specialists,
    # trained side by side as one Ray Tune trial each.
    teacher = _read_json(fs, f"{run}/teacher/metrics.json")
    assert teacher["num_workers"] == 2 and teacher["starts"] == [0]
    spec = _read_json(fs, f"{run}/specialists/metrics.json")
    assert spec["num_specialists"] >= 2
    trained_on = {s["node_id"] for s in spec["specialists"]}
    assert trained_on == set(r["nodes_at_submit"]), (trained_on, set(r["nodes_at_submit"]))

    # Submitting the finished run again skips every stage and rewrites nothing.
    markers = {s: fs.cat_file(f"{run}/{s}/_stage.json") for s in STAGES}
    again = Submission(cluster, r["logs"] / "submit-2.log", [f"output_dir=s3://{run}", *SMALL])
    code, out2, seconds = again.wait(600)
    assert code == 0, out2[-6000:]
    for stage in STAGES:
        assert f"stage {stage}: up to date" in out2, stage
        assert fs.cat_file(f"{run}/{stage}/_stage.json") == markers[stage], stage
    assert "running ->" not in out2
    print(f"first submit {r['seconds']:.0f}s, idempotent resubmit {seconds:.0f}s")


def _registered_epoch(fs, ray_root: str, prefix: str, old: set[str]):
    """Epoch of the latest checkpoint Ray Train has *registered* for a run `{prefix}*` under
    ray_root that was not there before (None if none yet). A checkpoint folder appears in storage
    as soon as its upload starts; only the controller's snapshot says a restart would resume from
    it."""
    try:
        runs = [p for p in fs.ls(ray_root, detail=False) if p.rsplit("/", 1)[-1].startswith(prefix)]
    except FileNotFoundError:
        return None
    for run in runs:
        if run.rsplit("/", 1)[-1] in old:
            continue
        try:
            snap = _read_json(fs, f"{run}/checkpoint_manager_snapshot.json")
        except FileNotFoundError:
            continue
        latest = snap.get("latest_checkpoint_result") or {}
        if "epoch" in (latest.get("metrics") or {}):
            return int(latest["metrics"]["epoch"])
    return None


def test_worker_node_killed_mid_stage_recovers(quickstart_run):
    r = quickstart_run
    assert r["code"] == 0, "the first run failed; see test_submit_quickstart_to_two_nodes_lands_in_s3"
    cluster, run, fs = r["cluster"], r["run"], _s3fs()
    worker = next(n for n in cluster.nodes[1:] if n.proc.poll() is None)
    ray_root = f"{run}/student/ray"
    old_runs = {p.rsplit("/", 1)[-1] for p in fs.ls(ray_root, detail=False)}
    before = _read_json(fs, f"{run}/student/metrics.json")
    old_report = _read_json(fs, f"{run}/report/_stage.json")

    # The user tries their own T/alpha: only the distilled student (and the report) rerun. Two Ray
    # Train workers on two 1-CPU nodes means one per node. A checkpoint every epoch (the quickstart
    # has one every 10), each epoch padded by the fault-injection hook, so the node dies between
    # checkpoints, not after the last one.
    overrides = [f"output_dir=s3://{run}", *SMALL, "student.use_tuned=false", "student.T=3.0",
                 "student.alpha=0.7", "student.num_workers=2", "student.checkpoint_every=1"]
    sub = Submission(cluster, r["logs"] / "submit-kill.log", overrides,
                     extra_env={"DISTILL_FAULT_INJECT": json.dumps({"epoch_sleep": 4.0})})
    deadline = time.monotonic() + 600
    while (registered := _registered_epoch(fs, ray_root, "distilled-", old_runs)) is None:
        assert sub.proc.poll() is None, f"run ended before the student checkpointed:\n{sub.tail()}"
        assert time.monotonic() < deadline, f"no student checkpoint after 600s:\n{sub.tail()}"
        time.sleep(0.5)

    alive_before = set(cluster.alive_node_ids())
    pids = worker.kill()
    assert pids, "the worker node had no processes to kill"
    cluster.wait_for(lambda ns: sum(n["state"] == "ALIVE" for n in ns) == 1, 120,
                     "the killed node to be declared dead")
    killed = alive_before - set(cluster.alive_node_ids())
    # A fresh node takes the dead one's place: the restarted worker group needs two CPUs again.
    cluster.start_worker(num_cpus=1, object_store_mb=150)

    code, out, seconds = sub.wait(900)
    assert code == 0, out[-8000:]
    assert [n["state"] for n in cluster.node_states() if n["node_id"] in killed] == ["DEAD"]
    epochs = 3
    distilled = _read_json(fs, f"{run}/student/metrics.json")["distilled"]
    starts = distilled["starts"]
    # Restarted once, right after the checkpoint registered before the kill (or a later one), and
    # no epoch is missing or repeated in the history.
    assert len(starts) == 2 and starts[0] == 0 and registered + 1 <= starts[1] < epochs, (starts, registered)
    assert [e["epoch"] for e in distilled["epochs"]] == list(range(epochs))
    assert (distilled["T"], distilled["alpha"]) == (3.0, 0.7)
    assert 0.0 <= distilled["test_error"] <= 1.0
    summary = _read_json(fs, f"{run}/summary.json")
    assert summary["models"]["student_distilled"]["T"] == 3.0
    assert _read_json(fs, f"{run}/report/_stage.json")["fingerprint"] != old_report["fingerprint"]
    for stage in ("data", "teacher", "cluster", "specialists", "targets", "tune"):
        assert f"stage {stage}: up to date" in out, stage
    # The baseline did not change: its finished Ray Train run was found and not retrained.
    after = _read_json(fs, f"{run}/student/metrics.json")["baseline"]
    assert after["starts"] == before["baseline"]["starts"] == [0]
    print(f"run with a node killed mid-student: {seconds:.0f}s; checkpoint of epoch {registered} "
          f"registered before the kill, distilled starts {starts}")
