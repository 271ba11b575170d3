"""Hostile LLM answers and leaking secrets (issue #27), against the real loopback server (tests/llm_server.py):
a bad answer fails its own request or variant only, parsing is linear, a verified high finding decides the
verdict, and no fragment of the key reaches an error, a log record or a written file."""
from __future__ import annotations

import json
import logging

import pytest

from tests.llm_server import Answer, LLMTestServer, Raw, Status
from tests.test_llm_client import SCHEMA, FakeTime, make_client
from tests.test_review import _answer_for_lora, manifest_with_ref, verify_json
from tools import review as R
from tools.llm import (AnswerParseError, Completion, CompletionRequest, LLMError, MalformedAnswer, ProviderConfig,
                       SecretStr, parse_json_answer)
from tools.render import write_audit

KEY = "sk-HOSTILE-b7e1c93d0a4f6e2857"
DIGITS = "9" * 5000
DEEP = "[" * 100_000 + "]" * 100_000


def fragments(key: str = KEY, n: int = 8) -> list[str]:
    """Every n-character piece of the key: none may appear anywhere."""
    return [key[i:i + n] for i in range(len(key) - n + 1)]


def leaked(text: str) -> list[str]:
    return [f for f in fragments() if f in text]


# ----------------------------------------------------------------------------------------------- parsing


