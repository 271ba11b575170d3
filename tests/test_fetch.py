"""Tests of ``tools.fetch`` against a real HTTP server on 127.0.0.1 and real archives in tmp.

No part of the client is mocked: GitHub downloads go over TCP to ``tests.http_files``;
PyPI downloads either run the real ``pip download`` against a local ``--find-links``
folder (offline) or use an injected downloader that copies a locally built archive, and
the member is then read by the real tarfile/zipfile code. After every refusal the cache
directory is compared byte for byte with its state before the call.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.http_files import HUGE_LENGTH, NO_LENGTH, SLOW, TRUNCATED, FileServer, closed_port
from tools.fetch import (
    CACHED,
    DEFAULT_MANIFEST,
    FETCHED,
    MISSING,
    RECORDED,
    FetchReport,
    Limits,
    ManifestError,
    cached_path,
    fetch_all,
    load_manifest,
    make_pip_downloader,
    pip_download_command,
    redact,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
PKG, VER = "refpkg", "1.0"
WHEEL_NAME = f"{PKG}-{VER}-py3-none-any.whl"
SDIST_NAME = f"{PKG}-{VER}.tar.gz"
SMALL = Limits(max_file_bytes=1000, max_archive_bytes=200_000, total_timeout_s=5.0, read_timeout_s=2.0)


# --------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def write_manifest(path: Path, entries: list[Mapping[str, Any]], schema_version: int = 1) -> Path:
    lines = [f"schema_version = {schema_version}", ""]
    for entry in entries:
        lines.append("[[file]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def gh(ident: str, path: str, body: bytes | None, commit: str = COMMIT, **over: Any) -> dict[str, Any]:
    """A github manifest entry; body=None means "sha256 recorded on first fetch"."""
    entry: dict[str, Any] = {
        "id": ident,
        "variants": ["lora"],
        "source": "github",
        "repo": "owner/repo",
        "commit": commit,
        "path": path,
    }
    if body is None:
        entry.update(sha256="", sha256_status="record-on-first-fetch")
    else:
        entry.update(sha256=sha(body), size=len(body))
    entry.update(licence="MIT", url=f"https://github.com/owner/repo/blob/{commit}/{path}")
    entry.update(over)
    return entry


def pypi(ident: str, path: str, body: bytes, artifact: str = "wheel", **over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": ident,
        "variants": ["dora"],
        "source": "pypi",
        "package": PKG,
        "version": VER,
        "artifact": artifact,
        "path": path,
        "sha256": sha(body),
        "size": len(body),
        "licence": "Apache-2.0",
        "url": f"https://pypi.org/project/{PKG}/{VER}/",
    }
    entry.update(over)
    return entry


def raw_path(entry: Mapping[str, Any]) -> str:
    return f"/{entry['repo']}/{entry['commit']}/{entry['path']}"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every folder (None) and file (its bytes) under root: the cache, byte for byte."""
    if not root.exists():
        return {}
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = p.read_bytes() if p.is_file() else None
    return out


def build_wheel(folder: Path, members: Mapping[str, bytes], symlinks: Mapping[str, str] = {}) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WHEEL_NAME
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in symlinks.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
        zf.writestr(f"{PKG}-{VER}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {VER}\n")
        zf.writestr(f"{PKG}-{VER}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{PKG}-{VER}.dist-info/RECORD", "")
    return path


def build_sdist(
    folder: Path, members: Mapping[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None
) -> Path:
    """members are named relative to the archive root (include the top folder yourself)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SDIST_NAME
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tf)
    return path


class CopyDownloader:
    """An injected PyPI step: copies a prebuilt archive into pip's destination and counts calls."""

    def __init__(self, archive: Path):
        self.archive = archive
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, package: str, version: str, artifact: str, dest: Path) -> Path:
        self.calls.append((package, version, artifact))
        target = dest / self.archive.name
        shutil.copyfile(self.archive, target)
        return target


def status_of(report: FetchReport, ident: str):
    (result,) = [r for r in report.results if r.id == ident]
    return result


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _prefill(tmp_path: Path, server: FileServer, cache: Path) -> dict[str, Any]:
    """Put one good file in the cache so "unchanged" compares a non-empty folder."""
    body = b"# a good cached reference\n" * 3
    entry = gh("good", "src/good.py", body, commit=OTHER_COMMIT)
    server.add(raw_path(entry), body)
    report = fetch_all(write_manifest(tmp_path / "pre.toml", [entry]), cache, github_raw=server.base_url)
    assert status_of(report, "good").status == FETCHED
    return entry


