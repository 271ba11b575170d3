"""Fetch the pinned reference files listed in ``refs/manifest.toml`` into a git-ignored cache.

Usage::

    python -m tools.fetch [--only ID,...] [--refresh] [--cache DIR] [--manifest PATH]
                          [--find-links DIR] [--json]

Why this exists: the reviewer and the audit cite third-party reference files (PEFT, the
original papers' repositories, wassname/lora-lite) by line. A citation is only worth
something if it points at exactly the bytes a reader can open, so every file is pinned
(a 40-hex commit, or a file inside a pinned PyPI release) and checked against a sha256.
No third-party source is ever committed; it lives only in the cache.

Sources:

* ``github``: ``{REFS_GITHUB_RAW or https://raw.githubusercontent.com}/OWNER/REPO/COMMIT/PATH``,
  streamed with httpx under connect/read timeouts, a whole-download deadline and a size cap.
* ``pypi``: ``python -m pip download --no-deps`` of the pinned release into a temporary
  folder (so the user's own pip configuration and index apply), then the one member is
  read from the wheel (zipfile) or sdist (tarfile). Archives holding absolute paths,
  ``..`` components, links or special files are refused; every member read is capped.
  Note: pip prepares metadata for an sdist by running its build backend, so prefer
  ``artifact = "wheel"`` where a wheel exists (no code from the package runs).

Cache layout (default ``<repo>/.cache/refs``, env ``REFS_CACHE``, option ``--cache``)::

    sha256/<hex>   content-addressed copies, written atomically once their hash is checked
    lock.json      hashes recorded on first fetch for entries whose manifest sha256 is ""

Guarantees: a file whose bytes do not match the expected sha256 is refused and never
replaces a cached copy; a refused download leaves the cache directory byte-for-byte as it
was (nothing is written before the check passes); an entry the cache already holds with
the right hash makes no request at all (unless ``--refresh``); a source that cannot be
reached is reported as missing with its reason and logged as a warning naming the file,
and the other entries carry on. The manifest itself is never edited by this tool.

Python API: ``load_manifest(path) -> list[RefEntry]``, ``fetch_all(manifest, cache, ...) ->
FetchReport`` (one FetchResult per entry: fetched / recorded / cached / missing, with a
``reason_code`` among INTEGRITY_REASONS and TRANSPORT_REASONS), and
``cached_path(entry, cache) -> Path | None``, which never touches the network.

Exit status of the command: 0 when every selected entry is present, or only missing
because its source could not be reached (warnings are printed); 1 when an entry was
refused for an integrity reason (hash or size mismatch, oversize, unsafe archive);
2 when the manifest or the arguments are invalid; 3 when the cache's lock.json is unreadable
or malformed (delete it to re-record).

Concurrency: runs sharing a cache serialise their lock.json updates with a file lock
(``.lock.json.flock`` in the cache), so every hash recorded on a first fetch is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from impl.atomic import atomic_write_bytes as atomic_write
from impl.atomic import file_lock

LOG = logging.getLogger("tools.fetch")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO_ROOT / "refs" / "manifest.toml"
DEFAULT_CACHE = REPO_ROOT / ".cache" / "refs"
DEFAULT_GITHUB_RAW = "https://raw.githubusercontent.com"
ENV_CACHE = "REFS_CACHE"
ENV_GITHUB_RAW = "REFS_GITHUB_RAW"

MANIFEST_SCHEMA_VERSION = 1
LOCK_SCHEMA_VERSION = 1
RECORD_ON_FIRST_FETCH = "record-on-first-fetch"

# Statuses of one entry in a FetchReport.
FETCHED = "fetched"  # downloaded now, matched the manifest's sha256
RECORDED = "recorded"  # downloaded now, manifest had no sha256: hash recorded in lock.json
CACHED = "cached"  # already in the cache with the expected hash: no request made
MISSING = "missing"  # not available; see reason_code / reason

# Reason codes for MISSING. The first group are refusals: the bytes were wrong or unsafe.
INTEGRITY_REASONS = frozenset({"sha256_mismatch", "size_mismatch", "oversize", "unsafe_archive"})
TRANSPORT_REASONS = frozenset(
    {"unreachable", "timeout", "truncated", "http_error", "download_failed", "member_not_found"}
)

_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,38}/[A-Za-z0-9_.-]{1,100}$")
_PACKAGE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION = re.compile(r"^[0-9][A-Za-z0-9.+!_-]{0,63}$")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")

_COMMON_KEYS = frozenset(
    {"id", "variants", "source", "path", "sha256", "sha256_status", "size", "licence", "url"}
)
_SOURCE_KEYS = {
    "github": frozenset({"repo", "commit"}),
    "pypi": frozenset({"package", "version", "artifact"}),
}
_ARTIFACTS = frozenset({"sdist", "wheel"})
_TOP_KEYS = frozenset({"schema_version", "file"})


class ManifestError(ValueError):
    """The manifest (or a name given on the command line) is invalid; the message names the entry."""


class LockError(ManifestError):
    """The cache's lock.json is unreadable or malformed (exit status 3); the message names the file."""


