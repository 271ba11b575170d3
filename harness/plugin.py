"""pytest plugin that turns (variant x property) into ordinary pytest items and collects their Results.

Loaded by `python -m tools.verify` (`-p harness.plugin`); works under pytest-xdist: each item attaches its Result
to its report's user_properties, and the controller builds the table and the JSON from the reports.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from spec import SPECS

from . import records, torch_state
from .engine import DEFAULT_DEADLINE_S, SCHEMA, Result, changes, encode_json, quantized_matrix, table
from .probes import PROPERTIES

ROOT = Path(__file__).resolve().parents[1]


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
    g.addoption("--verify-json", default=None, help="where to write the results JSON (the previous one is kept "
                                                   "beside it as <name>.prev.json)")
    g.addoption("--verify-deadline-s", type=float, default=None,
                help=f"seconds one property may run before its row fails naming the limit (default {DEFAULT_DEADLINE_S:g} "
                     "per 20 examples of the profile; 0: no limit)")
    g.addoption("--verify-journal", default=None,
                help="internal (tools.verify -n 0): a file of the rows so far, kept across a process that died")


def _one_line(e: BaseException) -> str:
    """`Type: first line of the message`, capped: how a module that cannot be imported is reported."""
    from .engine import cap_text

    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {cap_text(lines[0] if lines else '', 300)}"


def _opt(config, name):
    return config.getoption(name)


def _backend(config):
    """The backend under test: --backend NAME, else the one backend --backend-module registered, else impl."""
    from .backends import load_backend_module, make

    loaded = []
    for mod in _opt(config, "backend_module"):
        try:
            loaded += load_backend_module(mod)
        except BaseException as e:  # noqa: BLE001 - SyntaxError, SystemExit, KeyboardInterrupt at import: one line
            raise pytest.UsageError(f"--backend-module {mod} cannot be loaded: {_one_line(e)}") from None
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
    except (ImportError, RuntimeError, ValueError, OSError) as e:  # a backend that cannot start says why, in one line
        raise pytest.UsageError(f"backend {name!r} cannot start: {e}") from None
    except BaseException as e:  # noqa: BLE001 - anything else its constructor raises (SystemExit included): one line
        raise pytest.UsageError(f"backend {name!r} cannot start: {_one_line(e)}") from None


def results_path(config, be) -> Path:
    """--verify-json, else build/verify/<backend's results stem or name>.json; a stem that is not a plain name (a
    path, '..') is refused in one line."""
    from .backends import check_name

    if _opt(config, "verify_json"):
        return Path(_opt(config, "verify_json"))
    stem = getattr(be, "results_stem", be.name)
    try:
        check_name(stem, "results file name of the backend")
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    return Path("build/verify") / results_name(stem, config)


class SigintSeen:
    """Whether this process received SIGINT (the user's Ctrl-C), as opposed to a KeyboardInterrupt raised by the code
    under test, which the engine records as a crash. Installed in the main thread only."""

    def __init__(self) -> None:
        self.seen = False
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread() and callable(previous):  # (an ignored SIGINT stays so)

            def handler(signum, frame):
                self.seen = True
                previous(signum, frame)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, handler)

    def __call__(self) -> bool:
        return self.seen


def pytest_configure(config):
    import impl

    for mod in _opt(config, "variant_module"):
        try:
            impl.load_variant_module(mod)
        except impl.ConfigError as e:
            raise pytest.UsageError(str(e)) from None
        except BaseException as e:  # noqa: BLE001 - SyntaxError, SystemExit, KeyboardInterrupt at import: one line
            raise pytest.UsageError(f"--variant-module {mod} cannot be loaded: {_one_line(e)}") from None
    profile = _opt(config, "verify_profile") or ("ci" if os.environ.get("CI") else "verify")
    be = _backend(config)
    from .backends import check_name

    try:
        check_name(be.name)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config._verify = {"profile": profile, "backend": be, "device": _opt(config, "device"),
                      "t0": time.perf_counter(), "path": results_path(config, be),
                      "deadline_s": _opt(config, "verify_deadline_s"), "interrupted": SigintSeen(),
                      "expected": set(), "no_row": {}}
    torch.set_num_threads(1)  # one torch thread per process (each xdist worker sets its own)
    torch_state.register(config)  # every item starts from this torch state (grad mode, dtype, ...)
    config.pluginmanager.register(RowKeeper(config), "verify-rows")
    if hasattr(config, "workerinput"):  # a worker shows library logging from --log-level up, as the controller does
        handler = logging.StreamHandler()
        handler.setLevel(config.getoption("log_level") or "ERROR")
        logging.getLogger().addHandler(handler)


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


# ------------------------------------------------------------------ rows of items that crashed or never reported
# Every collected verify item ends as a row: a worker that died (xdist's crash report), an item that failed outside
# the property, or one that never reported (an interrupted run) becomes a failed row of kind crash naming what
# happened. Under -n 0 tools.verify runs pytest in a child process with a journal (--verify-journal): each item's
# start and row are appended to it, so that when the process dies inside an item (os._exit, a segfault) the
# supervisor records that item as a crash and runs the rest in a new process, which reads the earlier rows back.

DIED = "the verify process died while running it"


def _item_pair(config, nodeid: str) -> tuple[str, str] | None:
    """(variant, property) of a verify item's node id, from the ids pytest_generate_tests gave."""
    ids = getattr(config, "_verify_ids", None)
    if ids is None:
        variants, props = selected(config)
        ids = config._verify_ids = {f"{v}-{p}": (v, p) for v in variants for p in props}
    head, _, rest = nodeid.partition("::test_property[")
    return ids.get(rest[:-1]) if rest.endswith("]") and head.endswith("verify_test.py") else None


def _journal(config, entry: dict) -> None:
    path = _opt(config, "verify_journal")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def journal_rows(path: str | None) -> dict[str, dict]:
    """node id -> row, from a journal (the rows of earlier processes of the same run)."""
    rows = {}
    if path and Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if "row" in entry:
                rows[entry["nodeid"]] = entry["row"]
    return rows


def pytest_collection_modifyitems(config, items):
    done = journal_rows(_opt(config, "verify_journal"))
    if done:
        keep = [i for i in items if i.nodeid not in done]
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid in done])
        items[:] = keep


