"""Runs a property on a spec through a backend with Hypothesis, and turns the outcome into a Result.

Results flow one way: spec -> generated property -> Result -> JSON (build/verify/<backend>.json) -> report.
"""
from __future__ import annotations

import json
import signal
import sysconfig
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis.errors import Unsatisfiable

from .backends.protocol import (Deviations, FullBackend, LibraryDefaults, PropertyNA, ReleaseDeviations, SourceClass,
                                Supports, has, rejects)
from .checks import outcomes_of
from .probes import PROPERTIES, Falsified, Property
from spec.schema import Deviation, Spec
from .strategies import Case

SCHEMA = "lora-verify/results/2"  # 2: adds `specs` (spec records) and `findings` (mechanical)
STATUSES = ("pass", "fail", "deviation", "na")

_COMMON = dict(deadline=None, database=None, print_blob=True, report_multiple_bugs=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.differing_executors])
# Every phase but explain. Explain only annotates the printed falsifying example (which parts could vary), a note a
# row never stores (its detail is the exception's message, its example the minimal case), and it cost most of a
# failing property's time: after the first failure every shrink step ran under a line tracer (sys.settrace), and
# after the shrink each drawn argument was replayed up to 100+ times (PEFT 0.15.2 bone/model_merge_unload: 190 of
# 285 s). The verdicts and minimal examples are the shrink's, as before.
_PHASES = tuple(p for p in Phase if p is not Phase.explain)
settings.register_profile("verify", derandomize=True, max_examples=20, phases=_PHASES, **_COMMON)
settings.register_profile("ci", derandomize=True, max_examples=20, phases=_PHASES, **_COMMON)
settings.register_profile("history", derandomize=True, max_examples=3, phases=_PHASES, **_COMMON)  # tools.peft_history: 13+ releases
settings.register_profile("dev", derandomize=False, max_examples=200, phases=_PHASES, **_COMMON)
settings.register_profile("zoo", derandomize=True, max_examples=20,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)

# One property (all its examples, shrinking and the deviation's measurement) may take this long per 20 examples of
# its profile before its row is a failure naming the limit (`tools.verify --deadline-s` sets another; 0: none). The
# slowest property measured, PEFT's dora/quantized at 20 examples, took 145 s on 2 cores under a load of 14; the
# limit is only for code that never returns.
DEFAULT_DEADLINE_S = 900.0


def default_deadline(profile: str) -> float:
    """The profile's per-property limit: DEFAULT_DEADLINE_S per 20 examples (verify, ci: 900 s; dev: 9000 s)."""
    return DEFAULT_DEADLINE_S * max(1.0, settings.get_profile(profile).max_examples / 20)
TEXT_CAP = 4000  # characters of an exception message, a detail or an example that a row stores


def cap_text(text: str | None, limit: int = TEXT_CAP) -> str | None:
    """`text` cut to `limit` characters, with a note of how many were cut (a 50 MB exception message must not
    become a 50 MB results JSON)."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f" [... {len(text) - limit} more characters cut]"


def _text(e: BaseException) -> str:
    """An exception's message, capped before it is joined to anything."""
    try:
        return cap_text(str(e))
    except Exception as err:  # noqa: BLE001 - a __str__ that raises still gives a row
        return f"<str() raised {type(err).__name__}>"


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {_text(e)}"


class PropertyDeadline(BaseException):
    """A property overran its deadline. A BaseException, so that Hypothesis does not take it for a failing example
    (and shrink it, running the hanging code again): it ends the property at once."""


