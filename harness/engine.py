"""Runs a property on a spec through a backend with Hypothesis, and turns the outcome into a Result.

Results flow one way: spec -> generated property -> Result -> JSON (build/verify/<backend>.json) -> report.
"""
from __future__ import annotations

import json
import sysconfig
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from .backends.protocol import rejects
from .checks import outcomes_of
from .probes import PROPERTIES, Falsified, Property
from spec.schema import Spec
from .strategies import Case

SCHEMA = "lora-verify/results/2"  # 2: adds `specs` (spec records) and `findings` (mechanical)
STATUSES = ("pass", "fail", "deviation", "na")

_COMMON = dict(deadline=None, database=None, print_blob=True, report_multiple_bugs=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.differing_executors])
settings.register_profile("verify", derandomize=True, max_examples=20, **_COMMON)
settings.register_profile("ci", derandomize=True, max_examples=20, **_COMMON)
settings.register_profile("history", derandomize=True, max_examples=3, **_COMMON)  # tools.peft_history: 13+ releases
settings.register_profile("dev", derandomize=False, max_examples=200, **_COMMON)
settings.register_profile("zoo", derandomize=True, max_examples=20,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)


@dataclass
class Result:
    """The outcome of one property on one variant.

    status: pass | fail | deviation (a failure the spec declares, with its reason) | na (not applicable; `detail`
    says why). detail: what broke, or why n/a. worst_error: the largest scaled error the property measured
    over the examples it ran (the failing one included, where its check reports a size): a dimensionless
    ratio, error / (size of the adapter's contribution + eps * size of the output), with max-abs norms over
    the whole tensor (harness.tolerance.scaled_error); None when the property measures no error (a
    structural check) or crashed before measuring one; 0.0 for exact checks that held. example: the
    minimal falsifying case (repr of harness.strategies.Case). examples: how many examples ran. seconds:
    wall time. failure_kind: "assertion" (the property's check failed) or "crash" (the code under test
    raised); where: for a crash, the innermost frame of the code under test as "file:line in function: source".
    """

    variant: str
    property: str
    status: str  # pass | fail | deviation | na
    detail: str = ""
    worst_error: float | None = None
    example: str | None = None
    examples: int = 0
    seconds: float = 0.0
    failure_kind: str | None = None  # assertion | crash
    where: str | None = None  # crash site in the code under test
    # one verdict per check of a property made of several (harness.checks): [{name, status, detail, failure_kind,
    # where}], a check failing if it failed on any example; absent from the JSON row for a single-check property
    checks: list[dict] | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        if d["checks"] is None:
            del d["checks"]
        return d


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


_LIBRARY_DIRS = tuple({str(Path(sysconfig.get_paths()[k]).resolve()) for k in ("stdlib", "purelib", "platlib")})
_HARNESS_DIR = str(Path(__file__).resolve().parent)


def _is_library(filename: str) -> bool:
    """Python's own library, an installed package, or this harness: code that is not under test."""
    f = str(Path(filename).resolve())
    return f.startswith(_LIBRARY_DIRS + (_HARNESS_DIR,)) or "site-packages" in f or f.startswith("<")


def crash_site(exc: BaseException, own_files: set[str] = frozenset()) -> str | None:
    """The innermost traceback frame of the code under test, as "file:line in function: source".

    Prefers frames in `own_files` (the files that define the variant and its spec); otherwise the innermost
    frame outside Python's library, installed packages and the harness. None when every frame is library code.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    own = {str(Path(f).resolve()) for f in own_files}
    mine = [f for f in frames if str(Path(f.filename).resolve()) in own] or \
        [f for f in frames if not _is_library(f.filename)]
    if not mine:
        return None
    f = mine[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def variant_files(spec: Spec) -> set[str]:
    """The source files that define a variant: its registered impl class (if any) and its spec's oracles."""
    import inspect

    from impl.registry import REGISTRY

    files = {fn.__code__.co_filename for fn in (spec.oracle, spec.init_oracle) if hasattr(fn, "__code__")}
    if spec.name in REGISTRY.names():
        try:
            files.add(inspect.getfile(REGISTRY.get(spec.name)))
        except (TypeError, OSError):
            pass
    return files