def pytest_collection_finish(session):
    session.config._verify["expected"].update(i.nodeid for i in session.items if _item_pair(session.config, i.nodeid))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    config = node.config
    config._verify["expected"].update(i for i in ids if _item_pair(config, i))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    pair = _item_pair(item.config, item.nodeid)
    if pair:
        crash = Result(*pair, "fail", DIED, failure_kind="crash").to_json()
        _journal(item.config, {"start": item.nodeid, "crash_row": crash})


class RowKeeper:
    """Notes each verify item's row in the journal, and why an item that failed has none."""

    def __init__(self, config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report):
        rows = [v for k, v in getattr(report, "user_properties", ()) if k == "verify"]
        if rows and report.when == "call":
            row = json.loads(rows[0]) if isinstance(rows[0], str) else rows[0]
            _journal(self.config, {"nodeid": report.nodeid, "row": row})
        elif not rows and report.failed and _item_pair(self.config, report.nodeid):
            text = str(report.longrepr).strip().splitlines()
            self.config._verify["no_row"].setdefault(report.nodeid, text[-1] if text else f"failed at {report.when}")


def pytest_unconfigure(config):
    if hasattr(config, "_verify"):
        _journal(config, {"end": True})


def missing_rows(config, reported: set[tuple[str, str]]) -> list[dict]:
    """Failed rows (kind crash) for the collected verify items that have no row: the reason pytest or xdist gave
    for the item (a worker that crashed while running it, a failure outside the property), else that the run
    ended before the item reported."""
    env, out = config._verify, []
    for nodeid in sorted(env["expected"]):
        pair = _item_pair(config, nodeid)
        if pair and pair not in reported:
            why = env["no_row"].get(nodeid, "the run ended before it reported (interrupted, or its process was lost)")
            out.append(Result(*pair, "fail", f"no result: {why}", failure_kind="crash").to_json())
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput"):
        return
    results = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            for key, value in getattr(rep, "user_properties", ()):
                if key == "verify" and getattr(rep, "when", "call") in ("call", "setup"):
                    results.append(json.loads(value) if isinstance(value, str) else value)
    reported = {(r["variant"], r["property"]) for r in results}
    earlier = [r for r in journal_rows(_opt(config, "verify_journal")).values()
               if (r["variant"], r["property"]) not in reported]  # rows of this run's earlier processes (-n 0)
    results += earlier + missing_rows(config, reported | {(r["variant"], r["property"]) for r in earlier})
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
        "all_variants": list(SPECS.names()),
        # specs the backend has no counterpart of (all their rows are na): the review leaves them out, naming why
        "not_applicable": {n: why for n in SPECS.names() if (why := be.applies(SPECS.get(n)))},
        "properties": props,
        "results": results,
        "quantized_matrix": qm,
        "specs": {v: records.spec_record(specs[v], be, ROOT) for v in variants},
        "summary": {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "deviation", "na")},
        "unchecked": [f"{r['variant']}/{r['property']}" for r in results if r.get("unchecked")],
    }
    payload["findings"] = {v: records.record_findings(specs[v], payload["specs"][v],
                                                      [r for r in results if r["variant"] == v], be.name, props)
                           for v in variants}
    path = env["path"]
    tr = terminalreporter
    tr.write_sep("=", f"verify: backend {be.name}, profile {env['profile']}, device {env['device']}")
    tr.write_line(table(results, variants, props))
    if qm:
        tr.write_line("")
        tr.write_line("quantized support (bitsandbytes 4-bit / 8-bit): declared -> observed")
        w = max(map(len, qm))
        for v, row in qm.items():
            same = row["bnb4"] == row["bnb8"]
            observed = f"bnb4 and bnb8 {row['bnb4']}" if same else f"bnb4 {row['bnb4']}; bnb8 {row['bnb8']}"
            tr.write_line(wrapped(f"  {v:<{w}} declared {row['declared']:<7} observed {observed}"))
    for r in results:
        if r["status"] in ("fail", "deviation"):
            label = "CRASH" if r.get("failure_kind") == "crash" else r["status"].upper()
            tr.write_line(wrapped(f"{label:9} {r['variant']}/{r['property']}: {r['detail']}"))
            if r["status"] == "fail" and r.get("example"):
                tr.write_line(wrapped(f"          minimal example: {r['example']}"))
        elif r.get("unchecked"):
            tr.write_line(wrapped(f"UNCHECKED {r['variant']}/{r['property']}: {r['detail']}"))
    try:  # the table is out; the previous JSON is kept as .prev.json only once the new one is serialised
        data = encode_json(payload)
    except (TypeError, ValueError, RecursionError) as e:
        tr.write_line(summary_line(payload, time.perf_counter() - env["t0"]))
        tr.write_line(f"verify: the results JSON was not written ({_one_line(e)}); {path} is left as it was")
        return
    previous = keep_previous(path)
    from impl.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    tr.write_line(summary_line(payload, time.perf_counter() - env["t0"]) + f" -> {path}")
    if previous is None:
        failing = [f"{r['variant']}/{r['property']}" for r in results if r["status"] == "fail"]
        tr.write_line(wrapped(f"first run into {path}: every result is new ({len(results)}; {len(failing)} failing"
                              + (f": {', '.join(failing)})" if failing else ")")))
    else:
        prev_path, prev_results = previous
        if isinstance(prev_results, str):
            tr.write_line(f"the previous run ({prev_path}) is not compared: {prev_results}")
        else:
            tr.write_line(describe_changes(changes(prev_results, results), prev_path))


