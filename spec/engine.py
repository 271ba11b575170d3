"""Runs a property on a spec through a backend with Hypothesis, and turns the outcome into a Result.

Results flow one way: spec -> generated property -> Result -> JSON (build/verify/<backend>.json) -> report.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings

from .properties import PROPERTIES, Falsified, Property
from .schema import Spec

SCHEMA = "lora-verify/results/1"
STATUSES = ("pass", "fail", "deviation", "na")

_COMMON = dict(deadline=None, database=None, print_blob=True, report_multiple_bugs=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.differing_executors])
settings.register_profile("verify", derandomize=True, max_examples=20, **_COMMON)
settings.register_profile("ci", derandomize=True, max_examples=20, **_COMMON)
settings.register_profile("dev", derandomize=False, max_examples=200, **_COMMON)
settings.register_profile("zoo", derandomize=True, max_examples=20,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)


@dataclass
class Result:
    variant: str
    property: str
    status: str  # pass | fail | deviation | na
    detail: str = ""
    worst_error: float | None = None
    example: str | None = None
    examples: int = 0
    seconds: float = 0.0
    failure_kind: str | None = None  # assertion | crash

    def to_json(self) -> dict:
        return asdict(self)


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def run_property(prop: Property, spec: Spec, backend, profile: str = "verify", device: str = "cpu") -> Result:
    """Run one property on one spec; never raises for a property failure."""
    na = backend.applies(spec) or prop.applies(spec, backend)
    if na:
        return Result(spec.name, prop.name, "na", detail=na)
    base = settings.get_profile(profile)
    n = base.max_examples if prop.max_examples is None else min(base.max_examples, prop.max_examples)
    state = {"case": None, "n": 0, "worst": None}

    @settings(base, max_examples=n)
    @given(case=prop.strategy(spec, device))
    def run(case):
        state["case"] = case
        state["n"] += 1
        w = prop.check(spec, backend, case)
        if w is not None:
            state["worst"] = w if state["worst"] is None else max(state["worst"], w)

    t0 = time.perf_counter()
    status, detail, kind = "pass", "", None
    try:
        run()
    except BaseException as e:  # noqa: BLE001 - every failure becomes a Result
        e = _first(e)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        status = "fail"
        kind = "assertion" if isinstance(e, (Falsified, AssertionError)) else "crash"
        detail = str(e) if kind == "assertion" else f"{type(e).__name__}: {e}"
    res = Result(spec.name, prop.name, status, detail, state["worst"],
                 None if status == "pass" else repr(state["case"]), state["n"], round(time.perf_counter() - t0, 3), kind)
    dev = spec.deviation(prop.name, backend.name)
    if dev is not None and status == "fail":
        res.status = "deviation"
        res.detail = f"declared: {dev.reason}" + (f" [{dev.source}]" if dev.source else "") + f"; observed: {detail}"
    return res


def table(results: list[dict], variants: list[str], properties: list[str]) -> str:
    """A variant x property table in plain text: pass '.', fail 'F', declared deviation 'D', n/a '-'."""
    mark = {"pass": ".", "fail": "F", "deviation": "D", "na": "-"}
    by = {(r["variant"], r["property"]): r["status"] for r in results}
    w = max(len(v) for v in variants) + 1
    lines = [" " * w + " ".join(f"{i:>2}" for i in range(len(properties)))]
    for v in variants:
        lines.append(f"{v:<{w}}" + " ".join(f"{mark.get(by.get((v, p)), '?'):>2}" for p in properties))
    lines.append("")
    lines += [f"{i:>2} {p}" for i, p in enumerate(properties)]
    lines.append("legend: . pass  F fail  D declared deviation  - not applicable  ? not run")
    return "\n".join(lines)


def quantized_matrix(results: list[dict], specs: dict[str, Spec]) -> dict[str, dict]:
    """Declared vs observed support on bitsandbytes layers, from the `quantized` property's results."""
    out = {}
    for r in results:
        if r["property"] != "quantized" or r["status"] == "na":
            continue
        declared = specs[r["variant"]].quantized
        observed = declared if r["status"] == "pass" else f"differs: {r['detail'][:120]}"
        out[r["variant"]] = {"declared": declared, "bnb4": observed, "bnb8": observed}
    return out


def write_json(path: Path, payload: dict) -> None:
    from impl.checkpoint import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


def default_properties() -> list[str]:
    return list(PROPERTIES)
