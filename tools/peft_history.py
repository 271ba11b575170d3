"""`python -m tools.peft_history`: the PEFT backend's verify over PEFT's releases, and the history table.

    python -m tools.peft_history run [--peft-versions 0.9.0..0.21.2] [--all-patches] [--budget-s N] [-n 2]
                                     [--profile history] [--variants ...] [--properties ...]
    python -m tools.peft_history one VERSION [tools.verify args]     (what `nox -s verify -- --peft-version X` runs)
    python -m tools.peft_history render [--json audits/peft_history.json]

Each release gets its own cached environment `.nox/verify-peft-<version>/`: that release alone
(`pip install --no-deps --target`), layered in front of the current environment (PYTHONPATH), so every other
package is the pinned one of constraints.txt and the project's own `peft` requirement never takes part in the
install. Its constraints file `.nox/verify-peft-<version>.constraints.txt` is constraints.txt with peft pinned to
that release (the full version in the name: 0.10.0 and 0.10.1 never share one). A release that cannot be installed
or does not import gives one line naming why and a non-zero exit.

`run` lists the releases from the package index (`pip index versions peft`), by default the newest patch of each
minor between A and B (`--all-patches`: every release), verifies each one in its own process (results in
build/verify/peft-<version>.json), prints one progress line per release, starts no new release once --budget-s is
spent, and renders audits/peft_history.md and .json (written atomically).
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

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
ENVS = ROOT / ".nox"
RESULTS = ROOT / "build" / "verify"
AUDIT = ROOT / "audits" / "peft_history"
TEMPLATE = "peft_history.md.j2"
# The variants with a PEFT counterpart and an impl twin (ia3_ff is ia3's twin). The specs of PEFT's other methods
# (vera, oft, ...) are verified on the pinned release by `nox -s verify -- --backend peft`; `--variants` adds them.
HISTORY_VARIANTS = "lora,dora,pissa,eva,hra,ia3,delora"
# The whole-model properties and the bitsandbytes ones take nine tenths of a PEFT verify on CPU (tiny transformers
# models and bnb's CPU kernels, a few examples each whatever the profile); they are left to the single-release
# verify (`nox -s verify -- --backend peft --peft-version X`). `--properties all` runs every property.
HISTORY_SKIP = ("model_freezing", "model_oracle", "model_targeting", "model_knobs", "model_data_init", "quantized",
                "reference_quantized")


def history_properties(spec: str) -> str:
    """The --properties value for tools.verify: '' (every property) for 'all', else the given list, else every
    registered property but HISTORY_SKIP."""
    if spec == "all":
        return ""
    if spec:
        return spec
    from harness import PROPERTIES

    return ",".join(p for p in PROPERTIES if p not in HISTORY_SKIP)


STAMP = "installed.stamp"
# Limits on the subprocesses of a history (pip, the import probe, one release's verify): one that runs past its
# limit is killed and its release is an error row naming the limit.
PIP_TIMEOUT_S = 900.0
PROBE_TIMEOUT_S = 300.0
VERIFY_TIMEOUT_S = 3600.0


def _timed_out(what: str, limit: float) -> ReleaseError:
    return ReleaseError(f"{what} did not finish within the timeout of {limit:g} s (killed)")


def positive_seconds(value: float, what: str) -> float:
    """`value` when it is a finite number of seconds above zero; ValueError in one line otherwise (-1, 0, NaN and
    inf would skip every release, never stop, or crash after the whole run)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite positive number of seconds, not {value}")
    return float(value)
OLDEST = "0.9.0"  # the oldest release the backend is adapted to (see the module docstring)


class ReleaseError(RuntimeError):
    """A PEFT release that cannot be audited (not on the index, not installable, not importable): one line."""


# ----------------------------------------------------------------------------------------------- versions


VERSION_MAX = 32  # characters: a version names files (.nox/verify-peft-<version>/); 300 digits is no release