# --------------------------------------------------------------------------- GitHub path


def test_github_fetch_stores_verified_copies_at_pinned_urls(tmp_path, server, cache):
    a, b = b"def f():\n    return 1\n", b"x = 2\n" * 50
    ea, eb = gh("a", "src/pkg/a.py", a), gh("b", "docs/b file.py", b)
    server.add(raw_path(ea), a)
    server.add("/owner/repo/" + COMMIT + "/docs/b%20file.py", b)
    manifest = write_manifest(tmp_path / "m.toml", [ea, eb])
    before_manifest = manifest.read_bytes()

    report = fetch_all(manifest, cache, github_raw=server.base_url)

    assert [r.status for r in report.results] == [FETCHED, FETCHED]
    assert server.paths() == [raw_path(ea), f"/owner/repo/{COMMIT}/docs/b%20file.py"]
    entries = {e.id: e for e in load_manifest(manifest)}
    assert cached_path(entries["a"], cache).read_bytes() == a
    assert cached_path(entries["b"], cache).read_bytes() == b
    assert status_of(report, "a").path == str(cache / "sha256" / sha(a))
    assert report.file_bytes == len(a) + len(b) and report.downloaded_bytes == len(a) + len(b)
    assert not (cache / "lock.json").exists()
    assert manifest.read_bytes() == before_manifest
    assert not [p for p in cache.rglob("*.tmp")]


def test_warm_cache_makes_no_request_and_refresh_does(tmp_path, server, cache):
    body = b"print('hi')\n"
    wheel = build_wheel(tmp_path / "dist", {"refpkg/mod.py": b"y = 3\n"})
    entries = [gh("a", "a.py", body), pypi("w", "refpkg/mod.py", b"y = 3\n")]
    server.add(raw_path(entries[0]), body)
    manifest = write_manifest(tmp_path / "m.toml", entries)
    downloader = CopyDownloader(wheel)

    first = fetch_all(manifest, cache, github_raw=server.base_url, pypi_download=downloader)
    assert [r.status for r in first.results] == [FETCHED, FETCHED]
    assert server.request_count == 1 and len(downloader.calls) == 1

    second = fetch_all(manifest, cache, github_raw=server.base_url, pypi_download=downloader)
    assert [r.status for r in second.results] == [CACHED, CACHED]
    assert server.request_count == 1 and len(downloader.calls) == 1
    assert second.downloaded_bytes == 0

    third = fetch_all(manifest, cache, github_raw=server.base_url, pypi_download=downloader, refresh=True)
    assert [r.status for r in third.results] == [FETCHED, FETCHED]
    assert server.request_count == 2 and len(downloader.calls) == 2


def test_a_corrupted_cached_copy_is_fetched_again(tmp_path, server, cache):
    body = b"good = True\n"
    entry = gh("a", "a.py", body)
    server.add(raw_path(entry), body)
    manifest = write_manifest(tmp_path / "m.toml", [entry])
    fetch_all(manifest, cache, github_raw=server.base_url)
    (cache / "sha256" / sha(body)).write_bytes(b"good = False\n")

    report = fetch_all(manifest, cache, github_raw=server.base_url)

    assert status_of(report, "a").status == FETCHED and server.request_count == 2
    assert (cache / "sha256" / sha(body)).read_bytes() == body