class FetchRefused(Exception):
    """One entry could not be fetched; ``code`` is a reason code, ``args[0]`` the human text."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class RefEntry:
    """One validated manifest entry. ``sha256``/``size`` are None when recorded on first fetch."""

    id: str
    variants: tuple[str, ...]
    source: str
    path: str
    sha256: str | None
    size: int | None
    licence: str
    url: str
    repo: str | None = None
    commit: str | None = None
    package: str | None = None
    version: str | None = None
    artifact: str | None = None

    @property
    def source_key(self) -> str:
        """A canonical string naming exactly which bytes this entry is (used as the lock key)."""
        if self.source == "github":
            return f"github:{self.repo}@{self.commit}:{self.path}"
        return f"pypi:{self.package}=={self.version}[{self.artifact}]:{self.path}"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps and timeouts. Every download and every archive member is bounded by these."""

    max_file_bytes: int = 8 * 1024 * 1024  # one reference file (GitHub body or archive member)
    max_archive_bytes: int = 64 * 1024 * 1024  # one wheel/sdist downloaded by pip
    max_archive_members: int = 50_000
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # longest silence between two chunks
    total_timeout_s: float = 120.0  # whole body, so a slow drip cannot hold us forever
    pip_timeout_s: float = 600.0
    max_redirects: int = 3


@dataclasses.dataclass(frozen=True)
class FetchResult:
    """What happened to one entry. ``hash_source`` says where the expected hash came from."""

    id: str
    status: str
    path: str | None = None
    sha256: str | None = None
    size: int | None = None
    hash_source: str | None = None  # "manifest" | "recorded" | None
    reason_code: str | None = None
    reason: str | None = None
    source: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != MISSING


@dataclasses.dataclass(frozen=True)
class FetchReport:
    """The structured outcome of ``fetch_all``, consumed by the review and the audit."""

    results: tuple[FetchResult, ...]
    cache_dir: str
    manifest_sha256: str
    elapsed_s: float
    downloaded_bytes: int  # bytes received over the network (bodies, wheels, sdists)

    def by_status(self, status: str) -> tuple[FetchResult, ...]:
        return tuple(r for r in self.results if r.status == status)

    @property
    def missing(self) -> tuple[FetchResult, ...]:
        return self.by_status(MISSING)

    @property
    def refused(self) -> tuple[FetchResult, ...]:
        """Entries refused for an integrity reason (the bytes were wrong or unsafe)."""
        return tuple(r for r in self.missing if r.reason_code in INTEGRITY_REASONS)

    @property
    def unpinned(self) -> tuple[FetchResult, ...]:
        """Present entries whose hash comes from the cache's lock, not from the manifest."""
        return tuple(r for r in self.results if r.ok and r.hash_source == "recorded")

    @property
    def file_bytes(self) -> int:
        """Total size of the reference files that are present after this run."""
        return sum(r.size or 0 for r in self.results if r.ok)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache_dir": self.cache_dir,
            "manifest_sha256": self.manifest_sha256,
            "elapsed_s": round(self.elapsed_s, 3),
            "downloaded_bytes": self.downloaded_bytes,
            "file_bytes": self.file_bytes,
            "counts": {s: len(self.by_status(s)) for s in (FETCHED, RECORDED, CACHED, MISSING)},
            "results": [dataclasses.asdict(r) for r in self.results],
        }


# --------------------------------------------------------------------------- manifest


