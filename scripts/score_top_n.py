"""Score a finished run's generalist + specialists at several `specialists.top_n`, writing nothing.

The specialists stage scores the ensemble at the config's `top_n` only. This reads the same
checkpoints and runs the same evaluation (`pipeline.inference.evaluate_ensemble`, on Ray workers) on
the val and test splits for each top-n asked for, and prints one JSON object. It is how the README's
top-1/2/3 comparison is made (choose on val, report test). Nothing in the run directory changes.

    .venv/bin/python scripts/score_top_n.py configs/fashion_mnist.yaml runs/fashion_mnist/seed-0 --top-n 1,2,3
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import inference  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.shards import read_manifest  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.raysetup import ensure_ray  # noqa: E402
from pipeline.teacher_ensemble import resolve_from_config  # noqa: E402


def score(cfg, top_n: list[int], splits: list[str]) -> dict:
    """{"top_n": {n: {split: {"examples", "generalist_errors", "ensemble_errors"}}}} for the run of
    `cfg` (a loaded Config), each top-n scored on Ray workers. Reads checkpoints, writes nothing."""
    out: dict = {"run_dir": cfg.output_dir, "top_n": {}}
    ensure_ray(cfg)
    data_uri = cfg.stage_uri("data")
    transform = inference.eval_transform(cfg, read_manifest(data_uri))
    for n in top_n:
        c = cfg.model_copy(update={"specialists": cfg.specialists.model_copy(update={"top_n": int(n)})})
        spec = resolve_from_config(c)
        row = {}
        for split in splits:
            res = inference.evaluate_ensemble(spec, data_uri, split, **inference.options(c), transform=transform)
            row[split] = {"examples": int(res["num_test_examples"]), "generalist_errors": int(res["generalist_test_errors"]),
                          "ensemble_errors": int(res["test_errors"])}
        out["top_n"][str(n)] = row
        print(f"top-{n}: {row}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("run_dir", help="the run's output_dir (for a seeds run: its seed-S folder)")
    ap.add_argument("--top-n", default="1,2,3", help="comma-separated top-n values (default 1,2,3)")
    ap.add_argument("--splits", default="val,test")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides the run was made with")
    args = ap.parse_intermixed_args()
    try:
        ns = [int(x) for x in args.top_n.split(",") if x.strip()]
    except ValueError:
        print(f"--top-n {args.top_n!r}: give integers such as 1,2,3", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, [*args.overrides, f"output_dir={args.run_dir}"])
        out = score(cfg, ns, [s for s in args.splits.split(",") if s])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