def test_env_vars_choose_cache_and_github_base(tmp_path, server, monkeypatch):
    body = b"z = 1\n"
    entry = gh("a", "a.py", body)
    server.add(raw_path(entry), body)
    monkeypatch.setenv("REFS_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setenv("REFS_GITHUB_RAW", server.base_url + "/")
    report = fetch_all(write_manifest(tmp_path / "m.toml", [entry]))
    assert status_of(report, "a").status == FETCHED
    assert (tmp_path / "envcache" / "sha256" / sha(body)).read_bytes() == body


# --------------------------------------------------------------------------- refusals (GitHub)


def test_hash_mismatch_is_refused_and_cache_unchanged(tmp_path, server, cache):
    _prefill(tmp_path, server, cache)
    before = snapshot(cache)
    entry = gh("bad", "bad.py", b"the pinned bytes\n")
    server.add(raw_path(entry), b"different bytes\n")

    report = fetch_all(write_manifest(tmp_path / "m.toml", [entry]), cache, github_raw=server.base_url)

    result = status_of(report, "bad")
    assert result.status == MISSING and result.reason_code == "sha256_mismatch"
    assert sha(b"different bytes\n") in result.reason
    assert report.refused == (result,)
    assert snapshot(cache) == before


def test_refresh_never_replaces_a_cached_copy_with_mismatching_bytes(tmp_path, server, cache):
    entry = _prefill(tmp_path, server, cache)
    before = snapshot(cache)
    server.add(raw_path(entry), b"# tampered upstream\n")

    report = fetch_all(tmp_path / "pre.toml", cache, github_raw=server.base_url, refresh=True)

    assert status_of(report, "good").reason_code == "sha256_mismatch"
    assert snapshot(cache) == before
    assert cached_path(load_manifest(tmp_path / "pre.toml")[0], cache) is not None


def test_size_mismatch_with_right_hash_field_is_refused(tmp_path, server, cache):
    body = b"abc\n"
    entry = gh("a", "a.py", body, size=len(body) + 1)
    server.add(raw_path(entry), body)
    before = snapshot(cache)
    report = fetch_all(write_manifest(tmp_path / "m.toml", [entry]), cache, github_raw=server.base_url)
    assert status_of(report, "a").reason_code == "size_mismatch"
    assert snapshot(cache) == before


@pytest.mark.parametrize(
    ("fault", "size", "code"),
    [
        (None, 5000, "oversize"),  # honest Content-Length over the cap: refused before reading
        (NO_LENGTH, 5000, "oversize"),  # no Content-Length: cut off while streaming
        (HUGE_LENGTH, 10, "oversize"),  # a lying, huge Content-Length
        (TRUNCATED, 800, "truncated"),  # promises 800 bytes, sends 400, closes
    ],
)
def test_bad_bodies_are_refused_and_cache_unchanged(tmp_path, server, cache, fault, size, code):
    _prefill(tmp_path, server, cache)
    before = snapshot(cache)
    body = b"x" * size
    entry = gh("f", "f.py", body)
    server.add(raw_path(entry), body, fault=fault)

    report = fetch_all(write_manifest(tmp_path / "m.toml", [entry]), cache, github_raw=server.base_url, limits=SMALL)

    assert status_of(report, "f").reason_code == code
    assert snapshot(cache) == before


def test_slow_body_is_cut_at_the_download_deadline(tmp_path, cache):
    body = b"s" * 60
    entry = gh("slow", "slow.py", body)
    with FileServer(slow_delay_s=0.05) as srv:  # 60 bytes x 50 ms = 3 s if let run
        srv.add(raw_path(entry), body, fault=SLOW)
        before = snapshot(cache)
        report = fetch_all(
            write_manifest(tmp_path / "m.toml", [entry]),
            cache,
            github_raw=srv.base_url,
            limits=Limits(total_timeout_s=0.4, read_timeout_s=2.0),
        )
    # each byte comes well within the read timeout, so only the overall deadline can give "timeout": it cut the body
    assert status_of(report, "slow").reason_code == "timeout"
    assert snapshot(cache) == before


def test_read_timeout_when_the_body_stalls(tmp_path, cache):
    body = b"s" * 3
    entry = gh("stall", "stall.py", body)
    with FileServer(slow_delay_s=1.0) as srv:
        srv.add(raw_path(entry), body, fault=SLOW)
        report = fetch_all(
            write_manifest(tmp_path / "m.toml", [entry]),
            cache,
            github_raw=srv.base_url,
            limits=Limits(read_timeout_s=0.2),
        )
    assert status_of(report, "stall").reason_code == "timeout"


def test_unreachable_host_is_a_warning_naming_the_file_and_cache_unchanged(tmp_path, server, cache, caplog):
    _prefill(tmp_path, server, cache)
    before = snapshot(cache)
    entry = gh("far", "src/far_away.py", b"unreachable\n")
    base = f"http://127.0.0.1:{closed_port()}"

    with caplog.at_level(logging.WARNING, logger="tools.fetch"):
        report = fetch_all(write_manifest(tmp_path / "m.toml", [entry]), cache, github_raw=base)

    result = status_of(report, "far")
    assert result.status == MISSING and result.reason_code == "unreachable"
    assert report.refused == ()  # not an integrity failure
    assert any("far" in m and "src/far_away.py" in m for m in caplog.messages)
    assert snapshot(cache) == before


def test_other_entries_carry_on_when_one_source_is_down(tmp_path, cache):
    wheel = build_wheel(tmp_path / "dist", {"refpkg/ok.py": b"ok = 1\n"})
    entries = [gh("down", "down.py", b"z\n"), pypi("up", "refpkg/ok.py", b"ok = 1\n")]
    report = fetch_all(
        write_manifest(tmp_path / "m.toml", entries),
        cache,
        github_raw=f"http://127.0.0.1:{closed_port()}",
        pypi_download=CopyDownloader(wheel),
    )
    assert [r.status for r in report.results] == [MISSING, FETCHED]


def test_http_404_is_missing(tmp_path, server, cache):
    entry = gh("gone", "gone.py", b"z\n")
    before = snapshot(cache)
    report = fetch_all(write_manifest(tmp_path / "m.toml", [entry]), cache, github_raw=server.base_url)
    result = status_of(report, "gone")
    assert result.reason_code == "http_error" and "404" in result.reason
    assert snapshot(cache) == before


def test_redirects_are_followed_on_the_same_host_only(tmp_path, server, cache):
    body = b"moved = True\n"
    same, other = gh("same", "s.py", body), gh("other", "o.py", body, commit=OTHER_COMMIT)
    server.redirect(raw_path(same), "/new/place/s.py")
    server.add("/new/place/s.py", body)
    with FileServer() as elsewhere:
        elsewhere.add("/x.py", body)
        server.redirect(raw_path(other), elsewhere.base_url + "/x.py")
        report = fetch_all(write_manifest(tmp_path / "m.toml", [same, other]), cache, github_raw=server.base_url)
        assert elsewhere.request_count == 0
    assert status_of(report, "same").status == FETCHED
    assert status_of(report, "other").reason_code == "http_error"


# --------------------------------------------------------------------------- record on first fetch


def test_unknown_hash_is_recorded_on_first_fetch_then_enforced(tmp_path, server, cache):
    body = b"recorded = 1\n"
    entry = gh("rec", "rec.py", None)
    server.add(raw_path(entry), body)
    manifest = write_manifest(tmp_path / "m.toml", [entry])
    manifest_before = manifest.read_bytes()

    first = fetch_all(manifest, cache, github_raw=server.base_url)
    result = status_of(first, "rec")
    assert result.status == RECORDED and result.sha256 == sha(body) and result.hash_source == "recorded"
    assert first.unpinned == (result,)
    lock = json.loads((cache / "lock.json").read_text())
    record = lock["recorded"][f"github:owner/repo@{COMMIT}:rec.py"]
    assert record == {"id": "rec", "sha256": sha(body), "size": len(body)}
    assert manifest.read_bytes() == manifest_before  # the manifest is never edited

    second = fetch_all(manifest, cache, github_raw=server.base_url)
    assert status_of(second, "rec").status == CACHED and server.request_count == 1
    assert status_of(second, "rec").hash_source == "recorded"
    assert cached_path(load_manifest(manifest)[0], cache).read_bytes() == body

    server.add(raw_path(entry), b"recorded = 2\n")
    before = snapshot(cache)
    third = fetch_all(manifest, cache, github_raw=server.base_url, refresh=True)
    assert status_of(third, "rec").reason_code == "sha256_mismatch"
    assert snapshot(cache) == before


def test_corrupt_lock_is_a_clear_error_not_an_empty_record(tmp_path, server, cache):
    entry = gh("rec", "rec.py", None)
    manifest = write_manifest(tmp_path / "m.toml", [entry])
    (ref,) = load_manifest(manifest)
    assert cached_path(ref, cache) is None  # nothing recorded yet
    cache.mkdir()
    (cache / "lock.json").write_text("{not json")
    with pytest.raises(ManifestError, match="lock.json.*unreadable"):
        fetch_all(manifest, cache, github_raw=server.base_url)
    with pytest.raises(ManifestError, match="lock.json"):
        cached_path(ref, cache)
    assert server.request_count == 0


# --------------------------------------------------------------------------- manifest validation


def _valid() -> dict[str, Any]:
    return gh("entry-x", "src/x.py", b"x\n")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"anchors": []}, "unknown key"),
        ({"package": "peft"}, "unknown key"),
        ({"commit": "0123456"}, "40-character"),
        ({"commit": COMMIT.upper()}, "40-character"),
        ({"commit": "main"}, "40-character"),
        ({"path": "/etc/passwd"}, "absolute"),
        ({"path": "src/../../etc/passwd"}, "'..'"),
        ({"path": "../x.py"}, "'..'"),
        ({"path": "src//x.py"}, "empty"),
        ({"path": "src\\x.py"}, "backslash"),
        ({"sha256": "abc"}, "64 lowercase hex"),
        ({"sha256": "G" * 64}, "64 lowercase hex"),
        ({"sha256": ""}, "sha256_status"),
        ({"size": -1}, "positive"),
        ({"size": "12"}, "'size' must be int"),
        ({"source": "gitlab"}, "source"),
        ({"repo": "../evil"}, "OWNER/NAME"),
        ({"url": "http://example.com"}, "https://"),
        ({"variants": []}, "variants"),
        ({"licence": " "}, "licence"),
    ],
)
def test_manifest_errors_name_the_entry_and_the_problem(tmp_path, change, needle):
    entry = {**_valid(), **change}
    with pytest.raises(ManifestError) as err:
        load_manifest(write_manifest(tmp_path / "m.toml", [gh("fine", "f.py", b"f\n"), entry]))
    assert "'entry-x'" in str(err.value) and "#2" in str(err.value)
    assert needle in str(err.value)


