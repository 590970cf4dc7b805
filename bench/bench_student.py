"""What training on the streaming path costs, as ratios to a bare in-memory PyTorch loop.

Each figure compares, in one run, two ways of training the same model for the same steps and batch
size, interleaved round by round (this machine is noisy; medians of the rounds are reported):

  plain     the reference: an ordinary in-memory PyTorch loop on hard labels (torch tensors,
            `randperm`, index, forward, cross-entropy, backward, step); no pipeline code at all;
  cached    distillation as the student stage and every Tune trial run it: the cache joined with
            its inputs streamed through Ray Data (sha256 checked in the read tasks), minibatches
            cut on the device, the one training core, the fused KD loss with the teacher's targets
            at T prepared once per streamed chunk on the device (`pipeline.stages.student.train_in_process`);
  teacher   the generalist's architecture on hard labels through the same streaming path, against
            the plain loop training that model.

Reported per comparison: `steady` (median per-epoch training rate after the first epoch, whose
Ray Data start-up is reported apart: samples over the seconds of the epoch's steps, data waits
included, the per-epoch val pass excluded, since the plain loop has none) and `whole` (all epochs'
samples over the wall time of the whole job, start-up and the per-epoch val passes included), each
as a ratio to the plain loop. `stream_val_share` is the median share of an epoch's seconds spent
in its val pass.

It needs a run whose targets exist; upstream stages that are missing are run first (through the
normal runner, so a finished run is reused as is). Default: `configs/quickstart.yaml`.

    .venv/bin/python bench/bench_student.py --out bench/results_student.json
    .venv/bin/python bench/bench_student.py --config configs/fashion_mnist.yaml --epochs 3
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

from pipeline import cache, layout, models, runner, training  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.stages import student  # noqa: E402

from _common import emit  # noqa: E402  (bench/ is on sys.path when run as a script)

UPSTREAM = ("data", "teacher", "cluster", "specialists", "targets")


def ensure_run(cfg) -> None:
    """Run the stages before `tune`/`student` that are not up to date (skipped when they are)."""
    if layout.read_marker(cfg, "targets") is None:
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


def _plain_rate(job, model_spec, x, y, bs, steps, epochs, seed) -> tuple[list[float], float]:
    torch.manual_seed(0)
    model = models.build_model(model_spec, job.input_shape, job.num_classes)
    opt = training.make_optimizer(model, job.train)
    gen = torch.Generator().manual_seed(seed)
    rates, t_all = [], time.perf_counter()
    for _ in range(epochs):
        t0 = time.perf_counter()
        seen = plain_epoch(model, opt, x, y, bs, steps, gen)
        rates.append(seen / (time.perf_counter() - t0))
    return rates, epochs * steps * bs / (time.perf_counter() - t_all)


def _stream_rate(job, kind, epochs, seed) -> tuple[list[float], float, float]:
    t0 = time.perf_counter()
    _, history = student.train_in_process(job, kind, T=4.0, alpha=0.9, epochs=epochs, seed=seed)
    wall = time.perf_counter() - t0
    rates = [h["train_samples_per_s"] for h in history]
    samples = sum(h["train_samples_per_s"] * h["train_seconds"] for h in history)
    val_share = statistics.median(1.0 - h["train_seconds"] / max(h["seconds"], 1e-9) for h in history)
    return rates, samples / wall, val_share


def _summary(plain: list[tuple], stream: list[tuple]) -> dict:
    p_steady = statistics.median([r for rates, _ in plain for r in rates])
    s_steady = statistics.median([r for rates, *_ in stream for r in rates[1:]] or [stream[0][0][0]])
    p_whole = statistics.median([w for _, w in plain])
    s_whole = statistics.median([w for _, w, _ in stream])
    first = statistics.median([rates[0] for rates, *_ in stream])
    return {"plain_samples_per_s": round(p_steady, 1), "stream_samples_per_s": round(s_steady, 1),
            "stream_first_epoch_samples_per_s": round(first, 1),
            "stream_val_share": round(statistics.median([v for *_, v in stream]), 3),
            "ratio_steady": round(s_steady / p_steady, 3), "ratio_whole": round(s_whole / p_whole, 3)}


def main() -> int:
    import ray

    from pipeline.raysetup import ensure_ray

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.yaml"))
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE config overrides")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per mode per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as one Ray Train worker / Tune trial)")
    ap.add_argument("--quick", action="store_true", help="three epochs, two rounds")
    ap.add_argument("--skip-teacher", action="store_true",
                    help="only the student comparison (the teacher's architecture on CPU can take an hour: the "
                         "Fashion-MNIST CNN trains at a few hundred samples/s on one thread)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.rounds = 3, 2

    cfg = load_config(args.config, args.overrides)
    ensure_run(cfg)
    ensure_ray(cfg)
    torch.set_num_threads(args.threads)
    job = student.student_job(cfg)
    bs = int(job.train["batch_size"])
    # The plain reference gets the hard-label training split as prepared torch tensors: the best
    # case for a plain loop (nothing to read, nothing to decode).
    from pipeline.data import shards

    x, y, _ = shards.load_split(job.data_uri, "train")
    x_plain = models.prepare_inputs(np.array(x)).contiguous()
    y_plain = torch.from_numpy(np.array(y)).long()
    n = len(y_plain)
    manifest = cache.read_manifest(job.cache_uri)
    steps_cached = sum(int(e["num_samples"]) for e in manifest["shards"]) // bs
    steps_hard = n // bs
    teacher_job = job.replace(model=cfg.teacher.model.spec(), train=dict(job.train, batch_size=bs))

    load_start = [round(v, 2) for v in os.getloadavg()]
    runs: dict[str, list] = {"plain_student": [], "cached": [], "plain_teacher": [], "teacher": []}
    for r in range(args.rounds):
        runs["plain_student"].append(_plain_rate(job, job.model, x_plain, y_plain, bs, steps_cached, args.epochs, r))
        runs["cached"].append(_stream_rate(job, "cached", args.epochs, r))
        if not args.skip_teacher:
            runs["plain_teacher"].append(_plain_rate(teacher_job, teacher_job.model, x_plain, y_plain, bs,
                                                     steps_hard, args.epochs, r))
            runs["teacher"].append(_stream_rate(teacher_job, "hard", args.epochs, r))
        print(f"[bench_student] round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {statistics.median(v[-1][0]):,.0f}/s" for k, v in runs.items() if v), file=sys.stderr, flush=True)
    ray.shutdown()
    result = {
        "load_avg_start": load_start, "load_avg_end": [round(v, 2) for v in os.getloadavg()],
        "config": os.path.relpath(args.config, ROOT) if os.path.isabs(args.config) else args.config,
        "samples": n, "batch_size": bs, "epochs_per_round": args.epochs, "rounds": args.rounds,
        "threads": args.threads,
        "student": {"model": models.resolve_spec(job.model),
                    "params": models.count_params(models.build_model(job.model, job.input_shape, job.num_classes))},
        "teacher_model": models.resolve_spec(teacher_job.model),
        "cache": {"dtype": manifest["dtype"], "top_k": manifest.get("top_k"), "format": manifest["formats"][0],
                  "bytes_per_sample": cache.describe_bytes(manifest)},
        "cached_student_vs_plain": _summary(runs["plain_student"], runs["cached"]),
        "targets": {"cached_student_vs_plain": 0.95, "teacher_vs_plain": 0.9},
    }
    result["ratio_cached_to_plain"] = result["cached_student_vs_plain"]["ratio_steady"]
    if not args.skip_teacher:
        result["teacher_vs_plain"] = _summary(runs["plain_teacher"], runs["teacher"])
        result["ratio_teacher_to_plain"] = result["teacher_vs_plain"]["ratio_steady"]
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