def run_property(prop: Property, spec: Spec, backend, profile: str = "verify", device: str = "cpu") -> Result:
    """Run one property on one spec; never raises for a property failure."""
    property_na = getattr(backend, "property_na", None)
    na = backend.applies(spec) or (property_na and property_na(spec, prop.name)) or prop.applies(spec, backend)
    if na:
        return Result(spec.name, prop.name, "na", detail=na)
    base = settings.get_profile(profile)
    n = base.max_examples if prop.max_examples is None else min(base.max_examples, prop.max_examples)
    state = {"case": None, "n": 0, "worst": None}
    if declared_deviation(spec, prop.name, backend) is not None:  # a declared difference needs no minimal example:
        base = settings(base, phases=[p for p in base.phases if p != Phase.shrink])  # skip the (costly) shrinking

    if hasattr(backend, "supports"):  # cases the backend cannot take are not drawn (the backend says why)

        def admitted(drawn) -> bool:
            why = rejects(backend, spec, drawn)
            if why:
                state["refused"] = why
            return not why

        draw = prop.strategy
        prop = replace(prop, strategy=lambda spec, device: draw(spec, device).filter(admitted))

    prop = replace(prop, check=_noting_checks(prop.check, state, spec))  # (outside run: its source seeds the draw)

    # (the derandomized profiles seed Hypothesis with a hash of run's source, decorators included: a change
    # to these lines changes every drawn case)
    @settings(base, max_examples=n)
    @given(case=prop.strategy(spec, device))
    def run(case):
        state["case"] = case
        state["n"] += 1
        w = prop.check(spec, backend, case)
        if w is not None:
            state["worst"] = w if state["worst"] is None else max(state["worst"], w)

    t0 = time.perf_counter()
    status, detail, kind, where = "pass", "", None, None
    try:
        run()
    except Unsatisfiable:
        return Result(spec.name, prop.name, "na",
                      detail=f"{backend.name} supports none of the drawn cases: {state.get('refused')}")
    except BaseException as e:  # noqa: BLE001 - every failure becomes a Result
        e = _first(e)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        status = "fail"
        kind = "assertion" if isinstance(e, (Falsified, AssertionError)) else "crash"
        detail = str(e) if kind == "assertion" else f"{type(e).__name__}: {e}"
        if kind == "crash":
            where = crash_site(e, variant_files(spec))
            detail += f" [at {where}]" if where else ""
        size = getattr(e, "size", None)
        if size is not None:
            state["worst"] = max(state["worst"] or 0.0, float(size))
    res = Result(spec.name, prop.name, status, detail, state["worst"],
                 None if status == "pass" else repr(state["case"]), state["n"], round(time.perf_counter() - t0, 3), kind,
                 where, list(state["checks"].values()) if state.get("checks") else None)
    dev = declared_deviation(spec, prop.name, backend)
    if dev is None or (status == "fail" and dev.match and dev.match not in detail):
        return res
    declared = f"declared: {dev.reason}" + (f" [{dev.source}]" if dev.source else "")
    if dev.size is not None:
        measured, note = measure_deviation(prop, spec, backend, dev, device)
        if measured is None or not 0.5 * dev.size <= measured <= 2.0 * dev.size:
            res.status, res.failure_kind = "fail", "assertion"
            res.detail = (f"{declared}; its size on the declared case {dict(dev.case)} was {dev.size:.3g}, "
                          f"now {note}: outside 0.5x-2x")
            return res
        res.status, res.detail = "deviation", f"{declared}; size {measured:.3g} (declared {dev.size:.3g}); observed: {detail or note}"
        return res
    if status == "fail":
        res.status = "deviation"
        res.detail = f"{declared}; observed: {detail}"
        for c in res.checks or ():  # the failing checks the declared deviation covers
            if c["status"] == "fail" and (not dev.match or dev.match in c["detail"]):
                c["status"] = "deviation"
    return res


def _noting_checks(check, state: dict, spec: Spec):
    """The property's check, noting each example's check outcomes (harness.checks) in state['checks'] and
    returning its worst error as a plain float."""

    def noted(spec_, backend, case):
        try:
            w = check(spec_, backend, case)
        except BaseException as e:
            _note_checks(state, spec, outcomes_of(_first(e)))
            raise
        _note_checks(state, spec, outcomes_of(w))
        return None if w is None else float(w)

    return noted


