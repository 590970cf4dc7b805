"""bench/run_all.py's RESULTS.md: each benchmark's time and load, and whether its machine was idle."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", os.path.join(ROOT, "bench", "run_all.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_markdown_marks_idle_and_busy_runs_and_failures():
    mod = _run_all()
    results = {
        "bench_a": {"ratio": 0.97123, "nested": {"x": 1}, "_load_avg_1min": [0.4, 1.9], "_when": "2026-12-04 17:54"},
        "bench_b": {"ratio": 0.5, "_load_avg_1min": [1.0, mod.IDLE_LOAD + 0.5], "_when": "2026-12-04 18:00"},
        "bench_old": {"ratio": 0.1},  # written before loads were recorded
    }
    lines = mod.results_markdown(results, {"bench_c": "exit code 2"})
    text = "\n".join(lines)
    assert "| bench_a | 2026-12-04 17:54 | 0.4 / 1.9 | idle |" in lines
    assert f"| bench_b | 2026-12-04 18:00 | 1.0 / {mod.IDLE_LOAD + 0.5} | busy |" in lines
    assert "| bench_old | not recorded | not recorded | not recorded |" in lines
    assert "| bench_a | ratio | 0.9712 |" in lines
    assert "| bench_a | nested.x | 1 |" in lines
    assert "| bench_c | FAILED | exit code 2 |" in lines
    # the load table comes before the figures
    assert text.index("| bench_a | 2026-12-04") < text.index("| bench_a | ratio |")
