"""Start and stop real token-authenticated Ray nodes (`ray start`) on this machine for tests.

Why not `ray stop`: it kills every Ray process on the machine, including other tests' clusters.
Each node here is `ray start --block` in a new session, so teardown kills exactly that session's
processes (GCS, raylet, dashboard, agents, workers) and nothing else. Every port is picked free so
several clusters can coexist; the dashboard listens on 127.0.0.1 only. (On Linux `ray start`
advertises the machine's routable IP as the node address even when asked for 127.0.0.1; Ray
rewrites loopback addresses on purpose, so the GCS address below is that IP.)

`new_cluster(loopback=True)` keeps every node on 127.0.0.1 instead (see LOOPBACK_LAUNCHER): every
node registers as 127.0.0.1, the GCS binds to it (it refuses connections on the routable IP), and
every Ray address a test, a job driver or a Ray worker dials is 127.0.0.1.

The token lives only in the nodes' environment (`RAY_AUTH_TOKEN`), never in ~/.ray/auth_token,
so these clusters do not disturb the user's own token.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent

# `ray start` on Linux replaces a loopback --node-ip-address / --address by the machine's routable
# IP (ray._private.services.resolve_ip_for_localhost), so a worker told to join 127.0.0.1:P dials
# IP:P, which a loopback-bound GCS does not answer. This launcher runs Ray's own `ray start` CLI with
# that one rewrite switched off, so --node-ip-address=127.0.0.1 and --address=127.0.0.1:P are used
# as given. It also exports RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 *after* Ray's constants are loaded:
# the launcher itself still may join a cluster, while every process the node spawns (job drivers,
# Ray workers, agents) inherits it and so resolves "127.0.0.1" / RAY_ADDRESS to 127.0.0.1 too
# (`services.get_node_ip_address` returns the loopback address when that flag is off). Verified
# with Ray 2.60: head and worker both register as 127.0.0.1, tasks and Jobs run on both nodes.
LOOPBACK_LAUNCHER = (
    "import os, sys\n"
    "import ray._private.services as services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '0'\n"
    "from ray.scripts.scripts import main\n"
    "sys.exit(main())\n"
)
# What a driver process outside the cluster (e.g. `distill run ray.address=127.0.0.1:P` started by
# a test) needs in its environment to dial 127.0.0.1 rather than the routable IP.
LOOPBACK_DRIVER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env(token: str | None, extra: dict | None = None, drop: tuple[str, ...] = ()) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", *drop)}
    # Job entrypoints run `python ...` through /bin/sh: the project's interpreter must come first.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if token is not None:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = token
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    env.update(extra or {})
    return env


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


@dataclass
class RayNode:
    proc: subprocess.Popen
    log_path: Path

    def stop(self, grace_s: float = 3.0) -> None:
        """Kill this node's whole session (the node drains for up to 30 s on SIGTERM; tests don't wait)."""
        sid = self.proc.pid  # start_new_session: the session id is the leader's pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_pids(sid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + (grace_s if sig == signal.SIGTERM else 10)
            while time.time() < deadline:
                self.proc.poll()
                alive = [p for p in _session_pids(sid) if not _is_zombie(p)]
                if not alive:
                    break
                time.sleep(0.2)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self, timeout_s: float = 10.0) -> list[int]:
        """SIGKILL every process of this node at once (raylet, agents, workers; the GCS too on a
        head): what a machine failure looks like to the rest of the cluster. Returns the PIDs."""
        sid = self.proc.pid
        pids = _session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout_s
        while time.time() < deadline and [p for p in _session_pids(sid) if not _is_zombie(p)]:
            time.sleep(0.1)
        self.proc.poll()
        return pids

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@dataclass
class LocalRayCluster:
    """A head (and optionally workers) started with `ray start` on this machine."""

    token: str | None
    temp_dir: Path
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: list[RayNode] = field(default_factory=list)
    loopback: bool = False
    # Variables of this process's environment the nodes must not inherit (e.g. S3 settings, so a
    # test proves a job got them from its runtime env rather than from the node).
    env_drop: tuple[str, ...] = ()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        # Ray advertises the node's routable IP (see module docstring); joining workers resolve
        # 127.0.0.1 to the same IP, so this works for `ray start --address`.
        return f"127.0.0.1:{self.gcs_port}"

    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _start(self, args: list[str], name: str, env_extra: dict | None) -> RayNode:
        log_path = self.temp_dir / f"{name}.log"
        if self.loopback:
            cmd = [sys.executable, "-c", LOOPBACK_LAUNCHER, "start", "--block", "--disable-usage-stats",
                   "--node-ip-address=127.0.0.1", *args]
        else:
            cmd = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=_node_env(self.token, env_extra, self.env_drop), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        node = RayNode(proc, log_path)
        self.nodes.append(node)
        return node

    @staticmethod
    def _port_args() -> list[str]:
        names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
        return [f"--{n}={free_port()}" for n in names]

    def start_head(self, num_cpus: int = 1, object_store_mb: int = 100, resources: str | None = None,
                   env_extra: dict | None = None, timeout_s: float = 90) -> None:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        args = ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_mb * 1024 * 1024}",
                f"--temp-dir={self.temp_dir}", *self._port_args()]
        if resources:
            args.append(f"--resources={resources}")
        node = self._start(args, "head", env_extra)
        self._wait_jobs_api(node, timeout_s)

    def start_worker(self, num_cpus: int = 1, object_store_mb: int = 100, resources: str | None = None,
                     env_extra: dict | None = None, timeout_s: float = 90) -> RayNode:
        before = set(self.alive_node_ids())
        # Its own temp dir, as a node on another machine would have. By default a joining node uses
        # the head's, and then both nodes' runtime-env agents manage the same
        # runtime_resources/working_dir_files/: when the worker node's jobs' workers exit, its agent
        # deletes the job's unpacked working_dir while the job's driver on the head still runs in
        # it (seen as "getcwd: No such file or directory" in Tune and as "Intel oneMKL FATAL
        # ERROR: Cannot load libtorch_cpu.so" when the driver first imports torch).
        node_temp = self.temp_dir / f"w{len(self.nodes)}"
        node_temp.mkdir(parents=True, exist_ok=True)
        args = [f"--address={self.gcs_address}", f"--temp-dir={node_temp}", f"--num-cpus={num_cpus}",
                f"--object-store-memory={object_store_mb * 1024 * 1024}", *self._port_args()]
        if resources:
            args.append(f"--resources={resources}")
        node = self._start(args, f"worker{len(self.nodes)}", env_extra)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray worker exited early:\n{node.log_tail()}")
            if set(self.alive_node_ids()) - before:
                return node
            time.sleep(0.5)
        raise RuntimeError(f"worker did not join within {timeout_s}s:\n{node.log_tail()}")

    def alive_nodes(self) -> int:
        r = requests.get(f"{self.dashboard_url}/nodes?view=summary", headers=self.auth_headers(), timeout=5)
        if r.status_code != 200:
            return 0
        summary = r.json().get("data", {}).get("summary", [])
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    def node_states(self) -> list[dict]:
        """[{node_id, state, is_head, resources}] as the dashboard reports them ([] if it cannot)."""
        try:
            r = requests.get(f"{self.dashboard_url}/nodes?view=summary", headers=self.auth_headers(), timeout=5)
        except requests.RequestException:
            return []
        if r.status_code != 200:
            return []
        out = []
        for n in r.json().get("data", {}).get("summary", []):
            raylet = n.get("raylet", {})
            out.append({"node_id": raylet.get("nodeId"), "state": raylet.get("state"),
                        "is_head": bool(raylet.get("isHeadNode")), "ip": n.get("ip"),
                        "resources": raylet.get("resourcesTotal", {})})
        return out

    def alive_node_ids(self) -> list[str]:
        return [n["node_id"] for n in self.node_states() if n["state"] == "ALIVE"]

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        """Poll the dashboard's node table until `predicate(node_states())` holds."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if predicate(self.node_states()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}: {self.node_states()}")

    def _wait_jobs_api(self, node: RayNode, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray head exited early:\n{node.log_tail()}")
            try:
                r = requests.get(f"{self.dashboard_url}/api/jobs/", headers=self.auth_headers(), timeout=2)
                if r.status_code == 200 and self.alive_nodes() >= 1:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Ray Jobs API not up within {timeout_s}s:\n{node.log_tail()}")

    def stop(self, keep_temp_dir: bool = False) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        if not keep_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def new_cluster(token: str | None = "generate", loopback: bool = False) -> LocalRayCluster:
    """A cluster object with its own short temp dir (Ray's socket paths must stay under 107 chars).
    loopback=True: every node registers as 127.0.0.1 and listens on loopback (LOOPBACK_LAUNCHER)."""
    if token == "generate":
        token = secrets.token_hex(32)
    return LocalRayCluster(token=token, temp_dir=Path(tempfile.mkdtemp(prefix="rt", dir="/tmp")),
                           loopback=loopback)
