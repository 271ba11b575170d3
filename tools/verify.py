"""`python -m tools.verify`: run every property on every variant and write the results table and JSON.

Options: --variants lora,dora  --properties oracle,merge  --variant-module path/or.module
--backend impl|peft|lora-lite  --backend-module path/or.module (a user's backend)  --ref COMMIT  --repo PATH_OR_URL
(lora-lite's source)  --device cpu|cuda  --profile verify|ci|dev  --json PATH  -n WORKERS  --log-level LEVEL
--deadline-s S (per property). Exits non-zero on any failure; exit status 6 (harness.backends.protocol.BACKEND_INVALID):
a --backend-module's backend breaks the protocol (checked before anything runs; one line per problem on stderr).
The previous run's JSON is kept as <name>.prev.json and the summary says what changed since it. Logging from the
libraries under test is shown from --log-level (default ERROR) up. With -n 0 (or 1) the run is one child process,
restarted after the item it was running when it died (os._exit, a segfault): that item is a crash row and the run
goes on. Library Python warnings are shown only from --log-level WARNING down.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOURNAL = "LORA_VERIFY_JOURNAL"  # set for the child process of a supervised (-n 0) run


def _died(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}, without finishing the run"


def _entries(journal: Path, start: int) -> list[dict]:
    """The journal's entries from byte `start` on (a line cut short by the process's death is left out)."""
    if not journal.exists():
        return []
    with open(journal, "rb") as f:
        f.seek(start)
        lines = f.read().decode("utf-8", "replace").splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def supervise(argv: list[str]) -> int:
    """Run this command as a child process with a journal; when the child dies inside an item, record that item as
    a crash row (from the journal's start entry) and run the rest in a new child, which reads the rows so far back
    and writes the table and the JSON of the whole run. The exit status: the last child's, at least 1 when an item
    crashed."""
    crashed = 0
    with tempfile.TemporaryDirectory(prefix="lora-verify-") as d:
        journal = Path(d) / "journal.jsonl"
        env = {**os.environ, JOURNAL: str(journal),
               "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)}
        while True:
            start = journal.stat().st_size if journal.exists() else 0
            proc = subprocess.Popen([sys.executable, "-m", "tools.verify", *argv], env=env)
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:  # the child got the same Ctrl-C: it ends its run and writes its summary
                    continue
            entries = _entries(journal, start)
            open_item, ended = None, False
            for e in entries:
                if "start" in e:
                    open_item = e
                elif "row" in e and open_item and e["nodeid"] == open_item["start"]:
                    open_item = None
                ended = ended or "end" in e
            if ended or open_item is None:
                return max(rc, 1) if crashed and rc in (0, 5) else rc
            row = dict(open_item["crash_row"])
            row["detail"] += f" ({_died(rc)}); the run went on in a new process"
            with open(journal, "a", encoding="utf-8") as f:
                f.write(json.dumps({"nodeid": open_item["start"], "row": row}) + "\n")
            print(f"verify: {row['variant']}/{row['property']}: the process died ({_died(rc)}); recorded as a crash, "
                  "going on with the rest", file=sys.stderr, flush=True)
            crashed += 1


def show_logging_from(level: str) -> None:
    """Let records from `level` up through to stderr, whatever level a library set on its own logger (a handler
    level filters every record that reaches it; logging's last-resort handler would print warnings)."""
    handler = logging.StreamHandler()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(level)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.verify", description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="", help="comma-separated variant names (default: every registered one)")
    ap.add_argument("--properties", default="",
                    help="comma-separated property names, those of the results table's legend, e.g. oracle,merge "
                         "(default: all)")
    ap.add_argument("--variant-module", action="append", default=[],
                    help="a .py file registering a variant (impl.register) and its spec (spec.register); repeatable")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--backend-module", action="append", default=[])
    ap.add_argument("--ref", default=None)
    ap.add_argument("--repo", default=None)
    ap.add_argument("--fetch-only", action="store_true", help="only fetch --repo URL's archive of --ref, then exit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", default=None, help="Hypothesis profile: verify (default), dev, ci, zoo, history")
    ap.add_argument("--json", default=None,
                    help="results file (default: build/verify/<backend>[-<selection>].json under the current folder)")
    ap.add_argument("-n", "--workers", default="2", help="xdist workers (default 2); 0 or 1: one supervised process")
    ap.add_argument("--log-level", default="ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                    help="show library logging from this level up (default ERROR)")
    ap.add_argument("--peft-version", default=None, help="handled by `nox -s verify`; here it must match the installed peft")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="seconds one property may run before its row fails naming the limit (default 900 per 20 "
                         "examples of the profile; 0: no limit)")
    a = ap.parse_args(argv)
    if a.deadline_s is not None and not 0 <= a.deadline_s < 10**7:  # NaN and inf fail this too
        ap.error(f"--deadline-s {a.deadline_s}: expected seconds from 0 (no limit) to 10**7")
    if a.peft_version:
        from importlib.metadata import version

        from tools.peft_history import parse_version

        try:
            parse_version(a.peft_version)
        except ValueError as e:
            ap.error(f"--peft-version: {e}")
        if (a.backend or "impl") != "peft":
            ap.error(f"--peft-version verifies the PEFT backend; it cannot go with --backend {a.backend or 'impl'}")
        have = version("peft")
        if have != a.peft_version:
            ap.error(f"--peft-version {a.peft_version} requested but peft {have} is installed; run it through nox -s verify")
    if a.fetch_only and not (a.ref and a.repo and re.match(r"^https?://", a.repo)):
        ap.error("--fetch-only fetches an http(s) --repo URL's archive of --ref; nothing to fetch otherwise")
    if a.workers in ("0", "1") and not a.fetch_only and not os.environ.get(JOURNAL):
        return supervise(sys.argv[1:] if argv is None else list(argv))
    if a.repo and a.ref:
        from tools.lora_lite import local_source

        try:  # a URL's archive is fetched (sha256-checked) into .cache/; a git repository's commit extracted
            a.ref, a.repo = local_source(a.ref, a.repo)
        except (RuntimeError, ValueError) as e:  # tools.lora_lite.SourceError and the fetch refusals: one line
            print(f"error: {e}", file=sys.stderr)
            return 2
    if a.fetch_only:
        return 0
    if a.backend_module:
        from harness.backends import ModuleLoadError, check_backend_modules
        from harness.backends.protocol import BACKEND_INVALID

        try:
            problems = check_backend_modules(a.backend_module, a.backend)
        except ModuleLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 4  # pytest's usage error, as the plugin answers the same module
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return BACKEND_INVALID
    show_logging_from(a.log_level)
    if a.log_level == "ERROR" and not sys.warnoptions and "PYTHONWARNINGS" not in os.environ:
        # libraries' Python warnings (FutureWarning, deprecations) only from --log-level WARNING down; the
        # environment variable carries the filter into the xdist workers from their first import
        os.environ["PYTHONWARNINGS"] = "ignore"
        warnings.simplefilter("ignore")
    args = [str(ROOT / "harness" / "verify_test.py"), "-p", "harness.plugin", "-q", "--no-header", "-p", "no:randomly",
            "-p", "no:warnings", f"--log-level={a.log_level}", f"--rootdir={ROOT}", "--device", a.device]
    if a.workers not in ("0", "1"):
        args += ["-n", a.workers]
    for flag, value in (("--variants", a.variants), ("--properties", a.properties), ("--verify-profile", a.profile),
                        ("--verify-json", a.json), ("--backend", a.backend), ("--ref", a.ref), ("--repo", a.repo)):
        if value:
            args += [flag, value]
    for m in a.variant_module:
        args += ["--variant-module", m]
    if a.deadline_s is not None:
        args += ["--verify-deadline-s", str(a.deadline_s)]
    if os.environ.get(JOURNAL):
        args += ["--verify-journal", os.environ[JOURNAL]]
    for m in a.backend_module:
        args += ["--backend-module", m]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