def wrapped(text: str, width: int = 120, max_lines: int = 12) -> str:
    """A summary line wrapped at word boundaries, continuation lines indented 10 columns; a longer text ends
    after `max_lines` lines with ' [...]' at a word boundary (the JSON keeps it whole). Never cut mid-word."""
    import textwrap

    lines = textwrap.wrap(text, width=width, subsequent_indent=" " * 10, break_long_words=False,
                          break_on_hyphens=False, max_lines=max_lines, placeholder=" [...]")
    return "\n".join(lines) or text


def results_name(stem: str, config) -> str:
    """The results file of a run: `<stem>.json` for the full run (every spec, every property, no user module), else
    a name of its own saying the selection, `<stem>-<variants>-<properties>[-with-<modules>].json` ("all" for a
    part not selected), or `<stem>-sel-<hash of the selection>.json` when that name would be long. A subset
    never overwrites the full run's file or its .prev.json."""
    import hashlib

    variants = [v for v in (_opt(config, "variants") or "").split(",") if v]
    props = [p for p in (_opt(config, "properties") or "").split(",") if p]
    modules = [Path(m).stem if m.endswith(".py") else m for m in _opt(config, "variant_module") or ()]
    if not (variants or props or modules):
        return f"{stem}.json"
    tag = "-".join(["+".join(variants) or "all", "+".join(props) or "all"] + (["with-" + "+".join(modules)] if modules else []))
    if len(tag) > 80 or not all(c.isalnum() or c in "+-_." for c in tag):
        tag = "sel-" + hashlib.sha256(tag.encode()).hexdigest()[:12]
    return f"{stem}-{tag}.json"


def summary_line(payload: dict, seconds: float) -> str:
    """The run's counts, from its results: 'verify: V variants x P properties: ... pass, ... in S s'."""
    n = payload["summary"]
    return (f"verify: {len(payload['variants'])} variants x {len(payload['properties'])} properties: {n['pass']} pass, "
            f"{n['deviation']} declared deviation, {n['na']} n/a"
            + (f" ({len(payload['unchecked'])} unchecked: {', '.join(payload['unchecked'])})"
               if payload.get("unchecked") else "")
            + f", {n['fail']} fail in {seconds:.0f} s")


def keep_previous(path: Path) -> tuple[Path, list[dict] | str] | None:
    """Copy the results JSON of the previous run at `path` to <name>.prev.json (atomically; `path` itself stays
    until the new JSON replaces it); return (that path, its results, or why they cannot be read), or None when
    there was no previous run."""
    from impl.atomic import atomic_write_bytes

    if not path.is_file():
        return None
    prev = path.with_name(path.stem + ".prev.json")
    atomic_write_bytes(prev, path.read_bytes())
    try:
        return prev, json.loads(prev.read_text())["results"]
    except (ValueError, KeyError, TypeError) as e:
        return prev, f"not a results file ({type(e).__name__}: {e})"


def describe_changes(ch: dict[str, list[str]], prev: Path) -> str:
    """One line per kind of change since the previous run, or one line saying nothing changed."""
    labels = (("new_failures", "new failures"), ("fixed", "fixed"), ("other", "other changes"),
              ("new", "new, not in that run"))
    lines = [wrapped(f"  {label} ({len(ch[k])}): {', '.join(ch[k])}") for k, label in labels if ch.get(k)]
    head = f"since the previous run ({prev}):"
    return "\n".join([head] + lines) if lines else f"{head} no status changed"


def _impl_version() -> str:
    try:
        from importlib.metadata import version

        return version("lora-verify")
    except Exception:
        return "source"
