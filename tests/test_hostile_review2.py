"""Hostile input, round two (issue 35): what the review reads.

Classes 2 and 5 (paths named by an input stay inside the repository; a variant name never decides where a file
is written), 10 (--max-chars holds for every request, verify rows included), 11 (another verify schema, stale
named files and a shallow diff base are refused), 12 (a non-UTF-8 file does not end the review) and 14 (a
malformed verify JSON is one line). Repositories are made in tmp_path; the LLM is never reached.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_review import OFFLINE, manifest_without, verify_json
from tools import diffs as D
from tools import review as R
from tools.llm import ProviderConfig

ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def _edit(vj: Path, **files) -> Path:
    data = json.loads(vj.read_text())
    data["specs"]["lora"]["files"].update(files)
    vj.write_text(json.dumps(data))
    return vj


def _review(tmp_path, vj, variants=("lora",), **kw):
    man = tmp_path / "manifest.toml"
    return R.review(list(variants), verify_json=vj, config=kw.pop("config", OFFLINE),
                    manifest_path=man if man.exists() else manifest_without(tmp_path), refs_cache=tmp_path / "nocache",
                    audits_dir=tmp_path / "audits", prompts_dir=tmp_path / "prompts",
                    templates_dir=ROOT / "audits" / "templates", **kw)


# ----------------------------------------------------------------------------------------------- classes 2, 5


@pytest.mark.parametrize("key", ["impl", "spec", "impl_deps"])
@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_a_named_path_outside_the_repository_is_refused_and_never_read(tmp_path, key, how):
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- planted\n")
    name = str(secret) if how == "absolute" else os.path.relpath(secret, ROOT)
    vj = _edit(verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.0)]),
               **{key: [name] if key == "impl_deps" else name})
    with pytest.raises(R.ReviewError, match="refused: .*(absolute path|'\\.\\.' leaves the repository)"):
        _review(tmp_path, vj)
    written = b"".join(p.read_bytes() for p in (tmp_path / "prompts").rglob("*") if p.is_file()) \
        if (tmp_path / "prompts").exists() else b""
    assert b"planted" not in written


def test_a_symlink_out_of_the_repository_is_refused(tmp_path):
    from impl.untrusted import UntrustedInput, contained

    root = tmp_path / "repo"
    (root / "impl").mkdir(parents=True)
    (tmp_path / "secret").write_text("planted")
    (root / "impl" / "key.py").symlink_to(tmp_path / "secret")
    (root / "impl" / "ok.py").write_text("x = 1\n")
    assert contained(root, "impl/ok.py") == (root / "impl" / "ok.py").resolve()
    with pytest.raises(UntrustedInput, match="symlink out"):
        contained(root, "impl/key.py")
    with pytest.raises(R.ReviewError, match="refused: .*symlink out"):
        R.repo_file(root, "impl/key.py", "files.impl")


def test_a_path_shaped_variant_name_never_decides_where_a_prompt_is_written(tmp_path):
    vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.0)])
    for name in ("../../outside", "/tmp/abs", "a/b", ".."):
        with pytest.raises(R.ReviewError, match="refused: variant .*not usable as a file name"):
            _review(tmp_path, vj, variants=(name,))
    assert not (tmp_path / "outside.md").exists() and not (tmp_path / "prompts").exists()


# ----------------------------------------------------------------------------------------------- class 10


def test_verify_rows_are_capped_and_no_request_exceeds_max_chars(tmp_path):
    huge = "RuntimeError: " + "x" * 500_000
    vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "fail", huge, None)])
    run = _review(tmp_path, vj)
    (r,) = run["reviews"]
    verify_file = next(f for f in r["bundle"]["files"] if f["role"] == "verify-results")
    assert r["bundle"]["chars"] < 100_000 and verify_file["cut"] == "none"  # the row is kept, its text capped
    lines, _ = R.verify_lines("lora", json.loads(vj.read_text())["results"], {}, "v.json")
    assert sum(map(len, lines)) < R.MAX_ROW_TEXT + 500 and "more characters cut]" in lines[2]
    assert r["verdict"] == "BUGGY"  # the mechanical finding citing the row still holds
    # an LLM review whose never-cut files exceed the cap: that variant's request is not sent (no server exists)
    online = ProviderConfig.from_env({"REVIEW_PROVIDER": "openai", "REVIEW_BASE_URL": "http://127.0.0.1:9",
                                      "REVIEW_MODEL": "m", "OPENAI_API_KEY": "sk-unused-0000000000"})
    run = _review(tmp_path, vj, config=online, max_chars=1000)
    (r,) = run["reviews"]
    assert "over --max-chars 1000" in r["llm_error"] and "not sent" in r["llm_error"]
    assert run["provenance"]["requests"] == 0


# ----------------------------------------------------------------------------------------------- class 11


def test_schema_must_match_the_current_verify_schema_exactly(tmp_path):
    from harness.engine import SCHEMA

    assert R.VERIFY_SCHEMA == SCHEMA
    vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "fail", "bad", None)])
    for schema in ("lora-verify/results/1", "lora-verify/results/99"):
        data = json.loads(vj.read_text())
        data["schema"] = schema
        (tmp_path / "old.json").write_text(json.dumps(data))
        with pytest.raises(R.ReviewError, match=f"schema '{schema}', this review reads only 'lora-verify/results/2'"):
            R.load_verify(tmp_path / "old.json")


def test_staleness_compares_every_file_the_json_names(tmp_path):
    root = tmp_path / "repo"
    for folder in ("impl", "spec", "harness", "docs"):
        (root / folder).mkdir(parents=True)
    named = root / "docs" / "lora_notes.py"
    named.write_text("x = 1\n")
    vj = _edit(verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.0)]),
               spec=None, impl=None, impl_deps=["docs/lora_notes.py"])
    os.utime(named, (1, 1))
    assert R.verify_is_stale(vj, ["lora"], root) is None
    os.utime(named, (vj.stat().st_mtime + 10, vj.stat().st_mtime + 10))  # edited after verify ran
    assert R.verify_is_stale(vj, ["lora"], root) == f"docs/lora_notes.py (named by lora's record) is newer than {R.rel(vj, root)}"
    named.unlink()
    assert "no longer exists" in R.verify_is_stale(vj, ["lora"], root)


def test_a_shallow_clone_whose_diff_base_is_its_boundary_is_refused(tmp_path, monkeypatch):
    origin = tmp_path / "origin"
    origin.mkdir()
    _git(origin, "init", "-q", "-b", "main")
    for i in range(3):
        (origin / "impl").mkdir(exist_ok=True)
        (origin / "impl" / "v.py").write_text(f"x = {i}\n")
        if i == 0:
            (origin / "audits").mkdir()
            (origin / "audits" / "variants_review_v1.json").write_text("{}\n")
        _git(origin, "add", "-A")
        _git(origin, "commit", "-qm", f"c{i}")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{origin}", str(clone)], check=True)
    boundary = _git(clone, "rev-parse", "HEAD")
    # in the shallow clone the sidecar looks added by the boundary commit, not by the commit that added it
    assert D.commit_of({}, Path("audits/variants_review_v1.json"), clone) == boundary
    assert "shallow" in D.base_problem(clone, boundary)
    assert D.base_problem(origin, _git(origin, "rev-parse", "HEAD~2")) is None
    assert "not in this repository" in D.base_problem(clone, _git(origin, "rev-parse", "HEAD~2"))
    monkeypatch.setattr(R, "previous_audit", lambda *a: (1, {"variants": ["lora"], "llm": {"lora": {}}}, boundary))
    vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.0)])
    with pytest.raises(R.ReviewError, match="cannot diff against the previous audit v1: this clone is shallow"):
        _review(tmp_path, vj, root=clone)


# ----------------------------------------------------------------------------------------------- class 12


def test_a_non_utf8_file_does_not_end_the_review(tmp_path):
    repo = tmp_path / "repo"
    (repo / "impl").mkdir(parents=True)
    f = repo / "impl" / "v.py"
    f.write_bytes(b"x = 1  # caf\xe9\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "latin-1 file")
    base = _git(repo, "rev-parse", "HEAD")
    f.write_bytes(b"x = 2  # caf\xe9\n")
    out = D.changes_since(base, ["impl/v.py"], repo)
    assert out["files"][0]["status"] == "modified" and "+x = 2  # caf\ufffd" in out["diff"]
    at = out["diff"].index("+x = 2  # caf\ufffd") + 1
    assert D.check_diff_quote(out["diff"], at - 1, at, base, repo) == (True, "matches")


# ----------------------------------------------------------------------------------------------- class 14


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(results=[1]), r"results\[0\] is not a row"),
    (lambda d: d["results"][0].update(detail={"a": 1}), r"results\[0\].detail is not a string"),
    (lambda d: d.update(specs={"lora": 3}), "specs.lora is not an object"),
    (lambda d: d["specs"]["lora"].update(files={"impl_deps": "impl/x.py"}), "specs.lora.files is not"),
    (lambda d: d.update(variants="lora"), "'variants' is not a list of names"),
    (lambda d: d.update(schema=None), "not a verify results JSON"),
])
def test_a_malformed_verify_json_is_one_line(tmp_path, capsys, mutate, match):
    vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.0)])
    data = json.loads(vj.read_text())
    mutate(data)
    vj.write_text(json.dumps(data))
    rc = R.main(["--offline", "--verify-json", str(vj), "--allow-stale", "--out", str(tmp_path / "r.json"),
                 "--audits", str(tmp_path / "audits")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("error: ")
    import re

    assert re.search(match, err), err