def parse_version(v: str) -> tuple[int, ...]:
    """'0.10.1' -> (0, 10, 1); a pre-release, a non-numeric, an overlong or a non-PEP 440 version is a clear error
    in one line (before the version names any file)."""
    from packaging.version import InvalidVersion, Version

    shown = repr(v) if len(v) <= 40 else f"{v[:40]!r}... ({len(v)} characters)"
    if len(v) > VERSION_MAX or not re.fullmatch(r"\d+(\.\d+)*", v):
        raise ValueError(f"not a final release version: {shown} (expected digits and dots, e.g. 0.13.2, at most "
                         f"{VERSION_MAX} characters)")
    try:
        Version(v)
    except InvalidVersion:
        raise ValueError(f"not a PEP 440 version: {shown}") from None
    return tuple(int(p) for p in v.split("."))


def parse_range(text: str) -> tuple[str, str]:
    """'A..B' -> (A, B); a single version V -> (V, V)."""
    a, sep, b = text.partition("..")
    a, b = a.strip(), (b.strip() if sep else a.strip())
    parse_version(a), parse_version(b)
    if parse_version(a) > parse_version(b):
        raise ValueError(f"empty range {text!r}: {a} is newer than {b}")
    return a, b


def index_versions(python: str = sys.executable) -> list[str]:
    """PEFT's final releases on the package index, as `pip index versions peft` lists them."""
    try:
        p = subprocess.run([python, "-m", "pip", "index", "versions", "peft"], capture_output=True, text=True,
                           timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise _timed_out("pip index versions peft", PIP_TIMEOUT_S) from None
    m = re.search(r"Available versions:\s*(.+)", p.stdout)
    if p.returncode != 0 or not m:
        raise ReleaseError(f"cannot list PEFT's releases with pip index versions: {_last_line(p.stderr or p.stdout)}")
    return [v.strip() for v in m.group(1).split(",") if re.fullmatch(r"\d+(\.\d+)*", v.strip())]


def select(available: list[str], a: str, b: str, all_patches: bool = False) -> list[str]:
    """The releases in [a, b], oldest first; unless all_patches, only the newest patch of each minor (a and b
    themselves are kept when they are releases)."""
    lo, hi = parse_version(a), parse_version(b)
    inside = sorted((v for v in set(available) if lo <= parse_version(v) <= hi), key=parse_version)
    if all_patches:
        return inside
    newest: dict[tuple[int, ...], str] = {}
    for v in inside:
        newest[parse_version(v)[:2]] = v
    keep = set(newest.values()) | ({a} & set(inside)) | ({b} & set(inside))
    return sorted(keep, key=parse_version)


# ----------------------------------------------------------------------------------------------- environments


def env_dir(version: str) -> Path:
    return ENVS / f"verify-peft-{version}"


def constraints_file(version: str) -> Path:
    """.nox/verify-peft-<full version>.constraints.txt (not Path.with_suffix, which cuts at the last dot)."""
    parse_version(version)
    return ENVS / f"verify-peft-{version}.constraints.txt"


def release_constraints(version: str, base: str) -> str:
    """constraints.txt's text with its peft pin replaced by `peft==version`."""
    kept = [line for line in base.splitlines(True) if not re.match(r"\s*peft\s*(==|>=|<=|~=|$)", line)]
    return "".join(kept) + f"peft=={version}\n"


def _last_line(text: str) -> str:
    lines = [l.strip() for l in (text or "").splitlines() if l.strip() and "is ignored" not in l]
    errors = [l for l in lines if l.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1]


def ensure_env(version: str, python: str = sys.executable, run=subprocess.run) -> Path:
    """The site folder holding exactly PEFT `version` (installed once, then reused); ReleaseError in one line
    when pip cannot install it."""
    from impl.atomic import atomic_write_bytes

    if parse_version(version) < parse_version(OLDEST):
        raise ReleaseError(f"peft {version} is older than {OLDEST}, the oldest release the PEFT backend drives "
                           "(its get_peft_model / save_pretrained API differ)")
    site = env_dir(version) / "site"
    stamp = env_dir(version) / STAMP
    if stamp.is_file() and stamp.read_text() == version and (site / "peft").is_dir():
        return site
    cons = constraints_file(version)
    cons.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cons, release_constraints(version, CONSTRAINTS.read_text()).encode())
    # --no-deps: only the release itself goes into the folder (every other package is the pinned one behind it),
    # so the constraints file is the record of the environment's pins, not an input of this install
    try:
        p = run([python, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(site),
                 f"peft=={version}"], capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise _timed_out(f"peft {version}: pip install", PIP_TIMEOUT_S) from None
    if p.returncode != 0:
        raise ReleaseError(f"peft {version} cannot be installed: {_last_line(p.stderr or p.stdout)}")
    atomic_write_bytes(stamp, version.encode())
    return site


def env_vars(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}


PROBE = ("import json, transformers, harness.backends.peft as b; e = b.IMPORT_ERROR; "
         "print(json.dumps({'version': b.VERSION, 'shims': b.SHIMS, 'transformers': transformers.__version__, "
         "'error': None if e is None else f'{type(e).__name__}: {(str(e).splitlines() or [\"\"])[0]}'}))")


def probe(version: str, site: Path, python: str = sys.executable, run=subprocess.run) -> dict:
    """Import the release as the backend does; ReleaseError in one line when it does not import or is not
    the requested release. Returns {'version', 'shims', 'transformers'}."""
    try:
        p = run([python, "-c", PROBE], capture_output=True, text=True, env=env_vars(site), cwd=str(ROOT),
                timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise _timed_out(f"peft {version}: the import probe", PROBE_TIMEOUT_S) from None
    if p.returncode != 0:
        raise ReleaseError(f"peft {version}: the PEFT backend does not import: {_last_line(p.stderr)}")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    if info["error"]:
        raise ReleaseError(f"peft {version} does not import with transformers {info['transformers']}: {info['error']}")
    if info["version"] != version:
        raise ReleaseError(f"peft {version} requested but {info['version']} imports from {site}")
    return info


def verify_release(version: str, verify_args: list[str], python: str = sys.executable) -> int:
    """tools.verify --backend peft against PEFT `version` in its own environment; its exit status. A cached
    environment that no longer imports (a broken or edited install) is rebuilt once; then ReleaseError in one line."""
    import shutil

    parse_version(version)  # before the version names a folder
    cached = (env_dir(version) / STAMP).is_file()
    site = ensure_env(version, python)
    try:
        probe(version, site, python)
    except ReleaseError:
        if not cached:
            raise
        shutil.rmtree(site, ignore_errors=True)
        (env_dir(version) / STAMP).unlink(missing_ok=True)
        site = ensure_env(version, python)
        probe(version, site, python)
    cmd = [python, "-m", "tools.verify", "--backend", "peft", "--peft-version", version, *verify_args]
    try:
        return subprocess.run(cmd, env=env_vars(site), cwd=str(ROOT), timeout=VERIFY_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        raise _timed_out(f"peft {version}: verify", VERIFY_TIMEOUT_S) from None


# ----------------------------------------------------------------------------------------------- history


class _Reused(Exception):
    """Control flow in run_history: an earlier run's results of the release were taken."""


CELL = {"pass": "pass", "fail": "F", "deviation": "dev", "na": "na"}


def cell(result: dict | None) -> str:
    """pass | F (a property failed) | E (crashed: an exception inside the code under test) | dev | na | '' (not run)."""
    if result is None:
        return ""
    if result["status"] == "fail" and result.get("failure_kind") == "crash":
        return "E"
    return CELL.get(result["status"], result["status"])


def portable(text: str) -> str:
    """A crash site as the audit shows it: PEFT's files from the package root (`peft/tuners/...`), ours from the
    repository root, not this machine's folders (the same failure then reads the same in every release)."""
    text = re.sub(r"[^\s\[]*/site/(peft/)", r"\1", text)
    return text.replace(str(ROOT) + os.sep, "")


def build_history(releases: list[dict]) -> dict:
    """releases: [{'version', 'status': 'ran'|'error'|'skipped', 'line', 'results': [...] | None, ...}] oldest
    first -> the history: rows (variant, property) that are not 'pass' at some release that ran, a cell per
    release, and per failing row the first release it failed at, the release that fixed it (first passing or
    na-free release after the last failure... the first release after a failing one where it passes) and the
    detail and minimal example of its first and latest failure."""
    ran = [r for r in releases if r["status"] == "ran"]
    by = {r["version"]: {(x["variant"], x["property"]): x for x in r["results"]} for r in ran}
    keys: list[tuple[str, str]] = []
    for r in ran:
        for x in r["results"]:
            k = (x["variant"], x["property"])
            if x["status"] in ("fail", "deviation") and k not in keys:
                keys.append(k)
    versions = [r["version"] for r in releases]
    rows = []
    for k in sorted(keys):
        cells = {v: cell(by[v].get(k)) if v in by else "" for v in versions}
        fails = [v for v in versions if cells[v] in ("F", "E")]
        row = {"variant": k[0], "property": k[1], "cells": cells, "first_failing": fails[0] if fails else None,
               "fixed_in": None, "failures": []}
        if fails:
            seen_fail = False
            for v in versions:
                if cells[v] in ("F", "E"):
                    seen_fail, row["fixed_in"] = True, None
                elif seen_fail and cells[v] == "pass" and row["fixed_in"] is None:
                    row["fixed_in"] = v
            # one entry per distinct failure detail, with the releases showing it
            distinct: dict[str, dict] = {}
            for v in fails:
                x = by[v][k]
                detail, where = portable(x.get("detail") or ""), x.get("where") and portable(x["where"])
                d = distinct.setdefault(detail, {"releases": [], "detail": detail, "example": x.get("example"),
                                                 "where": where, "kind": cells[v]})
                d["releases"].append(v)
            row["failures"] = list(distinct.values())
        rows.append(row)
    counts = {r["version"]: ({s: sum(x["status"] == s for x in r["results"]) for s in ("pass", "fail", "deviation", "na")}
                             if r["status"] == "ran" else None) for r in releases}
    return {"schema": "lora-verify/peft-history/1", "releases": releases_meta(releases), "counts": counts,
            "rows": rows, "availability": availability(ran, versions)}


def availability(ran: list[dict], versions: list[str]) -> list[dict]:
    """Per variant and release: 'yes' when some property applied, else the (first) n/a reason, e.g.
    "peft 0.9.0 has no DeloraConfig"; '' for a release that did not run."""
    out = []
    variants = list(dict.fromkeys(x["variant"] for r in ran for x in r["results"]))
    by = {r["version"]: r["results"] for r in ran}
    for v in variants:
        cells = {}
        for ver in versions:
            res = [x for x in by.get(ver, []) if x["variant"] == v]
            if not res:
                cells[ver] = ""
            elif any(x["status"] != "na" for x in res):
                cells[ver] = "yes"
            else:
                cells[ver] = res[0].get("detail", "na")
        first = next((ver for ver in versions if cells[ver] == "yes"), None)
        out.append({"variant": v, "cells": cells, "first_available": first,
                    "reason_before": next((cells[ver] for ver in versions if cells[ver] not in ("", "yes")), None)})
    return out


def releases_meta(releases: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ("version", "status", "line", "seconds", "shims", "transformers", "profile", "reused")}
            for r in releases]


def render_markdown(history: dict, run: dict) -> str:
    from tools.render import make_env

    return make_env().get_template(TEMPLATE).render(h=history, run=run)


def write_history(history: dict, run: dict, stem: Path = AUDIT) -> tuple[Path, Path]:
    """audits/peft_history.json and .md, each written atomically."""
    from impl.atomic import atomic_write_bytes

    doc = {**history, "run": run}
    js, md = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    # both rendered before either is written (a failure leaves the committed pair as it was), then each moved
    # into place atomically, one after the other
    js_bytes = (json.dumps(doc, indent=1, sort_keys=False, allow_nan=False) + "\n").encode()
    md_bytes = render_markdown(history, run).encode()
    atomic_write_bytes(js, js_bytes)
    atomic_write_bytes(md, md_bytes)
    return js, md


def load_history(path: Path) -> tuple[dict, dict]:
    """(history, run) of a history JSON, rendered once in memory to check it; ValueError in one line when the
    file is missing, not JSON, or not a history this tool wrote."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable history JSON ({type(e).__name__}: {str(e)[:160]})") from None
    schema = "lora-verify/peft-history/1"
    if not isinstance(doc, dict) or doc.get("schema") != schema or not isinstance(doc.get("run"), dict):
        raise ValueError(f"{path}: not a PEFT history JSON (schema {schema} with a 'run' object expected)")
    run = doc.pop("run")
    try:
        render_markdown(doc, run)
    except Exception as e:  # noqa: BLE001 - a malformed field anywhere in the JSON: one line naming it
        raise ValueError(f"{path}: the history JSON does not render ({type(e).__name__}: {str(e)[:160]})") from None
    return doc, run


def previous_seconds(profile: str) -> dict[str, float]:
    """{release: seconds} of the history JSON written before, when it ran the same profile (what a reused
    release's row shows: the time of the run that produced its results)."""
    try:
        doc = json.loads(AUDIT.with_name(AUDIT.name + ".json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or (doc.get("run") or {}).get("profile") != profile:
        return {}
    return {r["version"]: r["seconds"] for r in doc.get("releases") or [] if isinstance(r.get("seconds"), (int, float))}


def run_history(versions: list[str], budget_s: float, verify_args: list[str], profile: str,
                python: str = sys.executable, log=print, reuse: bool = False,
                timeout_s: float = VERIFY_TIMEOUT_S) -> tuple[list[dict], bool]:
    """Verify each release in turn (its own process and environment); stop starting new ones when the budget is
    spent. reuse: take a release's build/verify/peft-<version>.json of an earlier run with the same profile
    instead of running it again (delete that file to rerun one release); its row keeps the seconds the previous
    history recorded for it. A release's verify that runs past `timeout_s` is killed: an error row naming the
    limit. Returns (one record per release, whether the budget stopped the run)."""
    budget_s, timeout_s = positive_seconds(budget_s, "--budget-s"), positive_seconds(timeout_s, "--timeout-s")
    before = previous_seconds(profile) if reuse else {}
    t0 = time.monotonic()
    out, stopped = [], False
    for i, v in enumerate(versions, 1):
        js = RESULTS / f"peft-{v}.json"
        if time.monotonic() - t0 > budget_s and not (reuse and js.is_file()):
            stopped = True
            out.append({"version": v, "status": "skipped", "line": f"not started: the budget of {budget_s:.0f} s was spent",
                        "results": None})
            log(f"[{i}/{len(versions)}] peft {v}: skipped (budget of {budget_s:.0f} s spent)", flush=True)
            continue
        t = time.monotonic()
        rec = {"version": v, "profile": profile}
        js = RESULTS / f"peft-{v}.json"
        try:
            site = ensure_env(v, python)
            info = probe(v, site, python)
            rec.update(shims=info["shims"], transformers=info["transformers"])
            old = json.loads(js.read_text()) if reuse and js.is_file() else None
            if old is not None and old.get("profile") == profile and old.get("backend_version") == v:
                rec.update(status="ran", results=old["results"], line=None, reused=True)
                raise _Reused
            if js.exists():
                js.unlink()
            try:
                p = subprocess.run([python, "-m", "tools.verify", "--backend", "peft", "--peft-version", v,
                                    "--profile", profile, "--json", str(js), *verify_args], env=env_vars(site),
                                   cwd=str(ROOT), capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise _timed_out(f"peft {v}: verify", timeout_s) from None
            if not js.is_file():
                raise ReleaseError(f"peft {v}: verify wrote no results (exit {p.returncode}): {_last_line(p.stdout + p.stderr)}")
            rec.update(status="ran", results=json.loads(js.read_text())["results"], line=None)
        except _Reused:
            pass
        except ReleaseError as e:
            rec.update(status="error", line=str(e), results=None)
        rec["seconds"] = before.get(v) if rec.get("reused") else round(time.monotonic() - t, 1)
        if rec["status"] == "ran":
            n = {s: sum(x["status"] == s for x in rec["results"]) for s in ("pass", "fail", "deviation", "na")}
            shim = f", shims {rec['shims']}" if rec.get("shims") else ""
            log(f"[{i}/{len(versions)}] peft {v}: {n['pass']} pass, {n['fail']} fail, {n['deviation']} dev, {n['na']} na "
                + ("(reused)" if rec.get("reused") else f"in {rec['seconds']:.0f} s") + shim, flush=True)
        else:
            log(f"[{i}/{len(versions)}] peft {v}: ERROR {rec['line']} ({rec['seconds']:.0f} s)", flush=True)
        out.append(rec)
    return out, stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.peft_history", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="verify a range of releases and render the history")
    r.add_argument("--peft-versions", default="0.9.0..0.21.2", help="A..B, or V")
    r.add_argument("--all-patches", action="store_true", help="every release, not only the newest patch per minor")
    r.add_argument("--budget-s", type=float, default=3600.0)
    r.add_argument("--profile", default="history")
    r.add_argument("--variants", default=HISTORY_VARIANTS)
    r.add_argument("--properties", default="")
    r.add_argument("-n", "--workers", default="2")
    r.add_argument("--reuse", action="store_true", help="reuse build/verify/peft-<version>.json of the same profile")
    r.add_argument("--timeout-s", type=float, default=VERIFY_TIMEOUT_S, help="limit on one release's verify")
    o = sub.add_parser("one", help="verify one release (nox -s verify -- --peft-version X)")
    o.add_argument("version")
    o.add_argument("verify_args", nargs=argparse.REMAINDER)
    d = sub.add_parser("render", help="render audits/peft_history.md from its JSON")
    d.add_argument("--json", default=str(AUDIT.with_name(AUDIT.name + ".json")))
    a = ap.parse_args(argv)
    try:
        if a.cmd == "one":
            return verify_release(a.version, a.verify_args)
        if a.cmd == "render":
            doc, run = load_history(Path(a.json))
            _, md = write_history(doc, run)
            print(f"rendered {md}")
            return 0
        positive_seconds(a.budget_s, "--budget-s"), positive_seconds(a.timeout_s, "--timeout-s")
        lo, hi = parse_range(a.peft_versions)
        versions = select(index_versions(), lo, hi, a.all_patches)
        if not versions:
            raise ReleaseError(f"no PEFT release on the index between {lo} and {hi}")
        print(f"peft history: {len(versions)} releases {', '.join(versions)}; profile {a.profile}; budget "
              f"{a.budget_s:.0f} s", flush=True)
        props = history_properties(a.properties)
        args = ["--variants", a.variants, "-n", a.workers] + (["--properties", props] if props else [])
        t0 = time.time()
        releases, stopped = run_history(versions, a.budget_s, args, a.profile, reuse=a.reuse, timeout_s=a.timeout_s)
        history = build_history(releases)
        run = {"range": f"{lo}..{hi}", "all_patches": a.all_patches, "profile": a.profile, "variants": a.variants,
               "properties": a.properties or f"all but {', '.join(HISTORY_SKIP)}", "budget_s": a.budget_s, "budget_spent": stopped,
               "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        js, md = write_history(history, run)
        print(f"peft history -> {md}, {js}" + ("; the budget stopped the run" if stopped else ""))
        return 0 if all(r["status"] == "ran" for r in releases) else 1
    except (ReleaseError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