class Deadline:
    """Raises PropertyDeadline in this thread once `seconds` have passed (SIGALRM), and again every second while
    `active` (code under test that swallows it does not escape). No limit for None or 0, or outside the main thread
    (signals reach only it). A hang inside C code that never returns to Python is not interrupted: its process or
    xdist worker is then lost, which the run records as a crash. Set `active = False` first, then `stop()`: a
    signal already on its way then raises nothing."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.old = seconds, None
        self.active = bool(seconds and seconds > 0 and threading.current_thread() is threading.main_thread())
        if self.active:
            self.old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)

    def _fire(self, signum, frame):
        if self.active:
            raise PropertyDeadline(self.seconds)

    def stop(self) -> None:
        self.active = False
        if self.old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)
            self.old = None


@dataclass
class Result:
    """The outcome of one property on one variant.

    status: pass | fail | deviation (a failure the spec declares, with its reason) | na (not applicable; `detail`
    says why). detail: what broke, or why n/a. worst_error: the largest scaled error the property measured
    over the examples it ran (the failing one included, where its check reports a size): the measured error
    divided by the largest error a correct implementation may show (harness.tolerance.within: passes at <= 1);
    None when the property measures no error (a
    structural check) or crashed before measuring one; 0.0 for exact checks that held. example: the
    minimal falsifying case (repr of harness.strategies.Case). examples: how many examples ran. seconds:
    wall time. failure_kind: "assertion" (the property's check failed) or "crash" (the code under test
    raised); where: for a crash, the innermost frame of the code under test as "file:line in function: source"; for
    a failed check, the implementation's method whose result it judged ("file:line in Class.method").
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
    unchecked: bool = False  # n/a, but the spec declares something only this property checks (Property.gap)
    # one verdict per check of a property made of several (harness.checks): [{name, status, detail, failure_kind,
    # where}], a check failing if it failed on any example; absent from the JSON row for a single-check property
    checks: list[dict] | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        for k in ("detail", "example", "where"):  # a detail is a (capped) message plus its context
            out[k] = cap_text(out[k], 2 * TEXT_CAP)
        if out["checks"] is None:
            del out["checks"]
        return out


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


# Packages the harness itself runs on: never the library under test (a crash inside torch is reported at the
# library's line that called it).
FRAMEWORK = ("torch", "hypothesis", "_pytest", "pluggy", "numpy", "safetensors")


def _is_framework(filename: str) -> bool:
    """Python's own library, this harness, or a package of FRAMEWORK: code that is not the library under test."""
    f = Path(filename).resolve()
    parts = f.parts
    if "site-packages" in parts or "dist-packages" in parts:
        i = max(i for i, p in enumerate(parts) if p in ("site-packages", "dist-packages"))
        return i + 1 < len(parts) and parts[i + 1] in FRAMEWORK
    return str(f).startswith(_LIBRARY_DIRS + (_HARNESS_DIR,)) or filename.startswith("<")


def _site(f: traceback.FrameSummary) -> str:
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def crash_site(exc: BaseException, own_files: set[str] | frozenset[str] = frozenset(),
               backend_files: set[str] | frozenset[str] = frozenset()) -> str | None:
    """The innermost traceback frame of the code under test, as "file:line in function: source", followed by
    " (called from <the backend's frame>)" when a backend method led to it.

    Prefers frames in `own_files` (the files that define the variant and its spec); else, past the innermost
    frame in `backend_files` (the backend's module), the innermost frame of the library under test (outside the
    harness, Python's library and FRAMEWORK), or that backend frame itself when the backend raised; else the
    innermost frame outside Python's library, installed packages and the harness. None when every frame is
    library code.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    res = [str(Path(f.filename).resolve()) for f in frames]
    own = {str(Path(f).resolve()) for f in own_files}
    backend = [i for i, r in enumerate(res) if r in {str(Path(f).resolve()) for f in backend_files}]
    mine = [i for i, r in enumerate(res) if r in own]
    if not mine and backend:
        k = backend[-1]
        mine = [i for i in range(k + 1, len(frames)) if not _is_framework(frames[i].filename)] or [k]
    if not mine:
        mine = [i for i, f in enumerate(frames) if not _is_library(f.filename)]
    if not mine:
        return None
    i = mine[-1]
    caller = [j for j in backend if j < i]
    return _site(frames[i]) + (f" (called from {_site(frames[caller[-1]])})" if caller else "")


def backend_files(backend: object) -> set[str]:
    """The source files of the backend's class and its bases (its module: where its methods call the library)."""
    import inspect

    out = set()
    for cls in type(backend).__mro__[:-1]:
        try:
            out.add(inspect.getfile(cls))
        except (TypeError, OSError):
            pass
    return out


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


FRAMES = {"forward": ("forward", "forward_input"), "init": ("init", "group_init", "tensors"), "merged": ("merged",)}


