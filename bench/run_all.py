"""Run every benchmark under bench/ and gather their figures in one place.

Each `bench/bench_*.py` is a standalone script that prints one JSON object and accepts `--out FILE`
(and `--quick` for a smaller size). This driver runs them one after another (never in parallel: they
measure ratios within one run, and two at once would skew each other), then writes
`bench/results.json` and `bench/RESULTS.md`, a Markdown table of every figure.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
IDLE_LOAD = 2.5  # on 2 cores a benchmark alone keeps the load near 1-2; above this, something else ran
# Extra runs of a benchmark under their own result key: (key, script, arguments, path that must exist).
# bench_cache on the Fashion-MNIST teacher (CNN + 4 specialists) when that dataset is installed.
EXTRA_RUNS = [
    ("bench_cache_fashion_mnist", "bench_cache.py",
     ["--config", os.path.join(os.path.dirname(HERE), "configs", "fashion_mnist.yaml")],
     "/usr/share/datasets/fashion-mnist"),
    # Specialists big enough that each trial's compute outweighs its start-up (Ray Data's first
    # stream in a new worker costs seconds of CPU; the default workload's trials are mostly that).
    ("bench_specialists_parallel_heavy", "bench_specialists_parallel.py", ["--hidden", "1024,1024"], HERE),
    ("bench_student_fashion_mnist", "bench_student.py",
     ["--skip-teacher", "--config", os.path.join(os.path.dirname(HERE), "configs", "fashion_mnist.yaml")],
     "/usr/share/datasets/fashion-mnist"),
]


def flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj


def results_markdown(results: dict, failures: dict) -> list[str]:
    """The lines of RESULTS.md: when each benchmark ran and whether its machine was idle, then every figure."""
    lines = ["# Benchmark results", "", "Figures from `make bench` on this machine (`run_all.py --only NAME` "
             "replaces that benchmark's rows); every ratio compares measurements taken within one "
             "benchmark's run.", "", "| benchmark | run (UTC) | load average before / after | machine |",
             "|---|---|---|---|"]
    for name, res in results.items():
        load = res.get("_load_avg_1min")
        idle = "not recorded" if not load else ("idle" if max(load) <= IDLE_LOAD else "busy")
        lines.append(f"| {name} | {res.get('_when', 'not recorded')} | "
                     f"{' / '.join(map(str, load)) if load else 'not recorded'} | {idle} |")
    lines += ["", f"*idle*: 1-minute load average at most {IDLE_LOAD} before and after (the benchmark's own "
              "processes included).", "", "| benchmark | figure | value |", "|---|---|---:|"]
    for name, res in results.items():
        flat: dict = {}
        flatten("", res, flat)
        for k, v in flat.items():
            if isinstance(v, float):
                v = f"{v:.4g}"
            lines.append(f"| {name} | {k} | {v} |")
    for name, why in failures.items():
        lines.append(f"| {name} | FAILED | {why} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes instead of tens of minutes)")
    ap.add_argument("--only", nargs="*", default=None, help="names such as bench_cache")
    args = ap.parse_args()
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    runs = [(os.path.splitext(os.path.basename(s))[0], s, []) for s in scripts]
    runs += [(key, os.path.join(HERE, script), extra) for key, script, extra, needs in EXTRA_RUNS
             if os.path.exists(needs)]
    if args.only:
        runs = [r for r in runs if r[0] in args.only]
    results, failures = {}, {}
    path = os.path.join(HERE, "results.json")
    if args.only and os.path.exists(path):
        # A partial run updates its own entries and keeps the others' figures.
        with open(path) as f:
            previous = json.load(f)
        results, failures = previous.get("results", {}), previous.get("failures", {})
    for name, script, extra in runs:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        cmd = [sys.executable, script, "--out", out] + (["--quick"] if args.quick else []) + extra
        print(f"[bench] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not os.path.getsize(out):
            failures[name] = f"exit code {proc.returncode}"
            results.pop(name, None)
            print(f"[bench] {name} FAILED ({failures[name]})", file=sys.stderr)
            continue
        failures.pop(name, None)
        with open(out) as f:
            results[name] = json.load(f)
        results[name]["_wall_s"] = round(seconds, 1)
        # 1-minute load average before and after, so RESULTS.md says per benchmark whether its
        # machine was idle (other work running beside a benchmark skews its ratios).
        results[name]["_load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        results[name]["_when"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        os.unlink(out)
    with open(path, "w") as f:
        json.dump({"results": results, "failures": failures}, f, indent=2)
    lines = results_markdown(results, failures)
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
