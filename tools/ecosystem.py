"""`python -m tools.ecosystem`: the outside adapter libraries verified as they ship, each in its own environment.

    python -m tools.ecosystem run [--libraries loralib,torchtune] [--budget-s 3600] [--profile history] [-n 2]
                                  [--reuse [--rerun PROP,...]]
    python -m tools.ecosystem render [--json audits/ecosystem.json]
    python -m tools.ecosystem probe BACKEND          (inside a library's environment: version, variants, sites)

The libraries are the shipped backends that declare `requirements` (tools/envs.py reads harness/backends/), grouped
by the library their first requirement names (loralib and loralib-merged are one library). Each library runs at
its pinned release and at the newest release of the previous minor (the previous release when the library has one
minor only), each in `.nox/verify-<library>-<hash>/`; every backend of the library is verified there by
tools.verify (results in build/ecosystem/<backend>-<version>.json). One progress line per library release; no new
release starts once --budget-s is spent. `--reuse` takes a release's results JSON of an earlier run with the same
profile, and keeps the libraries not named in --libraries from the existing audits/ecosystem.json, so a run for
`--libraries litgpt,adapters --reuse` adds their rows to the audit. `--reuse --rerun oracle,gradient_pattern` runs
those properties again on every reused release and replaces their rows (the columns a harness change touched); the
audit's run names them.

Every failure is classified: a `fail` is a real bug of the library (its failure site: the crash frame inside the
library, else the library function the property exercised, `sites(spec)` of the backend, as file:line at that
release); a `deviation` is a documented choice (the backend's declaration quotes the library); a crash inside
this harness is a harness limitation (to be fixed in the harness, never left in a committed audit).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools import envs
from tools.peft_history import cell  # the same table cells as the PEFT history

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "build" / "ecosystem"
AUDIT = ROOT / "audits" / "ecosystem"
TEMPLATE = "ecosystem.md.j2"
SCHEMA = "lora-verify/ecosystem/1"


class EcosystemError(RuntimeError):
    """A library release that cannot be audited (no environment, not importable): one line."""


# ----------------------------------------------------------------------------------------------- arguments


def budget(text: str) -> float:
    """--budget-s: a finite positive number of seconds."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget-s {text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"--budget-s {text!r} must be a finite positive number of seconds")
    return v


def libraries() -> dict[str, list[envs.Declared]]:
    """library (canonical name) -> the declarations of its backends, from the shipped backends."""
    out: dict[str, list[envs.Declared]] = {}
    for name in envs.shipped():
        d = envs.declared(name)
        out.setdefault(d.library, []).append(d)
    return out


def pick(names: str, known: dict) -> list[str]:
    want = [n.strip() for n in names.split(",") if n.strip()] or list(known)
    bad = [n for n in want if n not in known]
    if bad:
        raise EcosystemError(f"unknown librar(ies) {bad}; shipped: {sorted(known)}")
    return want


# ----------------------------------------------------------------------------------------------- releases


def _v(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def index_versions(lib: str, python: str = sys.executable) -> list[str]:
    p = subprocess.run([python, "-m", "pip", "index", "versions", lib], capture_output=True, text=True)
    m = re.search(r"Available versions:\s*(.+)", p.stdout)
    if p.returncode != 0 or not m:
        raise EcosystemError(f"cannot list {lib}'s releases with pip index versions: {envs._last_line(p.stderr or p.stdout)}")
    return [v.strip() for v in m.group(1).split(",") if re.fullmatch(r"\d+(\.\d+)*", v.strip())]


def previous(pinned: str, available: list[str]) -> tuple[str | None, str]:
    """The newest release of the previous minor below `pinned` ('previous minor'), else the newest release
    below it ('previous release': the library has no earlier minor), else None."""
    older = sorted((v for v in available if _v(v) < _v(pinned)), key=_v)
    minor = [v for v in older if _v(v)[:2] < _v(pinned)[:2]]
    if minor:
        return minor[-1], "previous minor"
    if older:
        return older[-1], "previous release (no earlier minor)"
    return None, ""


# ----------------------------------------------------------------------------------------------- probe (in the env)


def _site(fn) -> str | None:
    """'package/file.py:LINE' of a function or class, from its installed package root."""
    import inspect

    fn = inspect.unwrap(fn)  # a decorated function (torch.no_grad, contextmanager): its own source
    try:
        f = inspect.getsourcefile(fn)
        line = inspect.getsourcelines(fn)[1]
    except (TypeError, OSError):
        return None
    return f"{portable(f)}:{line}"


def portable(path: str) -> str:
    """A file of an installed package from its package root (`loralib/layers.py`), ours from the repository root."""
    path = re.sub(r"[^\s\[]*/site-packages/", "", str(path))
    return path.replace(str(ROOT) + os.sep, "")


def probe(backend: str) -> dict:
    """Inside a library's environment: the backend's library version, the variants it applies to, and the
    failure sites by variant and property (file:line at this release)."""
    from harness.backends import make
    from spec import SPECS

    be = make(backend)
    variants = [n for n in SPECS.names() if be.applies(SPECS.get(n)) is None]
    sites = {}
    for n in variants:
        spec = SPECS.get(n)
        fns = be.sites(spec) if hasattr(be, "sites") else {}
        cls = be.source_class(spec) if hasattr(be, "source_class") else None
        sites[n] = {"class": _site(cls) if cls is not None else None, **{k: _site(f) for k, f in fns.items()}}
    import importlib.util

    return {"backend": backend, "version": be.version, "variants": variants, "sites": sites,
            "peft": importlib.util.find_spec("peft") is not None}


# ----------------------------------------------------------------------------------------------- run


def portable_results(results: list[dict]) -> list[dict]:
    """The results with every path in `where` and `detail` made `portable` (the library's file from its package
    root, ours from the repository root), as they are recorded: the audit JSON names no folder of this machine."""
    return [{**r, **{k: portable(r[k]) for k in ("where", "detail") if isinstance(r.get(k), str)}} for r in results]


def _counts(results: list[dict]) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "deviation", "na")}


