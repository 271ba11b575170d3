"""The bug zoo: deliberately broken variants, each a real bug class, run through the same engine.

A mutant is a subclass of a real variant with one bug (or, for bugs in runtime parts a variant relies on, a
patch active while it runs), optionally with the same change made to its spec (a "shared misreading" that
only an independent implementation can catch). Each names the property that must flag it. Every module
`harness/zoo/<variant>.py` contributes a `MUTANTS` list.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from impl.registry import REGISTRY, Variant
from spec import SPECS
from harness.backends.peft_maps import MAPS as PEFT_MAPS
from harness.engine import Result, run_property
from harness import PROPERTIES


@dataclass(frozen=True)
class Mutant:
    name: str  # "<variant>.<bug>"
    variant: type[Variant]  # the broken implementation (a subclass of the real one)
    expects: str  # the property that names this bug
    bug: str  # what is wrong
    spec_changes: dict[str, Any] = field(default_factory=dict)  # shared misreading: the spec changed alike
    square: bool = False  # the bug breaks shapes: run on square layers, where it computes a wrong value
    patch: Callable[[], contextlib.AbstractContextManager] | None = None  # runtime bug active while it runs

    @property
    def base(self) -> str:
        return self.name.split(".", 1)[0]


@contextlib.contextmanager
def checkpoint_without(suffix: str):
    """A runtime bug: save silently leaves out every tensor whose key ends with `suffix`."""
    from unittest import mock

    from impl import checkpoint

    real = checkpoint.serialize

    def serialize(tensors, metadata):
        return real({k: v for k, v in tensors.items() if not k.endswith(suffix)}, metadata)

    with mock.patch.object(checkpoint, "serialize", serialize):
        yield


def all_mutants() -> list[Mutant]:
    out: list[Mutant] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        out += importlib.import_module(f"{__name__}.{info.name}").MUTANTS
    return out


@contextlib.contextmanager
def installed(m: Mutant):
    """Register the mutant under its own name for the duration; yield its spec."""
    zname = "zoo_" + m.name.replace(".", "_")
    cls = type(zname, (m.variant,), {"name": zname})
    REGISTRY.register(cls)
    spec = dataclasses.replace(SPECS.get(m.base), name=zname, square_only=m.square, **m.spec_changes)
    if m.base in PEFT_MAPS:  # the mutant keeps its variant's PEFT counterpart (the reference_* properties)
        PEFT_MAPS[zname] = PEFT_MAPS[m.base]
    try:
        with m.patch() if m.patch else contextlib.nullcontext():
            yield spec
    finally:
        REGISTRY.unregister(zname)
        PEFT_MAPS.pop(zname, None)


def run_mutant(m: Mutant, profile: str = "zoo") -> Result:
    """Run the property that must flag the mutant; the Result's status is 'fail' when it is caught."""
    from harness.backends import ImplBackend

    with installed(m) as spec:
        return run_property(PROPERTIES[m.expects], spec, ImplBackend(), profile)


def detected(res: Result) -> bool:
    """Caught by the named property's own assertion, not by a crash."""
    return res.status == "fail" and res.failure_kind == "assertion"


def report(mutants: list[Mutant], results: list[Result]) -> dict:
    rows = [{"mutant": m.name, "variant": m.base, "property": m.expects, "bug": m.bug, "detected": detected(r),
             "status": r.status, "failure_kind": r.failure_kind, "detail": r.detail[:300], "seconds": r.seconds}
            for m, r in zip(mutants, results)]
    n = sum(r["detected"] for r in rows)
    return {"schema": "lora-verify/zoo/1", "detected": n, "total": len(rows),
            "rate": n / len(rows) if rows else 0.0, "mutants": rows}


def dumps(rep: dict) -> str:
    return json.dumps(rep, indent=1, sort_keys=True) + "\n"
