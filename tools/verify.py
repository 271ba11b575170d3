"""`python -m tools.verify`: run every property on every variant and write the results table and JSON.

Options: --variants lora,dora  --properties oracle,merge  --variant-module path/or.module
--backend impl|peft|lora-lite  --backend-module path/or.module (a user's backend)  --ref COMMIT  --repo PATH_OR_URL
(lora-lite's source)  --device cpu|cuda  --profile verify|ci|dev  --json PATH  -n WORKERS  --log-level LEVEL. Exits
non-zero on any failure. The previous run's JSON is kept as <name>.prev.json and the summary says what changed since
it. Logging from the libraries under test is shown from --log-level (default ERROR) up, and their Python warnings
only from WARNING down.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
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
    if a.repo and a.ref:
        from tools.lora_lite import local_source

        a.ref, a.repo = local_source(a.ref, a.repo)  # a URL's archive is fetched (sha256-checked) into .cache/
    if a.fetch_only:
        return 0
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
    for m in a.backend_module:
        args += ["--backend-module", m]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
