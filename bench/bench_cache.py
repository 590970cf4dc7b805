"""What writing the soft-target cache costs, as a ratio to the teacher's plain inference (docs/performance.md).

Measured in one process on the same data (these machines are noisy: only ratios mean much):

  plain   the teacher (generalist + specialists, combined as in section 5.4 of the paper) run on the
          transfer set held in memory as one array: `TeacherEnsemble.predict`, torch using every core
          (and, as a stricter reference, on one thread times the number of cores);
  stage   the real targets stage: `pipeline.stages.targets.regenerate` on a fresh cache, i.e. one
          Ray Data pipeline: read tasks (one per input shard, sha256 checked there) -> an actor pool
          of `targets.num_actors` model replicas (1 CPU each, as many as there are cores) running
          the same teacher, top-k on the device -> one writer that reassembles each shard and writes
          Parquet atomically and its manifest entry. Ray itself is started beforehand (once per
          session in practice); the actor pool's start-up (each replica imports torch and loads the
          checkpoints) is inside the measurement.

Plain and stage runs are interleaved (`--rounds`) and the best of each kept, so a burst of load
from other processes does not decide the ratio; the 1-minute load average is recorded beside them.
Reported: samples/s of both and three ratios to plain (target >= 0.95 for the whole job):

  stage / plain    the whole job, start-up included (a fixed few seconds: Ray Data starts the
                   replicas' processes, each imports torch and loads the checkpoints);
  steady / plain   by the writer's wall clock, from the first shard's finish to the last one's:
                   what a long job converges to once the replicas are up;
  busy / plain     from the replicas' own inference seconds (summed over each shard's batches)
                   plus the writer's: no Ray Data gaps, no start-up;

and the bytes per sample of dense float16, dense float32 and top-k caches, Parquet and WebDataset,
at the benchmark's C and at C = 1000 (random teacher outputs: only sizes are measured there).

Two teachers:

  synthetic (default)  the paper's MNIST teacher shape (784-1200-1200-10 MLP, randomly initialised:
                       throughput does not depend on the weights) plus one specialist per confusable
                       class group of the synthetic dataset, each the generalist with a |S| + 1 head;
                       float32 inputs in shards of `--shard-size` (the dataset default, 5,000);
  --config CONFIG      a real run's trained teacher (generalist + specialists) on its own transfer set,
                       e.g. configs/fashion_mnist.yaml: the CNN and its 4 specialists on the 54,000
                       Fashion-MNIST training images. Upstream stages (data, teacher, cluster,
                       specialists) that are not up to date are run first by the normal runner;
                       beyond that the run is only read: the benchmark's cache goes to a temporary
                       folder beside links to the run's stages.

The teacher's cost per sample decides the ratio: reading, checking and writing cost about the same
per sample whatever the teacher, so a cheap teacher (the MLP) is the hard case.

    .venv/bin/python bench/bench_cache.py --out bench/results_cache.json
    .venv/bin/python bench/bench_cache.py --config configs/fashion_mnist.yaml --out bench/results_cache_fashion_mnist.json
    .venv/bin/python bench/bench_cache.py --quick
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import cache, storage  # noqa: E402
from pipeline.config import Config  # noqa: E402

from _common import emit  # noqa: E402  (bench/ is on sys.path when run as a script)


def build_run(root: str, samples: int, shard_size: int, dim: int, classes: int, groups: int,
              hidden: list[int]) -> Config:
    from pipeline.data.ingest import ingest
    from pipeline.models import build_model, replace_head, save_checkpoint
    from pipeline.layout import spec_dirname

    cpus = os.cpu_count() or 1
    cfg = Config.model_validate({
        "output_dir": root,
        "data": {"format": "synthetic", "shard_size": shard_size},
        "targets": {"format": "parquet", "dtype": "float16", "batch_size": 1024, "num_actors": cpus,
                    "cpus_per_actor": 1},
        "ray": {"num_cpus": cpus, "object_store_memory_mb": 256},
    })
    manifest = ingest("", cfg.stage_uri("data"), "synthetic", val_fraction=0.05, shard_size=shard_size,
                      synthetic_overrides={"num_classes": classes, "num_groups": groups, "train": samples,
                                           "test": 200, "dim": dim}, progress=False)
    subsets = [list(map(int, g)) for g in manifest["class_groups"] if 1 < len(g) < classes]
    spec = {"arch": "mlp", "hidden": hidden}
    torch.manual_seed(0)
    g = build_model(spec, (dim,), classes)
    save_checkpoint(cfg.stage_uri("teacher"), g, spec, (dim,), classes)
    storage.write_json_atomic(storage.join(cfg.stage_uri("cluster"), "specialists.json"), {"subsets": subsets})
    for m, s in enumerate(subsets):
        model = build_model(spec, (dim,), classes)
        model.load_state_dict(g.state_dict())
        replace_head(model, len(s) + 1, torch.tensor(s))
        f = len(s) / classes
        save_checkpoint(storage.join(cfg.stage_uri("specialists"), spec_dirname(m)), model, spec, (dim,), classes,
                        extra={"subset": s, "f": f, "dustbin_correction": float(np.log((1 - f) / f))})
    return cfg


UPSTREAM = ("data", "teacher", "cluster", "specialists")


def link_run(config: str, overrides: list[str], root: str) -> Config:
    """A config whose teacher, clusters and specialists are the run's (linked, read only) and whose
    cache and stage markers live under `root`, so benchmarking never touches the run itself."""
    from pipeline import runner
    from pipeline.config import load_config

    real = load_config(config, overrides)
    runner.run_pipeline(real, only=list(UPSTREAM))  # up-to-date stages are skipped
    for stage in ("teacher", "cluster", "specialists"):
        src = real.stage_uri(stage)
        if storage.is_remote(src):
            raise SystemExit(f"bench_cache --config needs a local run ({src} is remote)")
        os.symlink(src, os.path.join(root, stage))
    cpus = os.cpu_count() or 1
    return load_config(config, overrides + [
        f"output_dir={root}", f"data.uri={real.stage_uri('data')}", "targets.uri=null",
        f"targets.num_actors={cpus}", "targets.cpus_per_actor=1", "targets.gpus_per_actor=0",
        f"ray.num_cpus={cpus}", "ray.address="])


def plain_inference(cfg: Config, repeats: int) -> dict:
    """Best-of-`repeats` samples/s of the teacher on the in-memory transfer set, with torch on all
    cores (the usual way to run it) and on one thread (x cores: perfect scaling, the strictest
    reference for a pool of one-CPU replicas), interleaved so both see the same machine."""
    from pipeline.data.shards import load_split
    from pipeline.models import prepare_inputs
    from pipeline.teacher_ensemble import TeacherEnsemble, resolve_from_config

    x, _, _ = load_split(cfg.stage_uri("data"), cfg.data.transfer_split)
    cpus = os.cpu_count() or 1
    ens = TeacherEnsemble(resolve_from_config(cfg))
    bs = cfg.targets.batch_size
    best = {"all_cores": 0.0, "one_thread": 0.0, "generalist_all_cores": 0.0}
    for _ in range(repeats):
        for key, threads in (("all_cores", cpus), ("one_thread", 1)):
            torch.set_num_threads(threads)
            ens.predict(x[:bs], bs)  # warm-up at this thread count
            t0 = time.perf_counter()
            ens.predict(x, bs)
            best[key] = max(best[key], len(x) / (time.perf_counter() - t0))
        torch.set_num_threads(cpus)
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(x), bs):
                ens.generalist(prepare_inputs(x[s:s + bs]))
        best["generalist_all_cores"] = max(best["generalist_all_cores"], len(x) / (time.perf_counter() - t0))
    return {"samples": len(x), "num_specialists": len(ens.specialists), "cpus": cpus, **best}


def stage_writing(cfg: Config) -> dict:
    from pipeline.raysetup import ensure_ray
    from pipeline.stages import targets

    ensure_ray(cfg)  # started once per session; not part of writing the cache
    storage.remove(cfg.stage_uri("targets"), recursive=True)
    done: list[tuple[float, int, dict]] = []
    wall0 = time.time()
    t0 = time.perf_counter()
    report = targets.regenerate(cfg, progress=False, write_marker=False,
                                on_shard=lambda e, s, t: done.append((s, int(e["num_samples"]), t)))
    total = time.perf_counter() - t0
    n = report["num_samples"]
    actors = min(cfg.targets.num_actors, len(done))

    # Steady state, by the wall clock of the writer (of each writer, were there several): the
    # samples of its 2nd..last shards over the time from its first shard's finish to its last
    # one's (Ray Data gaps included): everything but the one-off start-up (process, torch import,
    # checkpoint loading) and the ragged end.
    by_worker: dict[str, list[tuple[float, int]]] = {}
    for _, k, t in done:
        by_worker.setdefault(t["worker"], []).append((t["finished_at"], k))
    steady = 0.0
    for shards in by_worker.values():
        shards.sort()
        if len(shards) > 1 and shards[-1][0] > shards[0][0]:
            steady += sum(k for _, k in shards[1:]) / (shards[-1][0] - shards[0][0])
    # Busy: the same from the replicas' own read + infer + write time per shard (no Ray Data gaps).
    phases = {k: round(sum(t.get(k, 0.0) for _, _, t in done), 3) for k in ("infer", "write")}
    busy = sum(phases.values())
    # Timeline of the whole job (seconds from the call): when the first replica's constructor
    # began (driver planning + Ray Data planning + the actor's process start), its torch/pipeline
    # import and checkpoint loading, the first and last shard written, and the driver's tail
    # (orphan check, metrics, manifest) after the last shard.
    timeline = None
    if done:
        last = max(t["finished_at"] for _, _, t in done) - wall0
        timeline = {"replica_constructed_s": round(min(t["replica_started_at"] for _, _, t in done) - wall0, 2),
                    "replica_import_s": round(max(t["replica_import_s"] for _, _, t in done), 2),
                    "replica_load_s": round(max(t["replica_load_s"] for _, _, t in done), 2),
                    "first_shard_s": round(min(t["finished_at"] for _, _, t in done) - wall0, 2),
                    "last_shard_s": round(last, 2), "driver_tail_s": round(total - last, 2), "total_s": round(total, 2)}
    assert cache.verify_cache(cfg.stage_uri("targets"))["damaged"] == 0
    return {"samples": n, "shards": report["rewritten"], "actors": actors, "seconds": total,
            "samples_per_s": n / total, "steady_samples_per_s": steady or None,
            "busy_samples_per_s": n / (busy / actors) if busy else None,
            "first_shard_s": done[0][0] if done else None, "actor_seconds": phases, "timeline": timeline}


def bytes_per_sample(num_classes: int, n: int, k: int, inputs: np.ndarray | None, logits: np.ndarray | None = None,
                     logprobs: np.ndarray | None = None) -> dict:
    """File bytes / sample of one shard of n samples in each layout and format."""
    rng = np.random.default_rng(0)
    if logits is None:
        logits = rng.normal(scale=4, size=(n, num_classes)).astype(np.float32)
        logprobs = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True)).astype(np.float32)
    keys = [f"train_{i:08d}" for i in range(n)]
    y = rng.integers(0, num_classes, n)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for label, layout in (("dense_float16", cache.Layout(num_classes, "float16")),
                              ("dense_float32", cache.Layout(num_classes, "float32")),
                              (f"top{k}_float16", cache.Layout(num_classes, "float16", k))):
            fields = layout.encode(logits, logprobs)
            files = cache.write_cache_shard(d, f"{label}-000000", ["parquet", "webdataset"], layout, keys, y, fields,
                                            inputs=inputs)
            # The tar also carries the input (self-contained); report the targets' own share too.
            no_input = cache.write_cache_shard(d, f"{label}-000001", ["webdataset"], layout, keys, y, fields)
            out[label] = {"parquet": files["parquet"]["bytes"] / n,
                          "webdataset_targets_only": no_input["webdataset"]["bytes"] / n}
            if inputs is not None:
                out[label]["webdataset_with_input"] = files["webdataset"]["bytes"] / n
    return out


def _r(v, digits: int):
    return round(v, digits) if v else None


def _ratio(rate, reference: float):
    return round(rate / reference, 3) if rate else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the JSON object to this file")
    ap.add_argument("--quick", action="store_true", help="12k samples instead of 60k")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--config", default=None, help="benchmark this run's trained teacher on its transfer set "
                    "instead of the synthetic one (e.g. configs/fashion_mnist.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides of --config")
    ap.add_argument("--shard-size", type=int, default=5000, help="synthetic: samples per input shard")
    ap.add_argument("--dim", type=int, default=784)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--hidden", default="1200,1200")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="plain-inference repeats (best is kept)")
    ap.add_argument("--rounds", type=int, default=2, help="stage runs, interleaved with plain ones (best is kept)")
    ap.add_argument("--keep", default=None, help="run directory to use and keep (default: a temp dir)")
    args = ap.parse_args()
    samples = args.samples or (12000 if args.quick else 60000)
    root = args.keep or tempfile.mkdtemp(prefix="bench_cache-")
    try:
        t0 = time.perf_counter()
        if args.config:
            cfg = link_run(args.config, args.overrides, root)
        else:
            cfg = build_run(root, samples, args.shard_size, args.dim, args.classes, args.groups,
                            [int(h) for h in args.hidden.split(",")])
        setup_s = time.perf_counter() - t0
        # Interleaved rounds (plain, stage, plain, stage, ..., plain); the best of each is kept, so
        # a burst of load from other processes does not decide the ratio.
        plains = [plain_inference(cfg, args.repeats)]
        stages = []
        for _ in range(args.rounds):
            stages.append(stage_writing(cfg))
            plains.append(plain_inference(cfg, 1))
        plain = plains[0]
        stage = max(stages, key=lambda r: r["samples_per_s"])
        for key in ("steady_samples_per_s", "busy_samples_per_s"):
            stage[key] = max((r[key] or 0) for r in stages) or None
        plain_rate = max(p["all_cores"] for p in plains)
        ideal_rate = max(p["one_thread"] for p in plains) * plain["cpus"]
        again = {"generalist_all_cores": max(p["generalist_all_cores"] for p in plains)}

        from pipeline.data.shards import load_shard, split_entries

        first = split_entries(cfg.stage_uri("data"), cfg.data.transfer_split)[0]
        x0, _, _ = load_shard(first["uri"])
        name = first["path"].rsplit("/", 1)[-1].removesuffix(".tar")
        shard = cache.load_cache_shard(storage.join(cfg.stage_uri("targets"), f"{name}.parquet"))
        n = len(shard["keys"])
        classes = shard["generalist_logits"].shape[1]
        teacher = ({"teacher": args.config, "teacher_model": cfg.teacher.model.model_dump(mode="json", exclude_none=True)}
                   if args.config else {"teacher": "synthetic", "teacher_hidden": args.hidden})
        result = {
            "setup": {**teacher, "samples": stage["samples"], "shard_size": int(first["num_samples"]),
                      "input_shape": list(x0.shape[1:]), "input_dtype": str(x0.dtype), "num_classes": classes,
                      "num_specialists": plain["num_specialists"], "cpus": os.cpu_count(), "actors": stage["actors"],
                      "setup_s": round(setup_s, 1), "rounds": args.rounds,
                      "load_average_1min": round(os.getloadavg()[0], 1)},
            "plain_inference_samples_per_s": round(plain_rate, 1),
            "plain_one_thread_x_cpus_samples_per_s": round(ideal_rate, 1),
            "plain_generalist_only_samples_per_s": round(max(plain["generalist_all_cores"],
                                                             again["generalist_all_cores"]), 1),
            "stage_samples_per_s": round(stage["samples_per_s"], 1),
            "stage_steady_samples_per_s": _r(stage["steady_samples_per_s"], 1),
            "stage_busy_samples_per_s": _r(stage["busy_samples_per_s"], 1),
            "stage_seconds": round(stage["seconds"], 2),
            "stage_first_shard_s": _r(stage["first_shard_s"], 2),
            "stage_actor_seconds": stage["actor_seconds"],
            "stage_timeline": stage["timeline"],
            "stage_seconds_all_rounds": [round(r["seconds"], 2) for r in stages],
            "plain_seconds_all_rounds": [round(p["samples"] / p["all_cores"], 2) for p in plains],
            "ratio_stage_to_plain": round(stage["samples_per_s"] / plain_rate, 3),
            "ratio_steady_to_plain": _ratio(stage["steady_samples_per_s"], plain_rate),
            "ratio_busy_to_plain": _ratio(stage["busy_samples_per_s"], plain_rate),
            "ratio_steady_to_one_thread_x_cpus": _ratio(stage["steady_samples_per_s"], ideal_rate),
            "target_ratio": 0.95,
            "bytes_per_sample": {
                f"C{classes}": bytes_per_sample(classes, n, min(args.topk, classes - 1), x0[:n],
                                                     shard["generalist_logits"].astype(np.float32),
                                                     shard["ensemble_logprobs"].astype(np.float32)),
                "C1000": bytes_per_sample(1000, 2000, args.topk, None),
            },
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
