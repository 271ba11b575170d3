"""`python -m tools.peft_history`: the PEFT backend's verify over PEFT's releases, and the history table.

    python -m tools.peft_history run [--peft-versions 0.9.0..0.21.2] [--all-patches] [--budget-s N] [-n 2]
                                     [--profile history] [--variants ...] [--properties ...]
    python -m tools.peft_history one VERSION [tools.verify args]     (what `nox -s verify -- --peft-version X` runs)
    python -m tools.peft_history run ... --shard I/N [--out F]    (one fixed slice of the (release, spec) jobs)
    python -m tools.peft_history run ... --jobs K                  (K such shards as local processes, then merged)
    python -m tools.peft_history run --full ...                    (every mapped spec, every property, ci profile)
    python -m tools.peft_history merge build/peft_history/shard-*-of-N.json
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
spent, and renders audits/peft_history.md and .json (written atomically). Its unit of work is one (release, spec)
job: tools.verify on one spec against one release. `--shard I/N` runs jobs I-1, I-1+N, ... of the release-major job
list and writes build/peft_history/shard-I-of-N.json; `merge` checks that the N files are the N shards of one
history and renders the same audit an unsharded run renders (the same JSON but for times). A CI matrix runs the
shard command once per I, then the merge; `--jobs K` does both locally (0: one shard per core). Pass `--releases`
to every shard of a matrix so that all of them agree on the release list without asking the index.
"""
from __future__ import annotations

import argparse
import itertools
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
# The whole-model properties and the bitsandbytes ones: left to the single-release verify (`nox -s verify --
# --backend peft --peft-version X`) and to `--full`. Measured over 7 ci-profile jobs once Hypothesis's explain phase
# was dropped (harness/engine.py _PHASES): about 16% of a job's row-seconds; a verify process's fixed start-up
# (imports) was about 9.5 s CPU of a job's mean 25 s, which is why run_jobs gives a release's jobs one process.
# `--properties all` runs every property.
HISTORY_SKIP = ("model_freezing", "model_oracle", "model_targeting", "model_knobs", "model_data_init", "quantized",
                "reference_quantized")


