"""Hostile input, round two (issue 35), lora-lite's source: refs, repositories, dependency specs, archives.

Classes 1 (a work tree verified as checked out), 3 (pip option injection through a pyproject), 6 (git argument
injection), 10 and 11 (archive caps, the extracted tree re-checked) and 14 (one line, not a traceback). Every
repository and archive is made here in tmp_path; nothing touches the network.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tools import lora_lite as LL

ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, marker: str, deps: list[str] | None = None) -> str:
    pkg = repo / "src" / "lora_lite"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f"MARK = {marker!r}\n")
    (repo / "pyproject.toml").write_text("[project]\nname = 'lora-lite'\ndependencies = " + json.dumps(deps or []) + "\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", marker)
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture
def clone(tmp_path):
    repo = tmp_path / "lora-lite"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    old = _commit(repo, "old")
    new = _commit(repo, "new", ["numpy>=1.20", "torch>=2", "torchvision"])
    return repo, old, new


# ----------------------------------------------------------------------------------------------- class 1


def test_a_work_tree_is_resolved_with_git_never_verified_as_checked_out(clone, tmp_path):
    """`--ref NEW --repo CLONE` with OLD checked out: the source is NEW's tree and the version NEW's full id."""
    from harness.backends.lora_lite import source

    repo, old, new = clone
    _git(repo, "checkout", "-q", old)  # the work tree holds the old commit's src/lora_lite
    commit, folder = LL.local_source("main", str(repo), cache=tmp_path / "cache")
    assert commit == new and len(commit) == 40
    assert (Path(folder) / "src" / "lora_lite" / "__init__.py").read_text() == "MARK = 'new'\n"
    # the backend alone, given the work tree, does the same (cache: the repository's .cache; same commit id)
    src, version = source(new[:9], str(repo))
    assert version == new and (src / "src" / "lora_lite" / "__init__.py").read_text() == "MARK = 'new'\n"


def test_a_plain_folder_is_not_a_source_to_verify_as_it_is(tmp_path):
    from harness.backends.lora_lite import source

    folder = tmp_path / "src-only"
    (folder / "src" / "lora_lite").mkdir(parents=True)
    (folder / "src" / "lora_lite" / "__init__.py").write_text("")
    with pytest.raises(ValueError, match="not a git repository"):
        source("ab" * 20, str(folder))


# ----------------------------------------------------------------------------------------------- class 6


@pytest.mark.parametrize("ref", ["--output=/tmp/x", "-n", "../other", "main..HEAD", "HEAD:pyproject.toml",
                                 "main@{1}", "a b", "main^", "x/../y", "", "refs/heads/", "a\nb"])
def test_refs_that_are_options_or_revision_syntax_are_refused(ref):
    from impl.untrusted import UntrustedInput, check_ref

    with pytest.raises(UntrustedInput):
        check_ref(ref)


def test_an_option_shaped_ref_never_reaches_git(clone, tmp_path):
    """`--output=P` as --ref: refused before git runs (on main it reached `git show` in the noxfile, which wrote P)."""
    from impl.untrusted import git_commit

    repo, _, _ = clone
    target = tmp_path / "written-by-git"
    for ref in (f"--output={target}", "-h"):
        with pytest.raises(LL.SourceError, match="never starts with '-'"):
            LL.pyproject_at(str(repo), ref)
        with pytest.raises(LL.SourceError):
            LL.local_source(ref, str(repo), cache=tmp_path / "cache")
    assert not target.exists()
    assert git_commit(repo, "main") == _git(repo, "rev-parse", "main")


def test_previous_sidecar_commit_is_validated_before_git(tmp_path):
    """The previous sidecar's `commit` (uncommitted audit, clean tree) reaches git only as a validated ref."""
    from tools.diffs import commit_of

    assert commit_of({"commit": "--output=/tmp/x", "dirty": False}, tmp_path / "a.json", tmp_path) is None
    assert commit_of({"commit": "ab" * 20, "dirty": False}, tmp_path / "a.json", tmp_path) == "ab" * 20


# ----------------------------------------------------------------------------------------------- class 3


@pytest.mark.parametrize("spec", ["--index-url=https://evil.example/simple", "-r requirements.txt",
                                  "evil @ file:///tmp/evil", "evil @ https://evil.example/evil.tar.gz",
                                  "numpy; os_name == 'posix'", "-e .", "numpy --install-option=x", 7])