def method_site(backend: FullBackend, spec: Spec, frame: str) -> str | None:
    """Where the implementation's method for `frame` (forward, init, merged) is defined, as "file:line in
    Class.method": the first of FRAMES[frame] that the variant's class (the backend's `source_class`) or a base of
    it below impl's Variant defines (a data-driven spec's init: its group_init first). None where the backend names
    no class (a library verified through its API) or the class defines none of them."""
    import inspect

    cls = backend.source_class(spec) if has(backend, SourceClass) else None
    if cls is None:
        return None
    names = FRAMES.get(frame, ())
    if frame == "init" and spec.data != "none":
        names = ("group_init", "init", "tensors")
    for name in names:
        for c in cls.__mro__:
            fn = c.__dict__.get(name)
            if fn is None or c.__module__ == "impl.registry":
                continue
            try:
                path, line = inspect.getsourcefile(fn), inspect.getsourcelines(fn)[1]
            except (OSError, TypeError):
                break
            return f"{path}:{line} in {c.__name__}.{name}"
    return None


def library_files(backend: FullBackend, spec: Spec) -> set[str]:
    """The file of the class an outside library implements the variant with (`source_class(spec)`): its frames
    are the code under test even inside site-packages."""
    import inspect

    cls = backend.source_class(spec) if has(backend, SourceClass) else None
    try:
        return {inspect.getfile(cls)} if cls is not None else set()
    except (TypeError, OSError):
        return set()


def run_property(prop: Property, spec: Spec, backend: FullBackend, profile: str = "verify", device: str = "cpu",
                 deadline_s: float | None = None, interrupted=None) -> Result:
    """Run one property on one spec; never raises for a property failure, a crash of any kind (SystemExit
    included) or a property that overran `deadline_s` seconds (None: the profile's default_deadline; 0: no limit):
    each is a failed row. A KeyboardInterrupt is
    re-raised when `interrupted()` says the user pressed Ctrl-C (or when no `interrupted` is given), else it is a
    crash of the code under test."""
    state: dict = {}
    t0 = time.perf_counter()
    deadline_s = default_deadline(profile) if deadline_s is None else deadline_s
    limit = Deadline(deadline_s)
    try:
        try:
            return _run_property(prop, spec, backend, profile, device, interrupted, state)
        finally:
            limit.active = False  # before any call: a signal arriving now raises nothing
            limit.stop()
    except PropertyDeadline:
        return Result(spec.name, prop.name, "fail",
                      f"timeout: the property did not finish within its deadline of {deadline_s:g} s (after "
                      f"{state.get('n', 0)} example(s); tools.verify --deadline-s sets the limit)",
                      state.get("worst"), cap_text(repr(state.get("case"))), state.get("n", 0),
                      round(time.perf_counter() - t0, 3), "crash")