def _note_checks(state: dict, spec: Spec, outcomes) -> None:
    """Fold one example's check outcomes into state['checks'] (name -> row): a check fails once it fails on some
    example; its detail is that of the latest failing example (Hypothesis replays the minimal one last)."""
    rows = state.setdefault("checks", {})
    for o in outcomes or ():
        row = rows.setdefault(o.name, {"name": o.name, "status": "pass", "detail": "", "failure_kind": None,
                                       "where": None})
        e = o.error
        if e is None:
            continue
        assertion = isinstance(e, AssertionError)
        row.update(status="fail", failure_kind="assertion" if assertion else "crash",
                   detail=str(e) if assertion else f"{type(e).__name__}: {e}", where=None)
        if not assertion:
            row["where"] = crash_site(e, variant_files(spec))
            row["detail"] += f" [at {row['where']}]" if row["where"] else ""


def declared_deviation(spec: Spec, prop: str, backend):
    """The spec's deviation for (property, backend), else a backend-wide one (a design choice of the backend)."""
    dev = spec.deviation(prop, backend.name)
    if dev is None and hasattr(backend, "deviation"):
        dev = backend.deviation(spec, prop)
    return dev


def case_of(fields: dict, device: str = "cpu") -> Case:
    """A Case from a deviation's declared fixed case (dtype by name)."""
    import torch

    f = dict(fields)
    f["dtype"] = getattr(torch, f.get("dtype", "float32"))
    f["fields"] = dict(f.get("fields", {}))
    if "batch" in f:
        f["batch"] = tuple(f["batch"])
    return Case(device=device, **f)


def measure_deviation(prop: Property, spec: Spec, backend, dev, device: str) -> tuple[float | None, str]:
    """Run the property once on the deviation's fixed case: (measured size or None, what happened)."""
    try:
        w = prop.check(spec, backend, case_of(dev.case, device))
    except Falsified as e:
        size = getattr(e, "size", None)
        if size is None:
            return None, f"failed without reporting a size ({e})"
        if dev.match and dev.match not in str(e):
            return None, f"a different failure: {e}"
        return float(size), f"{float(size):.3g} ({e})"
    except Exception as e:  # noqa: BLE001 - a crash on the declared case is reported, not raised
        return None, f"crashed: {type(e).__name__}: {e}"
    return (float(w) if w is not None else 0.0), f"{0.0 if w is None else float(w):.3g} (the property passed)"


def table(results: list[dict], variants: list[str], properties: list[str]) -> str:
    """A variant x property table in plain text: pass '.', failed check 'F', crash 'E', declared deviation 'D',
    n/a '-'."""
    mark = {"pass": ".", "fail": "F", "crash": "E", "deviation": "D", "na": "-"}
    by = {(r["variant"], r["property"]): "crash" if r.get("failure_kind") == "crash" and r["status"] == "fail"
          else r["status"] for r in results}
    w = max(len(v) for v in variants) + 1
    lines = [" " * w + " ".join(f"{i:>2}" for i in range(len(properties)))]
    for v in variants:
        lines.append(f"{v:<{w}}" + " ".join(f"{mark.get(by.get((v, p)), '?'):>2}" for p in properties))
    lines.append("")
    lines += [f"{i:>2} {p}" for i, p in enumerate(properties)]
    lines.append("legend: . pass  F failed check  E crash  D declared deviation  - not applicable  ? not run")
    return "\n".join(lines)


def changes(previous: list[dict], current: list[dict]) -> dict[str, list[str]]:
    """What changed between two runs' results, over the (variant, property) pairs both ran: `new_failures`
    (not failing before, failing now), `fixed` (failing before, not now), `other` (any other status change,
    as "variant/property: old -> new")."""
    before = {(r["variant"], r["property"]): r["status"] for r in previous}
    out: dict[str, list[str]] = {"new_failures": [], "fixed": [], "other": []}
    for r in current:
        key = (r["variant"], r["property"])
        old, new = before.get(key), r["status"]
        if old is None or old == new:
            continue
        name = "/".join(key)
        if new == "fail":
            out["new_failures"].append(name)
        elif old == "fail":
            out["fixed"].append(name)
        else:
            out["other"].append(f"{name}: {old} -> {new}")
    return out


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
    from impl.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


def default_properties() -> list[str]:
    return list(PROPERTIES)
