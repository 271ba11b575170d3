"""pytest plugin that turns (variant x property) into ordinary pytest items and collects their Results.

Loaded by `python -m tools.verify` (`-p harness.plugin`); works under pytest-xdist: each item attaches its Result
to its report's user_properties, and the controller builds the table and the JSON from the reports.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch

from spec import SPECS
from .engine import SCHEMA, quantized_matrix, table, write_json
from .probes import PROPERTIES


def pytest_addoption(parser):
    g = parser.getgroup("verify")
    g.addoption("--variants", default="", help="comma-separated variants (default: every spec)")
    g.addoption("--properties", default="", help="comma-separated properties (default: all)")
    g.addoption("--variant-module", action="append", default=[], help="a user's variant module (impl + spec)")
    g.addoption("--backend", default=None, help="impl (default) | peft | lora-lite | a name --backend-module registered")
    g.addoption("--backend-module", action="append", default=[],
                help="a user's backend module (path or dotted name) that registers a backend")
    g.addoption("--ref", default=None, help="the commit a source-built backend verifies (lora-lite)")
    g.addoption("--repo", default=None, help="where that backend's source comes from: a local git clone or a URL")
    g.addoption("--device", default="cpu", help="cpu | cuda")
    g.addoption("--verify-profile", default=None, help="Hypothesis profile: verify (default), ci, dev")
    g.addoption("--verify-json", default=None, help="where to write the results JSON")


def _opt(config, name):
    return config.getoption(name)


def _backend(config):
    """The backend under test: --backend NAME, else the one backend --backend-module registered, else impl."""
    from .backends import load_backend_module, make

    loaded = []
    for mod in _opt(config, "backend_module"):
        try:
            loaded += load_backend_module(mod)
        except (ImportError, OSError, ValueError) as e:
            raise pytest.UsageError(f"--backend-module {mod}: {type(e).__name__}: {e}") from None
    name = _opt(config, "backend")
    if name is None and len(loaded) > 1:
        raise pytest.UsageError(f"the backend modules registered {loaded}; pick one with --backend")
    name = name or (loaded[0] if loaded else "impl")
    options = {k: _opt(config, k) for k in ("ref", "repo") if _opt(config, k)}
    try:
        return make(name, **options)
    except KeyError as e:
        raise pytest.UsageError(str(e.args[0])) from None
    except TypeError as e:
        raise pytest.UsageError(f"backend {name!r} does not take {sorted(options)}: {e}") from None


def pytest_configure(config):
    import impl

    for mod in _opt(config, "variant_module"):
        impl.load_variant_module(mod)
    profile = _opt(config, "verify_profile") or ("ci" if os.environ.get("CI") else "verify")
    config._verify = {"profile": profile, "backend": _backend(config), "device": _opt(config, "device")}
    if not hasattr(config, "workerinput"):  # one torch thread per xdist worker is set in the worker
        pass
    torch.set_num_threads(1)


def selected(config) -> tuple[list[str], list[str]]:
    want = [v for v in _opt(config, "variants").split(",") if v]
    variants = want or list(SPECS.names())
    unknown = [v for v in variants if v not in SPECS.names()]
    if unknown:
        raise pytest.UsageError(f"no spec for variant(s) {unknown}; specs: {list(SPECS.names())}")
    props = [p for p in _opt(config, "properties").split(",") if p] or list(PROPERTIES)
    bad = [p for p in props if p not in PROPERTIES]
    if bad:
        raise pytest.UsageError(f"unknown propert(ies) {bad}; known: {list(PROPERTIES)}")
    return variants, props


def pytest_generate_tests(metafunc):
    if {"variant", "prop"} <= set(metafunc.fixturenames):
        variants, props = selected(metafunc.config)
        combos = [(v, p) for v in variants for p in props]
        metafunc.parametrize(("variant", "prop"), combos, ids=[f"{v}-{p}" for v, p in combos])


@pytest.fixture
def verify_env(request):
    return request.config._verify


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput"):
        return
    results = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            for key, value in getattr(rep, "user_properties", ()):
                if key == "verify" and getattr(rep, "when", "call") in ("call", "setup"):
                    results.append(json.loads(value) if isinstance(value, str) else value)
    if not results:
        return
    variants, props = selected(config)
    order = {(v, p): i for i, (v, p) in enumerate((v, p) for v in variants for p in props)}
    results.sort(key=lambda r: order.get((r["variant"], r["property"]), 1 << 30))
    env = config._verify
    be = env["backend"]
    specs = {n: SPECS.get(n) for n in variants}
    qm = quantized_matrix(results, specs)
    payload = {
        "schema": SCHEMA,
        "backend": be.name,
        "backend_version": getattr(be, "version", None) or _impl_version(),
        "profile": env["profile"],
        "device": env["device"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "variants": variants,
        "properties": props,
        "results": results,
        "quantized_matrix": qm,
        "summary": {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "deviation", "na")},
    }
    path = Path(_opt(config, "verify_json") or Path("build/verify") / f"{getattr(be, 'results_stem', be.name)}.json")
    write_json(path, payload)
    tr = terminalreporter
    tr.write_sep("=", f"verify: backend {be.name}, profile {env['profile']}, device {env['device']}")
    tr.write_line(table(results, variants, props))
    if qm:
        tr.write_line("")
        tr.write_line("quantized support (bitsandbytes 4-bit / 8-bit): declared -> observed")
        for v, row in qm.items():
            tr.write_line(f"  {v:<18} declared {row['declared']:<7} bnb4 {row['bnb4'][:40]:<40} bnb8 {row['bnb8'][:40]}")
    for r in results:
        if r["status"] in ("fail", "deviation"):
            tr.write_line(f"{r['status'].upper():9} {r['variant']}/{r['property']}: {r['detail'][:400]}")
            if r["status"] == "fail" and r.get("example"):
                tr.write_line(f"          minimal example: {r['example']}")
    tr.write_line(f"results: {payload['summary']} -> {path}")


def _impl_version() -> str:
    try:
        from importlib.metadata import version

        return version("lora-verify")
    except Exception:
        return "source"
