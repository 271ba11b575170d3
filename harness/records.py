"""What the audit needs from the records, written into the verify results JSON so that the audit side reads JSON
and files only: each spec's declarations rendered as text lines, where its spec and implementation live, and the
mechanical findings that follow from the spec and the verify rows alone.

A mechanical finding is a dict: severity, category, claim, anchor (a fixed key that gives it its identity across
audits, e.g. `property:oracle`, `claim:<name>`) and `cite`, the places its evidence lies as (document, key):
document `verify` keys a property's row, `spec` a section of the rendered declarations (`declaration_at`).
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spec.schema import Spec

from .backends.peft_maps import peft_map

# Spec declaration -> the property that checks it, and how much it matters that nothing did.
DECLARATION_CHECKS = (
    ("equation", "the equation (float64 oracle)", "oracle", "medium"),
    ("init_oracle", "the init formula", "init_formula", "low"),
    ("knobs", "the runtime knobs", "knob_identity", "low"),
    ("constraints", "the config constraints", "config_constraints", "low"),
)


def rel(path: Path, root: Path) -> str:
    """`path` relative to the repository root (POSIX), or absolute when it lies outside it."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


def _indent(label: str, text: str) -> list[str]:
    """`label: text`, with continuation lines of a multi-line text indented under it."""
    parts = str(text).splitlines() or [""]
    return [f"{label}{parts[0]}"] + [" " * len(label) + p for p in parts[1:]]


def _where(fn: Any, root: Path) -> str:
    try:
        path = Path(inspect.getsourcefile(fn) or "")
        line = inspect.getsourcelines(fn)[1]
    except (TypeError, OSError):
        return "?"
    return f"{rel(path, root)}:{line}"


def declarations(spec: Spec, root: Path) -> tuple[list[str], dict[str, int]]:
    """The spec rendered as text lines (defaults included) and the line where each section, claim and
    deviation starts."""
    lines: list[str] = []
    at: dict[str, int] = {}

    def add(key: str | None, *new: str) -> None:
        if key is not None:
            at[key] = len(lines) + 1
        lines.extend(new)

    add("header", f"declarations of the spec of variant '{spec.name}' (rendered from spec.SPECS, defaults included)")
    add("title", *_indent("title: ", spec.title))
    add("equation", *_indent("equation (LaTeX): ", spec.equation))
    add("oracle", f"float64 oracle: {getattr(spec.oracle, '__name__', '?')} at {_where(spec.oracle, root)}")
    add("tensors", "tensors:")
    for t in spec.tensors:
        extra = f"; zero gradient at init: {t.zero_grad_at_init}" if t.zero_grad_at_init else ""
        add(f"tensor:{t.name}", *_indent(f"  - {t.name}: shape {t.shape}, init {t.init}, "
                                         f"{'trainable' if t.trainable else 'frozen'}", extra))
    add("param_count", f"parameter count: {spec.param_count}")
    add("identity", f"identity at init: {spec.identity} (tolerance factor {spec.identity_factor:g}, "
                    f"init_shrink {spec.init_shrink:g})")
    add("knobs", "knobs (value at which the layer is the identity): "
        + (", ".join(f"{k}={v:g}" for k, v in sorted(spec.knobs.items())) or "none"))
    add("bias", *_indent(f"bias: {spec.bias}", f" ({spec.bias_note})" if spec.bias_note else ""))
    add("dropout", f"dropout: {spec.dropout}")
    add("data", f"calibration data: {spec.data}")
    add("quantized", f"bitsandbytes layers: {spec.quantized}")
    add("rewrites_base", f"rewrites the base weight: {spec.rewrites_base}")
    add("shapes", f"min_width: {spec.min_width}; square_only: {spec.square_only}")
    add("init_oracle", "init oracle: " + (f"{getattr(spec.init_oracle, '__name__', '?')} at "
                                          f"{_where(spec.init_oracle, root)}" if spec.init_oracle else "none"))
    add("constraints", "config constraints:" + ("" if spec.constraints else " none"))
    for c in spec.constraints:
        add(None, *_indent(f"  - {c.text} (violated by {dict(c.bad)})", ""))
    add("claims", "claims:" + ("" if spec.claims else " none"))
    for cl in spec.claims:
        bound = f", bound {cl.bound:g}" if cl.kind == "bounded" else ""
        add(f"claim:{cl.name}", *_indent(f"  - claim {cl.name} [{cl.kind}{bound}]: ", cl.text))
    add("references", "references:" + ("" if spec.references else " none"))
    for r in spec.references:
        add(None, f"  - {r.label}: {r.url}")
    add("deviations", "declared deviations:" + ("" if spec.deviations else " none"))
    for d in spec.deviations:
        src = f" [{d.source}]" if d.source else ""
        add(f"deviation:{d.backend}:{d.property}", *_indent(f"  - property {d.property} (backend {d.backend}): ",
                                                            d.reason + src))
    peft = peft_map(spec)  # the PEFT backend's mapping of this variant
    if peft is None:
        add("peft", "PEFT mapping: none")
    else:
        add("peft", f"PEFT mapping: {peft.config}" + (" (feed-forward target)" if peft.feedforward else ""))
        for ours, (theirs, how) in sorted(peft.tensors.items()):
            add(None, f"  - {ours} -> {theirs} ({how})")
        if peft.notes:
            add(None, *_indent("  notes: ", peft.notes))
    if spec.notes:
        add("notes", *_indent("notes: ", spec.notes))
    return lines, at


