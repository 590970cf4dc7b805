"""Stage `report`: what each model achieved, side by side, in `summary.json` and `report.md`.

It only reads what the other stages wrote (their metrics.json files and markers), so it is cheap and
always consistent with the run directory. Plots are PNGs beside report.md; on S3 they are uploaded
next to it.
"""
from __future__ import annotations

import io
from typing import Any, Optional

from pipeline import storage
from pipeline.config import Config, section_fingerprint
from pipeline.layout import (MANIFEST_FILE, METRICS_FILE, REPORT_FILE, STAGES, SUMMARY_FILE, marker_fingerprint,
                             read_json_or_none, read_marker, run_file, stage_file)

NEEDS_RAY = False
# Every stage before this one, in execution order: the report reads them all.
UPSTREAM = tuple(s for s in STAGES if s != "report")


def fingerprint(cfg: Config) -> str:
    return section_fingerprint("report-v1", [marker_fingerprint(cfg, s) for s in UPSTREAM])


def _read(cfg: Config, stage: str, name: str = METRICS_FILE) -> Optional[dict]:
    return read_json_or_none(stage_file(cfg, stage, name))


def _get(d: Optional[dict], *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def build_summary(cfg: Config) -> dict:
    manifest = _read(cfg, "data", MANIFEST_FILE) or {}
    splits = manifest.get("splits", {})
    teacher = _read(cfg, "teacher")
    spec = _read(cfg, "specialists")
    student = _read(cfg, "student")
    tune = _read(cfg, "tune")
    subsets = _get(_read(cfg, "cluster", "specialists.json"), "subsets", default=[])

    def model_entry(m: Optional[dict], **extra) -> dict:
        out = {"test_error": _get(m, "test_error"), "test_errors": _get(m, "test_errors"),
               "params": _get(m, "params")}
        out.update(extra)
        return out

    timings = {}
    for stage in ("data",) + UPSTREAM[1:]:
        marker = read_marker(cfg, stage)
        if marker:
            timings[stage] = marker.get("seconds")
    timings["total"] = round(sum(v for v in timings.values() if v), 3)
    distilled = _get(student, "distilled") or {}
    distilled_g = _get(student, "distilled_generalist") or {}
    return {
        "dataset": {
            "name": manifest.get("name"),
            "num_classes": manifest.get("num_classes"),
            "train": _get(splits, "train", "num_samples"),
            "val": _get(splits, "val", "num_samples"),
            "test": _get(splits, "test", "num_samples"),
        },
        "models": {
            "generalist": model_entry(teacher),
            "ensemble": {"test_error": _get(spec, "test_error"), "test_errors": _get(spec, "test_errors"),
                         "num_specialists": len(subsets), "params": _get(spec, "params")},
            "student_baseline": model_entry(_get(student, "baseline")),
            "student_distilled_generalist": model_entry(distilled_g, T=distilled_g.get("T"),
                                                        alpha=distilled_g.get("alpha")),
            "student_distilled": model_entry(distilled, T=distilled.get("T"), alpha=distilled.get("alpha")),
        },
        "tune": {"trials": _get(tune, "trials", default=0), "best": _get(tune, "best", default={})},
        "latency_ms_per_batch": _get(student, "latency_ms_per_batch", default={}),
        "timings_s": timings,
    }


def _fmt_err(e: Any) -> str:
    return "—" if e is None else f"{100 * e:.2f} %"


def headline_table(summary: dict) -> str:
    lat = summary.get("latency_ms_per_batch") or {}

    def ms(key: str) -> Any:
        # The student stage records {"ms_median": ..., "ms_p90": ..., ...} per model.
        v = lat.get(key)
        return v.get("ms_median") if isinstance(v, dict) else v

    rows = [("generalist (teacher)", "generalist", ms("generalist")),
            ("generalist + specialists", "ensemble", ms("ensemble")),
            ("student, hard labels", "student_baseline", ms("student")),
            ("student, distilled from the generalist", "student_distilled_generalist", ms("student")),
            ("student, distilled from generalist + specialists", "student_distilled", ms("student"))]

    def cell(v: Any, fmt: str = "{}") -> str:
        return "—" if v is None else fmt.format(v)

    lines = ["| model | test error | errors | parameters | CPU ms / batch |", "|---|---:|---:|---:|---:|"]
    for label, key, ms in rows:
        m = summary["models"].get(key) or {}
        lines.append(f"| {label} | {_fmt_err(m.get('test_error'))} | {cell(m.get('test_errors'))} | "
                     f"{cell(m.get('params'), '{:,}')} | {cell(ms, '{:.2f}')} |")
    return "\n".join(lines)


def _save_png(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes_atomic(uri, buf.getvalue())


def _learning_curves(cfg: Config, out_uri: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = _read(cfg, "teacher") or {}
    student = _read(cfg, "student") or {}
    curves = {"generalist": teacher.get("epochs") or []}
    for k in ("baseline", "distilled_generalist", "distilled"):
        curves[f"student {k}"] = _get(student, k, "epochs", default=[]) or []
    if not any(curves.values()):
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, eps in curves.items():
        pts = [(e.get("epoch"), e.get("val_error")) for e in eps if e.get("val_error") is not None]
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val error (%)")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_png(fig, out_uri)
    plt.close(fig)
    return True


def render_report(cfg: Config, summary: dict) -> str:
    manifest = _read(cfg, "data", "manifest.json") or {}
    names = manifest.get("class_names") or [str(i) for i in range(manifest.get("num_classes") or 0)]
    cluster = _read(cfg, "cluster", "specialists.json") or {}
    cluster_metrics = _read(cfg, "cluster") or {}
    spec = _read(cfg, "specialists") or {}
    tune = _read(cfg, "tune") or {}
    ds = summary["dataset"]
    out = [f"# distill report: {ds.get('name') or 'dataset'}", "",
           f"{ds.get('num_classes')} classes; {ds.get('train')} train, {ds.get('val')} val, {ds.get('test')} test samples. "
           f"Run directory: `{cfg.output_dir}`.", "", "## Models", "", headline_table(summary), ""]
    m = summary["models"]
    gb, gd, gt = (m["student_baseline"].get("test_error"), m["student_distilled"].get("test_error"),
                  m["generalist"].get("test_error"))
    if None not in (gb, gd, gt) and gb != gt:
        out.append(f"Distillation recovered {100 * (gb - gd) / (gb - gt):.0f} % of the gap between the baseline "
                   f"student and the generalist (the paper's MNIST figure: 91 %). Distilled at "
                   f"T = {m['student_distilled'].get('T')}, alpha = {m['student_distilled'].get('alpha')}.")
        out.append("")
    dg = m.get("student_distilled_generalist", {}).get("test_errors")
    de = m["student_distilled"].get("test_errors")
    if dg is not None and de is not None:
        out.append(f"Distilled from generalist + specialists: {de} test errors; from the generalist alone: {dg} "
                   f"({'the specialists helped the student' if de < dg else 'the specialists did not help the student'}; "
                   "same architecture, budget, T and alpha).")
        out.append("")
    out += ["## Specialists", ""]
    subsets = cluster.get("subsets") or []
    if subsets:
        ari = cluster_metrics.get("ari")
        if ari is not None:
            out.append(f"Adjusted Rand index of the clusters against the known class groups: {ari:.2f}.")
            out.append("")
        out += ["| specialist | classes |", "|---|---|"]
        for i, s in enumerate(subsets):
            out.append(f"| {i} | {', '.join(names[c] if c < len(names) else str(c) for c in s)} |")
        out.append("")
        out.append("![class covariance](cluster_covariance.png)")
        out.append("")
    rows = spec.get("table4") or []
    if rows:
        out += ["### Accuracy by specialist coverage (the paper's Table 4)", "",
                "| specialists covering the true class | test examples | generalist correct | ensemble correct | relative accuracy change |",
                "|---:|---:|---:|---:|---:|"]
        for r in rows:
            rel = r.get("relative_accuracy_change")
            rel_s = "—" if rel is None else f"{100 * rel:+.1f} %"
            out.append(f"| {r.get('covered_by')} | {r.get('num_test_examples')} | {r.get('generalist_correct')} | "
                       f"{r.get('ensemble_correct')} | {rel_s} |")
        out.append("")
    if tune:
        best = tune.get("best") or {}
        out += ["## Tuning T and alpha", "",
                f"{tune.get('trials')} Ray Tune trials, all reading the same soft-target cache. Best: "
                f"T = {best.get('T')}, alpha = {best.get('alpha')}, val error {_fmt_err(best.get('val_error'))}.", "",
                "![tune heatmap](tune_heatmap.png)", ""]
    out += ["## Learning curves", "", "![learning curves](learning_curves.png)", "",
            "## Timings (seconds)", "", "| stage | seconds |", "|---|---:|"]
    for k, v in summary["timings_s"].items():
        out.append(f"| {k} | {v if v is not None else '—'} |")
    out.append("")
    return "\n".join(out)


def _copy_plot(cfg: Config, stage: str, name: str, dest: str) -> None:
    src = storage.join(cfg.stage_uri(stage), name)
    if storage.exists(src):
        storage.write_bytes_atomic(storage.join(cfg.output_dir, dest), storage.read_bytes(src))


def run(cfg: Config) -> dict:
    summary = build_summary(cfg)
    _learning_curves(cfg, storage.join(cfg.output_dir, "learning_curves.png"))
    _copy_plot(cfg, "cluster", "covariance.png", "cluster_covariance.png")
    _copy_plot(cfg, "tune", "heatmap.png", "tune_heatmap.png")
    storage.write_bytes_atomic(run_file(cfg, REPORT_FILE), render_report(cfg, summary).encode())
    storage.write_json_atomic(run_file(cfg, SUMMARY_FILE), summary)
    return {"summary": summary}