def _run_property(prop: Property, spec: Spec, backend: FullBackend, profile: str, device: str, interrupted,
                  state: dict) -> Result:
    na = (backend.applies(spec) or (has(backend, PropertyNA) and backend.property_na(spec, prop.name))
          or prop.applies(spec, backend))
    if na:
        return Result(spec.name, prop.name, "na", detail=na, unchecked=bool(prop.gap(spec)))
    base = settings.get_profile(profile)
    n = base.max_examples if prop.max_examples is None else min(base.max_examples, prop.max_examples)
    state.update(case=None, n=0, worst=None)
    if declared_deviation(spec, prop.name, backend) is not None:  # a declared difference needs no minimal example:
        base = settings(base, phases=[p for p in base.phases if p != Phase.shrink])  # skip the (costly) shrinking

    first = defaults_case(spec, backend, device) if getattr(prop.strategy, "draws_case", False) else None
    if first is not None and rejects(backend, spec, first):
        first = None
    if has(backend, Supports):  # cases the backend cannot take are not drawn (the backend says why)

        def admitted(drawn) -> bool:
            why = rejects(backend, spec, drawn)
            if why:
                state["refused"] = why
            return not why

        draw = prop.strategy
        prop = replace(prop, strategy=lambda spec, device: draw(spec, device).filter(admitted))

    check = prop.check

    def noting(spec, backend, case):  # keeps the notes a passing check returns (probes.Noted) for the detail
        w = check(spec, backend, case)
        if getattr(w, "note", None):
            state.setdefault("notes", set()).add(w.note)
        return w

    # (outside run: its source seeds the draw) the check's notes, and each example's check outcomes
    prop = replace(prop, check=_noting_checks(noting, state, spec))

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

    if first is not None:  # applied here, not as a decorator: run's source (the derandomized seed) is unchanged
        run = example(case=first)(run)
    t0 = time.perf_counter()
    status, detail, kind, where = "pass", "", None, None
    try:
        run()
    except Unsatisfiable:
        return Result(spec.name, prop.name, "na",
                      detail=f"{backend.name} supports none of the drawn cases: {state.get('refused')}")
    except BaseException as e:  # noqa: BLE001 - every failure becomes a Result
        e = _first(e)
        if isinstance(e, PropertyDeadline) or (
                isinstance(e, KeyboardInterrupt) and (interrupted is None or interrupted())):
            raise e
        status = "fail"
        kind = "assertion" if isinstance(e, (Falsified, AssertionError)) else "crash"
        detail = _text(e) if kind == "assertion" else _message(e)
        if kind == "crash":
            where = crash_site(e, variant_files(spec) | library_files(backend, spec), backend_files(backend))
            detail += f" [at {where}]" if where else ""
        elif prop.frame:  # the implementation's method whose result the check judged
            where = method_site(backend, spec, prop.frame)
            detail += f" [judged: {where}]" if where else ""
        size = getattr(e, "size", None)
        if size is not None:
            state["worst"] = max(state["worst"] or 0.0, float(size))
    if status == "pass" and state.get("notes"):
        detail = "; ".join(sorted(state["notes"]))
    res = Result(spec.name, prop.name, status, detail, state["worst"],
                 None if status == "pass" else cap_text(repr(state["case"])), state["n"],
                 round(time.perf_counter() - t0, 3), kind, where,
                 checks=list(state["checks"].values()) if state.get("checks") else None)
    dev = declared_deviation(spec, prop.name, backend)
    if dev is None or (status == "fail" and not explains(dev, detail, state["case"])):
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


def defaults_case(spec: Spec, backend: FullBackend, device: str = "cpu") -> Case | None:
    """The library's own default config as one case, run first by every property drawing plain cases: no field
    drawn (only the default r, carried for the code that reads case.fields["r"]), float32, with bias, on a
    non-square (3r, 2r) layer (square for a square-only spec), both multiples of r. A default
    nobody draws (an alpha of 0, a dead init) is then seen. None when the backend has no default r or the layer
    would be wider than twice the strategies' MAX_DIM."""
    import torch

    from .strategies import MAX_DIM

    if has(backend, LibraryDefaults):  # the library's own word on its defaults
        return backend.defaults_case(spec, device)
    try:
        r = int(backend.spec_config(spec, Case(1, 1, True, torch.float32, 0, {}, device=device)).fields["r"])
    except Exception:  # noqa: BLE001 - a backend whose config needs drawn fields has no default case
        return None
    d_out = max(2 * r, spec.min_width, 3)  # multiples of r: block-structured variants need r | d
    d_in = d_out if spec.square_only else 3 * r if 3 * r > d_out else d_out + 1
    if d_in > 2 * MAX_DIM or r > (spec.rank_limit(d_in, d_out) or r):
        return None
    return Case(d_in=d_in, d_out=d_out, bias=True, dtype=torch.float32, seed=0, fields={"r": r}, device=device)


def explains(dev: Deviation, detail: str, case) -> bool:
    """A declared deviation explains a failure whose detail its `match` matches (Deviation.matches) and whose
    failing example has one of its `dtypes` (a float64 rounding choice does not excuse a bf16 failure)."""
    if not dev.matches(detail):
        return False
    return not dev.dtypes or case is None or str(case.dtype).removeprefix("torch.") in dev.dtypes


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
                   detail=_text(e) if assertion else _message(e), where=None)
        if not assertion:
            row["where"] = crash_site(e, variant_files(spec))
            row["detail"] += f" [at {row['where']}]" if row["where"] else ""


def declared_deviation(spec: Spec, prop: str, backend: FullBackend):
    """The spec's deviation for (property, backend), unless the backend's installed release predates the behaviour
    it declares; else a backend-wide one (a design choice of the backend)."""
    dev = spec.deviation(prop, backend.name)
    if dev is not None and has(backend, ReleaseDeviations) and not backend.deviation_shipped(spec, dev):
        dev = None
    if dev is None and has(backend, Deviations):
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