# ----------------------------------------------------------------------------------------------- source files


def _module_file(name: str) -> Path | None:
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin and found.origin.endswith(".py") else None


def imported_modules(path: Path, module: str) -> list[str]:
    """Absolute names of the modules a Python file imports (relative imports resolved against `module`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.rsplit(".", 1)[0] if "." in module else ""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(p for p in base if p)
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]  # `from . import layers` names a module
    return sorted({m for m in out if m})


def class_file(cls: type) -> tuple[Path, str] | None:
    """(source file, module) of the first class in the MRO whose source can be found: a class made with type()
    (the zoo registers its mutants that way) has no source of its own, its base does."""
    for c in cls.__mro__:
        try:
            inspect.getsourcelines(c)
        except (OSError, TypeError):
            continue
        return Path(inspect.getsourcefile(c) or ""), c.__module__
    return None


def impl_files(cls: type | None, root: Path) -> tuple[Path | None, list[Path]]:
    """An implementation class's file and the `impl` modules it imports (the dependencies a reviewer reads)."""
    found = class_file(cls) if cls is not None else None
    if found is None:
        return None, []
    path, module = found
    deps = []
    for name in imported_modules(path, module):
        if name == "impl" or name.startswith("impl."):
            f = _module_file(name)
            if f is not None and f.resolve() != path.resolve() and f.name != "__init__.py":
                deps.append(f)
    return path, sorted(set(deps), key=lambda p: rel(p, root))


def spec_file(spec: Spec) -> Path | None:
    try:
        src = inspect.getsourcefile(spec.oracle)
    except TypeError:
        return None
    return Path(src) if src else None


def spec_record(spec: Spec, backend: Any, root: Path) -> dict:
    """Everything the audit reads about one variant's spec and implementation, as plain JSON. A backend that can
    name the class implementing a variant (`source_class(spec)`, None when it has none) gets its files listed."""
    finder = getattr(backend, "source_class", None)
    impl_class = finder(spec) if finder else None
    lines, at = declarations(spec, root)
    sf = spec_file(spec)
    impl_path, deps = impl_files(impl_class, root)
    return {
        "title": spec.title,
        "equation": spec.equation,
        "references": [{"label": r.label, "url": r.url} for r in spec.references],
        "declarations": lines,
        "declaration_at": at,
        "files": {"spec": rel(sf, root) if sf else None,
                  "impl": rel(impl_path, root) if impl_path else None,
                  "impl_deps": [rel(d, root) for d in deps],
                  "impl_expected": finder is not None and backend.applies(spec) is None},
    }


