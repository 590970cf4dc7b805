"""`distill submit`: runtime env, token handling, and real submissions to a token-protected Ray head.

The unit tests need no cluster. The integration tests (slow, cluster) start one head with
`ray start --head` and RAY_AUTH_MODE=token (tests/_raycluster.py: free ports, its own temp dir,
killed by session at the end, never `ray stop`) and submit through the same code `distill submit`
uses.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import textwrap
import zipfile
from pathlib import Path

import pytest

from pipeline import submit as S
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _clean_auth_env(monkeypatch, home: Path) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))


# ---------------------------------------------------------------------------------------------
# Token resolution
# ---------------------------------------------------------------------------------------------

def test_token_precedence_env_then_path_then_default_file(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default-file\n")
    path_file = tmp_path / "tok"
    path_file.write_text("  from-path-file \n")

    t = S.resolve_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_file)}, home=home)
    assert (t.value, t.source) == ("from-env", "RAY_AUTH_TOKEN")
    t = S.resolve_auth_token({"RAY_AUTH_TOKEN_PATH": str(path_file)}, home=home)
    assert t.value == "from-path-file" and t.source.startswith("RAY_AUTH_TOKEN_PATH")
    t = S.resolve_auth_token({}, home=home)
    assert t.value == "from-default-file" and t.source.endswith("auth_token")
    assert t.headers() == {"Authorization": "Bearer from-default-file"}


def test_token_absent_or_disabled_gives_none(tmp_path):
    assert S.resolve_auth_token({}, home=tmp_path) is None
    assert S.resolve_auth_token({"RAY_AUTH_TOKEN": "x", "RAY_AUTH_MODE": "disabled"}, home=tmp_path) is None


def test_unreadable_token_path_is_a_user_error_without_fallback(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default")
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH"):
        S.resolve_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        S.resolve_auth_token({"RAY_AUTH_TOKEN_PATH": str(empty)}, home=tmp_path)


def test_token_value_never_in_repr():
    t = S.AuthToken("s3cr3t-token-value", "RAY_AUTH_TOKEN")
    assert "s3cr3t" not in repr(t) and "s3cr3t" not in str(t)


# ---------------------------------------------------------------------------------------------
# Runtime env
# ---------------------------------------------------------------------------------------------

def _fake_project(root: Path) -> Path:
    files = {
        "pipeline/__init__.py": "", "pipeline/cli.py": "print('hi')\n",
        "pipeline/__pycache__/cli.cpython-311.pyc": "x", "configs/q.yaml": "output_dir: s3://b/x\n",
        ".venv/lib/site.py": "x", ".git/HEAD": "ref", "runs/r1/summary.json": "{}",
        "distill.egg-info/PKG-INFO": "x", "docs/runs/keep.md": "nested runs/ folder is not the top one",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_runtime_env_excludes_are_applied_by_rays_packaging(tmp_path):
    """Package the working dir exactly as Ray's client will and look inside the zip."""
    from ray._private.runtime_env.packaging import create_package

    proj = _fake_project(tmp_path / "proj")
    env = S.build_runtime_env(proj, environ={})
    assert env["working_dir"] == str(proj.resolve())
    zpath = tmp_path / "pkg.zip"
    create_package(env["working_dir"], zpath, include_gitignore=True, excludes=env["excludes"])
    names = set(zipfile.ZipFile(zpath).namelist())
    assert "pipeline/cli.py" in names and "configs/q.yaml" in names
    assert "docs/runs/keep.md" in names  # only the top-level runs/ is excluded
    shipped = " ".join(sorted(names))
    for excluded in (".venv/", ".git/", "runs/r1", "__pycache__", "egg-info"):
        assert excluded not in shipped.replace("docs/runs/", ""), excluded


def test_default_working_dir_is_the_project(tmp_path):
    env = S.build_runtime_env(None, environ={})
    assert Path(env["working_dir"]) == ROOT
    assert (Path(env["working_dir"]) / "pipeline" / "submit.py").exists()
    with pytest.raises(UserError, match="not a directory"):
        S.build_runtime_env(tmp_path / "nope", environ={})