def _check_rel_path(path: Any, where: str) -> str:
    """Return ``path`` if it is a clean relative POSIX path, else raise naming ``where``."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{where}: 'path' must be a non-empty string")
    if "\\" in path or "\x00" in path:
        raise ManifestError(f"{where}: path {path!r} contains a backslash or NUL")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ManifestError(f"{where}: path {path!r} is absolute; it must be relative")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ManifestError(
            f"{where}: path {path!r} has an empty, '.' or '..' component (no traversal allowed)"
        )
    return path


def _require(raw: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in raw:
        raise ManifestError(f"{where}: missing required key {key!r}")
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def validate_entry(raw: Any, index: int) -> RefEntry:
    """Validate one raw ``[[file]]`` table and turn it into a RefEntry (pure; no I/O)."""
    if not isinstance(raw, Mapping):
        raise ManifestError(f"[[file]] #{index}: must be a table")
    ident = raw.get("id")
    where = f"entry {ident!r} ([[file]] #{index})" if isinstance(ident, str) else f"[[file]] #{index}"
    ident = _require(raw, "id", str, where)
    if not _ID.match(ident):
        raise ManifestError(f"{where}: id must match {_ID.pattern}")
    source = _require(raw, "source", str, where)
    if source not in _SOURCE_KEYS:
        raise ManifestError(f"{where}: source {source!r} is not one of {sorted(_SOURCE_KEYS)}")
    unknown = set(raw) - _COMMON_KEYS - _SOURCE_KEYS[source]
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {sorted(unknown)} for source {source!r}")

    variants = _require(raw, "variants", list, where)
    if not variants or not all(isinstance(v, str) and v for v in variants):
        raise ManifestError(f"{where}: 'variants' must be a non-empty list of names")
    path = _check_rel_path(raw.get("path"), where)
    licence = _require(raw, "licence", str, where).strip()
    if not licence:
        raise ManifestError(f"{where}: 'licence' must not be empty")
    url = _require(raw, "url", str, where)
    if not url.startswith("https://"):
        raise ManifestError(f"{where}: url {url!r} must start with https://")

    sha = _require(raw, "sha256", str, where)
    status = raw.get("sha256_status")
    if sha == "":
        if status != RECORD_ON_FIRST_FETCH:
            raise ManifestError(
                f"{where}: sha256 is empty, so sha256_status must be {RECORD_ON_FIRST_FETCH!r}"
            )
        if "size" in raw:
            raise ManifestError(f"{where}: 'size' must be omitted while sha256 is unknown")
        sha_value, size = None, None
    else:
        if not _HEX64.match(sha):
            raise ManifestError(f"{where}: sha256 {sha!r} is not 64 lowercase hex characters")
        if status is not None:
            raise ManifestError(f"{where}: sha256_status is only allowed when sha256 is empty")
        size = _require(raw, "size", int, where)
        if size <= 0:
            raise ManifestError(f"{where}: size must be a positive number of bytes")
        sha_value = sha

    fields: dict[str, Any] = {}
    if source == "github":
        repo = _require(raw, "repo", str, where)
        if not _REPO.match(repo) or ".." in repo:
            raise ManifestError(f"{where}: repo {repo!r} must look like OWNER/NAME")
        commit = _require(raw, "commit", str, where)
        if not _HEX40.match(commit):
            raise ManifestError(
                f"{where}: commit {commit!r} is not a full 40-character lowercase hex sha"
            )
        fields = {"repo": repo, "commit": commit}
    else:
        package = _require(raw, "package", str, where)
        version = _require(raw, "version", str, where)
        artifact = _require(raw, "artifact", str, where)
        if not _PACKAGE.match(package):
            raise ManifestError(f"{where}: package {package!r} is not a valid distribution name")
        if not _VERSION.match(version):
            raise ManifestError(f"{where}: version {version!r} is not an exact version")
        if artifact not in _ARTIFACTS:
            raise ManifestError(f"{where}: artifact {artifact!r} is not one of {sorted(_ARTIFACTS)}")
        fields = {"package": package, "version": version, "artifact": artifact}

    return RefEntry(
        id=ident,
        variants=tuple(variants),
        source=source,
        path=path,
        sha256=sha_value,
        size=size,
        licence=licence,
        url=url,
        **fields,
    )


def parse_manifest(data: Mapping[str, Any], origin: str = "manifest") -> list[RefEntry]:
    """Validate an already-parsed manifest mapping (pure). Raises ManifestError."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ManifestError(f"{origin}: unknown top-level key(s) {sorted(unknown)}")
    if data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(f"{origin}: schema_version must be {MANIFEST_SCHEMA_VERSION}")
    raw_files = data.get("file")
    if not isinstance(raw_files, list) or not raw_files:
        raise ManifestError(f"{origin}: needs at least one [[file]] entry")
    entries: list[RefEntry] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_files, start=1):
        try:
            entry = validate_entry(raw, i)
        except ManifestError as exc:
            raise ManifestError(f"{origin}: {exc}") from None
        if entry.id in seen:
            raise ManifestError(
                f"{origin}: entry {entry.id!r} ([[file]] #{i}): duplicate id "
                f"(first used by [[file]] #{seen[entry.id]})"
            )
        seen[entry.id] = i
        entries.append(entry)
    return entries


