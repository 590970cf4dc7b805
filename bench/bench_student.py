"""What distilling from the soft-target cache costs, as ratios to plain training (DESIGN.md).

Three ways to train the same student for the same number of steps, measured in one process,
interleaved round by round (this machine is noisy; medians of the rounds are reported):

  plain    the reference: an ordinary in-memory PyTorch loop on hard labels (torch tensors,
           `randperm`, index, forward, cross-entropy, backward, step); no pipeline code at all;
  cached   distillation as the student stage and every Tune trial run it: inputs joined with the
           cache's targets (`pipeline.cache.load_joined`), the pipeline's minibatches and loop
           (`pipeline.training.train_one_epoch`) and the KD loss;
  online   the same, but the teacher ensemble (generalist + specialists) runs on every batch.

Reported: samples/s of each, `cached / plain` (target >= 0.8: reading the cache should cost about
what plain training costs), `online / plain` and `cached / online` (what the cache saves), plus the
one-off time to load the cache into memory.

It needs a run whose targets exist; upstream stages that are missing are run first (through the
normal runner, so a finished run is reused as is). Default: `configs/quickstart.yaml`.

    .venv/bin/python bench/bench_student.py --out bench/results_student.json
    .venv/bin/python bench/bench_student.py --config configs/fashion_mnist.yaml --epochs 2
    .venv/bin/python bench/bench_student.py --quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import cache, models, runner, training  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ray_train import _rank_batches  # noqa: E402
from pipeline.stages import student  # noqa: E402

from _common import emit  # noqa: E402  (bench/ is on sys.path when run as a script)

UPSTREAM = ("data", "teacher", "cluster", "specialists", "targets")


def ensure_run(cfg) -> None:
    """Run the stages before `tune`/`student` that are not up to date (skipped when they are)."""
    if runner.read_marker(cfg, "targets") is None:
        print(f"[bench_student] no finished cache in {cfg.stage_uri('targets')}: running stages {list(UPSTREAM)} "
              f"of {cfg.output_dir} first (finished ones are skipped)", file=sys.stderr, flush=True)
        runner.run_pipeline(cfg, only=list(UPSTREAM))


def plain_epoch(model, opt, x: torch.Tensor, y: torch.Tensor, bs: int, steps: int, gen: torch.Generator) -> int:
    """The reference loop: what anyone would write for in-memory tensors. Returns samples seen."""
    model.train()
    n = len(x)
    perm = torch.randperm(n, generator=gen)
    seen = 0
    for s in range(steps):
        idx = perm[(s * bs) % n:(s * bs) % n + bs]
        xb, yb = x[idx], y[idx]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(idx)
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.yaml"))
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE config overrides")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per mode per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as one Ray Train worker / Tune trial)")
    ap.add_argument("--quick", action="store_true", help="one epoch, two rounds")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.rounds = 1, 2

    cfg = load_config(args.config, args.overrides)
    ensure_run(cfg)
    torch.set_num_threads(args.threads)
    job = student.student_job(cfg)
    bs = int(job["train"]["batch_size"])

    t0 = time.perf_counter()
    joined = student.load_transfer(job, with_targets=True)
    cache_load_s = time.perf_counter() - t0
    if "y" not in joined:
        raise SystemExit("the transfer set is unlabelled: the plain hard-label reference needs labels")
    n = len(joined["x"])
    steps = max(1, -(-n // bs))
    # The reference gets its data as prepared torch tensors, the best case for a plain loop.
    x_plain = models.prepare_inputs(np.array(joined["x"])).contiguous()
    y_plain = torch.from_numpy(np.array(joined["y"])).long()

    from pipeline.teacher_ensemble import TeacherEnsemble, resolve_from_config

    ensemble = TeacherEnsemble(resolve_from_config(cfg))
    hp = {"T": float(cfg.student.T), "alpha": float(cfg.student.alpha)}
    losses = {
        "cached": student.make_loss("cached", hp["T"], hp["alpha"], job["num_classes"]),
        "online": student.make_loss("online", hp["T"], hp["alpha"], job["num_classes"], job["target"], ensemble),
    }

    def fresh():
        torch.manual_seed(0)
        m = models.build_model(job["model"], job["input_shape"], job["num_classes"])
        return m, training.make_optimizer(m, job["train"])

    # As the student stage and every Tune trial do: soft targets at the run's T, computed once.
    t0 = time.perf_counter()
    prepared = student.with_soft_targets(joined, hp["T"])
    soft_targets_s = time.perf_counter() - t0

    rates: dict[str, list[float]] = {"plain": [], "cached": [], "online": []}
    for r in range(args.rounds):
        for mode in ("plain", "cached", "online"):
            model, opt = fresh()
            gen = torch.Generator().manual_seed(r)
            seen, t0 = 0, time.perf_counter()
            for ep in range(args.epochs):
                if mode == "plain":
                    seen += plain_epoch(model, opt, x_plain, y_plain, bs, steps, gen)
                else:
                    arrays = prepared if mode == "cached" else {"x": joined["x"], "y": joined["y"]}
                    stats = training.train_one_epoch(model, _rank_batches(arrays, bs, steps, 0, ep, 0), opt,
                                                     losses[mode])
                    seen += stats["samples"]
            rates[mode].append(seen / (time.perf_counter() - t0))
            print(f"[bench_student] round {r + 1}/{args.rounds} {mode}: {rates[mode][-1]:,.0f} samples/s",
                  file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    manifest = cache.read_manifest(job["cache_uri"])
    result = {
        "config": os.path.relpath(args.config, ROOT) if os.path.isabs(args.config) else args.config,
        "samples": n, "batch_size": bs, "epochs_per_round": args.epochs, "rounds": args.rounds,
        "threads": args.threads,
        "student": {"model": models.resolve_spec(job["model"]), "params": models.count_params(fresh()[0])},
        "teacher": {"specialists": len(ensemble.specialists)},
        "cache": {"dtype": manifest["dtype"], "top_k": manifest.get("top_k"), "format": manifest["formats"][0],
                  "load_s": round(cache_load_s, 3), "soft_targets_s": round(soft_targets_s, 4),
                  "bytes_per_sample": cache.describe_bytes(manifest)},
        "samples_per_s": {k: round(v, 1) for k, v in med.items()},
        "samples_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ratio_cached_to_plain": round(med["cached"] / med["plain"], 3),
        "ratio_online_to_plain": round(med["online"] / med["plain"], 3),
        "ratio_cached_to_online": round(med["cached"] / med["online"], 3),
        "target_cached_to_plain": 0.8,
    }
    result["meets_target"] = result["ratio_cached_to_plain"] >= 0.8
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
