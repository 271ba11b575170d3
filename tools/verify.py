"""`python -m tools.verify`: run every property on every variant and write the results table and JSON.

Options: --variants lora,dora  --properties oracle,merge  --variant-module path/or.module
--backend impl|peft|lora-lite  --backend-module path/or.module (a user's backend)  --ref COMMIT  --repo PATH_OR_URL
(lora-lite's source)  --device cpu|cuda  --profile verify|ci|dev  --json PATH  -n WORKERS  --log-level LEVEL. Exits
non-zero on any failure; exit status 6 (harness.backends.protocol.BACKEND_INVALID): a --backend-module's backend
breaks the protocol (checked before anything runs; one line per problem on stderr). The previous run's JSON is kept as <name>.prev.json and the summary says what changed since
it. Logging from the libraries under test is shown from --log-level (default ERROR) up.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    ap.add_argument("--variants", default="")
    ap.add_argument("--properties", default="")
    ap.add_argument("--variant-module", action="append", default=[])
    ap.add_argument("--backend", default=None)
    ap.add_argument("--backend-module", action="append", default=[])
    ap.add_argument("--ref", default=None)
    ap.add_argument("--repo", default=None)
    ap.add_argument("--fetch-only", action="store_true", help="only fetch --repo URL's archive of --ref, then exit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("-n", "--workers", default="2")
    ap.add_argument("--log-level", default="ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                    help="show library logging from this level up (default ERROR)")
    ap.add_argument("--peft-version", default=None, help="handled by `nox -s verify`; here it must match the installed peft")
    a = ap.parse_args(argv)
    if a.peft_version:
        from importlib.metadata import version

        have = version("peft")
        if have != a.peft_version:
            ap.error(f"--peft-version {a.peft_version} requested but peft {have} is installed; run it through nox -s verify")
    if a.fetch_only and not (a.ref and a.repo and re.match(r"^https?://", a.repo)):
        ap.error("--fetch-only fetches an http(s) --repo URL's archive of --ref; nothing to fetch otherwise")
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
        from harness.backends import check_backend_modules
        from harness.backends.protocol import BACKEND_INVALID

        problems = check_backend_modules(a.backend_module, a.backend)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return BACKEND_INVALID
    show_logging_from(a.log_level)
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
    for m in a.backend_module:
        args += ["--backend-module", m]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
