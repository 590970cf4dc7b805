"""The seeds harness: the whole pipeline at several global seeds, and one summary over them.

`distill run CONFIG --seeds 0,1,2` runs every stage once per seed, one seed after another in this
process (one Ray instance), each into its own ordinary run directory `{output_dir}/seed-{S}` (the
config with `seed=S` and `output_dir={output_dir}/seed-{S}`), so a rerun skips what is up to date and
resumes what was interrupted, per seed. It then reads each run's `summary.json` and writes, in
`{output_dir}`:

- `seeds_summary.json`: per model, the test error at each seed, its mean and sample standard
  deviation (n - 1); per comparison (ensemble - generalist, distilled - baseline, distilled -
  distilled from the generalist alone), the paired difference at each seed, its mean and sd, and
  whether the first model is better at every seed;
- `seeds_report.md`: the same as tables;
- `seeds.png`: each model's error at every seed with mean ± sd bars, and the paired differences.

`distill seeds-summary DIR` rebuilds the three files from the seed folders already in DIR without
running anything. See docs/seeds.md.
"""
from __future__ import annotations

import io
import math
import os
import re
import statistics
import time
from typing import Any, Iterable, Optional

from pipeline import storage
from pipeline.errors import UserError
from pipeline.layout import SUMMARY_FILE
from pipeline.log import log, warn

SEED_DIR_PREFIX = "seed-"
SUMMARY_JSON = "seeds_summary.json"
REPORT_MD = "seeds_report.md"
PLOT_PNG = "seeds.png"

# The `models` keys of a run's summary.json (pipeline.stages.report.build_summary), in table order.
MODELS = ("generalist", "ensemble", "student_baseline", "student_distilled_generalist", "student_distilled")
LABELS = {
    "generalist": "generalist",
    "ensemble": "generalist + specialists",
    "student_baseline": "student, hard labels",
    "student_distilled_generalist": "student, distilled from the generalist",
    "student_distilled": "student, distilled from generalist + specialists",
}
SHORT = {"generalist": "generalist", "ensemble": "ensemble", "student_baseline": "baseline",
         "student_distilled_generalist": "distilled\n(generalist)", "student_distilled": "distilled\n(ensemble)"}
# (better, worse): the difference is error(better) - error(worse); negative means the ordering holds.
COMPARISONS = (
    ("ensemble", "generalist"),
    ("student_distilled", "student_baseline"),
    ("student_distilled", "student_distilled_generalist"),
)
_SEED_RE = re.compile(r"^seed-(\d+)$")


def seed_dir(output_dir: str, seed: int) -> str:
    return storage.join(output_dir, f"{SEED_DIR_PREFIX}{seed}")


def parse_seeds(text: Optional[str], flag: str = "--seeds") -> list[int]:
    """`"0,1,2"` -> [0, 1, 2]. UserError naming `flag` for anything else (empty, not an integer,
    negative, a seed given twice)."""
    example = f"e.g. {flag} 0,1,2"
    if text is None or not str(text).strip():
        raise UserError(f"{flag}: no seeds given; pass a comma-separated list of non-negative integers, {example}")
    seeds: list[int] = []
    for part in str(text).split(","):
        p = part.strip()
        if not re.fullmatch(r"\d+", p):
            what = "an empty item" if not p else f"'{p}' is not a non-negative integer"
            raise UserError(f"{flag} '{text}': {what}; pass a comma-separated list of non-negative integers, "
                            f"{example}")
        s = int(p)
        if s in seeds:
            raise UserError(f"{flag} '{text}': seed {s} is given twice; each seed runs once, {example}")
        seeds.append(s)
    return seeds


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def run_seeds(config_path: Optional[str], overrides: list[str], seeds_text: Optional[str],
              force: bool = False) -> str:
    """Run the pipeline at each seed into `{output_dir}/seed-{S}`, then write the summary files in
    `output_dir`. Returns the summary tables (markdown) for the CLI to print."""
    from pipeline.config import Config, load_config
    from pipeline.runner import output_lock, run_pipeline

    seeds = parse_seeds(seeds_text)
    for item in overrides:
        if item.split("=", 1)[0].strip() == "seed":
            raise UserError(f"'{item}' (command line) and --seeds both set the global seed; drop '{item}' "
                            "and list the seeds in --seeds")
    base = load_config(config_path, overrides)
    if base.targets.uri and len(seeds) > 1:
        raise UserError(f"targets.uri is set ({base.targets.uri}), so every seed would write the same "
                        "soft-target cache; unset targets.uri with --seeds so that each seed's cache lives "
                        "in its own run directory")
    out = base.output_dir
    t_all = time.perf_counter()
    with output_lock(out):
        for i, s in enumerate(seeds, 1):
            run_dir = seed_dir(out, s)
            cfg = Config.model_validate({**base.model_dump(mode="json"), "seed": s, "output_dir": run_dir})
            log(f"seed {i}/{len(seeds)}: seed={s} -> {run_dir}")
            t0 = time.perf_counter()
            run_pipeline(cfg, force=force)
            log(f"seed {i}/{len(seeds)}: seed={s} done in {time.perf_counter() - t0:.1f}s")
        summary = write_seeds_summary(out, seeds)
    log(f"{len(seeds)} seeds finished in {time.perf_counter() - t_all:.1f}s; summary at "
        f"{storage.join(out, REPORT_MD)}")
    return seeds_tables(summary)


