"""`distill submit`: run a config on a remote Ray cluster through the Ray Jobs API.

Why this exists rather than `ray job submit`: the run needs the project's code shipped with it
(a runtime_env working_dir with the right excludes), its config validated *before* anything reaches
the cluster (bad input exits 2 here, not minutes later there), an explicit and non-leaking way to
hand S3 settings to the job, and Ray token authentication that works from Ray's standard token
places without the user also having to export `RAY_AUTH_MODE=token`.

Token authentication (Ray >= 2.52; facts checked against the installed Ray 2.60):
  * The dashboard / Jobs API rejects a request without a token with HTTP 401 and a wrong token with
    HTTP 403; Ray's SDK turns both into `ray.exceptions.AuthenticationError`.
  * Ray looks for the token in `RAY_AUTH_TOKEN`, then the file named by `RAY_AUTH_TOKEN_PATH`, then
    `~/.ray/auth_token` (whitespace stripped). We read the same places in the same order.
  * Ray's `JobSubmissionClient` only attaches the token when `RAY_AUTH_MODE=token` is set in the
    *client's* environment. We attach it ourselves as `Authorization: Bearer <token>` whenever a
    token is found (the SDK never overrides a caller's Authorization header), unless the user has
    explicitly set `RAY_AUTH_MODE=disabled`.
  * The token is never printed, logged, or put into the job's runtime_env: the cluster's own nodes
    already hold it (see cluster/README.md).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, TextIO

from pipeline.errors import UserError

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~") / ".ray" / "auth_token"

# Never shipped with a job: they are the cluster's own secret (the nodes already have it) or would
# point the job's driver at another token.
_REFUSED_PASSTHROUGH = {TOKEN_ENV, TOKEN_PATH_ENV, AUTH_MODE_ENV}

# gitignore-style patterns, matched by Ray against paths relative to the working dir. Anchored with
# '/' where only the top-level folder is meant, and without a trailing '/' so that the folder itself
# matches and Ray never walks into it (walking a venv alone takes seconds). The venv and run outputs
# are large and machine-specific; .git is history the job never needs.
DEFAULT_EXCLUDES = [
    "/.git", "/.venv", "/venv", "/runs", "/build", "/dist", "__pycache__", "*.pyc",
    "*.egg-info", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints",
]

# Set for every job: unbuffered output so `distill submit` streams log lines as they happen.
_JOB_ENV = {"PYTHONUNBUFFERED": "1"}

# Staged-config variable: a config outside the working dir travels as text in the runtime env.
STAGED_CONFIG_ENV = "DISTILL_SUBMITTED_CONFIG"

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_root() -> Path:
    """The folder holding `pipeline/` (and pyproject.toml): the default working_dir of a job."""
    return Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Token
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuthToken:
    """A Ray auth token and where it came from. `value` is kept out of repr so it cannot leak into
    tracebacks, logs or test output."""

    value: str = field(repr=False)
    source: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def resolve_auth_token(environ: Optional[Mapping[str, str]] = None,
                       home: Optional[Path] = None) -> Optional[AuthToken]:
    """Ray's token precedence: RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH's file, then ~/.ray/auth_token.

    Returns None when no token is configured or when the user explicitly set RAY_AUTH_MODE=disabled.
    A RAY_AUTH_TOKEN_PATH that cannot be read is an error (Ray itself treats it as fatal rather than
    silently falling back).
    """
    env = os.environ if environ is None else environ
    if env.get(AUTH_MODE_ENV, "").strip().lower() == "disabled":
        return None
    value = env.get(TOKEN_ENV, "").strip()
    if value:
        return AuthToken(value, TOKEN_ENV)
    path_str = env.get(TOKEN_PATH_ENV, "")
    if path_str:
        path = Path(path_str).expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UserError(f"{TOKEN_PATH_ENV} points to '{path}', which cannot be read ({e.strerror}); "
                            f"point it at the file holding the cluster's token, or unset it") from None
        if not value:
            raise UserError(f"{TOKEN_PATH_ENV} points to '{path}', which is empty; "
                            f"write the cluster's token into it, or unset it")
        return AuthToken(value, f"{TOKEN_PATH_ENV} ({path})")
    default = (home / ".ray" / "auth_token") if home is not None else DEFAULT_TOKEN_FILE.expanduser()
    try:
        value = default.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return AuthToken(value, str(default)) if value else None


def _auth_help(token: Optional[AuthToken]) -> str:
    if token is None and os.environ.get(AUTH_MODE_ENV, "").strip().lower() == "disabled":
        sent = f"no token was sent because {AUTH_MODE_ENV}=disabled is set in your environment"
    elif token is None:
        sent = (f"no token was found ({TOKEN_ENV} unset, {TOKEN_PATH_ENV} unset, "
                f"{DEFAULT_TOKEN_FILE} missing)")
    else:
        sent = f"the token from {token.source} was sent"
    return (f"{sent}. Get the cluster's token (on the head node: `ray get-auth-token`; on KubeRay: "
            f"the Secret named in the RayCluster/RayJob) and either export {TOKEN_ENV}, point "
            f"{TOKEN_PATH_ENV} at a file holding it, or write it to {DEFAULT_TOKEN_FILE} "
            f"(chmod 600). See cluster/README.md, 'Token authentication'.")


# ---------------------------------------------------------------------------------------------
# Runtime environment
# ---------------------------------------------------------------------------------------------

def build_runtime_env(working_dir: str | os.PathLike | None,
                      env_passthrough: Iterable[str] = (),
                      environ: Optional[Mapping[str, str]] = None,
                      extra_env: Optional[Mapping[str, str]] = None,
                      excludes: Optional[list[str]] = None) -> dict:
    """The job's runtime_env: the working dir (code + configs, big/private folders excluded) and
    env vars. `env_passthrough` names variables copied from the local environment (values are never
    printed; `describe_runtime_env` shows names only)."""
    env = os.environ if environ is None else environ
    wd = Path(working_dir if working_dir is not None else project_root()).expanduser().resolve()
    if not wd.is_dir():
        raise UserError(f"--working-dir '{wd}' is not a directory; pass the project folder to ship "
                        f"to the cluster (default: {project_root()})")
    env_vars = dict(_JOB_ENV)
    missing, refused = [], []
    for name in env_passthrough:
        name = name.strip()
        if name in _REFUSED_PASSTHROUGH:
            refused.append(name)
        elif name not in env:
            missing.append(name)
        else:
            env_vars[name] = env[name]
    if refused:
        raise UserError(f"--env {', '.join(refused)}: Ray's auth settings are never shipped with a job; "
                        "the cluster's nodes already hold the token (cluster/README.md, "
                        "'Token authentication'). Drop this --env.")
    if missing:
        raise UserError(f"--env {', '.join(missing)}: not set in your environment, so there is nothing "
                        "to copy to the job; export it first or drop the --env")
    env_vars.update(extra_env or {})
    return {"working_dir": str(wd), "excludes": list(excludes if excludes is not None else DEFAULT_EXCLUDES),
            "env_vars": env_vars}


def describe_runtime_env(runtime_env: Mapping) -> str:
    """One line for the user: working dir and env var *names* (values hidden: they may be secrets)."""
    parts = []
    if runtime_env.get("working_dir"):
        parts.append(f"working_dir={runtime_env['working_dir']}")
    names = sorted(k for k in (runtime_env.get("env_vars") or {}) if k != STAGED_CONFIG_ENV)
    if names:
        parts.append("env vars: " + ", ".join(names) + " (values not shown)")
    if STAGED_CONFIG_ENV in (runtime_env.get("env_vars") or {}):
        parts.append("config staged in the runtime env")
    return "; ".join(parts)


def build_entrypoint(config_path: str, overrides: list[str], runtime_env: dict) -> str:
    """The job's shell command. The config travels in the working dir when it lies inside it;
    otherwise its text is staged in the runtime env and written to a temp file on the cluster.

    `python -m pipeline.cli` rather than `distill`: the shipped working dir is first on sys.path,
    so the job runs the code being submitted even where an older `distill` is installed.
    """
    wd = Path(runtime_env["working_dir"])
    cfg = Path(config_path).expanduser().resolve()
    args = " ".join(shlex.quote(o) for o in overrides)
    try:
        rel = cfg.relative_to(wd).as_posix()
    except ValueError:
        rel = None
    if rel is not None and not _is_excluded(rel, wd, runtime_env.get("excludes") or []):
        return f"python -m pipeline.cli run {shlex.quote(rel)} {args}".rstrip()
    runtime_env.setdefault("env_vars", {})[STAGED_CONFIG_ENV] = cfg.read_text(encoding="utf-8")
    staged = shlex.quote(cfg.name)
    return ("d=$(mktemp -d) && printf '%s' \"$" + STAGED_CONFIG_ENV + "\" > \"$d\"/" + staged
            + " && exec python -m pipeline.cli run \"$d\"/" + staged + (f" {args}" if args else ""))


def _is_excluded(rel: str, wd: Path, patterns: list[str]) -> bool:
    """Would Ray leave `rel` out of the uploaded working dir? Same matcher as Ray's packaging, fed
    with our excludes plus the top-level .gitignore (Ray honours it unless
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and .rayignore."""
    from ray._private.thirdparty.pathspec import PathSpec

    lines = list(patterns)
    ignore_files = [".rayignore"]
    if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1":
        ignore_files.append(".gitignore")
    for name in ignore_files:
        try:
            lines += (wd / name).read_text(encoding="utf-8").splitlines()
        except OSError:
            pass
    spec = PathSpec.from_lines("gitwildmatch", lines)
    parts = rel.split("/")
    return any(spec.match_file("/".join(parts[:i])) for i in range(1, len(parts) + 1))


# ---------------------------------------------------------------------------------------------
# Jobs API
# ---------------------------------------------------------------------------------------------

def _scrub(text: str, token: Optional[AuthToken]) -> str:
    return text.replace(token.value, "<token>") if token and token.value else text


def _check_address(address: str) -> str:
    address = (address or "").strip()
    if not address:
        raise UserError("--address is empty; pass the Ray dashboard URL, e.g. http://HEAD_IP:8265")
    if address.startswith("ray://"):
        raise UserError(f"--address {address}: that is a Ray Client address; `distill submit` uses the "
                        "Jobs API on the dashboard port, e.g. http://HEAD_IP:8265")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def make_client(address: str, token: Optional[AuthToken] = None):
    """A JobSubmissionClient for `address`, authenticated with `token`; errors become UserError."""
    try:
        import requests
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # ray without [default]
        raise UserError(f"the Ray Jobs API needs `ray[default]` ({e}); install it with "
                        "pip install 'ray[default]'") from None

    headers = token.headers() if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise UserError(_auth_error_message(address, str(e), token)) from None
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        raise UserError(f"cannot reach the Ray Jobs API at {address}: nothing answered. Check the "
                        "address (the dashboard URL, default port 8265), that the cluster is up "
                        "(`ray status` on the head) and that the port is reachable from here "
                        "(e.g. `ray dashboard cluster/aws.yaml` forwards it to localhost)") from None
    except (requests.exceptions.RequestException, ValueError) as e:
        raise UserError(f"--address {address}: not a usable Ray dashboard URL "
                        f"({_scrub(str(e), token)}); pass e.g. http://HEAD_IP:8265") from None
    except RuntimeError as e:
        raise UserError(f"{address} did not answer like a Ray Jobs API: {_scrub(str(e), token)}") from None


def _auth_error_message(address: str, ray_message: str, token: Optional[AuthToken]) -> str:
    # Ray's SDK words a 401 as "Authentication required: ..." and a 403 as "Authentication failed: ..."
    if ray_message.startswith("Authentication failed") or "Forbidden" in ray_message:
        what = "rejected the authentication token as invalid (HTTP 403)"
    elif ray_message.startswith("Authentication required") or "Unauthorized" in ray_message:
        what = "requires an authentication token (HTTP 401)"
    else:
        what = "refused authentication"
    return f"the Ray cluster at {address} {what}: {_auth_help(token)}"


def _job_id(config_path: Optional[str]) -> str:
    stem = Path(config_path).stem if config_path else "job"
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)[:40]
    return f"distill-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def submit_entrypoint(address: str, entrypoint: str, runtime_env: Optional[dict] = None, *,
                      follow: bool = True, timeout_s: Optional[float] = None,
                      submission_id: Optional[str] = None, metadata: Optional[dict] = None,
                      token: Optional[AuthToken] = None, out: Optional[TextIO] = None,
                      err: Optional[TextIO] = None) -> int:
    """Submit `entrypoint` with `runtime_env`, stream its logs to `out`, return an exit code.

    0 the job SUCCEEDED; 1 it FAILED or was STOPPED (or `timeout_s` passed, after which the job is
    stopped); 2 if its driver itself exited with 2 (bad input found on the cluster). With
    `follow=False` returns 0 once the job is accepted. Raises UserError for an unreachable address or
    a missing/wrong token (the CLI exits 2).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    address = _check_address(address)
    if token is None:
        token = resolve_auth_token()
    client = make_client(address, token)
    # Ray's SDK logs every upload step and websocket close at INFO (its modules set that level when
    # imported, hence after make_client); our own lines say what matters. Warnings still show.
    for name in ("ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from ray.exceptions import AuthenticationError

    submission_id = submission_id or _job_id(None)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or {},
                                   submission_id=submission_id, metadata=metadata or {})
    except AuthenticationError as e:
        raise UserError(_auth_error_message(address, str(e), token)) from None
    except (ValueError, TypeError) as e:  # runtime_env rejected locally (e.g. package too large)
        raise UserError(f"the job's runtime_env was rejected: {_scrub(str(e), token)}") from None
    except RuntimeError as e:
        raise UserError(f"the Ray Jobs API at {address} refused the job: {_scrub(str(e), token)}") from None

    stop_cmd = f"ray job stop {job_id} --address {address}"
    err.write(f"distill submit: job {job_id} submitted to {address}\n")
    if not follow:
        err.write(f"distill submit: follow it with `ray job logs -f {job_id} --address {address}` "
                  f"(with {AUTH_MODE_ENV}=token exported if the cluster uses token authentication)\n")
        return 0
    err.flush()

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    out = _TailKeeper(out)
    try:
        streamed = _stream_logs(client, job_id, out, err, deadline)
        status, info = _wait_terminal(client, job_id, deadline)
        if not streamed:
            # Websocket unavailable (proxy, old server): print what the job wrote instead.
            out.write(client.get_job_logs(job_id))
            out.flush()
    except TimeoutError:
        client.stop_job(job_id)
        err.write(f"distill submit: job {job_id} still running after {timeout_s:.0f}s; asked the "
                  "cluster to stop it\n")
        return 1
    except KeyboardInterrupt:
        err.write(f"\ndistill submit: stopped following; job {job_id} keeps running on the cluster. "
                  f"Stop it with `{stop_cmd}`\n")
        raise

    if status == "SUCCEEDED":
        err.write(f"distill submit: job {job_id} SUCCEEDED\n")
        return 0
    # Ray appends the log tail to the message; it was streamed already, keep the first line.
    first = (getattr(info, "message", None) or "").strip().splitlines()
    why = f": {first[0].split(', last available logs')[0]}" if first else ""
    err.write(f"distill submit: job {job_id} {status}{why}\n")
    hint = vanished_working_dir_hint(out.tail + "\n" + (getattr(info, "message", None) or ""))
    if status == "FAILED" and hint:
        err.write(f"distill submit: {hint}\n")
    if status == "FAILED" and getattr(info, "driver_exit_code", None) == 2:
        return 2
    return 1


class _TailKeeper:
    """Passes writes through to `stream` and keeps the last characters, to explain a failure."""

    KEEP = 64 * 1024

    def __init__(self, stream: TextIO):
        self.stream, self.tail = stream, ""

    def write(self, text: str) -> int:
        self.tail = (self.tail + text)[-self.KEEP:]
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


# What a job prints when its working directory (the runtime_env copy Ray unpacked) disappeared
# under it: seen when a second Ray node on the same machine shares the head's temp dir and removes
# the head's unpacked working dirs (cluster/README.md, "Two nodes on one machine").
# getcwd as bash ("getcwd: cannot access parent directories: No such file or directory"), dash
# ("getcwd() failed: No such file or directory") and Python tools word it.
_VANISHED_WD = re.compile(r"getcwd[^\n]{0,60}No such file or directory|Intel oneMKL FATAL ERROR: Cannot load")


def vanished_working_dir_hint(log_text: str) -> Optional[str]:
    """A sentence naming the likely cause when a failed job's log shows its working dir vanished."""
    if not _VANISHED_WD.search(log_text):
        return None
    return ("the job's working directory vanished while it ran (its log shows "
            "'getcwd: No such file or directory' or 'Intel oneMKL FATAL ERROR: Cannot load "
            "…/libtorch_cpu.so'). Likely cause: two Ray nodes on one machine sharing one temp dir, "
            "where a node removes the other's unpacked runtime_env; start each extra node with its own "
            "`ray start --temp-dir=...` (see cluster/README.md, 'Two nodes on one machine')")


def _stream_logs(client, job_id: str, out: TextIO, err: TextIO, deadline: Optional[float]) -> bool:
    """Follow the job's log over the Jobs API websocket. False if the websocket could not be used."""

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        asyncio.run(asyncio.wait_for(follow(), timeout=remaining))
    except asyncio.TimeoutError:
        raise TimeoutError from None
    except RuntimeError as e:
        # aiohttp handshake failures and abnormal closes surface as RuntimeError / ClientError
        err.write(f"distill submit: log stream interrupted ({e}); waiting for the job\n")
        return False
    except Exception as e:  # aiohttp.ClientError etc.: fall back to polling
        err.write(f"distill submit: cannot follow logs ({type(e).__name__}); waiting for the job\n")
        return False
    return True


def _wait_terminal(client, job_id: str, deadline: Optional[float]):
    # The log stream can close a moment before the job's status turns terminal.
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in _TERMINAL:
            return status, info
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# distill submit
# ---------------------------------------------------------------------------------------------

def _written_output_dir(config_path: str, overrides: list[str]) -> str:
    """output_dir as the user wrote it (the loaded config resolves local paths against this
    machine's working directory, which means nothing on the cluster)."""
    import yaml

    from pipeline.config import Config, parse_overrides

    written = [value for key, value in parse_overrides(overrides)[0] if key == "output_dir"]
    if written:
        return str(written[-1])
    with open(config_path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    return str(raw.get("output_dir", Config.model_fields["output_dir"].default))


def prepare(config_path: str, overrides: list[str], working_dir: Optional[str] = None,
            env_passthrough: Iterable[str] = (),
            environ: Optional[Mapping[str, str]] = None) -> tuple[str, dict]:
    """Validate the config locally and build (entrypoint, runtime_env) without contacting a cluster."""
    from pipeline.config import load_config

    overrides = list(overrides or [])
    load_config(config_path, overrides)  # bad config or override: UserError, exit 2, here
    out_dir = _written_output_dir(config_path, overrides)
    if "://" not in out_dir and not os.path.isabs(out_dir):
        raise UserError(
            f"output_dir '{out_dir}' is a relative local path; on the cluster it would land inside the "
            "job's temporary copy of the working dir on the head node and be lost. Pass "
            "output_dir=s3://BUCKET/PREFIX (or an absolute path on a filesystem shared by all nodes)")
    # The job's driver joins the cluster it runs on, whatever address the config names for laptops.
    if not any(o.split("=", 1)[0].strip() == "ray.address" for o in overrides):
        overrides.append("ray.address=auto")
    runtime_env = build_runtime_env(working_dir, env_passthrough, environ=environ)
    entrypoint = build_entrypoint(config_path, overrides, runtime_env)
    return entrypoint, runtime_env


def submit(config_path: str, address: str, overrides: list[str], working_dir: Optional[str] = None,
           env_passthrough: Iterable[str] = (), follow: bool = True,
           timeout_s: Optional[float] = None) -> int:
    """`distill submit CONFIG --address URL [KEY=VALUE ...]`. Returns the process exit code."""
    entrypoint, runtime_env = prepare(config_path, overrides, working_dir, env_passthrough)
    token = resolve_auth_token()
    sys.stderr.write(f"distill submit: {describe_runtime_env(runtime_env)}; auth token: "
                     f"{'from ' + token.source if token else 'none'}\n")
    return submit_entrypoint(address, entrypoint, runtime_env, follow=follow, timeout_s=timeout_s,
                             submission_id=_job_id(config_path), token=token,
                             metadata={"distill_config": Path(config_path).name})