def test_missing_key_and_pypi_checks(tmp_path):
    entry = _valid()
    del entry["licence"]
    with pytest.raises(ManifestError, match="'entry-x'.*missing required key 'licence'"):
        load_manifest(write_manifest(tmp_path / "a.toml", [entry]))
    bad_artifact = pypi("p", "refpkg/a.py", b"a", artifact="egg")
    with pytest.raises(ManifestError, match="'p'.*artifact 'egg'"):
        load_manifest(write_manifest(tmp_path / "b.toml", [bad_artifact]))
    with pytest.raises(ManifestError, match="'p'.*unknown key.*commit"):
        load_manifest(write_manifest(tmp_path / "c.toml", [pypi("p", "a.py", b"a", commit=COMMIT)]))


def test_duplicate_id_and_top_level_errors(tmp_path):
    with pytest.raises(ManifestError, match=r"'dup' \(\[\[file\]\] #2\): duplicate id"):
        load_manifest(write_manifest(tmp_path / "m.toml", [gh("dup", "a.py", b"a"), gh("dup", "b.py", b"b")]))
    with pytest.raises(ManifestError, match="schema_version"):
        load_manifest(write_manifest(tmp_path / "v.toml", [_valid()], schema_version=2))
    (tmp_path / "bad.toml").write_text("schema_version = 1\n[[file]\n")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(tmp_path / "bad.toml")


