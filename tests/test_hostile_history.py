"""Hostile input, round two (issue 35): the PEFT history and the lora-lite timeline.

Class 7 (every subprocess has a time limit; one that hangs is a failed row naming it), class 9 (a budget that is
not a finite positive number is refused before anything is written; the committed history is replaced only by a
run that completed) and class 14 (a malformed history JSON at render is one line). No network, no pip: the
release environments and verify are stand-ins; a hang is a script that sleeps, killed by the limit.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tools import lora_lite as LL
from tools import peft_history as ph


def _hang(tmp_path: Path) -> str:
    script = tmp_path / "hang.sh"
    script.write_text("#!/bin/sh\nexec sleep 600\n")
    script.chmod(0o755)
    return str(script)


@pytest.fixture
def committed(tmp_path, monkeypatch):
    """audits/peft_history.{json,md} as committed (stand-ins in tmp_path); their bytes."""
    stem = tmp_path / "audits" / "peft_history"
    stem.parent.mkdir()
    for ext in (".json", ".md"):
        stem.with_name(stem.name + ext).write_text(f"committed {ext}\n")
    monkeypatch.setattr(ph, "AUDIT", stem)
    monkeypatch.setattr(ph, "RESULTS", tmp_path / "results")
    return stem, {ext: stem.with_name(stem.name + ext).read_bytes() for ext in (".json", ".md")}


def _unchanged(committed) -> bool:
    stem, before = committed
    return all(stem.with_name(stem.name + ext).read_bytes() == b for ext, b in before.items())


# ----------------------------------------------------------------------------------------------- class 9


@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf", "-inf"])
def test_a_budget_that_is_not_finite_and_positive_is_refused_before_anything_runs(budget, committed, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(ph, "index_versions", lambda *a, **k: pytest.fail("the run started"))
    assert ph.main(["run", f"--budget-s={budget}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--budget-s must be a finite positive number" in err
    assert _unchanged(committed)
    with pytest.raises(ValueError, match="finite positive"):
        ph.run_jobs([("0.9.0", "lora")], float(budget), [], "history", log=lambda *a, **k: None)


def test_the_committed_history_is_replaced_only_by_a_run_that_completed(committed, monkeypatch):
    """The Markdown fails to render (as inf's `| int` did): neither file is written, the JSON included."""
    stem, _ = committed

    def broken(*a, **k):
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(ph, "render_markdown", broken)
    with pytest.raises(OverflowError):
        ph.write_history(ph.build_history([]), {"budget_s": 1.0}, stem=stem)
    assert _unchanged(committed)


def test_a_run_whose_releases_all_fail_still_writes_nothing_on_a_refused_budget(committed, monkeypatch):
    monkeypatch.setattr(ph, "index_versions", lambda *a, **k: ["0.9.0"])
    monkeypatch.setattr(ph, "run_jobs", lambda *a, **k: pytest.fail("the run started"))
    assert ph.main(["run", "--budget-s", "nan", "--peft-versions", "0.9.0"]) == 2
    assert _unchanged(committed)


# ----------------------------------------------------------------------------------------------- class 7


def test_a_release_whose_verify_hangs_is_an_error_row_naming_the_limit(tmp_path, committed, monkeypatch):
    monkeypatch.setattr(ph, "SHARDS", tmp_path)
    lines: list[str] = []
    out, stopped = ph.run_jobs([("0.9.0", "lora")], 3600.0, [], "history", python=_hang(tmp_path),
                               log=lambda s, **k: lines.append(s), timeout_s=0.5,
                               prepare=lambda v: {"site": tmp_path, "shims": [], "transformers": "5.0"})
    assert not stopped and out[0]["status"] == "error"
    assert "did not finish within the timeout of 0.5 s (killed)" in out[0]["line"]
    assert lines[0] == "peft 0.9.0: lora in one verify" and "timeout of 0.5 s" in lines[1]


def test_pip_and_the_probe_have_limits_too(tmp_path, monkeypatch):
    monkeypatch.setattr(ph, "ENVS", tmp_path)
    seen = []

    def run(cmd, **kw):
        seen.append(kw.get("timeout"))
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))

    with pytest.raises(ph.ReleaseError, match=f"pip install did not finish within the timeout of {ph.PIP_TIMEOUT_S:g} s"):
        ph.ensure_env("0.13.2", run=run)
    with pytest.raises(ph.ReleaseError, match="the import probe did not finish within the timeout"):
        ph.probe("0.13.2", tmp_path, run=run)
    assert seen == [ph.PIP_TIMEOUT_S, ph.PROBE_TIMEOUT_S]


def test_a_timeline_commit_whose_verify_hangs_is_a_row_naming_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(LL.sys, "executable", _hang(tmp_path))
    data = LL.run_commit("ab" * 20, tmp_path, [], tmp_path, timeout_s=0.5)
    assert data == {"error": "verify did not finish within the timeout of 0.5 s (killed)", "results": []}
    md, _ = LL.table([{"commit": "ab" * 20, "subject": "s", **data}])
    assert "verify did not finish within the timeout" in md


# ----------------------------------------------------------------------------------------------- class 14


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"schema": "lora-verify/peft-history/1"}),
                                  json.dumps({"schema": "lora-verify/peft-history/1", "run": {},
                                              "releases": [{"version": "0.9.0"}]}),
                                  "\xff\xfe"])
def test_a_malformed_history_json_at_render_is_one_line(text, committed, tmp_path, capsys):
    p = tmp_path / "h.json"
    p.write_bytes(text.encode("latin-1"))
    assert ph.main(["render", "--json", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and str(p) in err
    assert _unchanged(committed)