def find_seeds(output_dir: str) -> list[int]:
    """Seeds of the `seed-{S}` folders under `output_dir` that hold a summary.json, ascending."""
    found = []
    for name in storage.listdir(output_dir):
        m = _SEED_RE.match(name)
        if m and storage.exists(storage.join(output_dir, name, SUMMARY_FILE)):
            found.append(int(m.group(1)))
    return sorted(found)


def rebuild_seeds_summary(output_dir: str, seeds_text: Optional[str] = None) -> str:
    """`distill seeds-summary DIR`: the summary files rebuilt from the seed folders in DIR (those
    named by `seeds_text`, or every `seed-{S}` folder with a summary.json). Runs nothing."""
    from pipeline.runner import output_lock

    out = output_dir if storage.is_remote(output_dir) else os.path.abspath(os.path.expanduser(output_dir))
    if not storage.is_remote(out) and not storage.isdir(out):
        raise UserError(f"seeds-summary: {out} is not a folder; pass the output_dir of a "
                        "`distill run CONFIG --seeds ...` run")
    if seeds_text is not None:
        seeds = parse_seeds(seeds_text)
    else:
        seeds = find_seeds(out)
        if not seeds:
            raise UserError(f"seeds-summary: no seed-N folder with a summary.json under {out}; run "
                            "`distill run CONFIG --seeds 0,1,2` with output_dir set to it first")
    with output_lock(out):
        summary = write_seeds_summary(out, seeds)
    return seeds_tables(summary)


# ---------------------------------------------------------------------------------------------
# Summary maths (plain Python: no Ray, no torch)
# ---------------------------------------------------------------------------------------------