def test_manifest_traversal_is_rejected_before_any_request(tmp_path, server, cache):
    _prefill(tmp_path, server, cache)
    before, requests = snapshot(cache), server.request_count
    entry = gh("evil", "../../../etc/passwd", b"root\n")
    with pytest.raises(ManifestError, match="'evil'.*'\\.\\.'"):
        fetch_all(write_manifest(tmp_path / "m.toml", [entry]), cache, github_raw=server.base_url)
    assert server.request_count == requests
    assert snapshot(cache) == before


def test_only_selects_entries_and_rejects_unknown_ids(tmp_path, server, cache):
    a, b = gh("a", "a.py", b"a\n"), gh("b", "b.py", b"b\n")
    server.add(raw_path(a), b"a\n")
    server.add(raw_path(b), b"b\n")
    manifest = write_manifest(tmp_path / "m.toml", [a, b])
    report = fetch_all(manifest, cache, github_raw=server.base_url, only=["b"])
    assert [r.id for r in report.results] == ["b"] and server.paths() == [raw_path(b)]
    with pytest.raises(ManifestError, match="unknown id.*'nope'"):
        fetch_all(manifest, cache, github_raw=server.base_url, only=["nope"])


# --------------------------------------------------------------------------- PyPI archives


def test_wheel_through_real_pip_with_local_find_links(tmp_path, cache):
    body = b"def dora():\n    pass\n"
    dist = tmp_path / "dist"
    build_wheel(dist, {"refpkg/__init__.py": b"", "refpkg/tuners/dora.py": body})
    entry = pypi("w", "refpkg/tuners/dora.py", body)
    report = fetch_all(
        write_manifest(tmp_path / "m.toml", [entry]), cache, pypi_download=make_pip_downloader(find_links=dist)
    )
    result = status_of(report, "w")
    assert result.status == FETCHED, result.reason
    assert Path(result.path).read_bytes() == body
    assert report.downloaded_bytes == (dist / WHEEL_NAME).stat().st_size


