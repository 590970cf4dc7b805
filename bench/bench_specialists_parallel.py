"""Do specialists really train in parallel? Wall time of K specialists at once vs one after another.

Sets up one run (synthetic data with confusable groups, an in-process generalist, the cluster stage
into K subsets), then runs the real `specialists` stage (Ray Tune, one trial per specialist, 1 CPU
each) twice on copies of that run: with `specialists.max_concurrent=K` and with `max_concurrent=1`.
The headline is `ratio = sequential wall / parallel wall` of the training phase (Tune's fit); K on
an idle machine with >= K free cores, less when other processes compete for the CPUs. Because a
shared machine may not have K free cores at all, the same ratio is measured in the same run for K
plain Python processes doing a fixed torch workload (`machine_sequential_over_parallel`), and
`relative_to_machine` is ours divided by it (1.0: Ray loses nothing to plain processes). Each
trial's compute seconds and the Tune/worker overhead are reported too, as is the load average.

Prints one JSON object; `--out FILE` also writes it. `--quick` uses a smaller workload.

    .venv/bin/python bench/bench_specialists_parallel.py --out bench/results_specialists_parallel.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from _common import emit  # noqa: E402  (bench/ is on sys.path when run as a script)

# Two confusable groups and K = 2: the two subsets (and so the two trials' work) are the same size.
FULL = dict(train=24000, test=2000, dim=64, classes=8, groups=2, k=2, epochs=10, hidden=[256, 256], gen_epochs=3)
QUICK = dict(train=6000, test=1000, dim=32, classes=8, groups=2, k=2, epochs=3, hidden=[64, 64], gen_epochs=3)


_PROBE = """
import sys, time, torch

torch.set_num_threads(1)
m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                        torch.nn.Linear(256, 5))
o = torch.optim.Adam(m.parameters())
x, y = torch.randn(128, 64), torch.randint(0, 5, (128,))
for _ in range(int(sys.argv[1])):
    loss = torch.nn.functional.cross_entropy(m(x), y)
    o.zero_grad()
    loss.backward()
    o.step()
