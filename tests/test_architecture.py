"""The shape of the code base (docs/architecture.md): no import cycles, modules of a readable size,
Ray kept out of the model/loss/specialists code, and every dotted name the docs mention exists.

Static checks on the source (ast), so they run in a second and need no Ray.
"""
from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "specialists")
MAX_LINES = 600
# A module may be longer when its first docstring says why ("Longer than 600 lines: ...").
LONG_REASON = re.compile(r"longer than 600 lines", re.I)


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = p
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_pkg: bool):
    """Every module name imported anywhere in `tree` (function-level too), except under
    `if TYPE_CHECKING:`, which never runs."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                yield f"{base}.{a.name}"  # resolved below: a submodule, else the module itself
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for m, p in mods.items():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        deps = {resolve(n) for n in _imports(tree, m, p.name == "__init__.py")}
        # A package's __init__ re-exporting its own submodules, and a submodule importing a
        # sibling through the package, are not cycles between concerns.
        graph[m] = {d for d in deps if d and d != m and not d.startswith(m + ".") and not m.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_detector_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (move the shared piece into its own module): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_modules_are_of_a_readable_size_or_say_why():
    too_long = []
    for name, p in _modules().items():
        text = p.read_text(encoding="utf-8")
        n = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > MAX_LINES and not LONG_REASON.search(doc):
            too_long.append(f"{name} ({n} lines)")
    assert not too_long, f"over {MAX_LINES} lines without a reason at the top: {too_long}"


def test_ray_stays_out_of_models_losses_and_specialists():
    graph = import_graph()
    for name, p in _modules().items():
        if name.startswith("specialists") or name in ("pipeline.models", "pipeline.losses", "pipeline.training"):
            tree = ast.parse(p.read_text(encoding="utf-8"))
            ray = [n for n in _imports(tree, name, p.name == "__init__.py") if n.split(".")[0] == "ray"]
            assert not ray, f"{name} imports Ray ({ray}); keep Ray in the stage and launcher code"
    assert graph  # the walk saw the code base


def test_layout_is_a_leaf():
    """The run-layout module is imported by the runner, the CLI and every stage: it imports none of them."""
    assert import_graph()["pipeline.layout"] <= {"pipeline.storage", "pipeline.errors"}


DOTTED = re.compile(r"`((?:pipeline|specialists)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


FILE_SUFFIXES = {"json", "yaml", "yml", "md", "png", "py", "csv", "txt", "pt"}


def _is_config_key(ref: str) -> bool:
    from pipeline.config import Config

    model = Config
    for part in ref.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return True


def _doc_files():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: p.name)
def test_every_dotted_name_in_the_docs_exists(doc):
    missing = []
    for ref in sorted(set(DOTTED.findall(doc.read_text(encoding="utf-8")))):
        if ref.rpartition(".")[2] in FILE_SUFFIXES or _is_config_key(ref):  # specialists.json, specialists.epochs
            continue
        parts = ref.split(".")
        obj, i = None, len(parts)
        while i > 0:  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ModuleNotFoundError:
                i -= 1
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is None:
            missing.append(ref)
    assert not missing, f"{doc.name} names what the code does not have: {missing}"