# ----------------------------------------------------------------------------------------------- findings


def record_findings(spec: Spec, record: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], backend: str,
                    properties: Iterable[str]) -> list[dict]:
    """The mechanical findings that follow from the spec and the verify rows: verify failures (high), failing
    differential oracles `reference_*` (high), declared deviations (info), oracles not applicable (low), claims and
    declarations that no property checked (medium for claims and the equation, low otherwise), a variant absent
    from the verify rows (medium) or without an implementation (high)."""
    by = {r["property"]: r for r in rows}
    known = set(properties)
    out: list[dict] = []

    def add(severity: str, category: str, claim: str, anchor: str, *cite: tuple[str, str]) -> None:
        out.append({"severity": severity, "category": category, "claim": claim, "anchor": anchor,
                    "cite": [list(c) for c in cite]})

    if record["files"]["impl"] is None and record["files"]["impl_expected"]:
        add("high", "no_implementation", f"no implementation of '{spec.name}' is registered in the backend", "impl")
    if not by:
        add("medium", "not_verified", f"the verify JSON has no results for '{spec.name}': nothing about it was "
            "checked", "verify", ("verify", "none"))
    for prop, r in by.items():
        oracle = prop.startswith("reference_")
        detail = (r.get("detail") or "").strip().splitlines()[0][:400] if r.get("detail") else ""
        if r["status"] == "fail":
            kind = "a crash" if r.get("failure_kind") == "crash" else "a failed check"
            what = "the differential oracle disagrees" if oracle else "the property fails"
            add("high", "oracle_mismatch" if oracle else "verify_failure", f"{prop}: {what} ({kind}): {detail}",
                f"property:{prop}", ("verify", prop))
        elif r["status"] == "deviation":
            dev = spec.deviation(prop, backend)
            cite = [("verify", prop)] + ([("spec", f"deviation:{dev.backend}:{dev.property}")] if dev else [])
            add("info", "declared_deviation", f"{prop}: declared deviation, observed as declared: {detail}",
                f"property:{prop}", *cite)
        elif r["status"] == "na" and r.get("unchecked"):
            add("medium", "unchecked_claim", f"{prop}: {detail}", f"property:{prop}", ("verify", prop))
        elif r["status"] == "na" and oracle:
            add("low", "oracle_unavailable", f"{prop}: no differential oracle for this variant ({detail})",
                f"property:{prop}", ("verify", prop))
    if not by:
        return out

    def unchecked(prop: str) -> str | None:
        """Why `prop` checked nothing for this variant, or None if it ran (or is not in the library)."""
        if prop not in known:
            return None
        r = by.get(prop)
        if r is None:
            return f"property '{prop}' was not run"
        if r["status"] == "na":
            return f"property '{prop}' was not applicable ({(r.get('detail') or '').strip()[:200]})"
        return None

    why = unchecked("spectrum")
    for c in spec.claims:
        if why:
            add("medium", "unchecked_claim", f"claim '{c.name}' ({c.kind}: {c.text}) is checked by no property: {why}",
                f"claim:{c.name}", ("spec", f"claim:{c.name}"))
    for attr, label, prop, severity in DECLARATION_CHECKS:
        declared = spec.oracle if attr == "equation" else getattr(spec, attr, None)
        why = unchecked(prop)
        if declared and why:
            add(severity, "unchecked_claim", f"the spec declares {label}, but no property checked it: {why}",
                f"declaration:{attr}", ("spec", attr))
    ref_props = sorted(p for p in known if p.startswith("reference_"))
    if peft_map(spec) is not None and ref_props and not any(by.get(p, {}).get("status") in ("pass", "fail", "deviation")
                                                       for p in ref_props):
        add("low", "unchecked_claim", f"the spec declares a PEFT mapping, but no differential oracle "
            f"({', '.join(ref_props)}) ran on it", "declaration:peft", ("spec", "peft"))
    return out