def load_manifest(path: str | os.PathLike[str]) -> list[RefEntry]:
    """Read and validate a manifest file. Raises ManifestError with the entry named."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{p}: manifest not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{p}: not valid TOML: {exc}") from None
    return parse_manifest(data, origin=str(p))


# --------------------------------------------------------------------------- cache


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _object_path(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "sha256" / digest


def _file_has_hash(path: Path, digest: str) -> bool:
    """True if ``path`` is a regular file whose content hashes to ``digest``."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return False
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest() == digest
    except OSError:
        return False


def _read_lock(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """Recorded hashes keyed by RefEntry.source_key; an unreadable or malformed lock is a LockError, not empty."""
    lock = cache_dir / "lock.json"
    if not lock.exists():
        return {}
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise LockError(f"{lock}: unreadable lock file ({type(exc).__name__}: {str(exc)[:200]}); delete it to "
                        "re-record") from None
    if not isinstance(data, dict):
        raise LockError(f"{lock}: malformed lock file (a JSON {type(data).__name__}, not an object with "
                        "'schema_version' and 'recorded'); delete it to re-record")
    recorded = data.get("recorded")
    if data.get("schema_version") != LOCK_SCHEMA_VERSION or not isinstance(recorded, dict):
        raise LockError(f"{lock}: unexpected lock format (schema_version {LOCK_SCHEMA_VERSION} and a 'recorded' "
                        "object expected); delete it to re-record")
    for key, rec in recorded.items():
        if not (isinstance(rec, dict) and _HEX64.match(str(rec.get("sha256", "")))):
            raise LockError(f"{lock}: bad record for {key!r}; delete it to re-record")
    return recorded


def _expected(entry: RefEntry, lock: Mapping[str, Mapping[str, Any]]) -> tuple[str | None, str | None]:
    """The hash the entry must have and where it comes from ("manifest"/"recorded"/None)."""
    if entry.sha256:
        return entry.sha256, "manifest"
    rec = lock.get(entry.source_key)
    if rec:
        return str(rec["sha256"]), "recorded"
    return None, None


def cached_path(
    entry: RefEntry, cache_dir: str | os.PathLike[str] | None = None
) -> Path | None:
    """The verified cached copy of ``entry``, or None. Re-hashes the file; never downloads.

    For an entry without a manifest sha256 the hash recorded in lock.json is used; a
    corrupt lock raises ManifestError rather than silently reporting the file absent.
    """
    cache = resolve_cache_dir(cache_dir)
    lock = {} if entry.sha256 else _read_lock(cache)
    digest, _ = _expected(entry, lock)
    if digest is None:
        return None
    path = _object_path(cache, digest)
    return path if _file_has_hash(path, digest) else None




def _write_lock(cache_dir: Path, new_records: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge ``new_records`` into lock.json under an exclusive file lock (``.lock.json.flock``): re-read, merge,
    replace atomically, so concurrent runs lose no record. A hash recorded first is never replaced."""
    if not new_records:
        return
    with file_lock(cache_dir / ".lock.json.flock"):
        recorded = dict(_read_lock(cache_dir))
        for key, rec in new_records.items():
            first = recorded.setdefault(key, dict(rec))
            if first["sha256"] != rec["sha256"]:
                LOG.warning("reference %s: another run recorded %s first; keeping it (this run got %s)",
                            rec.get("id"), first["sha256"], rec["sha256"])
        body = {"schema_version": LOCK_SCHEMA_VERSION, "recorded": dict(sorted(recorded.items()))}
        atomic_write(cache_dir / "lock.json", (json.dumps(body, indent=2) + "\n").encode())


# --------------------------------------------------------------------------- helpers


def redact(text: str) -> str:
    """Remove credentials from URLs (``scheme://user:token@host`` -> ``scheme://***@host``)."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Explicit argument, else env REFS_CACHE, else ``<repo>/.cache/refs``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else DEFAULT_CACHE


def resolve_github_raw(base: str | None) -> str:
    """Explicit argument, else env REFS_GITHUB_RAW, else raw.githubusercontent.com."""
    value = base or os.environ.get(ENV_GITHUB_RAW) or DEFAULT_GITHUB_RAW
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ManifestError(f"GitHub raw base URL {redact(value)!r} must be http(s)://host[/prefix]")
    return value.rstrip("/")


def github_raw_url(base: str, entry: RefEntry) -> str:
    """``{base}/{owner}/{repo}/{commit}/{path}`` with the path percent-quoted."""
    return f"{base}/{entry.repo}/{entry.commit}/{urllib.parse.quote(entry.path, safe='/')}"


def _check_bytes(entry: RefEntry, data: bytes, expected: str | None) -> str:
    """Return the sha256 of ``data`` if it is the expected content, else raise FetchRefused."""
    digest = sha256_hex(data)
    if expected is not None and digest != expected:
        raise FetchRefused(
            "sha256_mismatch",
            f"sha256 mismatch for {entry.path}: expected {expected}, got {digest} "
            f"({len(data)} bytes); refused, cache left unchanged",
        )
    if entry.size is not None and len(data) != entry.size:
        raise FetchRefused(
            "size_mismatch", f"size mismatch for {entry.path}: manifest {entry.size}, got {len(data)}"
        )
    return digest


# --------------------------------------------------------------------------- GitHub


def download_capped(client: httpx.Client, url: str, limits: Limits) -> bytes:
    """GET ``url`` and return its body, refusing anything over ``limits.max_file_bytes``.

    Redirects are followed only to the same scheme and host (GitHub redirects renamed
    repositories). The body is streamed; a declared Content-Length over the cap is refused
    before reading, an undeclared one is cut off at the cap, a body shorter than its
    Content-Length is "truncated", and the whole body must arrive within total_timeout_s.
    """
    origin = urllib.parse.urlsplit(url)[:2]
    current = url
    for _ in range(limits.max_redirects + 1):
        deadline = time.monotonic() + limits.total_timeout_s
        try:
            with client.stream("GET", current, headers={"Accept-Encoding": "identity"}) as resp:
                if resp.is_redirect:
                    location = resp.headers.get("location", "")
                    nxt = urllib.parse.urljoin(current, location)
                    if urllib.parse.urlsplit(nxt)[:2] != origin:
                        raise FetchRefused(
                            "http_error", f"redirect to another host refused: {redact(nxt)}"
                        )
                    current = nxt
                    continue
                if resp.status_code != 200:
                    raise FetchRefused("http_error", f"HTTP {resp.status_code} for {redact(current)}")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limits.max_file_bytes:
                    raise FetchRefused(
                        "oversize",
                        f"{redact(current)} declares {declared} bytes, over the cap of "
                        f"{limits.max_file_bytes}",
                    )
                buf = bytearray()
                for chunk in resp.iter_bytes():
                    buf += chunk
                    if len(buf) > limits.max_file_bytes:
                        raise FetchRefused(
                            "oversize",
                            f"{redact(current)} sent more than the cap of {limits.max_file_bytes} bytes",
                        )
                    if time.monotonic() > deadline:
                        raise FetchRefused(
                            "timeout",
                            f"{redact(current)} did not finish within {limits.total_timeout_s} s",
                        )
                encoding = resp.headers.get("content-encoding", "identity").lower()
                if declared is not None and declared.isdigit() and encoding == "identity":
                    if len(buf) != int(declared):
                        raise FetchRefused(
                            "truncated", f"{redact(current)}: got {len(buf)} of {declared} bytes"
                        )
                return bytes(buf)
        except httpx.TimeoutException as exc:
            raise FetchRefused("timeout", f"{redact(current)}: {type(exc).__name__}") from None
        except httpx.ConnectError as exc:
            raise FetchRefused("unreachable", f"cannot connect for {redact(current)}: {redact(str(exc))}") from None
        except httpx.RemoteProtocolError as exc:
            raise FetchRefused("truncated", f"{redact(current)}: {redact(str(exc))}") from None
        except httpx.HTTPError as exc:
            raise FetchRefused("unreachable", f"{redact(current)}: {type(exc).__name__}: {redact(str(exc))}") from None
    raise FetchRefused("http_error", f"too many redirects for {redact(url)}")


# --------------------------------------------------------------------------- PyPI


PypiDownloader = Callable[[str, str, str, Path], Path]
"""(package, version, artifact, dest_dir) -> path of the one downloaded wheel/sdist."""


def pip_download_command(
    package: str, version: str, artifact: str, dest: Path, find_links: Path | None = None
) -> list[str]:
    """The pip command line for one pinned release (pure, so it can be inspected in tests)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--only-binary", ":all:"] if artifact == "wheel" else ["--no-binary", ":all:"]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd += ["--dest", str(dest), f"{package}=={version}"]
    return cmd


def make_pip_downloader(find_links: Path | None = None, timeout_s: float = 600.0) -> PypiDownloader:
    """A PypiDownloader running ``pip download`` (the user's pip config applies unless
    ``find_links`` is given, which restricts pip to that local folder: --no-index)."""

    def download(package: str, version: str, artifact: str, dest: Path) -> Path:
        cmd = pip_download_command(package, version, artifact, dest, find_links)
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise FetchRefused("timeout", f"pip download {package}=={version} exceeded {timeout_s} s") from None
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise FetchRefused(
                "download_failed", f"pip download {package}=={version} ({artifact}) failed: {redact(tail)}"
            )
        return _single_download(dest, package, artifact)

    return download


def _single_download(dest: Path, package: str, artifact: str) -> Path:
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise FetchRefused(
            "download_failed", f"expected exactly one {artifact} of {package}, found {[p.name for p in files]}"
        )
    return files[0]


def _clean_member_name(name: str) -> str | None:
    """The normalised member name, or None if it is absolute or escapes the archive root."""
    if "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def _bounded_read(fh: Any, cap: int, what: str) -> bytes:
    data = fh.read(cap + 1)
    if len(data) > cap:
        raise FetchRefused("oversize", f"{what} is larger than the cap of {cap} bytes")
    return data


def read_wheel_member(archive: Path, member: str, limits: Limits) -> bytes:
    """Read one member of a wheel (zip), refusing unsafe archives and oversize members."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchRefused("unsafe_archive", f"{archive.name} is not a readable zip: {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_archive_members:
            raise FetchRefused("unsafe_archive", f"{archive.name} has {len(infos)} members")
        matches = []
        for info in infos:
            clean = _clean_member_name(info.filename)
            if clean is None:
                raise FetchRefused(
                    "unsafe_archive", f"{archive.name} holds an unsafe path {info.filename!r}"
                )
            mode = (info.external_attr >> 16) & 0o170000
            if mode and mode not in (stat.S_IFREG, stat.S_IFDIR):
                raise FetchRefused(
                    "unsafe_archive", f"{archive.name} holds a link or special file {info.filename!r}"
                )
            if clean == member and not info.is_dir():
                matches.append(info)
        return _read_unique(
            matches, member, archive, limits, lambda info: zf.open(info), lambda info: info.file_size
        )


def read_sdist_member(archive: Path, member: str, limits: Limits) -> bytes:
    """Read ``member`` (relative to the sdist's single top folder) from a tar sdist."""
    try:
        tf = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise FetchRefused("unsafe_archive", f"{archive.name} is not a readable tar: {exc}") from None
    with tf:
        tops: set[str] = set()
        entries: list[tuple[str, tarfile.TarInfo]] = []
        for count, info in enumerate(tf, start=1):
            if count > limits.max_archive_members:
                raise FetchRefused("unsafe_archive", f"{archive.name} has too many members")
            clean = _clean_member_name(info.name)
            if clean is None:
                raise FetchRefused("unsafe_archive", f"{archive.name} holds an unsafe path {info.name!r}")
            if info.issym() or info.islnk():
                raise FetchRefused(
                    "unsafe_archive", f"{archive.name} holds a link {info.name!r} -> {info.linkname!r}"
                )
            if not (info.isfile() or info.isdir()):
                raise FetchRefused("unsafe_archive", f"{archive.name} holds a special file {info.name!r}")
            tops.add(clean.split("/", 1)[0])
            entries.append((clean, info))
        if len(tops) != 1:
            raise FetchRefused(
                "unsafe_archive", f"{archive.name} must have one top-level folder, found {sorted(tops)}"
            )
        wanted = f"{tops.pop()}/{member}"
        matches = [info for clean, info in entries if clean == wanted and info.isfile()]

        def open_member(info: tarfile.TarInfo) -> Any:
            fh = tf.extractfile(info)
            if fh is None:
                raise FetchRefused("unsafe_archive", f"{archive.name}: {info.name!r} is not a file")
            return fh

        return _read_unique(matches, member, archive, limits, open_member, lambda info: info.size)


def _read_unique(
    matches: Sequence[Any],
    member: str,
    archive: Path,
    limits: Limits,
    opener: Callable[[Any], Any],
    declared_size: Callable[[Any], int],
) -> bytes:
    if not matches:
        raise FetchRefused("member_not_found", f"{member} is not in {archive.name}")
    if len(matches) > 1:
        raise FetchRefused("unsafe_archive", f"{archive.name} holds {member} {len(matches)} times")
    info = matches[0]
    if declared_size(info) > limits.max_file_bytes:
        raise FetchRefused(
            "oversize",
            f"{member} in {archive.name} declares {declared_size(info)} bytes, over the cap of "
            f"{limits.max_file_bytes}",
        )
    try:
        with opener(info) as fh:
            return _bounded_read(fh, limits.max_file_bytes, f"{member} in {archive.name}")
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise FetchRefused("unsafe_archive", f"{member} in {archive.name} is corrupt: {exc}") from None


def read_archive_member(archive: Path, artifact: str, member: str, limits: Limits) -> bytes:
    """Dispatch on the artifact kind (and an sdist's file name) after capping the archive size."""
    size = archive.stat().st_size
    if size > limits.max_archive_bytes:
        raise FetchRefused(
            "oversize", f"{archive.name} is {size} bytes, over the archive cap of {limits.max_archive_bytes}"
        )
    if artifact == "wheel" or archive.name.endswith(".zip"):
        return read_wheel_member(archive, member, limits)
    return read_sdist_member(archive, member, limits)


# --------------------------------------------------------------------------- orchestration


def _missing(entry: RefEntry, exc: FetchRefused) -> FetchResult:
    where = entry.source_key
    LOG.warning("reference %s (%s) is missing: %s", entry.id, where, exc)
    return FetchResult(
        id=entry.id, status=MISSING, reason_code=exc.code, reason=str(exc), source=where
    )


def _store(
    entry: RefEntry,
    data: bytes,
    expected: str | None,
    hash_source: str | None,
    cache_dir: Path,
    new_records: dict[str, dict[str, Any]],
) -> FetchResult:
    """Check ``data``; only if it passes, write it atomically and (if unpinned) record its hash."""
    digest = _check_bytes(entry, data, expected)
    target = _object_path(cache_dir, digest)
    if not _file_has_hash(target, digest):
        atomic_write(target, data)
    if expected is None:
        new_records[entry.source_key] = {"id": entry.id, "sha256": digest, "size": len(data)}
        LOG.warning(
            "reference %s had no sha256 in the manifest; recorded %s on first fetch (flagged)",
            entry.id,
            digest,
        )
        status, hash_source = RECORDED, "recorded"
    else:
        status = FETCHED
    return FetchResult(
        id=entry.id,
        status=status,
        path=str(target),
        sha256=digest,
        size=len(data),
        hash_source=hash_source,
        source=entry.source_key,
    )


def _select(entries: Sequence[RefEntry], only: Iterable[str] | None) -> list[RefEntry]:
    if only is None:
        return list(entries)
    wanted = [i for i in only if i]
    known = {e.id for e in entries}
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise ManifestError(f"--only names unknown id(s) {unknown}; known: {sorted(known)}")
    return [e for e in entries if e.id in set(wanted)]


def fetch_all(
    manifest_path: str | os.PathLike[str] = DEFAULT_MANIFEST,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    only: Iterable[str] | None = None,
    refresh: bool = False,
    github_raw: str | None = None,
    pypi_download: PypiDownloader | None = None,
    limits: Limits = Limits(),
) -> FetchReport:
    """Bring every selected manifest entry into ``cache_dir`` and say what happened to each.

    Raises ManifestError for an invalid manifest, lock or ``only`` list (before any
    request). Everything else (unreachable source, refused bytes) becomes a MISSING result.
    """
    start = time.monotonic()
    entries = _select(load_manifest(manifest_path), only)
    manifest_bytes = Path(manifest_path).read_bytes()
    cache = resolve_cache_dir(cache_dir)
    base = resolve_github_raw(github_raw)
    lock = _read_lock(cache)
    downloader = pypi_download or make_pip_downloader(timeout_s=limits.pip_timeout_s)

    results: dict[str, FetchResult] = {}
    todo: list[tuple[RefEntry, str | None, str | None]] = []
    for entry in entries:
        expected, hash_source = _expected(entry, lock)
        target = _object_path(cache, expected) if expected else None
        if not refresh and target is not None and _file_has_hash(target, expected or ""):
            results[entry.id] = FetchResult(
                id=entry.id,
                status=CACHED,
                path=str(target),
                sha256=expected,
                size=target.stat().st_size,
                hash_source=hash_source,
                source=entry.source_key,
            )
        else:
            todo.append((entry, expected, hash_source))

    new_records: dict[str, dict[str, Any]] = {}
    downloaded = 0
    github_todo = [t for t in todo if t[0].source == "github"]
    if github_todo:
        timeout = httpx.Timeout(
            connect=limits.connect_timeout_s,
            read=limits.read_timeout_s,
            write=limits.read_timeout_s,
            pool=limits.connect_timeout_s,
        )
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=True) as client:
            for entry, expected, hash_source in github_todo:
                try:
                    data = download_capped(client, github_raw_url(base, entry), limits)
                    downloaded += len(data)
                    results[entry.id] = _store(entry, data, expected, hash_source, cache, new_records)
                except FetchRefused as exc:
                    results[entry.id] = _missing(entry, exc)

    groups: dict[tuple[str, str, str], list[tuple[RefEntry, str | None, str | None]]] = {}
    for item in todo:
        e = item[0]
        if e.source == "pypi":
            groups.setdefault((e.package or "", e.version or "", e.artifact or ""), []).append(item)
    for (package, version, artifact), items in groups.items():
        with tempfile.TemporaryDirectory(prefix="refs-pip-") as tmp:
            try:
                archive = downloader(package, version, artifact, Path(tmp))
                downloaded += archive.stat().st_size
            except FetchRefused as exc:
                for entry, _, _ in items:
                    results[entry.id] = _missing(entry, exc)
                continue
            for entry, expected, hash_source in items:
                try:
                    data = read_archive_member(archive, artifact, entry.path, limits)
                    results[entry.id] = _store(entry, data, expected, hash_source, cache, new_records)
                except FetchRefused as exc:
                    results[entry.id] = _missing(entry, exc)

    _write_lock(cache, new_records)
    return FetchReport(
        results=tuple(results[e.id] for e in entries),
        cache_dir=str(cache),
        manifest_sha256=sha256_hex(manifest_bytes),
        elapsed_s=time.monotonic() - start,
        downloaded_bytes=downloaded,
    )


# --------------------------------------------------------------------------- CLI


def _format_line(r: FetchResult) -> str:
    if r.status == MISSING:
        return f"WARNING missing  {r.id}: [{r.reason_code}] {r.reason}"
    flag = "  (hash recorded on first fetch, not pinned in the manifest)" if r.hash_source == "recorded" else ""
    return f"{r.status:<8} {r.id}  {r.size} B{flag}"


def exit_code(report: FetchReport) -> int:
    """0: all present or only unreachable; 1: an integrity refusal happened."""
    return 1 if report.refused else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated manifest ids to fetch (default: all)")
    parser.add_argument("--refresh", action="store_true", help="download even what the cache holds")
    parser.add_argument("--cache", help=f"cache folder (default: ${ENV_CACHE} or {DEFAULT_CACHE})")
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="manifest path")
    parser.add_argument(
        "--find-links", help="take PyPI releases from this local folder only (pip --no-index)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    downloader = make_pip_downloader(Path(args.find_links)) if args.find_links else None
    try:
        report = fetch_all(
            args.manifest, args.cache, only=only, refresh=args.refresh, pypi_download=downloader
        )
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in report.results:
        print(_format_line(r), file=sys.stderr)
    counts = report.to_dict()["counts"]
    print(
        f"{counts[FETCHED]} fetched, {counts[RECORDED]} recorded, {counts[CACHED]} cached, "
        f"{counts[MISSING]} missing; {report.file_bytes} B of reference files, "
        f"{report.downloaded_bytes} B downloaded, {report.elapsed_s:.2f} s; cache {report.cache_dir}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
