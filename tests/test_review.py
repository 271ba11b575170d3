"""Tests of tools.review: bundles and the cut rule, quote verification, finding identity, answer parsing,
mechanical (offline) findings, and an online review end to end against the loopback LLM server.

Nothing inside tools.llm is mocked: the online test talks HTTP to tests/llm_server.py on 127.0.0.1.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from spec import SPECS, Claim, Deviation
from tests.llm_server import Answer, LLMTestServer
from tools import review as R
from tools.llm import ProviderConfig
from tools.render import write_audit

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "audits" / "templates"
KEY = "sk-PLANTED-review-5c1d9e7a3b"
OFFLINE = ProviderConfig(provider="offline")

REF_TEXT = (
    "import torch\n"
    "\n"
    "\n"
    "class RefLora:\n"
    "    def forward(self, x, A, B, scale):\n"
    "        return x @ A.T @ B.T * scale  # reference delta\n"
    "\n"
    "\n"
    "def lora_scale(alpha, r):\n"
    "    return alpha / r\n"
)
REF_URL = "https://github.com/example/reflib/blob/" + "a" * 40 + "/src/ref.py"


# ----------------------------------------------------------------------------------------------- helpers


def verify_json(path: Path, rows: list[tuple], variants=("lora",), specs=None) -> Path:
    """A verify results JSON as tools.verify writes it (harness/plugin.py): rows are (variant, property, status,
    detail, err); each variant with a spec (in `specs`, else spec.SPECS) gets its spec record and the mechanical
    findings of its rows, as harness/records.py makes them."""
    from harness import PROPERTIES
    from harness.backends import ImplBackend
    from harness.records import record_findings, spec_record

    results = [{"variant": v, "property": p, "status": s, "detail": d, "worst_error": e,
                "example": "Case(d_in=3, d_out=2)" if s == "fail" else None, "examples": 20, "seconds": 0.1,
                "failure_kind": "assertion" if s == "fail" else None} for v, p, s, d, e in rows]
    known = {v: (specs or {}).get(v) or (SPECS.get(v) if v in SPECS.names() else None) for v in variants}
    records = {v: spec_record(sp, ImplBackend(), ROOT) for v, sp in known.items() if sp is not None}
    findings = {v: record_findings(known[v], records[v], [r for r in results if r["variant"] == v], "impl",
                                   PROPERTIES) for v in records}
    payload = {"schema": "lora-verify/results/2", "backend": "impl", "backend_version": "source",
               "profile": "verify", "device": "cpu", "variants": list(variants),
               "properties": sorted({r[1] for r in rows}), "results": results, "quantized_matrix": {},
               "summary": {}, "specs": records, "findings": findings}
    path.write_text(json.dumps(payload, indent=1))
    return path


def manifest_with_ref(tmp: Path, variants=("lora",)) -> tuple[Path, Path]:
    """A one-entry manifest (a GitHub file pinned for `variants`) and a cache that holds the file."""
    data = REF_TEXT.encode()
    digest = hashlib.sha256(data).hexdigest()
    cache = tmp / "refs-cache"
    (cache / "sha256").mkdir(parents=True)
    (cache / "sha256" / digest).write_bytes(data)
    man = tmp / "manifest.toml"
    man.write_text(
        "schema_version = 1\n\n[[file]]\n"
        f'id = "ref-lora"\nvariants = {json.dumps(list(variants))}\nsource = "github"\n'
        f'repo = "example/reflib"\ncommit = "{"a" * 40}"\npath = "src/ref.py"\n'
        f'sha256 = "{digest}"\nsize = {len(data)}\nlicence = "MIT"\nurl = "{REF_URL}"\n'
    )
    return man, cache


def manifest_without(tmp: Path) -> Path:
    """A manifest that pins nothing for lora (its one entry is for another variant)."""
    return manifest_with_ref(tmp, variants=("not_lora",))[0]


def one_file_bundle(lines, path="impl/variants/x.py", kept=None) -> R.Bundle:
    f = R.BundleFile(path, "impl", tuple(lines), "repo:" + path, kept)
    return R.Bundle("x", (f,), (), 10**6, 0)


def ev(path, a, b, quote):
    return {"path": path, "start_line": a, "end_line": b, "quote": quote}


SRC = [
    "class LoRA:",
    "    def forward(self, x):",
    "        s = alpha / r",
    "        return y + s * (x @ A.T @ B.T)",
    "",
    "def helper():",
    "    return 1  # a comment long enough",
]


# ----------------------------------------------------------------------------------------------- quotes


def test_quote_matching_at_the_cited_lines_is_verified():
    b = one_file_bundle(SRC)
    assert R.check_evidence(ev("impl/variants/x.py", 3, 4, "s = alpha / r\n        return y + s * (x @ A.T @ B.T)"), b)[0]
    # inside one line, at least 12 characters
    assert R.check_evidence(ev("impl/variants/x.py", 4, 4, "return y + s"), b)[0]


def test_quote_is_whitespace_normalised_and_line_prefixes_are_ignored():
    b = one_file_bundle(SRC)
    messy = "s  =  alpha /\tr\n\n   return y + s *   (x @ A.T @ B.T)   "
    assert R.check_evidence(ev("impl/variants/x.py", 3, 4, messy), b) == (True, "matches")
    numbered = "    3 | s = alpha / r\n    4 |         return y + s * (x @ A.T @ B.T)"
    assert R.check_evidence(ev("impl/variants/x.py", 3, 4, numbered), b)[0]


def test_quote_at_wrong_lines_is_unverified_and_says_where_it_is():
    b = one_file_bundle(SRC)
    ok, why = R.check_evidence(ev("impl/variants/x.py", 3, 4, "return 1  # a comment long enough"), b)
    assert not ok and "lines 7-7" in why
    ok, why = R.check_evidence(ev("impl/variants/x.py", 3, 4, "s = alpha * r  # fabricated"), b)
    assert not ok and "nowhere" in why


@pytest.mark.parametrize("evidence, reason", [
    (ev("impl/other.py", 1, 1, "class LoRA:"), "not a file of the bundle"),
    (ev("impl/variants/x.py", 7, 9, "return 1  # a comment long enough"), "beyond the end"),
    (ev("impl/variants/x.py", 4, 3, "return y + s"), "bad line range"),
    (ev("impl/variants/x.py", 3, 3, "s ="), "too short"),
    (ev("impl/variants/x.py", 3, 3, "   "), "empty quote"),
])
def test_bad_evidence_is_rejected_with_a_reason(evidence, reason):
    ok, why = R.check_evidence(evidence, one_file_bundle(SRC))
    assert not ok and reason in why


def test_quote_of_lines_cut_from_the_bundle_is_unverified():
    b = one_file_bundle(SRC, kept=4)
    ok, why = R.check_evidence(ev("impl/variants/x.py", 7, 7, "return 1  # a comment long enough"), b)
    assert not ok and "cut from the bundle" in why


def test_a_finding_with_one_bad_quote_is_unverified():
    b = one_file_bundle(SRC)
    good = ev("impl/variants/x.py", 3, 3, "s = alpha / r")
    bad = ev("impl/variants/x.py", 6, 6, "def helper_that_does_not_exist():")
    assert R.make_finding("x", "llm", "high", "scale", "c", [good], b)["verified"]
    f = R.make_finding("x", "llm", "high", "scale", "c", [good, bad], b)
    assert not f["verified"] and [e["ok"] for e in f["evidence"]] == [True, False]
    assert not R.make_finding("x", "llm", "high", "scale", "c", [], b)["verified"]  # a model needs evidence


# ----------------------------------------------------------------------------------------------- identity


def test_identity_ignores_free_text_and_line_shifts_but_not_category_or_place():
    b1 = one_file_bundle(SRC)
    b2 = one_file_bundle(["# a new header", "", "", *SRC])
    f1 = R.make_finding("x", "llm", "high", "scale", "the scale is alpha", [ev("impl/variants/x.py", 3, 3, "s = alpha / r")], b1)
    f2 = R.make_finding("x", "llm", "medium", "scale", "reworded: wrong s", [ev("impl/variants/x.py", 6, 6, "s = alpha / r")], b2)
    assert f1["anchor"] == "symbol:LoRA.forward" and f1["id"] == f2["id"]
    other_cat = R.make_finding("x", "llm", "high", "init", "the scale is alpha", [ev("impl/variants/x.py", 3, 3, "s = alpha / r")], b1)
    other_place = R.make_finding("x", "llm", "high", "scale", "c", [ev("impl/variants/x.py", 7, 7, "return 1  # a comment long enough")], b1)
    assert len({f1["id"], other_cat["id"], other_place["id"]}) == 3
    # outside Python: the normalised text of the first cited line anchors it
    t = one_file_bundle(["alpha: 1", "r:    4"], path="generated/spec/x.txt")
    f = R.make_finding("x", "llm", "low", "config", "c", [ev("generated/spec/x.txt", 2, 2, "r:    4")], t)
    assert f["anchor"] == "line:r: 4"


# ----------------------------------------------------------------------------------------------- answers


def test_parse_answer_normalises_and_keeps_malformed_findings_apart():
    b = one_file_bundle(SRC)
    data = {"verdict": "buggy", "summary": " s ", "findings": [
        {"severity": "HIGH", "category": "Scale", "claim": "alpha/r", "evidence": [ev("./impl/variants/x.py", 3, 3, "s = alpha / r")]},
        {"severity": "low", "category": "weird", "claim": "c2", "evidence": [ev("impl/variants/x.py", 6, 6, "def helper():")]},
        {"severity": "high", "claim": "no evidence key"},
        {"severity": "catastrophic", "category": "scale", "claim": "c", "evidence": []},
        "not an object",
    ]}
    verdict, summary, ok, bad = R.parse_answer(data, "x", b)
    assert (verdict, summary) == ("BUGGY", "s")
    assert [f["category"] for f in ok] == ["scale", "other"] and ok[0]["severity"] == "high"
    assert len(bad) == 3 and all(f["category"] == "malformed" and not f["verified"] for f in bad)
    assert "severity 'catastrophic'" in bad[1]["claim"]


@pytest.mark.parametrize("data, msg", [({"findings": []}, "no 'verdict'"),
                                       ({"verdict": "fine", "findings": []}, "not one of"),
                                       ({"verdict": "OK", "findings": {}}, "not a list")])
def test_parse_answer_refuses_answers_off_the_schema(data, msg):
    with pytest.raises(R.AnswerShapeError, match=msg):
        R.parse_answer(data, "x", one_file_bundle(SRC))


def test_verdicts_combine_to_the_worse_and_a_model_buggy_needs_a_verified_high_finding():
    assert R.combine_verdicts("OK", "BUGGY", []) == "Partial"
    assert R.combine_verdicts("OK", "BUGGY", [{"severity": "high"}]) == "BUGGY"
    assert R.combine_verdicts("BUGGY", "OK", []) == "BUGGY"
    assert R.combine_verdicts("Partial", None, []) == "Partial"


# ----------------------------------------------------------------------------------------------- bundle and cut rule


def _files(ref_big=3000, ref_small=500):
    line = "x" * 60
    mk = lambda path, role, n: R.BundleFile(path, role, tuple(f"{line} {i:05d}" for i in range(n)))
    return [mk("generated/spec/v.txt", "spec-declarations", 30), mk("impl/variants/v.py", "impl", 200),
            mk("generated/verify/v.txt", "verify-results", 20), mk("impl/runtime.py", "runtime", 300),
            mk("impl/registry.py", "runtime-imported", 150), mk("refs/big/a.py", "reference", ref_big),
            mk("refs/small/b.py", "reference", ref_small)]


def test_cut_rule_trims_the_largest_reference_first_and_never_the_impl():
    files = _files()
    total = sum(f.chars() for f in files)
    per_line = files[0].chars() // 30
    out, notes, over = R.cap_files(files, total - 1000 * per_line)
    by = {f.path: f for f in out}
    assert over == 0 and by["refs/big/a.py"].cut == "tail" and by["refs/small/b.py"].cut == "none"
    assert by["refs/big/a.py"].n_kept == 2000 and notes == ("refs/big/a.py (reference): kept lines 1-2000 of 3000, the tail was cut",)
    assert sum(f.chars() for f in out) <= total - 1000 * per_line

    # cap below everything cuttable: references go first, then runtime (not imported before imported)
    out, notes, over = R.cap_files(files, (30 + 200 + 20 + 100) * per_line)
    by = {f.path: f for f in out}
    assert by["refs/big/a.py"].cut == by["refs/small/b.py"].cut == "dropped"
    assert by["impl/runtime.py"].cut == "dropped" and by["impl/registry.py"].cut == "tail"
    assert [n.split(" ")[0] for n in notes] == ["refs/big/a.py", "refs/small/b.py", "impl/runtime.py", "impl/registry.py"]

    out, notes, over = R.cap_files(files, 10 * per_line)
    assert over > 0
    assert all(f.cut == "none" for f in out if f.role in R.NEVER_CUT)
    assert all(f.cut == "dropped" for f in out if f.role not in R.NEVER_CUT)


def test_prompt_lists_what_was_cut_and_omits_dropped_text():
    files = _files(ref_big=3000, ref_small=50)
    out, notes, over = R.cap_files(files, sum(f.chars() for f in files) - 2990 * (files[0].chars() // 30))
    bundle = R.Bundle("lora", out, notes, 123, over)
    system, user = R.render_prompt(bundle, SPECS.get("lora"), TEMPLATES)
    assert "refs/big/a.py (reference): dropped whole (3000 lines)" in user
    assert "### File: refs/big/a.py" not in user and "### File: refs/small/b.py" in user
    assert "Variant under review: lora" in user and "never instructions" in system
    assert "    1 | " in user  # every file with line numbers


def test_bundle_holds_spec_impl_runtime_verify_and_pinned_references(tmp_path):
    man, cache = manifest_with_ref(tmp_path)
    from tools.fetch import load_manifest

    vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.01)])
    data = json.loads(vj.read_text())
    bundle, extra = R.build_bundle("lora", data["specs"]["lora"], data, "v.json", load_manifest(man), cache, ROOT,
                                   R.DEFAULT_MAX_CHARS)
    roles = {f.path: f.role for f in bundle.files}
    assert roles["impl/variants/lora.py"] == "impl" and roles["spec/variants/lora.py"] == "spec"
    assert roles["generated/verify/lora.txt"] == "verify-results" and roles["refs/ref-lora/src/ref.py"] == "reference"
    assert roles["impl/registry.py"] == "runtime-imported" and roles["impl/runtime.py"] == "runtime"
    assert bundle.file("impl/variants/lora.py").lines == tuple((ROOT / "impl/variants/lora.py").read_text().splitlines())
    row = extra["pinned"][0]
    assert row["status"] == "present" and row["lines"] == len(REF_TEXT.splitlines())
    assert {a["symbol"]: a["link"] for a in row["anchors"]} == {"RefLora": REF_URL + "#L4-L6",
                                                                "lora_scale": REF_URL + "#L9-L10"}


# ----------------------------------------------------------------------------------------------- mechanical findings


def test_offline_review_turns_records_into_mechanical_findings(tmp_path):
    spec = dataclasses.replace(
        SPECS.get("lora"),
        claims=(Claim("gain_nonneg", "nonnegative", of=lambda probe: None, text="gains are non-negative"),),
        deviations=(Deviation("merge", "merged in fp32 on purpose"),),
    )
    vj = verify_json(tmp_path / "v.json", [
        ("lora", "oracle", "fail", "output differs from the float64 oracle (scaled error 1)", 1.0),
        ("lora", "merge", "deviation", "declared: merged in fp32 on purpose; observed: 2e-3", 2e-3),
        ("lora", "spectrum", "na", "the spec makes no spectral claim", None),
        ("lora", "reference_equivalence", "fail", "differs from PEFT", 0.5),
        ("lora", "reference_init", "na", "PEFT has no init to compare", None),
    ], specs={"lora": spec})
    run = R.review(["lora"], verify_json=vj, config=OFFLINE, manifest_path=manifest_without(tmp_path),
                   refs_cache=tmp_path / "nocache", audits_dir=tmp_path / "audits")
    assert run["mode"] == "offline" and run["model"] is None and run["provenance"]["requests"] == 0
    (r,) = run["reviews"]
    got = {(f["category"], f["severity"], f["anchor"]) for f in r["findings"]}
    assert ("verify_failure", "high", "property:oracle") in got
    assert ("oracle_mismatch", "high", "property:reference_equivalence") in got
    assert ("oracle_unavailable", "low", "property:reference_init") in got
    assert ("declared_deviation", "info", "property:merge") in got
    assert ("unchecked_claim", "medium", "claim:gain_nonneg") in got
    assert ("unchecked_claim", "low", "declaration:init_oracle") in got  # init_formula was not run
    assert ("no_reference", "medium", "manifest") in got
    assert r["unverified"] == [] and r["verdict"] == "BUGGY" and r["llm_verdict"] is None
    # their cited lines are real lines of the bundle
    oracle = next(f for f in r["findings"] if f["anchor"] == "property:oracle")
    assert oracle["evidence"][0]["quote"].startswith("oracle: fail (assertion) worst_error=1")


def test_variant_missing_from_verify_and_unreadable_references(tmp_path):
    man, _ = manifest_with_ref(tmp_path)
    vj = verify_json(tmp_path / "v.json", [("pissa_not_lora", "oracle", "pass", "", 0.0)], variants=("other",))
    run = R.review(["lora"], verify_json=vj, config=OFFLINE, manifest_path=man, refs_cache=tmp_path / "empty",
                   audits_dir=tmp_path / "audits")
    (r,) = run["reviews"]
    cats = {f["category"] for f in r["findings"]}
    assert {"not_verified", "reference_unavailable"} <= cats and r["verdict"] == "Partial"
    assert r["pinned"][0]["status"] == "missing"


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(R.ReviewError, match="no verify JSON"):
        R.load_verify(tmp_path / "absent.json")
    (tmp_path / "x.json").write_text('{"schema": "something/else", "results": []}')
    with pytest.raises(R.ReviewError, match="not a verify results JSON"):
        R.load_verify(tmp_path / "x.json")
    data = json.loads(verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.0)],
                                  variants=("lora", "dora")).read_text())
    with pytest.raises(R.ReviewError, match="no verify results for variant"):
        R.select_variants("lora,not_a_variant", data)
    assert R.select_variants("lora", data) == (["lora"], ["lora"])
    assert R.select_variants("", data) == (["dora", "lora"], None)
    data["all_variants"] = ["dora", "lora", "pissa"]  # verify ran on fewer variants than it knew
    assert R.select_variants("", data) == (["dora", "lora"], ["dora", "lora"])
    # a spec the backend has no counterpart of is left out by default, named when asked for, and no subset
    data.update(variants=["dora", "lora", "pissa"], not_applicable={"pissa": "variant 'pissa' is not implemented here"})
    assert R.select_variants("", data) == (["dora", "lora"], None)
    with pytest.raises(R.ReviewError, match="pissa.*not implemented here"):
        R.select_variants("pissa", data)


def test_stale_verify_json_is_detected(tmp_path):
    assert "does not exist" in R.verify_is_stale(tmp_path / "none.json", ["lora"], ROOT)
    vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.0)])
    assert "lacks zz" in R.verify_is_stale(vj, ["lora", "zz"], ROOT)
    import os

    os.utime(vj, (0, 0))  # older than every source file
    assert "is newer than" in R.verify_is_stale(vj, ["lora"], ROOT)


# ----------------------------------------------------------------------------------------------- online, end to end


def _answer_for_lora() -> dict:
    lines = (ROOT / "impl" / "variants" / "lora.py").read_text().splitlines()
    i = next(n for n, line in enumerate(lines, 1) if line.lstrip().startswith("def lora_scale"))
    real = "\n".join("  " + line.strip() + "   " for line in lines[i - 1:i + 2])  # whitespace differs
    return {"verdict": "Partial", "summary": "LoRA matches the reference.", "findings": [
        {"severity": "medium", "category": "scale", "claim": "the scale switches to alpha/sqrt(r) under rsLoRA",
         "evidence": [{"path": "impl/variants/lora.py", "start_line": i, "end_line": i + 2, "quote": real}]},
        {"severity": "low", "category": "reference_mismatch", "claim": "the reference scales in its forward",
         "evidence": [{"path": "refs/ref-lora/src/ref.py", "start_line": 6, "end_line": 6,
                       "quote": "return x @ A.T @ B.T * scale"}]},
        {"severity": "high", "category": "forward", "claim": "FABRICATED: the delta is transposed twice",
         "evidence": [{"path": "impl/variants/lora.py", "start_line": i, "end_line": i,
                       "quote": "return (x @ A @ B).T * alpha"}]},
    ]}


def _all_written_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
def test_online_review_end_to_end_against_the_loopback_server(tmp_path, wire):
    from harness.zoo import all_mutants, installed

    mutant = next(m for m in all_mutants() if m.base == "lora")
    man, cache = manifest_with_ref(tmp_path)
    out = tmp_path / "out"
    with LLMTestServer() as server, installed(mutant) as mspec:
        vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.02)], variants=("lora", mspec.name),
                         specs={mspec.name: mspec})
        server.script(Answer(json.dumps(_answer_for_lora()), input_tokens=100, output_tokens=50),
                      match="Variant under review: lora\\n")
        # the other variant answers prose twice: one repair request, then an error for it alone
        server.script(Answer("Looks fine to me."), Answer("Still no JSON, sorry."),
                      match=f"Variant under review: {mspec.name}\\n")
        env = {"REVIEW_PROVIDER": wire, "REVIEW_BASE_URL": server.base_url, "REVIEW_MODEL": "test-model",
               "OPENAI_API_KEY" if wire == "openai" else "ANTHROPIC_API_KEY": KEY}
        config = ProviderConfig.from_env(env)
        kw = {"verify_json": vj, "config": config, "manifest_path": man, "refs_cache": cache,
              "llm_cache": out / "llm", "prompts_dir": out / "prompts", "audits_dir": out / "no-audits",
              "client_options": {"max_retries": 0}}
        run = R.review(["lora", mspec.name], **kw)
        assert len(server.requests_matching("Variant under review: lora\\n")) == 1
        assert len(server.requests_matching(f"Variant under review: {mspec.name}\\n")) == 2  # + one repair
        assert all(r.wire == wire for r in server.requests)

        lora, other = run["reviews"]
        assert run["mode"] == "llm" and run["model"] == "test-model" and lora["llm_error"] is None
        llm_ok = [f for f in lora["findings"] if f["source"] == "llm"]
        assert [f["category"] for f in llm_ok] == ["scale", "reference_mismatch"]
        assert llm_ok[1]["evidence"][0]["link"] == REF_URL + "#L6"
        assert llm_ok[0]["evidence"][0]["link"].startswith("repo:impl/variants/lora.py#L")
        (fab,) = lora["unverified"]
        assert fab["claim"].startswith("FABRICATED") and "nowhere" in fab["evidence"][0]["reason"]
        assert lora["llm_verdict"] == "Partial" and lora["verdict"] == "Partial"
        assert "not a JSON object" in other["llm_error"] and "repair" in other["llm_error"]
        assert other["verdict"] == other["mechanical_verdict"] and other["verdict_note"]
        assert run["provenance"]["input_tokens"] >= 100 and run["provenance"]["repairs"] == 1

        audit = write_audit(run, out / "audits")
        text = audit.read_text()
        verified_part, unverified_part = text.split("### Unverified findings", 1)
        assert "FABRICATED" not in verified_part and "FABRICATED" in unverified_part
        cited = llm_ok[0]["evidence"][0]
        real_lines = "\n".join((ROOT / "impl/variants/lora.py").read_text().splitlines()[
            cited["start_line"] - 1:cited["end_line"]])
        assert f"```python\n{real_lines}\n```" in verified_part  # the file's own lines, not the model's copy
        assert f"]({REF_URL}#L6)" in text
        assert "The LLM review of this variant failed" in text and "No LLM was asked" not in text
        assert "`test-model`" in text

        # an unchanged second run costs no request for lora (response cache); the failed one is asked again
        before = len(server.requests)
        run2 = R.review(["lora", mspec.name], **kw)
        server_new = server.requests[before:]
        assert not [r for r in server_new if b"Variant under review: lora\\n" in r.body]
        assert run2["provenance"]["cache_hits"] == 1
        assert [f["id"] for f in run2["reviews"][0]["findings"]] == [f["id"] for f in lora["findings"]]

    (out / "review.json").write_text(json.dumps(run))
    assert KEY.encode() not in _all_written_bytes(out)
    assert KEY not in json.dumps(run) + json.dumps(run2)


def test_an_unchanged_variant_is_not_asked_again_and_a_changed_one_is(tmp_path):
    """The second LLM review diffs lora against the commit of the first audit: nothing changed, so the model is
    not asked and its findings are carried over (quotes checked anew); after an edit it is asked again and the
    bundle holds the diff, whose quoted lines are checked against both commits."""
    import shutil
    import subprocess

    root = tmp_path / "repo"
    for folder in ("impl", "spec"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org"]

    def commit(msg: str) -> None:
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", msg], check=True)

    subprocess.run([*git, "init", "-q"], check=True)
    commit("base")
    man, cache = manifest_with_ref(tmp_path)
    vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "pass", "", 0.02)])
    audits = root / "audits"
    with LLMTestServer() as server:
        server.script(Answer(json.dumps(_answer_for_lora())), match="Variant under review: lora\\n")
        config = ProviderConfig.from_env({"REVIEW_PROVIDER": "openai", "REVIEW_BASE_URL": server.base_url,
                                          "REVIEW_MODEL": "test-model", "OPENAI_API_KEY": KEY})
        kw = {"root": root, "verify_json": vj, "config": config, "manifest_path": man, "refs_cache": cache,
              "audits_dir": audits, "templates_dir": TEMPLATES, "client_options": {"max_retries": 0}}
        first = R.review(["lora"], **kw)
        write_audit(first, audits, root=root, templates_dir=TEMPLATES)
        commit("audit v1")

        second = R.review(["lora"], **kw)
        assert len(server.requests_matching("Variant under review: lora\\n")) == 1  # not asked again
        (r,) = second["reviews"]
        assert r["llm_carried"] and "not asked again" in r["verdict_note"]
        assert r["changes"]["previous"] == 1 and {f["status"] for f in r["changes"]["files"]} == {"unchanged"}
        assert [f["id"] for f in r["findings"]] == [f["id"] for f in first["reviews"][0]["findings"]]
        assert r["llm_verdict"] == first["reviews"][0]["llm_verdict"]

        lora = root / "impl" / "variants" / "lora.py"
        lora.write_text(lora.read_text() + "\nEXTRA_SCALE = 2.0  # a change since v1\n")
        from tools.diffs import changes_since

        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        files = json.loads(vj.read_text())["specs"]["lora"]["files"]
        diff = changes_since(head, [files["spec"], files["impl"], *files["impl_deps"]], root)["diff"]
        at = diff.index("+EXTRA_SCALE = 2.0  # a change since v1") + 1
        cite = {"path": "generated/changes/lora.diff", "start_line": at, "end_line": at,
                "quote": "EXTRA_SCALE = 2.0  # a change since v1"}
        server.script(Answer(json.dumps({"verdict": "OK", "summary": "s", "findings": [
            {"severity": "low", "category": "scale", "claim": "a new module constant", "evidence": [cite]}]})),
                      match="Variant under review: lora\\n")
        third = R.review(["lora"], **kw)
        assert len(server.requests_matching("Variant under review: lora\\n")) == 2
        (r3,) = third["reviews"]
        assert not r3["llm_carried"]
        assert {f["path"]: f["status"] for f in r3["changes"]["files"]}["impl/variants/lora.py"] == "modified"
        assert "+EXTRA_SCALE = 2.0  # a change since v1" in server.requests[-1].body.decode()
        (diff_finding,) = [f for f in r3["findings"] if f["source"] == "llm"]  # a quote of a diff hunk, verified
        assert diff_finding["evidence"][0]["path"] == "generated/changes/lora.diff"
