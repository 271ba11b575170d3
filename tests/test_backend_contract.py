"""The backend contract as code: a backend module is checked against the protocols before anything runs (one
line per problem, exit status BACKEND_INVALID), a crash names the library's line and the backend line that called
it, and Mapped's transforms (a diagonal; a pair of functions) give the spec's layout as a view."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness import PROPERTIES
from harness.backends import BACKENDS, ImplBackend, check_backend_modules
from harness.backends.protocol import BACKEND_INVALID, Errors, Mapped, Transform, check_backend
from harness.engine import run_property
from spec import SPECS

ROOT = Path(__file__).resolve().parents[1]


def _module(tmp_path: Path, name: str, body: str) -> Path:
    f = tmp_path / f"{name}.py"
    f.write_text(textwrap.dedent(body))
    return f


BROKEN = """
    from harness.backends import ImplBackend, register
    from harness.backends.protocol import Errors

    @register
    class Broken(ImplBackend):
        name = "broken-contract"
        errors = Errors(config=(ValueError, "not a type"), attach=(), checkpoint=())

        def tensors(self, model, adapter_name):          # one argument more than the harness passes
            return super().tensors(model)

        def attach(self, model, spec, case, calibration=None):   # no **over: dropout/param_dtype cannot reach it
            return super().attach(model, spec, case, calibration)

        def merge_adapter(self, model):                  # unmerge without unmerge_adapter
            pass
"""


def test_check_backend_names_every_problem_in_one_line_each(tmp_path):
    class Missing:
        name, version = "m", None
        errors = Errors(config=(ValueError,), attach=(int,), checkpoint=())

        def applies(self, spec, case):
            return None

        def merge_adapter(self, model):
            pass

    problems = check_backend(Missing())
    text = "\n".join(problems)
    for needle in ("missing required method 'attach'", "missing required method 'hooks_left'",
                   "applies: requires 2 arguments", "errors.attach holds <class 'int'>, not an exception type",
                   "capability 'unmerge' (and embedding, scaled_embedding, conv2d, lora_bias, which share them) is partly there: has merge_adapter, lacks unmerge_adapter"):
        assert needle in text, text
    assert all("\n" not in p for p in problems)
    assert check_backend(ImplBackend()) == []


def test_verify_refuses_a_backend_module_that_breaks_the_contract(tmp_path):
    """tools.verify checks the module before pytest runs: one line per problem, exit BACKEND_INVALID."""
    mod = _module(tmp_path, "broken_backend", BROKEN)
    proc = subprocess.run([sys.executable, "-m", "tools.verify", "--backend-module", str(mod), "-n", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == BACKEND_INVALID, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4, lines
    for needle in ("tensors: requires 2 arguments", "attach: takes no **over",
                   "errors.config holds 'not a type', not an exception type", "capability 'unmerge' (and embedding"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert "passed" not in proc.stdout  # nothing ran


def test_checking_a_module_imports_it_once(tmp_path):
    mod = _module(tmp_path, "twice_backend", """
        from harness.backends import ImplBackend, register

        @register
        class Twice(ImplBackend):
            name = "twice-contract"
    """)
    try:
        assert check_backend_modules([str(mod)]) == []
        assert check_backend_modules([str(mod)]) == []  # the plugin imports it again in the same process
    finally:
        BACKENDS.pop("twice-contract", None)


LIBRARY = """
    import torch


    def adapt(layer):
        return _build(layer.in_features + 1, layer.out_features)


    def _build(d_in, d_out):
        probe = torch.nn.Linear(d_in, d_out)
        return probe(torch.zeros(2, d_in - 1))    # the library's bug: a shape off by one, raised inside torch
"""

BACKEND = """
    import crashlib_contract

    from harness.backends import ImplBackend


    class CrashBackend(ImplBackend):
        name = "crash-contract"

        def attach(self, model, spec, case, calibration=None, **over):
            crashlib_contract.adapt(model.layer)
            return super().attach(model, spec, case, calibration, **over)