def mean_sd(values: Iterable[Optional[float]]) -> dict:
    """Mean and sample standard deviation (n - 1) of the values that are not None; sd is None with
    fewer than two values, mean is None with none."""
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    mean = statistics.fmean(vals) if n else None
    sd = statistics.stdev(vals) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n}


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def summarise(runs: dict[int, dict], run_dirs: Optional[dict[int, str]] = None) -> dict:
    """The seeds summary from each seed's summary.json (`runs`: seed -> parsed summary.json)."""
    seeds = sorted(runs)
    models: dict[str, dict] = {}
    for key in MODELS:
        entries = [(runs[s].get("models") or {}).get(key) or {} for s in seeds]
        errs = [_num(e.get("test_error")) for e in entries]
        entry = {"test_error": errs, "test_errors": [e.get("test_errors") for e in entries], **mean_sd(errs),
                 "params": next((e.get("params") for e in entries if e.get("params") is not None), None)}
        if key in ("student_distilled", "student_distilled_generalist"):
            entry["T"] = [e.get("T") for e in entries]
            entry["alpha"] = [e.get("alpha") for e in entries]
        if key == "ensemble":
            entry["num_specialists"] = [e.get("num_specialists") for e in entries]
        models[key] = entry
    comparisons = []
    for a, b in COMPARISONS:
        ea, eb = models[a]["test_error"], models[b]["test_error"]
        diffs = [None if x is None or y is None else x - y for x, y in zip(ea, eb)]
        known = [d for d in diffs if d is not None]
        stats = mean_sd(diffs)
        # Standard error of the mean difference: what to set the mean against (paired t = mean / se).
        se = stats["sd"] / math.sqrt(stats["n"]) if stats["sd"] is not None else None
        comparisons.append({
            "name": f"{a} - {b}", "better": a, "worse": b, "difference": diffs, **stats, "se": se,
            "better_at": sum(d < 0 for d in known),
            "holds_at_every_seed": bool(seeds) and len(known) == len(seeds) and all(d < 0 for d in known),
        })
    first = runs[seeds[0]] if seeds else {}
    datasets = {s: runs[s].get("dataset") for s in seeds}
    if len({repr(d) for d in datasets.values()}) > 1:
        warn("the seed runs are not on the same dataset (their summary.json `dataset` differ): "
             + "; ".join(f"seed {s}: {d}" for s, d in datasets.items()))
    return {
        "seeds": seeds,
        "runs": {str(s): (run_dirs or {}).get(s) for s in seeds},
        "dataset": first.get("dataset"),
        "sd": "sample standard deviation (n - 1)",
        "models": models,
        "comparisons": comparisons,
        "timings_s": [(runs[s].get("timings_s") or {}).get("total") for s in seeds],
    }


def read_runs(output_dir: str, seeds: list[int]) -> tuple[dict[int, dict], dict[int, str]]:
    runs, dirs = {}, {}
    for s in seeds:
        d = seed_dir(output_dir, s)
        uri = storage.join(d, SUMMARY_FILE)
        try:
            runs[s] = storage.read_json(uri)
        except FileNotFoundError:
            raise UserError(f"{uri} does not exist: seed {s} has not finished; rerun `distill run CONFIG "
                            f"--seeds ...` with this output_dir (finished stages are skipped)") from None
        except ValueError as e:
            raise UserError(f"{uri} is not valid JSON ({e}); rerun that seed's report stage "
                            f"(`distill stage report CONFIG output_dir={d}`)") from None
        if not isinstance(runs[s], dict) or not isinstance(runs[s].get("models"), dict):
            raise UserError(f"{uri} has no `models` section; it is not a distill run summary")
        dirs[s] = d
    return runs, dirs


