"""Conformance: a backend that lacks a capability gets `pass` or `na` (with its own reason) from every property,
never a crash or a failure. A property that calls a capability's member without declaring it in `needs=` crashes
here (AttributeError) on the backend lacking that capability; one that calls a member no protocol declares fails
`nox -s lint`.

The backends are impl's LoRA behind the protocol, built member by member: `lacking(caps)` has every member of the
protocol except the methods of `caps`, and its `unsupported` gives its own reason for each of them. One example per
property (profile `conformance`), LoRA only; every property runs on the backend lacking every capability and on the
worked example's tinylib, and for each capability in turn, every property that touched that capability when it
ran on the backend lacking nothing (a traced run) runs again without it.
"""
from __future__ import annotations

import pytest
from hypothesis import Phase, settings

from harness import PROPERTIES
from harness.backends import ImplBackend
from harness.backends.protocol import CAPABILITIES, METHODS
from harness.engine import _COMMON, run_property
from spec import SPECS

settings.register_profile("conformance", derandomize=True, max_examples=1, phases=[Phase.explicit, Phase.generate],
                          **_COMMON)
IMPL = ImplBackend()
CORE = ("applies", "spec_config", "attach", "tensors", "base_weight", "knobs", "dequantized", "hooks_left")
# impl's members beyond the core, by capability (impl lacks the others: their methods are not there)
OWN = {cap: ms for cap, ms in METHODS.items() if all(callable(getattr(IMPL, m, None)) for m in ms)}
# capabilities impl has by its `unsupported` only (no method of their own)
PLAIN = tuple(c for c in CAPABILITIES if c not in METHODS and IMPL.unsupported(SPECS.get("lora"), c) is None)


def reason(cap: str) -> str:
    return f"conformance backend built without {cap}"


def lacking(*caps: str, trace: set | None = None):
    """impl's LoRA behind a backend holding every protocol member impl has except the methods of `caps`; its
    `unsupported` names each of `caps` (and what impl itself lacks). `trace` collects the members and
    capabilities the properties touched."""
    members = {m for cap, ms in OWN.items() if cap not in caps for m in ms}
    members -= {m for cap in caps for m in METHODS.get(cap, ())}
    ns = {m: _delegate(m, trace) for m in CORE + tuple(sorted(members))}

    def unsupported(self, spec, capability):
        if trace is not None:
            trace.add(capability)
        return reason(capability) if capability in caps else IMPL.unsupported(spec, capability)

    def applies(self, spec):
        return None if spec.name == "lora" else "the conformance backend runs LoRA only"

    ns.update(name="conformance", version="0", errors=IMPL.errors, unsupported=unsupported, applies=applies)
    return type("Conformance", (), ns)()


def _delegate(member: str, trace: set | None):
    def call(self, *a, **kw):
        if trace is not None:
            trace.add(member)
        return getattr(IMPL, member)(*a, **kw)

    call.__name__ = member
    return call


def _run(be, props) -> dict[str, object]:
    lora = SPECS.get("lora")
    return {p: run_property(PROPERTIES[p], lora, be, "conformance") for p in props}


def _bad(results: dict, caps: tuple[str, ...]) -> list[str]:
    """The cells that are neither pass nor n/a with the backend's reason."""
    out = []
    for p, r in results.items():
        if r.status == "pass":
            continue
        if r.status != "na":
            out.append(f"{p}: {r.status} ({r.failure_kind}) {r.detail[:300]}")
        elif set(PROPERTIES[p].needs) & set(caps) and not any(reason(c) in r.detail or "the backend has no" in r.detail
                                                               for c in caps):
            out.append(f"{p}: n/a without the backend's reason: {r.detail}")
    return out


ALL = tuple(CAPABILITIES)


def test_every_property_on_a_backend_lacking_every_capability():
    be = lacking(*ALL)
    bad = _bad(_run(be, PROPERTIES), ALL)
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def touched() -> dict[str, set]:
    """What each property touched on the backend lacking nothing: backend members and capabilities asked."""
    out = {}
    for p in PROPERTIES:
        trace: set = set()
        r = _run(lacking(trace=trace), [p])[p]
        assert r.status in ("pass", "na"), (p, r.status, r.detail)
        out[p] = trace
    return out


@pytest.mark.parametrize("cap", sorted(set(OWN) | set(PLAIN)))
def test_every_property_touching_a_capability_without_it(cap, touched):
    props = [p for p, t in touched.items() if cap in t or set(METHODS.get(cap, ())) & t or cap in PROPERTIES[p].needs]
    assert props or cap in ("quantized",), cap
    bad = _bad(_run(lacking(cap), props), (cap,))
    assert not bad, "\n".join(bad)


def test_the_worked_example_on_every_property(monkeypatch):
    """tinylib (examples/tinylib_backend.py) on every property, LoRA and IA3: pass or n/a."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    import tinylib_backend

    be = tinylib_backend.TinylibBackend()
    for v in ("lora", "ia3"):
        res = {p: run_property(PROPERTIES[p], SPECS.get(v), be, "conformance") for p in PROPERTIES}
        bad = [f"{v}/{p}: {r.status} {r.detail[:300]}" for p, r in res.items() if r.status not in ("pass", "na")]
        assert not bad, "\n".join(bad)