def _verify(py, name: str, version: str, js: Path, profile: str, workers: str, variants: list[str],
            extra: list[str]) -> list[dict]:
    """tools.verify on one backend in its release's environment: its result rows."""
    js.parent.mkdir(parents=True, exist_ok=True)
    if js.exists():
        js.unlink()
    cmd = [str(py), "-m", "tools.verify", "--backend", name, "--profile", profile, "--json", str(js),
           "-n", workers, "--variants", ",".join(variants), *extra]
    v = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not js.is_file():
        raise EcosystemError(f"{name} {version}: verify wrote no results (exit {v.returncode}): "
                             f"{envs._last_line(v.stdout + v.stderr)}")
    return json.loads(js.read_text())["results"]


def run_release(decls: list[envs.Declared], version: str, profile: str, workers: str, reuse: bool,
                extra: list[str], rerun: tuple[str, ...] = (), log=print) -> dict:
    """Every backend of one library at one release, in that release's environment. With `reuse`, the results of
    an earlier run of the same profile are kept, but for the properties named in `rerun` (the columns a harness
    change touched), which run again and replace theirs, in build/ecosystem/ too."""
    py = envs.ensure(envs.with_version(decls[0], version), log=lambda m: None)
    for d in decls[1:]:
        envs.ensure(envs.with_version(d, version), log=lambda m: None)
    out = {}
    for d in decls:
        p = subprocess.run([str(py), "-m", "tools.ecosystem", "probe", d.name], capture_output=True, text=True,
                           cwd=str(ROOT), env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode != 0:
            raise EcosystemError(f"{d.name} {version} does not start: {envs._last_line(p.stderr)}")
        info = json.loads(p.stdout.strip().splitlines()[-1])
        js = RESULTS / f"{d.name}-{version}.json"
        old = json.loads(js.read_text()) if reuse and js.is_file() else None
        if old is not None and old.get("profile") == profile and old.get("backend_version") == info["version"]:
            results, reused = old["results"], True
            if rerun:
                fresh = _verify(py, d.name, version, js.with_suffix(".rerun.json"), profile, workers,
                                info["variants"], ["--properties", ",".join(rerun)])
                results = [x for x in results if x["property"] not in rerun] + fresh
                from impl.atomic import atomic_write_bytes
                atomic_write_bytes(js, json.dumps({**old, "results": results}).encode())
        else:
            results, reused = _verify(py, d.name, version, js, profile, workers, info["variants"], extra), False
        out[d.name] = {"version": info["version"], "variants": info["variants"], "sites": info["sites"],
                       "peft": info["peft"], "results": portable_results(results), "reused": reused,
                       **({"rerun": list(rerun)} if reused and rerun else {})}
    return out


def run_all(libs: dict[str, list[envs.Declared]], names: list[str], budget_s: float, profile: str, workers: str,
            reuse: bool, extra: list[str], log=print, previous_doc: dict | None = None,
            rerun: tuple[str, ...] = ()) -> tuple[dict, bool]:
    t0 = time.monotonic()
    out, stopped = {}, False
    plan = []
    for lib in names:
        pinned = envs.library_version(libs[lib][0])
        try:
            prev, role = previous(pinned, index_versions(lib))
        except EcosystemError as e:
            prev, role = None, str(e)
        plan += [(lib, pinned, "pinned")] + ([(lib, prev, role)] if prev else [])
        out[lib] = {"backends": [d.name for d in libs[lib]], "requirements": list(libs[lib][0].requirements),
                    "without": list(libs[lib][0].without), "releases": [], "note": None if prev else role or None}
    before = {(lib, r["version"]): r.get("seconds") for lib, L in ((previous_doc or {}).get("libraries") or {}).items()
              for r in L.get("releases", [])}
    for i, (lib, version, role) in enumerate(plan, 1):
        rec: dict[str, Any] = {"version": version, "role": role, "profile": profile}
        if time.monotonic() - t0 > budget_s:
            stopped = True
            rec.update(status="skipped", line=f"not started: the budget of {budget_s:.0f} s was spent", backends=None)
            log(f"[{i}/{len(plan)}] {lib} {version}: skipped (budget of {budget_s:.0f} s spent)", flush=True)
            out[lib]["releases"].append(rec)
            continue
        t = time.monotonic()
        try:
            rec.update(status="ran", line=None, backends=run_release(libs[lib], version, profile, workers, reuse, extra,
                                                                           rerun))
        except (EcosystemError, envs.EnvError) as e:
            rec.update(status="error", line=str(e), backends=None)
        all_reused = rec["status"] == "ran" and all(b["reused"] for b in rec["backends"].values())
        timing = RESULTS / f"{lib}-{version}.seconds.json"  # the seconds of the run that produced the results
        if all_reused:
            try:
                rec["seconds"] = json.loads(timing.read_text())[profile]
            except (OSError, ValueError, KeyError):
                rec["seconds"] = before.get((lib, version))
        else:
            rec["seconds"] = round(time.monotonic() - t, 1)
            if rec["status"] == "ran":
                from impl.atomic import atomic_write_bytes

                atomic_write_bytes(timing, json.dumps({profile: rec["seconds"]}).encode())
        rec["reused"] = all_reused
        if rec["status"] == "ran":
            n = _counts([r for b in rec["backends"].values() for r in b["results"]])
            log(f"[{i}/{len(plan)}] {lib} {version} ({role}): {n['pass']} pass, {n['fail']} fail, {n['deviation']} dev, "
                f"{n['na']} na " + ("(reused)" if all_reused else f"in {rec['seconds']:.0f} s"), flush=True)
        else:
            log(f"[{i}/{len(plan)}] {lib} {version} ({role}): ERROR {rec['line']}", flush=True)
        out[lib]["releases"].append(rec)
    return out, stopped


# ----------------------------------------------------------------------------------------------- the audit


def classify(r: dict) -> str:
    """real bug (a failure of the library), documented choice (a declared deviation quoting the library),
    undocumented choice (a declared deviation quoting the library's source lines, which no text of the library
    explains), harness limitation (a crash inside this harness: fix the harness)."""
    if r["status"] == "deviation":  # a declaration read from the library's source alone says "undocumented"
        return "undocumented choice" if "declared: undocumented" in (r.get("detail") or "") else "documented choice"
    where = r.get("where") or ""
    if r.get("failure_kind") == "crash" and portable(where).startswith(("harness/", "tools/", "impl/", "spec/")):
        return "harness limitation"
    return "real bug"


def build(libs_doc: dict) -> dict:
    """The audit's tables from the per-library records: columns (library, backend, release), rows by variant and
    property; failures with their site and class; variants shared by several libraries side by side."""
    columns, by, order = [], {}, {}
    for lib, L in libs_doc.items():
        for rel in L["releases"]:
            if rel["status"] != "ran":
                continue
            for be, B in rel["backends"].items():
                col = f"{be} {rel['version']}"
                columns.append({"id": col, "library": lib, "backend": be, "version": rel["version"], "role": rel["role"],
                                "peft": B["peft"], "counts": _counts(B["results"])})
                for r in B["results"]:
                    by[(col, r["variant"], r["property"])] = r
                    order.setdefault(r["property"], len(order))
    variants = sorted({v for (_, v, _) in by})
    rows = []
    for v in variants:
        cols = [c for c in columns if any(k[0] == c["id"] and k[1] == v for k in by)]
        props = sorted({p for (c, vv, p) in by if vv == v}, key=order.get)
        shown = [p for p in props if any(by.get((c["id"], v, p), {}).get("status") != "na" for c in cols)]
        rows.append({"variant": v, "columns": [c["id"] for c in cols], "libraries": sorted({c["library"] for c in cols}),
                     "properties": [{"property": p, "cells": {c["id"]: cell(by.get((c["id"], v, p))) for c in cols}}
                                    for p in shown],
                     "na_everywhere": [p for p in props if p not in shown]})
    failures = []
    for (col, v, p), r in by.items():
        if r["status"] not in ("fail", "deviation"):
            continue
        c = next(x for x in columns if x["id"] == col)
        rel = next(x for x in libs_doc[c["library"]]["releases"] if x["version"] == c["version"])
        sites = rel["backends"][c["backend"]]["sites"].get(v, {})
        site = portable(r["where"]) if r.get("where") else sites.get(p) or sites.get("*") or sites.get("class")
        failures.append({"library": c["library"], "backend": c["backend"], "version": c["version"], "variant": v,
                         "property": p, "status": r["status"], "kind": cell(r), "class": classify(r),
                         "detail": portable(r.get("detail") or ""), "example": r.get("example"), "site": site})
    failures.sort(key=lambda f: (f["library"], f["backend"], f["variant"], f["property"], f["version"]))
    return {"columns": columns, "rows": rows, "failures": failures,
            "shared": [r for r in rows if len(r["libraries"]) > 1], "repros": repros()}


def repros(folder: Path = AUDIT.parent / "ecosystem" / "repro") -> list[dict]:
    """The standalone reproductions (audits/ecosystem/repro/*.py): tools.render.repro_list."""
    from tools.render import repro_list

    return repro_list(folder, ROOT)


def render_markdown(doc: dict) -> str:
    from tools.render import make_env

    return make_env().get_template(TEMPLATE).render(d=doc, t=build(doc["libraries"]))


def write(doc: dict, stem: Path = AUDIT) -> tuple[Path, Path]:
    """audits/ecosystem.json and .md, each written atomically."""
    from impl.atomic import atomic_write_bytes

    js, md = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    atomic_write_bytes(js, (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write_bytes(md, render_markdown(doc).encode())
    return js, md


def _slim(libs_doc: dict) -> dict:
    """The audit JSON keeps per result what the audit shows (the full JSONs stay in build/ecosystem/)."""
    keep = ("variant", "property", "status", "detail", "example", "failure_kind", "where", "examples", "seconds")
    for L in libs_doc.values():
        for rel in L["releases"]:
            for B in (rel.get("backends") or {}).values():
                B["results"] = [{k: r.get(k) for k in keep} for r in B["results"]]
    return libs_doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.ecosystem", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="verify every shipped library at two releases and render the audit")
    r.add_argument("--libraries", default="", help="comma-separated (default: every shipped library)")
    r.add_argument("--budget-s", type=budget, default=3600.0)
    r.add_argument("--profile", default="history")
    r.add_argument("-n", "--workers", default="2")
    r.add_argument("--properties", default="")
    r.add_argument("--rerun", default="", help="with --reuse: these properties (comma-separated) run again and "
                   "replace their reused results (the columns a harness change touched)")
    r.add_argument("--reuse", action="store_true",
                   help="reuse build/ecosystem/<backend>-<version>.json of the same profile, and keep the other "
                        "libraries of the existing audits/ecosystem.json")
    p = sub.add_parser("probe", help="(inside a library's environment) version, variants and failure sites")
    p.add_argument("backend")
    d = sub.add_parser("render", help="render audits/ecosystem.md from its JSON")
    d.add_argument("--json", default=str(AUDIT.with_name(AUDIT.name + ".json")))
    a = ap.parse_args(argv)
    try:
        if a.cmd == "probe":
            print(json.dumps(probe(a.backend)))
            return 0
        if a.cmd == "render":
            doc = json.loads(Path(a.json).read_text())
            _, md = write(doc)
            print(f"rendered {md}")
            return 0
        rerun = tuple(x.strip() for x in a.rerun.split(",") if x.strip())
        if rerun and not a.reuse:
            raise EcosystemError("--rerun replaces columns of reused results: it needs --reuse")
        libs = libraries()
        names = pick(a.libraries, libs)
        existing = None
        js = AUDIT.with_name(AUDIT.name + ".json")
        if a.reuse and js.is_file():
            existing = json.loads(js.read_text())
            if existing.get("schema") != SCHEMA:
                raise EcosystemError(f"{js} is not an ecosystem audit ({existing.get('schema')!r})")
        print(f"ecosystem: {', '.join(names)}; profile {a.profile}; budget {a.budget_s:.0f} s", flush=True)
        extra = ["--properties", a.properties] if a.properties else []
        t0 = time.time()
        done, stopped = run_all(libs, names, a.budget_s, a.profile, a.workers, a.reuse, extra, previous_doc=existing,
                                rerun=rerun)
        merged = {k: v for k, v in ((existing or {}).get("libraries") or {}).items() if k not in done}
        merged.update(_slim(done))
        run = {"libraries": names, "profile": a.profile, "budget_s": a.budget_s, "budget_spent": stopped,
               **({"rerun": list(rerun)} if rerun else {}),
               "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "kept": sorted(set(merged) - set(done))}
        doc = {"schema": SCHEMA, "run": run, "libraries": dict(sorted(merged.items()))}
        js, md = write(doc)
        print(f"ecosystem -> {md}, {js}" + ("; the budget stopped the run" if stopped else ""))
        return 0 if all(r["status"] == "ran" for L in done.values() for r in L["releases"]) else 1
    except (EcosystemError, envs.EnvError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
