"""The `distill` command: a thin argparse front over the stage functions.

Each sub-command maps to one function; heavy imports (torch, ray) happen inside them so that
`distill config show` and bad-usage errors answer instantly. Exit codes (docs/contracts.md): 0 success,
2 bad usage or invalid config/input (one paragraph naming the key or file, no traceback), 1 a failure
while running.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from pipeline.errors import UserError
from pipeline.layout import STAGES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors also exit 2, with our wording
        self.print_usage(sys.stderr)
        sys.stderr.write(f"distill: error: {message}\n")
        raise SystemExit(2)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=True, default=str))


def cmd_config_show(args) -> int:
    from pipeline.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def cmd_run(args) -> int:
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    if args.seeds is not None:  # the seeds harness (docs/seeds.md)
        from pipeline.seeds import run_seeds

        sys.stdout.write(run_seeds(args.config, args.overrides, args.seeds, force=args.force))
        return 0
    cfg = load_config(args.config, args.overrides)
    run_pipeline(cfg, force=args.force)
    return 0


def cmd_seeds_summary(args) -> int:
    from pipeline.seeds import rebuild_seeds_summary

    sys.stdout.write(rebuild_seeds_summary(args.dir, args.seeds))
    return 0


def cmd_stage(args) -> int:
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    cfg = load_config(args.config, args.overrides)
    run_pipeline(cfg, only=[args.name], force=args.force)
    return 0


def cmd_data_ingest(args) -> int:
    from pipeline.stages.data import ingest_source

    manifest = ingest_source(
        args.source, args.out, fmt=args.format, val_fraction=args.val_fraction,
        shard_size=args.shard_size, seed=args.seed, synthetic_overrides=args.synthetic,
    )
    counts = {s: manifest["splits"][s]["num_samples"] for s in manifest["splits"]}
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    return 0


def cmd_data_verify(args) -> int:
    from pipeline.data.shards import verify_dataset

    report = verify_dataset(args.uri, progress=not args.json)
    if args.json:
        _print_json(report)
    else:
        for name in report["damaged_shards"]:
            print(f"DAMAGED {name}: {report['problems'][name]}")
        print(f"{args.uri}: {report['checked']} shards checked, {report['damaged']} damaged, "
              + ", ".join(f"{s} {n}" for s, n in report["samples"].items()))
    return 0 if report["damaged"] == 0 else 1


def cmd_targets_regen(args) -> int:
    from pipeline.config import load_config
    from pipeline.stages.targets import regenerate

    from pipeline.runner import output_lock

    cfg = load_config(args.config, args.overrides)
    with output_lock(cfg.output_dir):
        report = regenerate(cfg, progress=not args.json)
    if args.json:
        _print_json(report)
    else:
        print(f"targets: {report['rewritten']} rewritten, {report['kept']} kept, "
              f"{report['damaged']} damaged found ({report['checked']} checked)")
    return 0


def cmd_targets_verify(args) -> int:
    from pipeline.cache import verify_cache

    report = verify_cache(args.uri)
    if args.json:
        _print_json(report)
    else:
        for name in report["damaged_shards"]:
            print(f"DAMAGED {name}: {report['problems'][name]}")
        print(f"{args.uri}: {report['checked']} shards checked, {report['damaged']} damaged")
    return 0 if report["damaged"] == 0 else 1


def cmd_submit(args) -> int:
    from pipeline.submit import submit

    return submit(args.config, args.address, args.overrides, working_dir=args.working_dir,
                  env_passthrough=args.env, follow=not args.no_wait)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distill", description="Specialist-ensemble knowledge distillation on Ray.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(sp):
        sp.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. teacher.epochs=3")

    r = sub.add_parser("run", help="every stage in order; up-to-date stages are skipped")
    with_config(r)
    r.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    r.add_argument("--seeds", metavar="S,S,...", help="run once per global seed into {output_dir}/seed-S, "
                   "then write seeds_summary.json, seeds_report.md, seeds.png there (docs/seeds.md)")
    r.set_defaults(func=cmd_run)
    ss = sub.add_parser("seeds-summary", help="rebuild the seeds summary of DIR from its seed-S runs (runs nothing)")
    ss.add_argument("dir", help="output_dir of a `distill run CONFIG --seeds ...` run")
    ss.add_argument("--seeds", metavar="S,S,...", help="only these seeds (default: every seed-S with a summary.json)")
    ss.set_defaults(func=cmd_seeds_summary)

    s = sub.add_parser("stage", help="one stage: " + "|".join(STAGES))
    s.add_argument("name", choices=STAGES)
    with_config(s)
    s.add_argument("--force", action="store_true", help="rerun the stage even when up to date")
    s.set_defaults(func=cmd_stage)

    d = sub.add_parser("data", help="ingest or verify datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    di = dsub.add_parser("ingest", help="raw data -> WebDataset shards + manifest.json")
    di.add_argument("source", help="raw data path (unused by synthetic and digits; pass '-')")
    di.add_argument("out", help="output folder: local path or s3://bucket/prefix")
    di.add_argument("--format", required=True, choices=["idx", "cifar", "npz", "folder", "digits", "synthetic"])
    di.add_argument("--val-fraction", type=float, default=0.1, help="val carved from train when the source has none")
    di.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--synthetic", nargs="*", default=[], metavar="KEY=VALUE",
                    help="synthetic generator settings, e.g. num_classes=12 num_groups=4 difficulty=1.5")
    di.set_defaults(func=cmd_data_ingest)
    dv = dsub.add_parser("verify", help="counts, checksums and decodability of every shard")
    dv.add_argument("uri")
    dv.add_argument("--json", action="store_true", help="print one JSON object")
    dv.set_defaults(func=cmd_data_verify)

    t = sub.add_parser("targets", help="soft-target caches")
    tsub = t.add_subparsers(dest="targets_command", required=True, parser_class=_Parser)
    tr = tsub.add_parser("regen", help="rewrite only stale or damaged cache shards")
    with_config(tr)
    tr.add_argument("--json", action="store_true", help="print one JSON object")
    tr.set_defaults(func=cmd_targets_regen)
    tv = tsub.add_parser("verify", help="checksums, row counts, key order, finiteness")
    tv.add_argument("uri")
    tv.add_argument("--json", action="store_true", help="print one JSON object")
    tv.set_defaults(func=cmd_targets_verify)

    sb = sub.add_parser("submit", help="run on a Ray cluster through the Ray Jobs API")
    sb.add_argument("config")
    sb.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    sb.add_argument("--address", required=True, help="dashboard URL, e.g. http://127.0.0.1:8265")
    sb.add_argument("--working-dir", default=None, help="shipped to the cluster (default: this project)")
    sb.add_argument("--env", action="append", default=[], metavar="NAME",
                    help="copy this environment variable to the job (value never printed); repeatable")
    sb.add_argument("--no-wait", action="store_true", help="submit and return without streaming logs")
    sb.set_defaults(func=cmd_submit)

    c = sub.add_parser("config", help="configuration")
    csub = c.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    cs = csub.add_parser("show", help="the resolved, validated config")
    with_config(cs)
    cs.set_defaults(func=cmd_config_show)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse stops filling a `nargs="*"` positional at the first option, so the documented
    # `distill submit CONFIG --address URL KEY=VALUE ...` (and `run CONFIG --force KEY=VALUE`) would
    # leave the overrides unrecognised; collect trailing KEY=VALUE words into `overrides`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(
                "=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error("unrecognized arguments: " + " ".join(extra))
    func: Callable = args.func
    try:
        return int(func(args) or 0)
    except UserError as e:
        sys.stderr.write(f"distill: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        _stop_local_ray()
        sys.stderr.write("distill: interrupted\n")
        return 130
    except Exception as e:
        from pipeline.errors import storage_error_message

        msg = storage_error_message(e)
        if msg is None:
            raise
        sys.stderr.write(f"distill: error: {msg}\n")
        return 2


def _stop_local_ray() -> None:
    """After Ctrl-C: shut down the Ray this process started (raylet, GCS, workers, Train/Tune
    actors) now, so none is left behind; on a joined cluster this only disconnects."""
    ray = sys.modules.get("ray")
    if ray is None:
        return
    try:
        if ray.is_initialized():
            ray.shutdown()
    except BaseException:  # noqa: BLE001 - a second Ctrl-C or a dying Ray: we are exiting anyway
        pass


if __name__ == "__main__":
    sys.exit(main())