"""


def test_a_crash_names_the_librarys_line_and_the_backend_line_that_called_it(tmp_path, monkeypatch):
    lib = _module(tmp_path, "crashlib_contract", LIBRARY)
    be_file = _module(tmp_path, "crashbackend_contract", BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    import crashbackend_contract

    r = run_property(PROPERTIES["identity_at_init"], SPECS.get("lora"), crashbackend_contract.CrashBackend(), "zoo")
    assert r.status == "fail" and r.failure_kind == "crash", r
    lib_site, called = r.where.split(" (called from ")
    assert lib_site.startswith(f"{lib}:11 in _build: return probe("), r.where  # not torch's frame
    assert called.startswith(f"{be_file}:11 in attach: crashlib_contract.adapt(model.layer)"), r.where
    assert f"[at {r.where}]" in r.detail


# ----------------------------------------------------------------------------------------------- Mapped


def test_a_diagonal_held_as_a_full_matrix():
    """The library holds a (n, n) matrix whose diagonal is the spec's (n,) vector: reads, writes and grad go
    through the diagonal; the off-diagonal entries are the library's own."""
    full = torch.nn.Parameter(torch.diag(torch.tensor([1.0, 2.0, 3.0])) + 0.5 * (1 - torch.eye(3)))
    v = Mapped.of(full, "diag")
    assert v.shape == (3,) and torch.equal(v, torch.tensor([1.0, 2.0, 3.0])) and v.source is full
    with torch.no_grad():
        v.copy_(torch.tensor([7.0, 8.0, 9.0]))
    assert torch.equal(full.diagonal(), torch.tensor([7.0, 8.0, 9.0])) and float(full.detach()[0, 1]) == 0.5
    (full * torch.arange(9.0).reshape(3, 3)).sum().backward()
    assert torch.equal(v.grad, torch.tensor([0.0, 4.0, 8.0]))  # only the diagonal's gradient, in the spec's layout
    v.grad = None
    assert full.grad is None
    v.grad = torch.tensor([1.0, 1.0, 1.0])
    assert torch.equal(full.grad, torch.eye(3))


def test_a_transform_as_a_pair_of_functions():
    """A library holding the spec's (a, b) matrix flattened and scaled storage-wise passes its own pair:
    to_spec (a view) and to_library (the inverse, for grads)."""
    flat = torch.nn.Parameter(torch.arange(6.0))
    t = Transform("flat-2x3", to_spec=lambda x: x.view(2, 3), to_library=lambda x, shape: x.reshape(shape))
    v = Mapped.of(flat, t)
    assert v.shape == (2, 3)
    with torch.no_grad():
        v[1, 2] = 50.0
    assert float(flat[5]) == 50.0
    (flat * 2).sum().backward()
    assert torch.equal(v.grad, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="unknown transform 'nope'"):
        Mapped.of(flat, "nope")


# ----------------------------------------------------------------------------------------------- trainable_set


class Unfrozen(ImplBackend):
    """A planted library: attach leaves the base layer's parameters trainable."""

    name = "unfrozen-contract"

    def attach(self, model, spec, case, calibration=None, **over):
        out = super().attach(model, spec, case, calibration, **over)
        for p in model.parameters():
            p.requires_grad_(True)
        return out


def test_trainable_set_reports_every_problem_in_one_message_the_count_first():
    assert run_property(PROPERTIES["trainable_set"], SPECS.get("lora"), ImplBackend(), "zoo").status == "pass"
    r = run_property(PROPERTIES["trainable_set"], SPECS.get("lora"), Unfrozen(), "zoo")
    assert r.status == "fail" and r.failure_kind == "assertion", r
    assert r.detail.startswith("3 problems: ") and " trainable parameters, the spec's formula " in r.detail, r.detail
    parts = r.detail.removeprefix("3 problems: ").split("; ")
    assert "trainable parameters" in parts[0]
    assert parts[1].startswith("base parameters received gradients: ") and parts[2] == "a base parameter is left trainable"