def test_env_passthrough_copies_values_but_describes_names_only():
    secret = "AKIA-very-secret-value"
    env = S.build_runtime_env(None, ["AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"],
                              environ={"AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == secret
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    line = S.describe_runtime_env(env)
    assert "AWS_SECRET_ACCESS_KEY" in line and "AWS_ENDPOINT_URL" in line
    assert secret not in line and "127.0.0.1:9" not in line


def test_env_passthrough_refuses_auth_settings_and_missing_names():
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN") as e:
        S.build_runtime_env(None, ["RAY_AUTH_TOKEN"], environ={"RAY_AUTH_TOKEN": "tok-value-123"})
    assert "tok-value-123" not in str(e.value)
    with pytest.raises(UserError, match="NOT_SET_ANYWHERE"):
        S.build_runtime_env(None, ["NOT_SET_ANYWHERE"], environ={})


# ---------------------------------------------------------------------------------------------
# Entrypoint and local validation
# ---------------------------------------------------------------------------------------------

def test_prepare_ships_config_in_working_dir_and_quotes_overrides():
    entry, env = S.prepare(str(QUICKSTART), ["output_dir=s3://bucket/run 1", "teacher.epochs=1"])
    assert entry.startswith("python -m pipeline.cli run configs/quickstart.yaml ")
    assert "'output_dir=s3://bucket/run 1'" in entry
    assert entry.endswith("ray.address=auto")  # the driver joins the cluster it runs on
    assert S.STAGED_CONFIG_ENV not in env["env_vars"]


def test_prepare_keeps_an_explicit_ray_address():
    entry, _ = S.prepare(str(QUICKSTART), ["output_dir=s3://b/x", "ray.address=10.0.0.1:6379"])
    assert "ray.address=auto" not in entry and "ray.address=10.0.0.1:6379" in entry


def test_prepare_rejects_bad_config_and_relative_output_dir_before_any_network(tmp_path):
    with pytest.raises(UserError, match="teacher.epochs"):
        S.prepare(str(QUICKSTART), ["output_dir=s3://b/x", "teacher.epochs=zero"])
    with pytest.raises(UserError, match="relative local path"):
        S.prepare(str(QUICKSTART), [])  # quickstart writes to runs/quickstart
    with pytest.raises(UserError, match="does not exist"):
        S.prepare(str(tmp_path / "missing.yaml"), [])


def test_config_outside_working_dir_is_staged_and_the_shell_snippet_works(tmp_path):
    """Run the generated entrypoint with /bin/sh and a stand-in `python` that reports what it got."""
    cfg = tmp_path / "elsewhere" / "my exp.yaml"
    cfg.parent.mkdir()
    text = "output_dir: s3://b/x  # 100% sure, $HOME and `backticks` stay literal\nseed: 3\n"
    cfg.write_text(text)
    entry, env = S.prepare(str(cfg), ["teacher.epochs=2"], working_dir=str(ROOT))
    assert env["env_vars"][S.STAGED_CONFIG_ENV] == text

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG:$a"; done\ncat "$4"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    run_env = {"PATH": f"{bindir}:/usr/bin:/bin", S.STAGED_CONFIG_ENV: text, "HOME": "/nonexistent"}
    res = subprocess.run(["/bin/sh", "-c", entry], env=run_env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:3] == ["ARG:-m", "ARG:pipeline.cli", "ARG:run"]
    assert lines[3].startswith("ARG:") and lines[3].endswith("/my exp.yaml")
    assert lines[4:6] == ["ARG:teacher.epochs=2", "ARG:ray.address=auto"]
    assert "\n".join(lines[6:]) + "\n" == text


def test_config_in_an_excluded_or_gitignored_folder_is_staged(tmp_path):
    """Ray would leave such a config out of the upload, so it must travel in the runtime env."""
    proj = _fake_project(tmp_path / "proj")
    (proj / ".gitignore").write_text("scratch/\n")
    for rel in ("runs/r1/c.yaml", "scratch/c.yaml"):
        cfg = proj / rel
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text("output_dir: s3://b/x\n")
        entry, env = S.prepare(str(cfg), [], working_dir=str(proj))
        assert S.STAGED_CONFIG_ENV in env["env_vars"] and '$d"/c.yaml' in entry, rel
    entry, env = S.prepare(str(proj / "configs" / "q.yaml"), [], working_dir=str(proj))
    assert S.STAGED_CONFIG_ENV not in env["env_vars"] and "run configs/q.yaml" in entry


def test_address_checks():
    with pytest.raises(UserError, match="Ray Client address"):
        S._check_address("ray://1.2.3.4:10001")
    assert S._check_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"


def test_unreachable_address_is_a_user_error_naming_it(monkeypatch, tmp_path):
    _clean_auth_env(monkeypatch, tmp_path)
    with pytest.raises(UserError, match=r"127\.0\.0\.1:1\b"):
        S.submit_entrypoint("http://127.0.0.1:1", "true", {})


def test_cli_submit_exit_code_2_on_unreachable_address(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main

    _clean_auth_env(monkeypatch, tmp_path)
    code = main(["submit", str(QUICKSTART), "--address", "http://127.0.0.1:1", "output_dir=s3://b/x"])
    assert code == 2
    assert "cannot reach" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Integration: a real token-protected head
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_head():
    from _raycluster import new_cluster

    cluster = new_cluster()
    try:
        cluster.start_head(num_cpus=1, object_store_mb=100)
        yield cluster
    finally:
        cluster.stop()


def _fake_cli_project(root: Path) -> Path:
    """A working dir whose `pipeline.cli` reports what the job received, so the test checks the
    shipping of code, config, overrides and env without running the real pipeline."""
    (root / "pipeline").mkdir(parents=True)
    (root / "pipeline" / "__init__.py").write_text("")
    (root / "pipeline" / "cli.py").write_text(textwrap.dedent("""
        import hashlib, os, sys
        import ray
        ray.init()
        print("CLI-ARGS", sys.argv[1:])
        print("CONFIG-SHA", hashlib.sha256(open(sys.argv[2], "rb").read()).hexdigest())
        secret = os.environ.get("DISTILL_TEST_SECRET", "")
        print("SECRET-SHA", hashlib.sha256(secret.encode()).hexdigest())
        print("TASK", ray.get(ray.remote(lambda: sum(range(10))).remote()))
    """))
    (root / "configs").mkdir()
    (root / "configs" / "c.yaml").write_text("output_dir: s3://bucket/run\nseed: 5\n")
    return root


@pytest.mark.slow
@pytest.mark.cluster
def test_submit_entrypoint_streams_logs_and_returns_status(token_head, monkeypatch, tmp_path):
    _clean_auth_env(monkeypatch, tmp_path)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token_head.token)
    out, err = io.StringIO(), io.StringIO()
    code = S.submit_entrypoint(
        token_head.dashboard_url,
        "python -c \"import ray; ray.init(); print('MARKER', ray.get(ray.remote(lambda: 6*7).remote()))\"",
        {"env_vars": {"PYTHONUNBUFFERED": "1"}}, timeout_s=120, out=out, err=err)
    assert code == 0, out.getvalue() + err.getvalue()
    assert "MARKER 42" in out.getvalue()
    assert "SUCCEEDED" in err.getvalue()
    assert token_head.token not in out.getvalue() + err.getvalue()

    out, err = io.StringIO(), io.StringIO()
    assert S.submit_entrypoint(token_head.dashboard_url, "python -c 'import sys; sys.exit(3)'", {},
                               timeout_s=120, out=out, err=err) == 1
    assert "FAILED" in err.getvalue() and "exit code 3" in err.getvalue()
    # a driver that exits 2 found bad input on the cluster: same meaning, same code here
    assert S.submit_entrypoint(token_head.dashboard_url, "python -c 'import sys; sys.exit(2)'", {},
                               timeout_s=120, out=io.StringIO(), err=io.StringIO()) == 2

    # --no-wait: accepted, told how to follow it, nothing streamed
    out, err = io.StringIO(), io.StringIO()
    assert S.submit_entrypoint(token_head.dashboard_url, "true", {}, follow=False, out=out, err=err) == 0
    assert out.getvalue() == "" and "ray job logs -f distill-job-" in err.getvalue()


@pytest.mark.slow
@pytest.mark.cluster
def test_wrong_or_missing_token_is_exit_2_without_the_token(token_head, monkeypatch, tmp_path, capsys):
    _clean_auth_env(monkeypatch, tmp_path)
    wrong = "wrong-" + token_head.token[:20]
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong)
    with pytest.raises(UserError) as e:
        S.submit_entrypoint(token_head.dashboard_url, "true", {})
    msg = str(e.value)
    assert "403" in msg and "RAY_AUTH_TOKEN" in msg
    assert wrong not in msg and token_head.token not in msg

    # No token anywhere: a fresh process, because a Ray started earlier in this test process
    # (other test files) leaves its own token cached inside Ray's client, which would be sent.
    monkeypatch.delenv("RAY_AUTH_TOKEN")  # and HOME has no ~/.ray/auth_token
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", str(QUICKSTART), "--address",
         token_head.dashboard_url, "output_dir=s3://b/x"],
        cwd=str(ROOT), env=dict(os.environ), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "401" in proc.stderr and "~/.ray/auth_token" in proc.stderr
    assert token_head.token not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.cluster