def _python_lines_run(fn) -> int:
    """How many lines of Python `fn` runs (sys.settrace line events): a work count that no machine load changes."""
    import sys

    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def test_parsing_unclosed_fences_is_linear():
    # took 35 s for 40 kB with the regex parser (quadratic): ten times the input must cost about ten times the work
    work = {}
    for size in (40_000, 400_000):
        text = "```json\n" * (size // 8)

        def parse():
            with pytest.raises(AnswerParseError, match="no JSON object found"):
                parse_json_answer(text)

        work[size] = _python_lines_run(parse)
    assert work[400_000] <= 15 * work[40_000], work


def test_fences_still_parse_as_before():
    assert parse_json_answer('```json\n{"a": 1}\n  ```  \nprose') == {"a": 1}
    assert parse_json_answer('````\n{"b": "```"}\n````') == {"b": "```"}
    assert parse_json_answer('~~~json\n{"c": 3}\n~~~') == {"c": 3}
    assert parse_json_answer("```json\n" * 1000 + '```python\nx\n```\n```json\n{"d": 4}\n```') == {"d": 4}


@pytest.mark.parametrize("text, match", [
    ('{"verdict": ' + DIGITS + "}", "digits"),
    (DEEP, "nested too deeply"),
    ("Here: " + '{"a": ' * 50_000, "no JSON object found"),
    ("```json\n" + DEEP + "\n```", "nested too deeply"),
])
def test_hostile_json_is_a_parse_error_not_a_crash(text, match):
    with pytest.raises(AnswerParseError, match=match):
        parse_json_answer(text)


# ----------------------------------------------------------------------------------------------- complete_many


def test_one_hostile_answer_fails_its_own_request_only():
    fake = FakeTime()
    with LLMTestServer() as server:
        server.script(Answer('{"verdict": ' + DIGITS + "}"), Answer(DEEP), match="case-digits")
        server.script(Raw(DEEP.encode(), content_type="application/json"), match="case-deep-200")
        server.script(Status(500, body=b'{"error": ' + DEEP.encode() + b"}"), match="case-deep-500")
        server.script(Status(400, body=b'{"error": {"message": ' + DIGITS.encode() + b"}}"), match="case-bigint-400")
        server.script(Answer('{"verdict": "OK"}'), match="case-good")
        cases = ["case-digits", "case-deep-200", "case-deep-500", "case-bigint-400", "case-good"]
        with make_client(server, "openai", fake, max_retries=0) as client:
            out = client.complete_many([CompletionRequest("s", c, SCHEMA, json=True) for c in cases])
    assert [type(r) for r in out[:4]] == [MalformedAnswer, LLMError, LLMError, LLMError]
    assert isinstance(out[4], Completion) and out[4].data == {"verdict": "OK"}
    assert "HTTP 500" in str(out[2]) and "HTTP 400" in str(out[3])


def test_complete_many_turns_an_unexpected_exception_into_that_slots_error(monkeypatch):
    fake = FakeTime()
    with LLMTestServer() as server:
        server.script(Answer('{"verdict": "OK"}'), forever=True)
        with make_client(server, "openai", fake, key=KEY) as client:
            real = client.complete_json

            def flaky(system, user, *a, **k):
                if user == "boom":
                    raise RecursionError(f"deep {KEY}")
                return real(system, user, *a, **k)
            monkeypatch.setattr(client, "complete_json", flaky)
            out = client.complete_many([CompletionRequest("s", u, SCHEMA, json=True) for u in ("a", "boom", "b")])
            with pytest.raises(ValueError, match="empty"):  # bad arguments are still refused up front
                client.complete_many([CompletionRequest("s", " ")])
    assert isinstance(out[0], Completion) and isinstance(out[2], Completion)
    assert isinstance(out[1], LLMError) and "RecursionError" in str(out[1]) and not leaked(str(out[1]))


# ----------------------------------------------------------------------------------------------- secrets


def test_scrub_covers_prefixes_and_whitespace_split_keys():
    s = SecretStr(KEY)
    assert s.scrub(f"a {KEY} b") == "a [REDACTED] b"
    assert s.scrub(f"cut here: {KEY[:20]}...") == "cut here: [REDACTED]..."
    for sep in ("\n", "\t", " ", "\r\n  "):
        assert leaked(s.scrub(f"x {KEY[:11]}{sep}{KEY[11:]} y")) == []
    assert s.scrub("an unrelated sk-HOST text") == "an unrelated sk-HOST text"  # under 8 characters: kept


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
def test_no_key_fragment_reaches_errors_logs_or_files(tmp_path, caplog, wire):
    caplog.set_level(logging.DEBUG)
    fake = FakeTime()
    with LLMTestServer() as server:
        server.script(Status(401, "x" * 290 + KEY), match="case-boundary")  # the excerpt is cut inside the key
        server.script(Status(401, f"bad key {KEY[:13]}\n{KEY[13:]}"), match="case-newline")
        server.script(Status(403, f"bad key {KEY[:9]}\t{KEY[9:]}"), match="case-tab")
        server.script(Raw(("y" * 110 + KEY).encode(), status=200), match="case-raw-head")
        server.script(Status(401, "nope", headers={"x-echo-key": KEY}), match="case-header")
        server.script(Answer(f"not json {KEY[:15]}"), Answer(f'{{"verdict": "OK", "k": "{KEY[:12]}\\n{KEY[12:]}"}}'),
                      match="case-answer")
        errors, texts = [], []
        with make_client(server, wire, fake, key=KEY, cache_dir=tmp_path, max_retries=0) as client:
            for case in ("case-boundary", "case-newline", "case-tab", "case-raw-head", "case-header"):
                with pytest.raises(LLMError) as info:
                    client.complete_json("s", case, SCHEMA)
                errors.append(info.value)
            texts.append(json.dumps(client.complete_json("s", "case-answer", SCHEMA).data))
        assert any(KEY in v for r in server.requests for v in r.headers.values())  # the key really was sent
    assert all("[REDACTED]" in str(e) for e in errors[1:4])
    for e in errors:
        assert leaked(str(e)) == [] and leaked(repr(e)) == [], str(e)
    assert leaked(" ".join(texts)) == []
    assert "receive_response_headers" in caplog.text  # the DEBUG trace ran, only its headers were withheld
    assert leaked(caplog.text) == [] and all(leaked(r.getMessage()) == [] for r in caplog.records)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(leaked(p.read_text(errors="replace")) == [] for p in files)


# ----------------------------------------------------------------------------------------------- the review


def _lora_says_ok_with_a_verified_high_finding() -> dict:
    answer = _answer_for_lora()
    answer["verdict"] = "OK"
    answer["findings"][0]["severity"] = "high"  # the verified one
    answer["findings"] = answer["findings"][:1]
    return answer


def test_review_survives_hostile_answers_and_a_verified_high_finding_decides(tmp_path):
    man, cache = manifest_with_ref(tmp_path, variants=("lora", "dora", "ia3"))
    vj = verify_json(tmp_path / "v.json", [(v, "oracle", "pass", "", 0.01) for v in ("lora", "dora", "ia3")],
                     variants=("lora", "dora", "ia3"))
    out = tmp_path / "out"
    with LLMTestServer() as server:
        server.script(Answer(json.dumps(_lora_says_ok_with_a_verified_high_finding())),
                      match="Variant under review: lora\\n")
        server.script(Answer('{"verdict": ' + DIGITS + "}"), Answer(DEEP), match="Variant under review: dora\\n")
        server.script(Status(500, body=b'{"error": ' + DEEP.encode() + b"}"), match="Variant under review: ia3\\n")
        config = ProviderConfig.from_env({"REVIEW_PROVIDER": "openai", "REVIEW_BASE_URL": server.base_url,
                                          "REVIEW_MODEL": "m", "OPENAI_API_KEY": KEY})
        run = R.review(["lora", "dora", "ia3"], verify_json=vj, config=config, manifest_path=man,
                       refs_cache=cache, llm_cache=out / "llm", prompts_dir=out / "prompts",
                       client_options={"max_retries": 0})
    lora, dora, ia3 = run["reviews"]
    assert lora["llm_error"] is None and lora["llm_verdict"] == "OK"
    assert [f["severity"] for f in lora["findings"] if f["source"] == "llm"] == ["high"]
    assert lora["verdict"] == "BUGGY" and lora["verdict_note"] == "model said OK"
    assert "not a JSON object" in dora["llm_error"] and "HTTP 500" in ia3["llm_error"]
    assert dora["verdict"] == dora["mechanical_verdict"] and ia3["verdict"] == ia3["mechanical_verdict"]
    audit = write_audit(run, out / "audits")
    row = next(line for line in audit.read_text().splitlines() if line.startswith("| [lora]"))
    assert "**BUGGY**" in row and "(1 high)" in row and "**OK**" not in row
    assert (out / "audits" / "variants_review_v1.json").is_file()


def test_combine_verdicts_a_verified_high_finding_decides():
    assert R.combine_verdicts("OK", "OK", [{"severity": "high"}]) == "BUGGY"
    assert R.combine_verdicts("OK", "OK", [{"severity": "medium"}]) == "Partial"
    assert R.combine_verdicts("OK", "Partial", [{"severity": "low"}]) == "Partial"
    assert R.combine_verdicts("Partial", None, [{"severity": "high"}]) == "BUGGY"


def test_an_answer_that_breaks_the_finding_reader_fails_that_variant_only():
    bundle = R.Bundle("x", (R.BundleFile("impl/variants/x.py", "impl", ("a = 1",), None),), (), 10**6, 0)
    data = {"verdict": "OK", "findings": [{"severity": "high", "category": "scale", "claim": "c",
                                           "evidence": [{"path": "impl/variants/x.py", "start_line": float("inf"),
                                                         "end_line": 1, "quote": "a = 1"}]}]}
    verdict, _, ok, bad = R.parse_answer(data, "x", bundle)
    assert verdict == "OK" and ok == [] and "line numbers must be integers" in bad[0]["claim"]
