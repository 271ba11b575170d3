"""The standalone reproductions under audits/*/repro/ (the bugs the audits report, one script each) stand alone:
their third-party imports are torch and the library the audit names (plus transformers for AdapterHub's adapters,
which is built on it), never this harness; each says what it shows in its docstring and exits non-zero while
the bug is there."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPROS = sorted(ROOT.glob("audits/*/repro/*.py"))
LIBRARY_DEPENDENCIES = {"adapters": {"transformers"}}


def _library(path: Path) -> str:
    """The library a repro is about: PEFT for the history's, else the prefix of its file name."""
    return "peft" if path.parent.parent.name == "peft_history" else path.name.split("_")[0]


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add("." if node.level else node.module.split(".")[0])
    return out


def test_there_are_repros_for_both_audits():
    assert {p.parent.parent.name for p in REPROS} == {"ecosystem", "peft_history"}


@pytest.mark.parametrize("path", REPROS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_a_repro_needs_only_torch_and_its_library_and_exits_non_zero_on_the_bug(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lib = _library(path)
    third_party = {m for m in _imports(tree) if m not in sys.stdlib_module_names}
    assert third_party <= {"torch", lib} | LIBRARY_DEPENDENCIES.get(lib, set()), third_party
    assert lib in third_party
    doc = ast.get_docstring(tree) or ""
    assert doc.splitlines() and len(doc.splitlines()[0]) > 20, "the first docstring line says what it shows"
    exits = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
             ((isinstance(n.func, ast.Attribute) and n.func.attr == "exit") or
              (isinstance(n.func, ast.Name) and n.func.id in ("exit", "SystemExit")))]
    raises = [n for n in ast.walk(tree) if isinstance(n, ast.Raise) or isinstance(n, ast.Assert)]
    assert exits or raises, "it exits non-zero (sys.exit, raise or assert) while the bug is there"