def test_pip_failure_is_missing_with_reason(tmp_path, cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    report = fetch_all(
        write_manifest(tmp_path / "m.toml", [pypi("w", "refpkg/a.py", b"a")]),
        cache,
        pypi_download=make_pip_downloader(find_links=empty),
    )
    result = status_of(report, "w")
    assert result.reason_code == "download_failed" and "refpkg==1.0" in result.reason
    assert snapshot(cache) == {}


def test_sdist_member_is_read_relative_to_its_top_folder(tmp_path, cache):
    body = b"corda = 1\n"
    sdist = build_sdist(tmp_path / "dist", {f"{PKG}-{VER}/src/refpkg/corda.py": body, f"{PKG}-{VER}/PKG-INFO": b"x"})
    entries = [
        pypi("s", "src/refpkg/corda.py", body, artifact="sdist"),
        pypi("nope", "src/none.py", b"n", artifact="sdist"),
    ]
    downloader = CopyDownloader(sdist)
    report = fetch_all(write_manifest(tmp_path / "m.toml", entries), cache, pypi_download=downloader)
    assert status_of(report, "s").status == FETCHED
    assert status_of(report, "nope").reason_code == "member_not_found"
    assert downloader.calls == [(PKG, VER, "sdist")]  # one download for both entries


def _symlink(tf: tarfile.TarFile) -> None:
    info = tarfile.TarInfo(f"{PKG}-{VER}/src/s.py")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tf.addfile(info)


def _hardlink(tf: tarfile.TarFile) -> None:
    info = tarfile.TarInfo(f"{PKG}-{VER}/src/h.py")
    info.type, info.linkname = tarfile.LNKTYPE, f"{PKG}-{VER}/src/refpkg/ok.py"
    tf.addfile(info)


def _fifo(tf: tarfile.TarFile) -> None:
    info = tarfile.TarInfo(f"{PKG}-{VER}/src/fifo")
    info.type = tarfile.FIFOTYPE
    tf.addfile(info)


OK_BODY = b"ok = 1\n"


TOP = f"{PKG}-{VER}"
UNSAFE_ARCHIVES = {
    "wheel-dotdot": (lambda d: build_wheel(d, {"refpkg/ok.py": OK_BODY, "../evil.py": b"x"}), "unsafe path"),
    "wheel-absolute": (lambda d: build_wheel(d, {"refpkg/ok.py": OK_BODY, "/abs/evil.py": b"x"}), "unsafe path"),
    "wheel-symlink": (lambda d: build_wheel(d, {"refpkg/ok.py": OK_BODY}, {"refpkg/s.py": "/etc/passwd"}), "link"),
    "wheel-backslash": (lambda d: build_wheel(d, {"refpkg/ok.py": OK_BODY, "refpkg\\win.py": b"x"}), "unsafe path"),
    "sdist-dotdot": (lambda d: build_sdist(d, {f"{TOP}/src/refpkg/ok.py": OK_BODY, f"{TOP}/../../e.py": b"x"}), "unsafe path"),
    "sdist-absolute": (lambda d: build_sdist(d, {f"{TOP}/src/refpkg/ok.py": OK_BODY, "/tmp/e.py": b"x"}), "unsafe path"),
    "sdist-symlink": (lambda d: build_sdist(d, {f"{TOP}/src/refpkg/ok.py": OK_BODY}, _symlink), "a link"),
    "sdist-hardlink": (lambda d: build_sdist(d, {f"{TOP}/src/refpkg/ok.py": OK_BODY}, _hardlink), "a link"),
    "sdist-fifo": (lambda d: build_sdist(d, {f"{TOP}/src/refpkg/ok.py": OK_BODY}, _fifo), "special file"),
    "sdist-two-tops": (lambda d: build_sdist(d, {f"{TOP}/src/refpkg/ok.py": OK_BODY, "other-1.0/x.py": b"x"}), "one top-level"),
}


@pytest.mark.parametrize(("make_archive", "why"), list(UNSAFE_ARCHIVES.values()), ids=list(UNSAFE_ARCHIVES))
def test_unsafe_archives_are_refused_and_cache_unchanged(tmp_path, server, cache, make_archive, why):
    _prefill(tmp_path, server, cache)
    before = snapshot(cache)
    archive = make_archive(tmp_path / "dist")
    artifact = "wheel" if archive.name.endswith(".whl") else "sdist"
    member = "refpkg/ok.py" if artifact == "wheel" else "src/refpkg/ok.py"
    entry = pypi("arch", member, OK_BODY, artifact=artifact)

    report = fetch_all(write_manifest(tmp_path / "m.toml", [entry]), cache, pypi_download=CopyDownloader(archive))

    result = status_of(report, "arch")
    assert result.status == MISSING and result.reason_code == "unsafe_archive", result.reason
    assert why in result.reason
    assert snapshot(cache) == before


def test_the_same_archives_without_the_unsafe_member_are_accepted(tmp_path, cache):
    """Control for the test above: the refusal comes from the unsafe member, not the builder."""
    wheel = build_wheel(tmp_path / "w", {"refpkg/ok.py": OK_BODY})
    sdist = build_sdist(tmp_path / "s", {f"{PKG}-{VER}/src/refpkg/ok.py": OK_BODY})
    for archive, artifact, member in ((wheel, "wheel", "refpkg/ok.py"), (sdist, "sdist", "src/refpkg/ok.py")):
        entry = pypi(f"ok-{artifact}", member, OK_BODY, artifact=artifact)
        report = fetch_all(
            write_manifest(tmp_path / f"{artifact}.toml", [entry]), cache / artifact, pypi_download=CopyDownloader(archive)
        )
        assert report.results[0].status == FETCHED, report.results[0].reason


@pytest.mark.parametrize("artifact", ["wheel", "sdist"])
def test_oversize_archive_member_is_refused(tmp_path, server, cache, artifact):
    _prefill(tmp_path, server, cache)
    before = snapshot(cache)
    big = b"#" * 5000  # over SMALL.max_file_bytes = 1000
    if artifact == "wheel":
        archive, member = build_wheel(tmp_path / "dist", {"refpkg/big.py": big}), "refpkg/big.py"
    else:
        archive, member = build_sdist(tmp_path / "dist", {f"{PKG}-{VER}/src/big.py": big}), "src/big.py"
    entry = pypi("big", member, big, artifact=artifact)

    report = fetch_all(write_manifest(tmp_path / "m.toml", [entry]), cache, pypi_download=CopyDownloader(archive), limits=SMALL)

    assert status_of(report, "big").reason_code == "oversize"
    assert snapshot(cache) == before


def test_oversize_archive_is_refused(tmp_path, cache):
    archive = build_wheel(tmp_path / "dist", {"refpkg/a.py": b"a\n", "refpkg/pad.bin": os.urandom(50_000)})
    entry = pypi("a", "refpkg/a.py", b"a\n")
    report = fetch_all(
        write_manifest(tmp_path / "m.toml", [entry]),
        cache,
        pypi_download=CopyDownloader(archive),
        limits=Limits(max_archive_bytes=10_000),
    )
    assert status_of(report, "a").reason_code == "oversize"
    assert snapshot(cache) == {}


def test_archive_member_hash_mismatch_is_refused(tmp_path, cache):
    archive = build_wheel(tmp_path / "dist", {"refpkg/a.py": b"a = 'tampered'\n"})
    report = fetch_all(
        write_manifest(tmp_path / "m.toml", [pypi("a", "refpkg/a.py", b"a = 'pinned'\n")]),
        cache,
        pypi_download=CopyDownloader(archive),
    )
    assert status_of(report, "a").reason_code == "sha256_mismatch"
    assert snapshot(cache) == {}


# --------------------------------------------------------------------------- CLI and small pure parts


def _run_cli(args: list[str], env_extra: Mapping[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "tools.fetch", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_reports_json_and_exit_codes(tmp_path, server):
    good, bad = gh("good", "g.py", b"g\n"), gh("bad", "b.py", b"pinned\n")
    server.add(raw_path(good), b"g\n")
    server.add(raw_path(bad), b"tampered\n")
    env = {"REFS_GITHUB_RAW": server.base_url}
    manifest = write_manifest(tmp_path / "m.toml", [good, bad])
    cache_arg = ["--cache", str(tmp_path / "c"), "--manifest", str(manifest)]

    ok = _run_cli([*cache_arg, "--only", "good", "--json"], env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["counts"] == {"fetched": 1, "recorded": 0, "cached": 0, "missing": 0}

    refused = _run_cli(cache_arg, env)
    assert refused.returncode == 1
    assert "bad" in refused.stderr and "sha256_mismatch" in refused.stderr and "1 cached" in refused.stderr

    down = _run_cli([*cache_arg, "--only", "bad"], {"REFS_GITHUB_RAW": f"http://127.0.0.1:{closed_port()}"})
    assert down.returncode == 0 and "WARNING missing  bad" in down.stderr

    invalid = write_manifest(tmp_path / "bad.toml", [gh("broken", "a.py", b"a", commit="abc")])
    err = _run_cli(["--cache", str(tmp_path / "c"), "--manifest", str(invalid)], env)
    assert err.returncode == 2 and "'broken'" in err.stderr and "40-character" in err.stderr


def test_redact_and_pip_command():
    assert redact("https://user:s3cret@example.org/simple x") == "https://***@example.org/simple x"
    assert "s3cret" not in redact("pip failed for http://tok@idx.local/a and https://a:b@c/d")
    wheel = pip_download_command("peft", "0.21.2", "wheel", Path("/d"))
    assert wheel[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert ["--only-binary", ":all:"] == wheel[wheel.index("--only-binary") : wheel.index("--only-binary") + 2]
    assert "--no-index" not in wheel and wheel[-1] == "peft==0.21.2"
    sdist = pip_download_command("peft", "0.21.2", "sdist", Path("/d"), find_links=Path("/w"))
    assert "--no-binary" in sdist and "--no-index" in sdist and "/w" in sdist


# --------------------------------------------------------------------------- the real manifest

def project_variants() -> set[str]:
    """Every variant with a spec: the manifest may pin references for these and no others."""
    from spec import SPECS

    return set(SPECS.names())


def test_real_manifest_parses_validates_and_covers_the_variants():
    entries = load_manifest(DEFAULT_MANIFEST)
    by_id = {e.id: e for e in entries}
    assert len({e.source_key for e in entries}) == len(entries)

    pypi = [e for e in entries if e.source == "pypi"]
    peft = [e for e in pypi if e.package == "peft"]
    assert {e.path for e in peft} >= {
        "peft/tuners/lora/layer.py", "peft/tuners/lora/dora.py", "peft/tuners/lora/variants.py",
        "peft/tuners/hra/layer.py", "peft/tuners/delora/layer.py", "peft/tuners/ia3/layer.py",
        "peft/tuners/lora/eva.py", "peft/tuners/lora/corda.py",
    }
    assert all(e.package == "peft" and e.version == "0.21.2" and e.sha256 for e in peft)

    originals = {e.repo for e in entries if e.source == "github" and e.repo != "wassname/lora-lite"}
    assert originals >= {"GraphPKU/PiSSA", "DaShenZi721/HRA", "ExplainableML/DeLoRA", "NVlabs/DoRA", "ml-jku/EVA", "iboing/CorDA"}

    # lora-lite is the reference of every variant impl implements; a spec impl does not implement (verified on
    # PEFT only) has its PEFT source pinned instead
    import impl

    implemented = {v for v in project_variants() if v in impl.VARIANTS}
    lite = [e for e in entries if e.repo == "wassname/lora-lite"]
    assert implemented <= {v for e in lite for v in e.variants}
    assert project_variants() - implemented <= {v for e in pypi for v in e.variants}
    assert set(v for e in entries for v in e.variants) <= project_variants()

    for e in entries:
        if e.source == "github":
            assert e.url == f"https://github.com/{e.repo}/blob/{e.commit}/{e.path}", e.id
        if e.sha256 is None:  # only lora-lite commits newer than the mirror may be unpinned
            assert e.repo == "wassname/lora-lite", e.id
    assert by_id["lora-lite-antipasto-ablate"].commit.startswith("09dcfe0")
    assert by_id["lora-lite-antipasto"].commit.startswith("ef69c88")


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("REFS_NETWORK") != "1", reason="set REFS_NETWORK=1 to download peft 0.21.2")
def test_real_pypi_fetch_of_peft(tmp_path):
    ids = [e.id for e in load_manifest(DEFAULT_MANIFEST) if e.source == "pypi"]
    report = fetch_all(DEFAULT_MANIFEST, tmp_path / "cache", only=ids)
    assert [r.status for r in report.results] == [FETCHED] * len(ids), [r.reason for r in report.results]
    assert all(r.hash_source == "manifest" for r in report.results)
    again = fetch_all(DEFAULT_MANIFEST, tmp_path / "cache", only=ids)
    assert [r.status for r in again.results] == [CACHED] * len(ids)