def test_dependency_specs_that_are_not_names_and_versions_are_refused(spec):
    with pytest.raises(LL.SourceError):
        LL.dependencies("[project]\ndependencies = " + json.dumps([spec]) + "\n")


def test_torch_is_left_out_by_exact_name_only(clone):
    from impl.untrusted import requirements

    repo, _, new = clone
    commit, pyproject = LL.pyproject_at(str(repo), "main")
    assert commit == new
    assert LL.dependencies(pyproject) == ["numpy>=1.20", "torchvision"]  # torch itself left out, torchvision kept
    assert requirements(["Torch_Vision [a, b] >=1,<2"]) == ["Torch_Vision[a,b]<2,>=1"]


# ----------------------------------------------------------------------------------------------- classes 10, 11, 14


def _archive(top: str, files: dict[str, bytes | int]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            if isinstance(data, int):  # a file of `data` zero bytes: compresses to almost nothing
                info.size = data
                tar.addfile(info, io.BytesIO(b"\0" * data))
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Served:
    """An httpx-shaped client serving one archive (fetch_archive's download goes through tools.fetch)."""

    def __init__(self, data: bytes):
        import httpx

        self.client = httpx.Client(transport=httpx.MockTransport(lambda req: httpx.Response(200, content=data)))


def test_archive_extraction_is_capped_and_refused_in_one_line(tmp_path, monkeypatch):
    from harness.backends import lora_lite as B

    monkeypatch.setattr(B, "MAX_UNPACKED_BYTES", 1 << 20)
    commit = "ab" * 20
    bomb = _archive(f"lora-lite-{commit}", {"src/lora_lite/__init__.py": b"", "src/lora_lite/big.bin": 4 << 20})
    assert len(bomb) < 64 * 1024  # 4 MiB of zeros in a few KiB
    with pytest.raises(LL.SourceError, match="unpacks to more than 1 MiB; refused"):
        LL.fetch_archive("https://example.invalid/lora-lite", commit, tmp_path / "c", client=_Served(bomb).client)
    monkeypatch.setattr(B, "MAX_MEMBERS", 5)
    many = _archive(f"lora-lite-{commit}", {f"src/lora_lite/m{i}.py": b"" for i in range(10)})
    with pytest.raises(LL.SourceError, match="more than 5 members; refused"):
        LL.fetch_archive("https://example.invalid/lora-lite", commit, tmp_path / "c", client=_Served(many).client)
    assert not (tmp_path / "c" / commit).exists()


def test_the_extracted_tree_is_rechecked_before_each_use(tmp_path):
    commit = "cd" * 20
    data = _archive(f"lora-lite-{commit}", {"src/lora_lite/__init__.py": b"SCALE = 1\n"})
    dest = LL.fetch_archive("https://example.invalid/lora-lite", commit, tmp_path / "c", client=_Served(data).client)
    assert LL.fetch_archive("https://example.invalid/lora-lite", commit, tmp_path / "c") == dest  # unchanged: reused
    (dest / "src" / "lora_lite" / "__init__.py").write_text("SCALE = 2\n")  # edited after the fetch
    with pytest.raises(LL.SourceError, match="changed since it was extracted"):
        LL.fetch_archive("https://example.invalid/lora-lite", commit, tmp_path / "c")
    from harness.backends.lora_lite import source

    with pytest.raises(ValueError, match="changed since it was extracted"):
        source(commit, str(dest))


def test_a_malformed_sha256_json_is_one_line(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    for text in ("{not json", '["a"]', '{"x": 3}'):
        (cache / "sha256.json").write_text(text)
        with pytest.raises(LL.SourceError, match="sha256.json"):
            LL.fetch_archive("https://example.invalid/lora-lite", "ef" * 20, cache, client=_Served(b"").client)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.verify", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_fetch_only_with_a_non_http_url_and_a_bad_ref_are_one_line(tmp_path, clone):
    repo, _, _ = clone
    p = _cli("--fetch-only", "--ref", "ab" * 20, "--repo", "file:///etc")
    assert p.returncode == 2 and "--fetch-only fetches an http(s)" in p.stderr and "Traceback" not in p.stderr
    p = _cli("--backend", "lora-lite", "--ref=--output=x", "--repo", str(repo), "-n", "0")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "never starts with '-'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
