"""Peak memory of a whole `distill run` at two dataset sizes: does memory grow with the data?

Runs `distill run` twice in a subprocess on synthetic data of `--dim` floats per sample (default
1,024: 4 KiB a sample) with tiny models and one epoch per stage, at N and 4N samples, sampling every
0.2 s the summed PSS (proportional set size: shared pages counted once across processes) of the
`distill` process and all its descendants — the driver, Ray's GCS, raylet, dashboard, object store
and every worker, Ray Data task and Tune trial. Reported: each run's peak, its wall time, and the
ratio peak(4N) / peak(N). A pipeline whose memory is bounded by batch sizes, prefetch and shuffle
buffers gives a ratio near 1; one that loads splits whole grows with the data (docs/data.md).

    python bench/bench_memory.py [--quick] [--samples N] [--dim D] [--out FILE]

`--quick`: N = 4,000 (16 MiB of inputs), the size the test suite uses. Default N = 61,440
(0.25 GiB of inputs; 4N = 1 GiB).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402


def _children(pid: int) -> list[int]:
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out = [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """`pid` and every descendant (Ray's processes are children of the driver or of its raylet)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(_children(p))
    return seen


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_pss(cmd: list[str], env: dict, interval: float = 0.2, log_path: str | None = None) -> dict:
    """Run `cmd`; return {"peak_bytes", "rc", "seconds", "processes"} (max over samples of summed PSS)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    peak = {"bytes": 0, "procs": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            pids = tree(proc.pid)
            total = sum(pss_bytes(p) for p in pids)
            if total > peak["bytes"]:
                peak.update(bytes=total, procs=len(pids))
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    if log_path:
        out.close()
    return {"peak_bytes": peak["bytes"], "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "processes": peak["procs"]}


CONFIG = """\
output_dir: {out}
seed: 0
data:
  format: synthetic
  shard_size: {shard}
  val_fraction: 0.1
  synthetic: {{num_classes: 8, num_groups: 4, train: {train}, test: {test}, dim: {dim}, difficulty: 1.0, seed: 0}}
teacher: {{model: {{arch: mlp, hidden: [32]}}, epochs: 1, batch_size: 256, num_workers: 2, cpus_per_worker: 1}}
cluster: {{num_specialists: 2}}
specialists: {{epochs: 1, batch_size: 256, cpus_per_specialist: 1}}
targets: {{format: parquet, dtype: float16}}
student: {{model: {{arch: mlp, hidden: [16]}}, epochs: 1, batch_size: 256, num_workers: 1}}
tune: {{T: [2.0], alpha: [0.5], epochs: 1, scheduler: fifo, max_concurrent: 1}}
ray: {{num_cpus: 2, object_store_memory_mb: 256}}
"""


def run_at(samples: int, dim: int, workdir: str) -> dict:
    out = os.path.join(workdir, f"run-{samples}")
    cfg_path = os.path.join(workdir, f"cfg-{samples}.yaml")
    train, test = int(samples * 0.8), samples - int(samples * 0.8)
    with open(cfg_path, "w") as f:
        f.write(CONFIG.format(out=out, shard=max(500, samples // 16), train=train, test=test, dim=dim))
    exe = os.path.join(os.path.dirname(sys.executable), "distill")
    cmd = [exe, "run", cfg_path] if os.path.exists(exe) else [sys.executable, "-m", "pipeline.cli", "run", cfg_path]
    env = dict(os.environ, RAY_TMPDIR=os.path.join(workdir, "ray"))
    os.makedirs(env["RAY_TMPDIR"], exist_ok=True)
    res = peak_pss(cmd, env, log_path=os.path.join(workdir, f"log-{samples}.txt"))
    res["samples"] = samples
    res["input_bytes"] = samples * dim * 4
    res["log"] = os.path.join(workdir, f"log-{samples}.txt")
    return res


def measure(samples: int, dim: int, workdir: str) -> dict:
    small = run_at(samples, dim, workdir)
    large = run_at(4 * samples, dim, workdir)
    ratio = large["peak_bytes"] / small["peak_bytes"] if small["peak_bytes"] else float("nan")
    return {
        "dim": dim,
        "small": {k: small[k] for k in ("samples", "input_bytes", "peak_bytes", "seconds", "rc", "processes")},
        "large": {k: large[k] for k in ("samples", "input_bytes", "peak_bytes", "seconds", "rc", "processes")},
        "peak_ratio_4x_data": round(ratio, 3),
        "logs": [small["log"], large["log"]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None, help="keep the runs and their logs here (default: a temp dir)")
    args = ap.parse_args()
    samples = args.samples or (4000 if args.quick else 61440)
    with tempfile.TemporaryDirectory(prefix="distill-bench-mem-") as tmp:
        d = args.workdir or tmp
        os.makedirs(d, exist_ok=True)
        res = measure(samples, args.dim, d)
        for log, run in zip(res.pop("logs"), ("small", "large")):
            if res[run]["rc"] != 0:
                with open(log, errors="replace") as f:
                    print(f"[bench_memory] the {run} run failed; the end of its log:\n" + f.read()[-4000:],
                          file=sys.stderr)
    res["peak_gib"] = {"small": round(res["small"]["peak_bytes"] / 2**30, 3),
                       "large": round(res["large"]["peak_bytes"] / 2**30, 3)}
    status = emit(res, args.out)
    return status if all(res[r]["rc"] == 0 for r in ("small", "large")) else 1


if __name__ == "__main__":
    sys.exit(main())