"""


def machine_parallel_ratio(k: int, steps: int) -> dict:
    """The same ratio for k plain Python processes (no Ray): what this machine allows right now.

    On a machine shared with other work the Ray ratio can only be judged against this one.
    """
    import subprocess

    def run(concurrent: bool) -> float:
        t = time.perf_counter()
        cmd = [sys.executable, "-c", _PROBE, str(steps)]
        if concurrent:
            procs = [subprocess.Popen(cmd) for _ in range(k)]
            for p in procs:
                p.wait()
        else:
            for _ in range(k):
                subprocess.run(cmd, check=True)
        return time.perf_counter() - t

    par1, seq, par2 = run(True), run(False), run(True)
    return {"sequential_s": round(seq, 2), "parallel_s": round((par1 + par2) / 2, 2),
            "sequential_over_parallel": round(seq / ((par1 + par2) / 2), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small workload (about a minute)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir, removed)")
    ap.add_argument("--hidden", default=None,
                    help="hidden sizes of the generalist and so of each specialist, e.g. 1024,1024: trials whose "
                         "compute outweighs their start-up (default: 256,256, start-up dominated)")
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    if args.hidden:
        p["hidden"] = [int(h) for h in args.hidden.split(",")]

    import ray
    import torch

    from _specialists_helpers import ingest_synthetic, make_config, train_generalist
    from pipeline import storage
    from pipeline.runner import run_stage

    torch.set_num_threads(1)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-spec-par-")
    base = os.path.join(work, "base")
    common = {
        "data.format": "synthetic", "data.shard_size": 2000,
        "data.synthetic.num_classes": p["classes"], "data.synthetic.num_groups": p["groups"],
        "data.synthetic.train": p["train"], "data.synthetic.test": p["test"], "data.synthetic.dim": p["dim"],
        "cluster.num_specialists": p["k"], "specialists.epochs": p["epochs"], "specialists.patience": None,
        "specialists.cpus_per_specialist": 1, "ray.num_cpus": p["k"],
    }
    cfg = make_config(base, **common)
    t0 = time.perf_counter()
    ingest_synthetic(cfg)
    gen = train_generalist(cfg, epochs=p["gen_epochs"], hidden=p["hidden"], lr=1e-3)
    run_stage(cfg, "cluster")
    setup_s = time.perf_counter() - t0
    subsets = storage.read_json(os.path.join(base, "cluster", "specialists.json"))["subsets"]

    runs = {}
    # Parallel first, then sequential, then parallel again: the ratio uses the mean of the two
    # parallel runs, so a drift in machine load affects both sides alike.
    for label, mc in (("parallel", p["k"]), ("sequential", 1), ("parallel_again", p["k"])):
        out = os.path.join(work, label)
        shutil.rmtree(out, ignore_errors=True)
        for stage in ("teacher", "cluster"):
            shutil.copytree(os.path.join(base, stage), os.path.join(out, stage))
        rcfg = make_config(out, **common, **{"data.uri": os.path.join(base, "data"),
                                              "specialists.max_concurrent": mc})
        load = os.getloadavg()[0]
        t = time.perf_counter()
        res = run_stage(rcfg, "specialists", force=True)
        stage_s = time.perf_counter() - t
        m = storage.read_json(os.path.join(out, "specialists", "metrics.json"))
        trials = [storage.read_json(os.path.join(out, "specialists", f"spec_{i:03d}", "metrics.json"))
                  for i in range(len(subsets))]
        starts = [tm["started_at"] for tm in trials]
        ends = [tm["finished_at"] for tm in trials]
        runs[label] = {
            "max_concurrent": mc,
            "train_wall_s": round(m["training"]["wall_seconds"], 2),
            "stage_wall_s": round(stage_s, 2),
            "trial_seconds": [round(tm["seconds"], 2) for tm in trials],
            # Of each trial: the seconds before its first epoch (the generalist's checkpoint, the head
            # swap), its first epoch (which waits for the trial's first Ray Data stream: new read
            # workers, imports) and the median of its later epochs.
            "trial_before_first_epoch_s": [round(tm["seconds"] - sum(h["seconds"] for h in tm["history"]), 2)
                                           for tm in trials],
            "trial_first_epoch_s": [round(tm["history"][0]["seconds"], 2) for tm in trials],
            "trial_later_epoch_median_s": [round(statistics.median(h["seconds"] for h in tm["history"][1:]), 3)
                                           if len(tm["history"]) > 1 else None for tm in trials],
            "trials_overlap_s": round(max(0.0, min(ends) - max(starts)), 2),
            # Tune start-up, worker processes, data loading: the part of the wall time no trial counts.
            "overhead_s": round(m["training"]["wall_seconds"] - (max(ends) - min(starts)), 2),
            "load_avg_1m_before": round(load, 2),
            "test_error": m["test_error"],
            "generalist_test_error": m["generalist_test_error"],
        }
        print(f"{label}: {runs[label]}", file=sys.stderr, flush=True)
    machine = machine_parallel_ratio(len(subsets), 400 if args.quick else 1500)
    print(f"plain processes: {machine}", file=sys.stderr, flush=True)
    par = (runs["parallel"]["train_wall_s"] + runs["parallel_again"]["train_wall_s"]) / 2
    seq = runs["sequential"]["train_wall_s"]
    result = {
        "bench": "specialists_parallel",
        "quick": bool(args.quick),
        "workload": p,
        "num_specialists": len(subsets),
        "subset_sizes": [len(s) for s in subsets],
        "cpus": os.cpu_count(),
        "generalist_test_error": gen["test_error"],
        "setup_s": round(setup_s, 2),
        "runs": runs,
        "sequential_over_parallel": round(seq / par, 3),
        "ideal_ratio": len(subsets),
        # The same ratio for plain processes measured in this run, and ours as a fraction of it.
        "machine_sequential_over_parallel": machine["sequential_over_parallel"],
        "machine_probe": machine,
        "relative_to_machine": round((seq / par) / machine["sequential_over_parallel"], 3),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    ray.shutdown()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