def full_breadth() -> list[str]:
    """`--full`'s specs: every spec the PEFT backend maps (harness/backends/peft_maps.py), whichever releases have it."""
    from harness.backends.peft_maps import MAPS
    return sorted(MAPS)


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
    release, and per failing row the first release it failed at, the release that fixed it (the first release
    after the last failing one where it passes, or shows only a declared deviation) and the
    detail and minimal example of its first and latest failure."""
    ran = [r for r in releases if r["status"] == "ran"]
    by = {r["version"]: {(x["variant"], x["property"]): x for x in per_check(r["results"])} for r in ran}
    keys: list[tuple[str, str]] = []
    for r in ran:
        for x in per_check(r["results"]):
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
                elif seen_fail and cells[v] in ("pass", "dev") and row["fixed_in"] is None:
                    row["fixed_in"] = v  # (dev: the failure is gone, what is left is a declared deviation)
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


def per_check(results: list[dict]) -> list[dict]:
    """The results with, after each property made of several checks, one row per check (property
    'adapters_on_one_module: both_merged'), so that the first-failing and fixed-in columns work per check and a
    check failing behind another one still gets its own row."""
    out = []
    for x in results:
        out.append(x)
        for c in x.get("checks") or ():
            failed = c["status"] != "pass"
            out.append({"variant": x["variant"], "property": f"{x['property']}: {c['name']}", "status": c["status"],
                        "failure_kind": c.get("failure_kind"), "detail": c.get("detail") or "",
                        "example": x.get("example") if failed else None, "where": c.get("where")})
    return out


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
    from tools.render import make_env, repro_list

    return make_env().get_template(TEMPLATE).render(h=history, run=run,
                                                    repros=repro_list(AUDIT.parent / "peft_history" / "repro", ROOT))


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


# ----------------------------------------------------------------------------------------------- shards
#
# The full history is a list of (release, spec) jobs, each one tools.verify process on one spec against one release.
# `run --shard I/N` runs the fixed slice jobs[I-1::N] of that list and writes build/peft_history/shard-I-of-N.json;
# `merge` renders the audit from the N shard files. Round robin over a list ordered release-major spreads every
# release over the shards, so no shard gets all the slow recent releases. The same two commands run unchanged as a
# CI matrix (one shard per job, then one merge job); `run --jobs K` runs the K shards as K local processes.

SHARDS = ROOT / "build" / "peft_history"
SHARD_SCHEMA = "lora-verify/peft-history-shard/1"
# what may differ between shards of one history (and between a sharded and an unsharded run): times only
TIME_KEYS = ("seconds", "date")


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 1 <= I <= N; anything else is a clear error."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"--shard must be I/N with 1 <= I <= N (e.g. 2/4), not {text!r}")
    return int(m.group(1)), int(m.group(2))


def job_list(versions: list[str], variants: list[str]) -> list[tuple[str, str]]:
    """Every (release, spec) job of a history, release-major: the order every shard and the merge agree on."""
    return [(v, s) for v in versions for s in variants]


def shard_slice(jobs: list[tuple[str, str]], i: int, n: int) -> list[tuple[str, str]]:
    """Shard i of n (1-based): jobs i-1, i-1+n, i-1+2n, ...; the n slices partition the list."""
    return jobs[i - 1::n]


def shard_path(i: int, n: int, folder: Path | None = None) -> Path:
    return (folder or SHARDS) / f"shard-{i}-of-{n}.json"


def _job_file(version: str, variant: str, suffix: str = ".json") -> Path:
    return SHARDS / "jobs" / f"peft-{version}-{variant}{suffix}"


def _reused_job(version: str, variant: str, profile: str, verify_args: list[str]) -> dict | None:
    """An earlier run's results of the job and its meta (seconds, shims), when that run used the same profile and
    verify arguments against the same release; else None."""
    try:
        doc = json.loads(_job_file(version, variant).read_text())
        meta = json.loads(_job_file(version, variant, ".meta.json").read_text())
    except (OSError, ValueError):
        return None
    if (doc.get("profile") != profile or doc.get("backend_version") != version or meta.get("profile") != profile
            or meta.get("verify_args") != verify_args):
        return None
    return {**meta, "results": [x for x in doc["results"] if x["variant"] == variant]}


def _verify_job(version: str, variants: list[str], site: Path, profile: str, verify_args: list[str], python: str,
                timeout_s: float | None) -> list[dict]:
    """tools.verify on some specs against one release, in that release's environment, as one process (its start,
    importing torch, transformers and PEFT, costs as much as a spec's properties): their result rows; ReleaseError
    in one line when it writes none."""
    import tempfile

    (SHARDS / "jobs").mkdir(parents=True, exist_ok=True)
    what = f"peft {version} / {', '.join(variants)}"
    with tempfile.TemporaryDirectory(dir=SHARDS / "jobs", prefix=f"peft-{version}-") as tmp:
        js = Path(tmp) / "verify.json"  # (the shards' processes run releases side by side: a folder each)
        cmd = [python, "-m", "tools.verify", "--backend", "peft", "--peft-version", version, "--profile", profile,
               "--variants", ",".join(variants), "--json", str(js), *verify_args]
        try:
            p = subprocess.run(cmd, env=env_vars(site), cwd=str(ROOT), capture_output=True, text=True,
                               timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise _timed_out(f"{what}: verify", timeout_s) from None
        if not js.is_file():
            raise ReleaseError(f"{what}: verify wrote no results (exit {p.returncode}): "
                               f"{_last_line(p.stdout + p.stderr)}")
        return [x for x in json.loads(js.read_text())["results"] if x["variant"] in variants]


def _locked_env(version: str, python: str) -> Path:
    """ensure_env under a per-release file lock: two local shards never pip-install one release at once."""
    import fcntl

    lock = ENVS / f"verify-peft-{version}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            return ensure_env(version, python)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_jobs(jobs: list[tuple[str, str]], budget_s: float, verify_args: list[str], profile: str,
             python: str = sys.executable, log=print, verify=_verify_job, timeout_s: float | None = None,
             prepare=None, reuse: bool = False) -> tuple[list[dict], bool]:
    """Run the (release, spec) jobs in order; each release's environment is prepared (installed and probed) once,
    and each run of consecutive jobs of one release is one verify process (a shard's slice is release-major).
    Once budget_s is spent no job starts: it is recorded 'skipped'. A release that cannot be installed or imported
    makes each of its jobs an 'error' naming why. A job's seconds are its properties' seconds plus an equal share
    of its process's start. reuse: a job whose results an earlier run with the same profile and verify arguments
    left in build/peft_history/jobs/ is taken as is, with that run's seconds (delete the file to rerun it). A
    verify that runs past `timeout_s` per job it holds is killed: an error row naming the limit. Returns (one
    record per job, whether the budget stopped the run)."""
    budget_s = positive_seconds(budget_s, "--budget-s")
    timeout_s = None if timeout_s is None else positive_seconds(timeout_s, "--timeout-s")

    def _prepare(v: str) -> dict:
        site = _locked_env(v, python)
        return {"site": site, **probe(v, site, python)}

    prepare = prepare or _prepare
    envs: dict[str, dict | ReleaseError] = {}
    t0 = time.monotonic()
    out: list[dict] = []
    stopped = False

    def done(rec: dict) -> None:
        k = len(out) + 1
        v, s = rec["version"], rec["variant"]
        if rec["status"] == "skipped":
            log(f"[{k}/{len(jobs)}] peft {v} / {s}: skipped (budget of {budget_s:.0f} s spent)", flush=True)
        elif rec.get("reused"):
            log(f"[{k}/{len(jobs)}] peft {v} / {s}: reused", flush=True)
        elif rec["status"] == "ran":
            n = {st: sum(x["status"] == st for x in rec["results"]) for st in ("pass", "fail", "deviation", "na")}
            log(f"[{k}/{len(jobs)}] peft {v} / {s}: {n['pass']} pass, {n['fail']} fail, {n['deviation']} dev, "
                f"{n['na']} na in {rec['seconds']:.0f} s", flush=True)
        else:
            log(f"[{k}/{len(jobs)}] peft {v} / {s}: ERROR {rec['line']} ({rec['seconds']:.0f} s)", flush=True)
        out.append(rec)

    for v, group in itertools.groupby(jobs, key=lambda j: j[0]):
        todo = []
        for _, s in group:
            if stopped or time.monotonic() - t0 > budget_s:
                stopped = True
                done({"version": v, "variant": s, "profile": profile, "status": "skipped", "results": None,
                      "seconds": None, "line": f"not started: the budget of {budget_s:.0f} s was spent"})
                continue
            old = _reused_job(v, s, profile, verify_args) if reuse else None
            if old is not None:
                done({"version": v, "variant": s, "profile": profile, "status": "ran", "line": None,
                      "results": old["results"], "seconds": old["seconds"], "reused": True,
                      "shims": old.get("shims"), "transformers": old.get("transformers")})
            else:
                todo.append(s)
        if not todo:
            continue
        log(f"peft {v}: {', '.join(todo)} in one verify", flush=True)
        t = time.monotonic()
        try:
            if v not in envs:
                try:
                    envs[v] = prepare(v)
                except ReleaseError as e:
                    envs[v] = e
            env = envs[v]
            if isinstance(env, ReleaseError):
                raise env
            limit = None if timeout_s is None else timeout_s * len(todo)
            results, line = verify(v, todo, env["site"], profile, verify_args, python, limit), None
        except ReleaseError as e:
            env, results, line = {}, None, str(e)
        wall = time.monotonic() - t
        by = {s: [x for x in results or [] if x["variant"] == s] for s in todo}
        share = max(0.0, wall - sum(x.get("seconds") or 0.0 for rs in by.values() for x in rs)) / len(todo)
        for s in todo:
            rec = {"version": v, "variant": s, "profile": profile, "shims": env.get("shims"),
                   "transformers": env.get("transformers"), "status": "error" if line else "ran", "line": line,
                   "results": None if line else by[s],
                   "seconds": round(share + sum(x.get("seconds") or 0.0 for x in by[s]), 1)}
            if not line:
                _write_job(rec, profile, verify_args)
            done(rec)
    return out, stopped


def _write_job(rec: dict, profile: str, verify_args: list[str]) -> None:
    """build/peft_history/jobs/peft-<release>-<spec>.json and its .meta.json: what `--reuse` takes."""
    from impl.atomic import atomic_write_bytes

    v, s = rec["version"], rec["variant"]
    _job_file(v, s).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_job_file(v, s), json.dumps({"profile": profile, "backend_version": v,
                                                    "results": rec["results"]}).encode())
    meta = {k: rec.get(k) for k in ("seconds", "shims", "transformers")}
    atomic_write_bytes(_job_file(v, s, ".meta.json"),
                       json.dumps({**meta, "profile": profile, "verify_args": verify_args}).encode())


def releases_from_jobs(versions: list[str], variants: list[str], records: list[dict]) -> list[dict]:
    """The per-release records build_history reads, assembled from job records (from one run or from many shards):
    a release's results are its jobs' results in spec order; it 'ran' when some job ran (the other jobs' errors
    and skips are named in its line), is an 'error' when its jobs only errored, else 'skipped'. Its seconds are the
    sum of its jobs' (CPU-side cost, whichever shard ran them)."""
    by = {(r["version"], r["variant"]): r for r in records}
    out = []
    for v in versions:
        recs = [by[(v, s)] for s in variants if (v, s) in by]
        ran = [r for r in recs if r["status"] == "ran"]
        errors = list(dict.fromkeys(r["line"] for r in recs if r["status"] == "error"))
        skipped = [r["variant"] for r in recs if r["status"] == "skipped"]
        missing = [s for s in variants if (v, s) not in by]
        rec = {"version": v, "profile": recs[0]["profile"] if recs else None,
               "seconds": round(sum(r["seconds"] or 0 for r in recs), 1) if recs else None}
        notes = errors + ([f"not started (budget spent): {', '.join(skipped)}"] if skipped else []) \
            + ([f"no shard ran: {', '.join(missing)}"] if missing else [])
        if ran:
            rec.update(status="ran", shims=ran[0].get("shims"), transformers=ran[0].get("transformers"),
                       results=[x for r in ran for x in r["results"]], line="; ".join(notes) or None,
                       reused=True if all(r.get("reused") for r in ran) else None)
        elif errors:
            rec.update(status="error", line="; ".join(notes), results=None)
        else:
            rec.update(status="skipped", line="; ".join(notes) or "not started", results=None)
        out.append(rec)
    return out


def run_shard(versions: list[str], variants: list[str], shard: tuple[int, int], budget_s: float,
              verify_args: list[str], run: dict, log=print, **kw) -> dict:
    """One shard of a history: its slice of the jobs, run; the document `merge` reads (every job of the whole
    history is listed, so the merge can check that the shards belong together and cover it)."""
    i, n = shard
    jobs = job_list(versions, variants)
    mine = shard_slice(jobs, i, n)
    log(f"peft history shard {i}/{n}: {len(mine)} of {len(jobs)} (release, spec) jobs", flush=True)
    t0 = time.time()
    records, stopped = run_jobs(mine, budget_s, verify_args, run["profile"], log=log, **kw)
    return {"schema": SHARD_SCHEMA, "shard": [i, n], "versions": versions, "variants": variants,
            "jobs": [list(j) for j in jobs], "run": run, "records": records, "budget_spent": stopped,
            "seconds": round(time.time() - t0, 1)}


def write_shard(doc: dict, path: Path) -> Path:
    from impl.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
    return path


def merge_shards(docs: list[dict]) -> tuple[dict, dict]:
    """(history, run) from the shard documents of one history; ValueError in one line when they are not the N
    shards of one and the same history (another job list or run options, a shard missing or given twice)."""
    if not docs:
        raise ValueError("merge needs the shard JSON files of a history (none given)")
    for d in docs:
        if not isinstance(d, dict) or d.get("schema") != SHARD_SCHEMA:
            raise ValueError(f"not a PEFT history shard (schema {SHARD_SCHEMA} expected)")
    first = docs[0]
    n = first["shard"][1]
    for d in docs[1:]:
        for key in ("jobs", "versions", "variants", "run"):
            if d[key] != first[key]:
                raise ValueError(f"shard {d['shard'][0]}/{d['shard'][1]} belongs to another history than shard "
                                 f"{first['shard'][0]}/{n}: its {key!r} differ")
        if d["shard"][1] != n:
            raise ValueError(f"shards of {n} and of {d['shard'][1]} cannot be merged")
    got = sorted(d["shard"][0] for d in docs)
    if got != list(range(1, n + 1)):
        dup = sorted({i for i in got if got.count(i) > 1})
        lost = sorted(set(range(1, n + 1)) - set(got))
        raise ValueError(f"the shards of {n} are not all there exactly once: "
                         + ", ".join(([f"missing {lost}"] if lost else []) + ([f"given twice {dup}"] if dup else [])))
    records = [r for d in sorted(docs, key=lambda d: d["shard"][0]) for r in d["records"]]
    releases = releases_from_jobs(first["versions"], first["variants"], records)
    history = build_history(releases)
    run = {**first["run"], "budget_spent": any(d["budget_spent"] for d in docs),
           "shards": [{"shard": f"{d['shard'][0]}/{n}", "jobs": len(d["records"]), "seconds": d["seconds"]}
                      for d in sorted(docs, key=lambda d: d["shard"][0])],
           "seconds": round(max(d["seconds"] for d in docs)),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return history, run


def without_times(doc):
    """A history or shard document with every time field (seconds, date) removed: what must be equal between a
    sharded and an unsharded run, and between runs."""
    if isinstance(doc, dict):
        return {k: without_times(v) for k, v in doc.items() if k not in TIME_KEYS}
    if isinstance(doc, list):
        return [without_times(x) for x in doc]
    return doc


def run_local_shards(argv_common: list[str], k: int, folder: Path, launch=None) -> list[Path]:
    """`run --jobs K`: the K shards as K processes at once (each the command a CI matrix job runs), then their
    files. A shard whose process fails leaves no file, which the merge names."""
    launch = launch or (lambda argv: subprocess.Popen([sys.executable, "-m", "tools.peft_history", *argv], cwd=str(ROOT)))
    procs = []
    for i in range(1, k + 1):
        out = shard_path(i, k, folder)
        if out.exists():
            out.unlink()
        procs.append(launch([*argv_common, "--shard", f"{i}/{k}", "--out", str(out)]))
    for p in procs:
        if hasattr(p, "wait"):
            p.wait()
    paths = [shard_path(i, k, folder) for i in range(1, k + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ReleaseError(f"{len(missing)} of {k} shards wrote no result: {', '.join(missing)}")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.peft_history", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="verify a range of releases and render the history")
    r.add_argument("--peft-versions", default="0.9.0..0.21.2", help="A..B, or V")
    r.add_argument("--all-patches", action="store_true", help="every release, not only the newest patch per minor")
    r.add_argument("--budget-s", type=float, default=3600.0)
    r.add_argument("--profile", default=None, help="Hypothesis profile (default history)")
    r.add_argument("--variants", default=None, help=f"specs, comma-separated (default {HISTORY_VARIANTS})")
    r.add_argument("--full", action="store_true", help="full breadth: every spec PEFT has a mapping of (a release "
                   "without it gives n/a naming the release), every property, the ci profile")
    r.add_argument("--properties", default=None, help="comma-separated, or all (default: all but the slow ones)")
    r.add_argument("-n", "--workers", default=None, help="tools.verify's workers per job (default 2, 1 with --jobs)")
    r.add_argument("--reuse", action="store_true",
                   help="reuse build/peft_history/jobs/peft-<version>-<spec>.json of the same profile")
    r.add_argument("--releases", default="", help="exactly these releases (comma-separated), not the index listing")
    r.add_argument("--shard", default="", help="I/N: run the I-th of N fixed slices of the (release, spec) jobs and "
                   "write build/peft_history/shard-I-of-N.json (then `merge`)")
    r.add_argument("--jobs", type=int, default=1, help="run K shards as K local processes, then merge (0: one per core)")
    r.add_argument("--out", default="", help="the shard JSON path (with --shard)")
    r.add_argument("--timeout-s", type=float, default=VERIFY_TIMEOUT_S, help="limit on one job's verify")
    m = sub.add_parser("merge", help="render the history from the JSON files of all shards of a run")
    m.add_argument("shards", nargs="+")
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
        if a.cmd == "merge":
            docs = []
            for f in a.shards:
                try:
                    docs.append(json.loads(Path(f).read_text(encoding="utf-8")))
                except (OSError, UnicodeDecodeError, ValueError) as e:
                    raise ValueError(f"{f}: not a readable shard JSON ({type(e).__name__}: {str(e)[:160]})") from None
            history, run = merge_shards(docs)
            js, md = write_history(history, run, AUDIT)
            print(f"peft history ({len(docs)} shards) -> {md}, {js}")
            return 0 if all(r["status"] == "ran" for r in history["releases"]) else 1
        positive_seconds(a.budget_s, "--budget-s"), positive_seconds(a.timeout_s, "--timeout-s")
        given = [f"--{n}" for n in ("profile", "variants", "properties") if getattr(a, n) is not None]
        if a.full and given:
            raise ValueError(f"--full sets the profile, the specs and the properties itself: drop {', '.join(given)}")
        lo, hi = parse_range(a.peft_versions)
        if a.releases:
            versions = sorted({v.strip() for v in a.releases.split(",") if v.strip()}, key=parse_version)
        else:
            versions = select(index_versions(), lo, hi, a.all_patches)
        if not versions:
            raise ReleaseError(f"no PEFT release on the index between {lo} and {hi}")
        if a.full:
            a.variants, a.properties, a.profile = ",".join(full_breadth()), "all", "ci"
        else:
            a.variants, a.properties, a.profile = a.variants or HISTORY_VARIANTS, a.properties or "", a.profile or "history"
        variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        k = a.jobs if a.jobs > 0 else (os.cpu_count() or 1)
        shard = parse_shard(a.shard) if a.shard else None
        workers = a.workers or ("1" if (k > 1 or shard) else "2")
        props = history_properties(a.properties)
        args = ["-n", workers] + (["--properties", props] if props else [])
        run = {"range": f"{lo}..{hi}", "all_patches": a.all_patches, "profile": a.profile, "variants": a.variants,
               "properties": a.properties or f"all but {', '.join(HISTORY_SKIP)}", "budget_s": a.budget_s}
        if shard is None:
            print(f"peft history: {len(versions)} releases {', '.join(versions)}; {len(variants)} specs; profile "
                  f"{a.profile}; budget {a.budget_s:.0f} s" + (f"; {k} local shards" if k > 1 else ""), flush=True)
        if shard is None and k > 1:
            common = ["run", "--releases", ",".join(versions), "--peft-versions", a.peft_versions, "--budget-s",
                      str(a.budget_s), "--profile", a.profile, "--variants", a.variants, "--properties", a.properties,
                      "-n", workers, "--timeout-s", str(a.timeout_s)] + (["--all-patches"] if a.all_patches else []) + (["--reuse"] if a.reuse else [])
            paths = run_local_shards(common, k, SHARDS)
            docs = [json.loads(p.read_text()) for p in paths]
        else:
            doc = run_shard(versions, variants, shard or (1, 1), a.budget_s, args, run, reuse=a.reuse,
                            timeout_s=a.timeout_s)
            if shard is not None:
                out = write_shard(doc, Path(a.out) if a.out else shard_path(*shard))
                print(f"peft history shard {shard[0]}/{shard[1]} -> {out}")
                return 0 if all(r["status"] == "ran" for r in doc["records"]) else 1
            docs = [doc]
        history, run = merge_shards(docs)
        js, md = write_history(history, run, AUDIT)
        print(f"peft history -> {md}, {js}" + ("; the budget stopped the run" if run["budget_spent"] else ""))
        return 0 if all(r["status"] == "ran" for r in history["releases"]) else 1
    except (ReleaseError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