def measure_deviation(prop: Property, spec: Spec, backend: FullBackend, dev, device: str) -> tuple[float | None, str]:
    """Run the property once on the deviation's fixed case: (measured size or None, what happened)."""
    try:
        w = prop.check(spec, backend, case_of(dev.case, device))
    except Falsified as e:
        size = getattr(e, "size", None)
        if size is None:
            return None, f"failed without reporting a size ({e})"
        if not dev.matches(str(e)):
            return None, f"a different failure: {e}"
        return float(size), f"{float(size):.3g} ({e})"
    except (Exception, SystemExit, GeneratorExit) as e:  # noqa: BLE001 - a crash on the declared case is reported
        return None, f"crashed: {_message(e)}"
    return (float(w) if w is not None else 0.0), f"{0.0 if w is None else float(w):.3g} (the property passed)"


def table(results: list[dict], variants: list[str], properties: list[str]) -> str:
    """A variant x property table in plain text: pass '.', failed check 'F', crash 'E', declared deviation 'D',
    n/a '-', unchecked 'U' (n/a, but the spec declares something only that property checks)."""
    mark = {"pass": ".", "fail": "F", "crash": "E", "deviation": "D", "na": "-", "unchecked": "U"}
    by = {(r["variant"], r["property"]): "crash" if r.get("failure_kind") == "crash" and r["status"] == "fail"
          else "unchecked" if r["status"] == "na" and r.get("unchecked") else r["status"] for r in results}
    w = max(len(v) for v in variants) + 1
    lines = [" " * w + " ".join(f"{i:>2}" for i in range(len(properties)))]
    for v in variants:
        lines.append(f"{v:<{w}}" + " ".join(f"{mark.get(by.get((v, p)), '?'):>2}" for p in properties))
    lines.append("")
    lines += [f"{i:>2} {p}" for i, p in enumerate(properties)]
    lines.append("legend: . pass  F failed check  E crash  D declared deviation  - not applicable  ? not run")
    lines.append("        U unchecked: not applicable, but the spec declares what only that property checks")
    return "\n".join(lines)


def changes(previous: list[dict], current: list[dict]) -> dict[str, list[str]]:
    """What changed between two runs' results: over the (variant, property) pairs both ran, `new_failures`
    (not failing before, failing now), `fixed` (failing before, not now), `other` (any other status change,
    as "variant/property: old -> new"); and `new`, the pairs the previous run did not have ("variant/property:
    status", e.g. a variant's first run)."""
    before = {(r["variant"], r["property"]): r["status"] for r in previous}
    out: dict[str, list[str]] = {"new_failures": [], "fixed": [], "other": [], "new": []}
    for r in current:
        key = (r["variant"], r["property"])
        old, new = before.get(key), r["status"]
        name = "/".join(key)
        if old is None:
            out["new"].append(f"{name}: {new}")
            continue
        if old == new:
            continue
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
        observed = declared if r["status"] == "pass" else f"differs: {r['detail']}"
        row = out[r["variant"]] = {"declared": declared, "bnb4": observed, "bnb8": observed}
        for lay in ("bnb4", "bnb8"):  # a kind the backend's release cannot run here (the pass's detail says why)
            if r["status"] == "pass" and f"{lay} not checked:" in (r.get("detail") or ""):
                row[lay] = "not checked (n/a here, see the detail)"
    return out


def _not_json(value) -> str:
    """What the JSON holds for a value it cannot (a backend's version given as an object): its type and text."""
    try:
        text = str(value)
    except Exception as e:  # noqa: BLE001
        text = f"<str() raised {type(e).__name__}>"
    return cap_text(f"<{type(value).__name__}: {text}>")


def encode_json(payload: dict) -> bytes:
    """The results JSON's bytes; a value JSON cannot hold becomes its `<type: text>` (one bad value never loses
    the run's results)."""
    return (json.dumps(payload, indent=1, sort_keys=True, default=_not_json) + "\n").encode()


def write_json(path: Path, payload: dict) -> None:
    from impl.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_json(payload))


def default_properties() -> list[str]:
    return list(PROPERTIES)