def write_seeds_summary(output_dir: str, seeds: list[int]) -> dict:
    runs, dirs = read_runs(output_dir, seeds)
    summary = summarise(runs, dirs)
    plotted = _plot(summary, storage.join(output_dir, PLOT_PNG))
    storage.write_bytes_atomic(storage.join(output_dir, REPORT_MD), render_report(summary, plotted).encode())
    storage.write_json_atomic(storage.join(output_dir, SUMMARY_JSON), summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Report and plot
# ---------------------------------------------------------------------------------------------

def _pct(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def _mean_sd_cell(e: dict, signed: bool = False) -> str:
    if e.get("mean") is None:
        return "—"
    sd = "—" if e.get("sd") is None else f"{100 * e['sd']:.2f}"
    return f"{_pct(e['mean'], signed)} ± {sd}"


def seeds_tables(summary: dict) -> str:
    """Two markdown tables: test error (%) per model and seed with mean ± sd, and the paired
    differences (percentage points) with whether the ordering holds at every seed."""
    seeds = summary["seeds"]
    head = "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |"
    rule = "|---|" + "---:|" * (len(seeds) + 1)
    lines = ["Test error (%) per seed:", "", head, rule]
    for key in MODELS:
        m = summary["models"][key]
        cells = []
        for err, count in zip(m["test_error"], m["test_errors"]):
            cells.append(_pct(err) + (f" ({count})" if count is not None else ""))
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + f" | {_mean_sd_cell(m)} |")
    lines += ["", "Paired differences (percentage points; negative: the first model has the lower error):", "",
              "| difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | better at every seed |",
              "|---|" + "---:|" * (len(seeds) + 1) + "---|"]
    for c in summary["comparisons"]:
        name = f"{SHORT[c['better']].replace(chr(10), ' ')} − {SHORT[c['worse']].replace(chr(10), ' ')}"
        holds = "yes" if c["holds_at_every_seed"] else f"no ({c['better_at']} of {len(seeds)})"
        lines.append(f"| {name} | " + " | ".join(_pct(d, signed=True) for d in c["difference"])
                     + f" | {_mean_sd_cell(c, signed=True)} | {holds} |")
    return "\n".join(lines) + "\n"


def render_report(summary: dict, plotted: bool = True) -> str:
    seeds = summary["seeds"]
    ds = summary.get("dataset") or {}
    out = [f"# distill seeds report: {ds.get('name') or 'dataset'}", "",
           f"{len(seeds)} runs of the whole pipeline, global `seed` = {', '.join(map(str, seeds))}, each in its "
           f"own run directory (`seed-S/`, with its own report.md). {ds.get('test')} test samples per run. "
           "Standard deviations are sample standard deviations (n − 1) over the seeds.", "",
           seeds_tables(summary)]
    for key in ("student_distilled", "student_distilled_generalist"):
        m = summary["models"][key]
        if any(t is not None for t in m.get("T", [])):
            out.append(f"{LABELS[key]}: T = {', '.join(str(t) for t in m['T'])}; "
                       f"alpha = {', '.join(str(a) for a in m['alpha'])} (per seed).")
    ns = summary["models"]["ensemble"].get("num_specialists") or []
    out += [f"Specialists per seed: {', '.join(str(n) for n in ns)}.", ""]
    if plotted:
        out += ["![test error per seed](seeds.png)", ""]
    out += ["How to read the differences: the standard error of a mean difference is sd / √n; a mean "
            "within about two standard errors of zero is not told apart from seed-to-seed noise (with 3 seeds "
            "a paired t-test at the 5 % level needs |mean| > 4.3 standard errors). \"Better at every seed\" "
            "is the ordering the project's targets ask for, not a significance test.", "",
            "The global seed changes the models' initialisation, data order, dropout and augmentation in "
            "every stage (teacher, specialists, tune, students); the dataset "
            "(`data.seed`, `data.synthetic.seed`) and the k-means seed (`cluster.seed`) are their own keys "
            "and stay as configured.", ""]
    return "\n".join(out)


def _plot(summary: dict, uri: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = summary["seeds"]
    if not seeds:
        return False
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [5, 3]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    offsets = [(j - (len(seeds) - 1) / 2) * 0.08 for j in range(len(seeds))]

    def panel(axis, rows: list[tuple[str, list, dict]], ylabel: str, title: str) -> None:
        for i, (_, values, stats) in enumerate(rows):
            for j, v in enumerate(values):
                if v is not None:
                    axis.scatter(i + offsets[j], 100 * v, color=colours[j % len(colours)], s=24, zorder=3,
                                 label=f"seed {seeds[j]}" if i == 0 else None)
            if stats.get("mean") is not None:
                axis.errorbar(i + 0.3, 100 * stats["mean"], yerr=100 * (stats.get("sd") or 0.0), fmt="s",
                              color="black", capsize=4, zorder=4, label="mean ± sd" if i == 0 else None)
        axis.set_xticks(range(len(rows)))
        axis.set_xticklabels([r[0] for r in rows], fontsize=8)
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(alpha=0.3, axis="y")

    panel(ax, [(SHORT[k], summary["models"][k]["test_error"], summary["models"][k]) for k in MODELS],
          "test error (%)", f"Test error at {len(seeds)} seeds")
    ax.legend(fontsize=8)
    rows = [(f"{SHORT[c['better']]}\n− {SHORT[c['worse']]}".replace("\n(", " ("), c["difference"], c)
            for c in summary["comparisons"]]
    panel(ax2, rows, "difference (percentage points)", "Paired differences (< 0: first is better)")
    ax2.axhline(0.0, color="grey", linewidth=1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return True
