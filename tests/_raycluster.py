"""Start and stop real token-authenticated Ray nodes (`ray start`) on this machine for tests.

Why not `ray stop`: it kills every Ray process on the machine, including other tests' clusters.
Each node here is `ray start --block` in a new session, so teardown kills exactly that session's
processes (GCS, raylet, dashboard, agents, workers) and nothing else. Every port is picked free so
several clusters can coexist; the dashboard listens on 127.0.0.1 only. (On Linux `ray start`
advertises the machine's routable IP as the node address even when asked for 127.0.0.1; Ray
rewrites loopback addresses on purpose, so the GCS address below is that IP.)

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env(token: str | None, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
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
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=_node_env(self.token, env_extra), stdout=log,
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
        expected = self.alive_nodes() + 1
        args = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                f"--object-store-memory={object_store_mb * 1024 * 1024}", *self._port_args()]
        if resources:
            args.append(f"--resources={resources}")
        node = self._start(args, f"worker{len(self.nodes)}", env_extra)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray worker exited early:\n{node.log_tail()}")
            if self.alive_nodes() >= expected:
                return node
            time.sleep(0.5)
        raise RuntimeError(f"worker did not join within {timeout_s}s:\n{node.log_tail()}")

    def alive_nodes(self) -> int:
        r = requests.get(f"{self.dashboard_url}/nodes?view=summary", headers=self.auth_headers(), timeout=5)
        if r.status_code != 200:
            return 0
        summary = r.json().get("data", {}).get("summary", [])
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

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


def new_cluster(token: str | None = "generate") -> LocalRayCluster:
    """A cluster object with its own short temp dir (Ray's socket paths must stay under 107 chars)."""
    if token == "generate":
        token = secrets.token_hex(32)
    return LocalRayCluster(token=token, temp_dir=Path(tempfile.mkdtemp(prefix="rt", dir="/tmp")))
