"""Concurrent fetches and a malformed lock.json (issue #27), against the real file server (tests/http_files.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tools.fetch as F
from tests.http_files import FileServer
from tests.test_fetch import COMMIT, gh, raw_path, write_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def _two_unpinned(tmp_path, server):
    a, b = gh("a", "a.py", None), gh("b", "b.py", None)
    server.add(raw_path(a), b"a = 1\n")
    server.add(raw_path(b), b"b = 2\n")
    return write_manifest(tmp_path / "m.toml", [a, b])


@pytest.mark.parametrize("trial", range(4))
def test_concurrent_runs_keep_every_recorded_hash(tmp_path, server, monkeypatch, trial):
    manifest = _two_unpinned(tmp_path, server)
    cache = tmp_path / "cache"
    real = F._read_lock

    def slow_read(cache_dir):  # widen the read-merge-write window, so both runs read before either writes
        out = real(cache_dir)
        time.sleep(0.15)
        return out
    monkeypatch.setattr(F, "_read_lock", slow_read)
    errors: list[BaseException] = []

    def run(ident):
        try:
            F.fetch_all(manifest, cache, only=[ident], github_raw=server.base_url)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    recorded = json.loads((cache / "lock.json").read_text())["recorded"]
    assert sorted(recorded) == [f"github:owner/repo@{COMMIT}:a.py", f"github:owner/repo@{COMMIT}:b.py"]
    report = F.fetch_all(manifest, cache, github_raw=server.base_url)  # both now served from the cache
    assert [r.status for r in report.results] == [F.CACHED, F.CACHED]


def test_a_hash_recorded_first_is_kept(tmp_path):
    key = "github:owner/repo@x:a.py"
    F._write_lock(tmp_path, {key: {"id": "a", "sha256": "1" * 64, "size": 1}})
    F._write_lock(tmp_path, {key: {"id": "a", "sha256": "2" * 64, "size": 1}})
    assert F._read_lock(tmp_path)[key]["sha256"] == "1" * 64


@pytest.mark.parametrize("content, match", [
    ("[]", "a JSON list, not an object"),
    ('"x"', "a JSON str, not an object"),
    ('{"schema_version": 1, "recorded": []}', "unexpected lock format"),
    ("[" * 100_000, "unreadable lock file"),
])
def test_malformed_lock_is_a_clear_error_with_its_own_exit_code(tmp_path, server, content, match):
    manifest = _two_unpinned(tmp_path, server)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "lock.json").write_text(content)
    with pytest.raises(F.LockError, match=match):
        F.fetch_all(manifest, cache, github_raw=server.base_url)
    assert server.request_count == 0
    cli = subprocess.run([sys.executable, "-m", "tools.fetch", "--cache", str(cache), "--manifest", str(manifest)],
                         cwd=REPO_ROOT, env={**os.environ, "REFS_GITHUB_RAW": server.base_url,
                                             "PYTHONPATH": str(REPO_ROOT)},
                         capture_output=True, text=True, timeout=120) if content == "[]" else None
    if cli is not None:
        assert cli.returncode == 3, cli.stderr
        assert "lock.json" in cli.stderr and "Traceback" not in cli.stderr and "delete it" in cli.stderr