def test_submit_ships_working_dir_config_overrides_and_env(token_head, monkeypatch, tmp_path, capfd):
    """`submit()` end to end against the token head, with the token read from a token file
    (RAY_AUTH_TOKEN_PATH) and one secret passed with --env."""
    _clean_auth_env(monkeypatch, tmp_path)
    tok_file = tmp_path / "token"
    tok_file.write_text(token_head.token + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tok_file))
    secret = "secret-value-" + os.urandom(8).hex()
    monkeypatch.setenv("DISTILL_TEST_SECRET", secret)
    proj = _fake_cli_project(tmp_path / "proj")
    outside = tmp_path / "outside.yaml"
    outside.write_text("output_dir: s3://bucket/other\nseed: 9\n")

    code = S.submit(str(proj / "configs" / "c.yaml"), token_head.dashboard_url, ["teacher.epochs=2"],
                    working_dir=str(proj), env_passthrough=["DISTILL_TEST_SECRET"], timeout_s=180)
    code2 = S.submit(str(outside), token_head.dashboard_url, [], working_dir=str(proj), timeout_s=180)
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert (code, code2) == (0, 0), text
    assert "CLI-ARGS ['run', 'configs/c.yaml', 'teacher.epochs=2', 'ray.address=auto']" in text
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    assert f"CONFIG-SHA {sha((proj / 'configs' / 'c.yaml').read_bytes())}" in text
    assert f"CONFIG-SHA {sha(outside.read_bytes())}" in text  # staged config arrived byte-identical
    assert f"SECRET-SHA {sha(secret.encode())}" in text       # --env reached the job
    assert f"SECRET-SHA {sha(b'')}" in text                   # ...and only the job that asked for it
    assert "TASK 45" in text
    assert "DISTILL_TEST_SECRET" in text and "auth token: from RAY_AUTH_TOKEN_PATH" in text
    assert secret not in text and token_head.token not in text
