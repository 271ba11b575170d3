"""The layout's one direction, checked on the import graph of the repository's own modules:

records (spec/) import nothing of ours; the runtime (impl/) imports no records, engine or tools; the engine
(harness/) imports no tools or tests; the audit side (tools' review, render, diffs, llm, fetch) reads JSON and
files, so it imports only tools, impl.atomic and impl.untrusted (validation of input); nothing shipped imports
tests/; and no import circle exists.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("impl", "spec", "harness", "tools", "tests")
AUDIT_SIDE = ("tools.review", "tools.render", "tools.diffs", "tools.llm", "tools.fetch")
FORBIDDEN = {  # importer package -> packages it must not import
    "spec": {"impl", "harness", "tools", "tests"},
    "impl": {"spec", "harness", "tools", "tests"},
    "harness": {"tools", "tests"},
    "tools": {"tests"},
}


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module name -> the project modules it imports (a `from pkg import name` counts as pkg.name when that is a
    module, else as pkg)."""
    files = {}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            mod = ".".join(f.relative_to(root).with_suffix("").parts)
            files[mod.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def wrong_arrows(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        for d in deps:
            if d.split(".")[0] in FORBIDDEN.get(top, ()):
                out.append(f"{mod} -> {d}")
            elif mod in AUDIT_SIDE and not (d.startswith("tools") or d in ("impl.atomic", "impl.untrusted")):
                out.append(f"{mod} (audit side) -> {d}")
    return sorted(out)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_run_one_way_and_close_no_circle():
    graph = module_graph(ROOT)
    assert {"spec.schema", "harness.probes", "impl.runtime", "tools.review"} <= set(graph)
    assert wrong_arrows(graph) == []
    assert circles(graph) == []


def test_the_checks_see_a_wrong_arrow_and_a_circle(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "spec" / "schema.py").write_text("from harness import probes\n")
    (tmp_path / "harness" / "probes.py").write_text("from . import properties\n")
    (tmp_path / "harness" / "properties.py").write_text("from .probes import x\n")
    (tmp_path / "tools" / "review.py").write_text("import spec.schema\n")
    graph = module_graph(tmp_path)
    assert wrong_arrows(graph) == ["spec.schema -> harness.probes", "tools.review (audit side) -> spec.schema"]
    assert circles(graph) == [["harness.probes", "harness.properties"]]
