"""Tests of tools.llm against a real HTTP server on 127.0.0.1 (tests/llm_server.py).

Nothing inside the client is patched: only its injectable ``sleep``/``clock`` (so backoff waits are recorded
instead of slept) and ``rng`` are replaced. Timeouts are small so the whole file runs in a few seconds.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import random
import socket
import time
import traceback

import pytest

from tests.llm_server import (
    Answer,
    Dribble,
    Drop,
    LLMTestServer,
    RateLimited,
    Raw,
    ServerError,
    Slow,
    Status,
)
from tools.llm import (
    ANTHROPIC_VERSION,
    AnswerParseError,
    CacheError,
    Completion,
    CompletionRequest,
    ConfigError,
    LLMClient,
    LLMError,
    MalformedAnswer,
    ProviderConfig,
    SecretStr,
    parse_json_answer,
)

KEY = "sk-PLANTED-7f3c9a1e5d2b4c6a8e0f"
SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["OK", "Partial", "BUGGY"]}},
    "required": ["verdict"],
    "additionalProperties": False,
}
WIRES = ["openai", "anthropic"]


class FakeTime:
    """Injected sleep + clock: sleeping records the wait and advances the clock instead of blocking."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.offset = 0.0

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.offset += seconds

    def clock(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def server():
    with LLMTestServer() as s:
        yield s


@pytest.fixture
def fake_time():
    return FakeTime()


def make_client(server: LLMTestServer, provider: str, fake_time: FakeTime, *, key: str | None = KEY,
                base_url: str | None = None, **kw) -> LLMClient:
    config = ProviderConfig(provider=provider, model="test-model", base_url=base_url or server.base_url,
                            api_key=SecretStr(key) if key else None)
    options = dict(connect_timeout=0.5, read_timeout=0.5, deadline_s=5.0, max_retries=3, max_concurrency=4,
                   sleep=fake_time.sleep, clock=fake_time.clock, rng=random.Random(1234))
    options.update(kw)
    return LLMClient(config, **options)


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------


def test_from_env_offline_when_unset_or_offline():
    assert ProviderConfig.from_env({}).is_offline
    assert ProviderConfig.from_env({"REVIEW_PROVIDER": "  "}).is_offline
    assert ProviderConfig.from_env({"REVIEW_PROVIDER": "offline", "REVIEW_MODEL": "x"}).is_offline
    with pytest.raises(ConfigError, match="offline"):
        LLMClient(ProviderConfig.from_env({}))


def test_from_env_reads_openai_and_anthropic_settings():
    cfg = ProviderConfig.from_env({"REVIEW_PROVIDER": "openai", "REVIEW_MODEL": "gpt-x", "OPENAI_API_KEY": KEY})
    assert (cfg.provider, cfg.model, cfg.base_url) == ("openai", "gpt-x", "https://api.openai.com")
    assert cfg.endpoint == "https://api.openai.com/v1/chat/completions"
    assert cfg.api_key is not None and cfg.api_key.reveal() == KEY
    cfg = ProviderConfig.from_env({"REVIEW_PROVIDER": "Anthropic", "REVIEW_MODEL": "claude-x",
                                   "REVIEW_BASE_URL": "http://127.0.0.1:9/v1/", "ANTHROPIC_API_KEY": KEY + "\n"})
    assert cfg.endpoint == "http://127.0.0.1:9/v1/messages"
    assert cfg.api_key.reveal() == KEY and cfg.anthropic_version == "2023-06-01"
    # A local server needs no key.
    cfg = ProviderConfig.from_env({"REVIEW_PROVIDER": "openai", "REVIEW_MODEL": "llama",
                                   "REVIEW_BASE_URL": "http://localhost:8000"})
    assert cfg.api_key is None and cfg.endpoint == "http://localhost:8000/v1/chat/completions"


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"REVIEW_PROVIDER": "gemini"}, "REVIEW_PROVIDER"),
        ({"REVIEW_PROVIDER": "openai", "OPENAI_API_KEY": KEY}, "REVIEW_MODEL"),
        ({"REVIEW_PROVIDER": "openai", "REVIEW_MODEL": "a b", "OPENAI_API_KEY": KEY}, "REVIEW_MODEL"),
        ({"REVIEW_PROVIDER": "openai", "REVIEW_MODEL": "m"}, "OPENAI_API_KEY"),
        ({"REVIEW_PROVIDER": "anthropic", "REVIEW_MODEL": "m", "OPENAI_API_KEY": KEY}, "ANTHROPIC_API_KEY"),
        ({"REVIEW_PROVIDER": "openai", "REVIEW_MODEL": "m", "OPENAI_API_KEY": KEY,
          "REVIEW_BASE_URL": "ftp://host"}, "REVIEW_BASE_URL"),
        ({"REVIEW_PROVIDER": "openai", "REVIEW_MODEL": "m", "OPENAI_API_KEY": KEY,
          "REVIEW_BASE_URL": f"https://user:{KEY}@host"}, "REVIEW_BASE_URL"),
        ({"REVIEW_PROVIDER": "openai", "REVIEW_MODEL": "m", "OPENAI_API_KEY": KEY[:8] + " " + KEY[8:]},
         "OPENAI_API_KEY"),
    ],
)
def test_from_env_bad_values_name_the_variable_never_the_key(env, variable):
    with pytest.raises(ConfigError) as info:
        ProviderConfig.from_env(env)
    assert variable in str(info.value)
    assert KEY not in str(info.value) and KEY[8:] not in str(info.value)


@pytest.mark.parametrize("bad", [KEY + "\n", "sk-a b", "sk-\x00", "sk-'q'", "sk-\\x", "sk-é"])
def test_key_with_unsafe_characters_is_rejected_without_echo(bad):
    with pytest.raises(ConfigError, match="api_key contains") as info:
        ProviderConfig(provider="openai", model="m", api_key=SecretStr(bad))
    assert bad not in str(info.value)


def test_secret_is_redacted_everywhere():
    secret = SecretStr(KEY)
    cfg = ProviderConfig(provider="openai", model="m", api_key=secret)
    for text in (repr(secret), str(secret), f"{secret}", repr(cfg), str(cfg), repr(copy.deepcopy(cfg))):
        assert KEY not in text
    assert copy.deepcopy(cfg).api_key.reveal() == KEY
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(cfg)


# ---------------------------------------------------------------------------------------------------------------
# wire formats
# ---------------------------------------------------------------------------------------------------------------


def test_openai_answer_headers_and_body_shape(server, fake_time):
    server.script(Answer('{"verdict": "OK"}', input_tokens=120, output_tokens=30))
    with make_client(server, "openai", fake_time) as client:
        result = client.complete("You review code.", "Review this.", SCHEMA, "audit_review")
    assert isinstance(result, Completion)
    assert (result.text, result.cached, result.provider, result.model) == ('{"verdict": "OK"}', False, "openai",
                                                                          "test-model")
    assert result.usage == {"input_tokens": 120, "output_tokens": 30} and result.attempts == 1
    [req] = server.requests
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"] == "application/json"
    assert "x-api-key" not in req.headers
    body = req.json
    assert body["model"] == "test-model"
    assert body["messages"] == [{"role": "system", "content": "You review code."},
                                {"role": "user", "content": "Review this."}]
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "audit_review", "strict": True, "schema": SCHEMA}}
    assert "temperature" not in body and "max_tokens" not in body
    stats = client.stats
    assert (stats.requests, stats.input_tokens, stats.output_tokens, stats.retries) == (1, 120, 30, 0)


def test_anthropic_answer_headers_and_body_shape(server, fake_time):
    thinking = {"type": "thinking", "thinking": "not part of the answer", "signature": "x"}
    server.script(Answer('{"verdict": "BUGGY"}', input_tokens=50, output_tokens=9, extra_blocks=(thinking,)))
    with make_client(server, "anthropic", fake_time) as client:
        result = client.complete("You review code.", "Review this.", SCHEMA)
    assert result.text == '{"verdict": "BUGGY"}' and result.usage == {"input_tokens": 50, "output_tokens": 9}
    [req] = server.requests
    assert req.path == "/v1/messages"
    assert req.headers["x-api-key"] == KEY
    assert req.headers["anthropic-version"] == ANTHROPIC_VERSION == "2023-06-01"
    assert req.headers["content-type"] == "application/json"
    assert "authorization" not in req.headers
    body = req.json
    assert set(body) == {"model", "max_tokens", "system", "messages"}
    assert body["model"] == "test-model" and body["max_tokens"] == 4096
    assert body["messages"] == [{"role": "user", "content": "Review this."}]
    assert body["system"].startswith("You review code.")
    assert json.dumps(SCHEMA, indent=2, sort_keys=True) in body["system"]  # schema given as an instruction


def test_openai_without_schema_and_without_key_sends_no_auth(server, fake_time):
    server.script(Answer("plain text"))
    with make_client(server, "openai", fake_time, key=None) as client:
        assert client.complete("", "hello").text == "plain text"
    [req] = server.requests
    assert "authorization" not in req.headers
    assert req.json == {"model": "test-model", "messages": [{"role": "user", "content": "hello"}]}


def test_base_url_ending_in_v1_is_not_doubled(server, fake_time):
    server.script(Answer("ok"))
    with make_client(server, "openai", fake_time, base_url=server.base_url + "/v1") as client:
        client.complete("s", "u")
    assert server.requests[0].path == "/v1/chat/completions"


# ---------------------------------------------------------------------------------------------------------------
# retries, deadline, concurrency
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", WIRES)
def test_429_with_retry_after_then_success(server, fake_time, wire):
    server.script(RateLimited(retry_after="3"), Answer("fine"))
    with make_client(server, wire, fake_time, deadline_s=10.0) as client:
        result = client.complete("s", "u")
    assert result.text == "fine" and result.attempts == 2
    assert fake_time.slept == [3.0]  # exactly the server's Retry-After, no jitter
    assert len(server.requests) == 2
    assert client.stats.retries == 1 and client.stats.requests == 2


def test_retry_after_is_capped(server, fake_time):
    server.script(RateLimited(retry_after="1000"), Answer("fine"))
    with make_client(server, "openai", fake_time, retry_after_cap_s=4.0, deadline_s=30.0) as client:
        client.complete("s", "u")
    assert fake_time.slept == [4.0]


def test_backoff_is_full_jitter_from_the_injected_rng(server, fake_time):
    server.script(ServerError(503), ServerError(502), ServerError(500), Answer("fine"))
    with make_client(server, "openai", fake_time, backoff_base_s=0.5, backoff_cap_s=1.5,
                     rng=random.Random(7), deadline_s=30.0) as client:
        assert client.complete("s", "u").text == "fine"
    expected_rng = random.Random(7)
    expected = [expected_rng.uniform(0.0, ceiling) for ceiling in (0.5, 1.0, 1.5)]
    assert fake_time.slept == pytest.approx(expected)
    assert len(server.requests) == 4 and client.stats.retries == 3


def test_500s_until_the_deadline_give_a_clear_error(server, fake_time):
    server.script(ServerError(500, "upstream exploded"), forever=True)
    with make_client(server, "openai", fake_time, deadline_s=2.0, max_retries=1000, backoff_base_s=0.2,
                     backoff_cap_s=0.4) as client:
        with pytest.raises(LLMError) as info:
            client.complete("s", "u")
    err = info.value
    assert err.status == 500
    # the last attempt may be cut by the deadline before the server records it
    assert len(server.requests) <= err.attempts <= len(server.requests) + 1 and len(server.requests) > 3
    assert f"127.0.0.1:{server.base_url.rsplit(':', 1)[1]}/v1/chat/completions" in str(err)
    assert "openai" in str(err) and "HTTP 500" in str(err) and "deadline of 2 s" in str(err)
    assert "upstream exploded" in str(err)  # also when the last attempt was cut short by the deadline
    assert sum(fake_time.slept) <= 2.0


def test_max_retries_bounds_attempts(server, fake_time):
    server.script(ServerError(503), forever=True)
    with make_client(server, "anthropic", fake_time, max_retries=2, deadline_s=60.0) as client:
        with pytest.raises(LLMError, match="giving up after 2 retries") as info:
            client.complete("s", "u")
    assert info.value.attempts == 3 == len(server.requests)


def test_complete_many_keeps_going_when_one_request_fails(server, fake_time):
    server.script(ServerError(500), match="variant-bad", forever=True)
    server.script(Answer('{"verdict": "OK"}'), match="variant-good", forever=True)
    requests = [CompletionRequest("s", f"review variant-good-{i}") for i in range(3)]
    requests.insert(1, CompletionRequest("s", "review variant-bad"))
    with make_client(server, "openai", fake_time, deadline_s=1.5, max_retries=1000, backoff_base_s=0.1,
                     backoff_cap_s=0.2) as client:
        results = client.complete_many(requests)
    assert [type(r).__name__ for r in results] == ["Completion", "LLMError", "Completion", "Completion"]
    assert results[1].status == 500 and "deadline" in str(results[1])
    assert all(r.text == '{"verdict": "OK"}' for i, r in enumerate(results) if i != 1)
    assert len(server.requests_matching("variant-good")) == 3
    assert server.unscripted == 0


def test_complete_many_bounds_concurrency(server, fake_time):
    server.script(Answer("ok", delay_s=0.15), forever=True)
    with make_client(server, "anthropic", fake_time, max_concurrency=2) as client:
        results = client.complete_many([CompletionRequest("s", f"request {i}") for i in range(6)])
    assert all(isinstance(r, Completion) for r in results)
    assert [server.requests_matching(f"request {i}") != [] for i in range(6)] == [True] * 6
    assert server.max_in_flight == 2  # reached, never exceeded


@pytest.mark.parametrize("stage", ["body", "headers"])
def test_slow_answer_past_read_timeout_is_retried_then_fails(server, fake_time, stage):
    server.script(Slow(1.0, stage=stage), forever=True)
    with make_client(server, "openai", fake_time, read_timeout=0.2, max_retries=2) as client:
        with pytest.raises(LLMError) as info:
            client.complete("s", "u")
    assert "read timeout" in str(info.value) and info.value.status is None
    assert info.value.attempts == 3 == len(server.requests)
    assert len(fake_time.slept) == 2


def test_slow_answer_then_success(server, fake_time):
    server.script(Slow(1.0, stage="body"), Answer("second time lucky"))
    with make_client(server, "anthropic", fake_time, read_timeout=0.2) as client:
        assert client.complete("s", "u").text == "second time lucky"
    assert len(server.requests) == 2 and client.stats.retries == 1


def test_body_dribbling_past_the_deadline_is_abandoned(server):
    # Blank lines every 0.1 s keep resetting the 0.3 s read timeout; only the overall deadline stops the wait.
    server.script(Dribble(0.1, count=30), forever=True)
    client = make_client(server, "openai", FakeTime(), read_timeout=0.3, deadline_s=0.6, sleep=time.sleep,
                         clock=time.monotonic)
    with client, pytest.raises(LLMError, match="ran out while the body was still arriving") as info:
        client.complete("s", "u")  # the dribble never ends: only the overall deadline can end it, with this error
    assert info.value.attempts == 1


def test_blank_lines_before_the_json_are_fine_within_the_deadline(server, fake_time):
    server.script(Dribble(0.02, count=5, content="after blank lines"))
    with make_client(server, "anthropic", fake_time) as client:
        assert client.complete("s", "u").text == "after blank lines"


@pytest.mark.parametrize("wire", WIRES)
def test_dropped_connections_are_retried(server, fake_time, wire):
    server.script(Drop("mid_body"), Drop("before_response"), Answer("made it"))
    with make_client(server, wire, fake_time) as client:
        result = client.complete("s", "u")
    assert result.text == "made it" and result.attempts == 3
    assert len(server.requests) == 3 and client.stats.retries == 2


def test_connection_refused_is_retried_then_reported(fake_time):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    config = ProviderConfig("openai", model="m", base_url=f"http://127.0.0.1:{port}", api_key=SecretStr(KEY))
    with LLMClient(config, connect_timeout=0.3, read_timeout=0.3, max_retries=2, sleep=fake_time.sleep,
                   clock=fake_time.clock, rng=random.Random(0)) as client:
        with pytest.raises(LLMError, match="connection failed") as info:
            client.complete("s", "u")
    assert info.value.attempts == 3 and len(fake_time.slept) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_other_than_429_are_not_retried(server, fake_time, status):
    server.script(Status(status, "nope"), forever=True)
    with make_client(server, "openai", fake_time) as client:
        with pytest.raises(LLMError) as info:
            client.complete("s", "u")
    assert info.value.status == status and info.value.attempts == 1 and len(server.requests) == 1
    assert f"HTTP {status}" in str(info.value) and "nope" in str(info.value)
    assert fake_time.slept == []


@pytest.mark.parametrize("wire, code", [("openai", "insufficient_quota"),
                                        ("anthropic", "enforced_spend_limit_reached")])
def test_429_for_exhausted_quota_is_not_retried(server, fake_time, wire, code):
    server.script(Status(429, "no money", "rate_limit_error", code, {"retry-after": "1"}), forever=True)
    with make_client(server, wire, fake_time) as client:
        with pytest.raises(LLMError, match="quota or spend limit") as info:
            client.complete("s", "u")
    assert info.value.attempts == 1 and len(server.requests) == 1


def test_non_json_body_is_a_clear_error(server, fake_time):
    server.script(Raw(b"<html>gateway page</html>"))
    with make_client(server, "openai", fake_time) as client:
        with pytest.raises(LLMError, match="body is not JSON") as info:
            client.complete("s", "u")
    assert "<html>gateway page" in str(info.value) and len(server.requests) == 1


@pytest.mark.parametrize("wire, reason", [("openai", "length"), ("anthropic", "max_tokens")])
def test_truncated_answer_is_an_error_and_not_cached(server, fake_time, tmp_path, wire, reason):
    server.script(Answer('{"verdict": "O', finish_reason=reason), Answer('{"verdict": "OK"}'))
    with make_client(server, wire, fake_time, cache_dir=tmp_path) as client:
        with pytest.raises(LLMError, match="cut off"):
            client.complete_json("s", "u", SCHEMA)
        assert client.complete_json("s", "u", SCHEMA).data == {"verdict": "OK"}
    assert len(server.requests) == 2  # no repair round for a truncated answer; the failure was not cached


def test_response_format_rejected_falls_back_to_prompt_once(server, fake_time):
    server.script(Status(400, "Unknown parameter: 'response_format'.", "invalid_request_error"),
                  Answer('{"verdict": "OK"}'), Answer('{"verdict": "Partial"}'))
    with make_client(server, "openai", fake_time) as client:
        assert client.complete_json("sys", "first", SCHEMA).data == {"verdict": "OK"}
        assert client.complete_json("sys", "second", SCHEMA).data == {"verdict": "Partial"}
    first, fallback, second = server.requests
    assert "response_format" in first.json
    assert "response_format" not in fallback.json and "response_format" not in second.json
    assert json.dumps(SCHEMA, indent=2, sort_keys=True) in fallback.json["messages"][0]["content"]
    assert client.stats.format_fallbacks == 1 and client.stats.requests == 3


# ---------------------------------------------------------------------------------------------------------------
# JSON answers and the repair round
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"a": 1}', {"a": 1}),
        ('  \n{"a": [1, 2]}\n', {"a": [1, 2]}),
        ('Here is my review:\n```json\n{"a": 1}\n```\nThanks.', {"a": 1}),
        ('```\n{"a": 2}\n```', {"a": 2}),
        ('````json\n{"code": "```x```"}\n````', {"code": "```x```"}),
        ('Sure. The answer is {"a": {"b": 3}} as requested.', {"a": {"b": 3}}),
        ('```python\nx = {1: 2}\n```\n```json\n{"a": 4}\n```', {"a": 4}),
    ],
)
def test_parse_json_answer_is_tolerant(text, expected):
    assert parse_json_answer(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("[1, 2]", "got an array"),
        ("I think the code is fine.", "no JSON object found"),
        ('{"a": 1,, "b": 2}', "line 1 column"),
        ('```json\n{"a": \n```', "fenced block 1"),
    ],
)
def test_parse_json_answer_errors_are_clear(text, message):
    with pytest.raises(AnswerParseError, match=message):
        parse_json_answer(text)


@pytest.mark.parametrize("wire", WIRES)
def test_malformed_json_then_repaired_with_exactly_one_request(server, fake_time, tmp_path, wire):
    bad = 'Sure! {"verdict": OK}'
    server.script(Answer(bad, input_tokens=100, output_tokens=10),
                  Answer('```json\n{"verdict": "OK"}\n```', input_tokens=130, output_tokens=12))
    with make_client(server, wire, fake_time, cache_dir=tmp_path) as client:
        result = client.complete_json("sys", "review it", SCHEMA, template_id="review-v1")
        assert result.data == {"verdict": "OK"} and result.repaired and not result.cached
        assert result.usage == {"input_tokens": 230, "output_tokens": 22} and result.attempts == 2
        assert client.stats.repairs == 1 and client.stats.requests == 2
        # The repaired answer is cached under the original request: the next run costs nothing.
        again = client.complete_json("sys", "review it", SCHEMA, template_id="review-v1")
        assert again.cached and again.data == {"verdict": "OK"} and again.repaired
    assert len(server.requests) == 2
    repair = server.requests[1].json["messages"]
    turns = [m for m in repair if m["role"] != "system"]
    assert [m["role"] for m in turns] == ["user", "assistant", "user"]
    assert turns[0]["content"] == "review it" and turns[1]["content"] == bad
    assert "could not be parsed as a JSON object" in turns[2]["content"]
    assert "line 1 column" in turns[2]["content"]  # the parse error is passed on


def test_malformed_twice_raises_malformed_answer_and_others_go_on(server, fake_time, tmp_path):
    server.script(Answer("no json here"), Answer("still none"), match="variant-a")
    server.script(Answer('{"verdict": "OK"}'), match="variant-b")
    requests = [CompletionRequest("s", "variant-a", SCHEMA, json=True),
                CompletionRequest("s", "variant-b", SCHEMA, json=True)]
    with make_client(server, "anthropic", fake_time, cache_dir=tmp_path) as client:
        bad, good = client.complete_many(requests)
    assert isinstance(bad, MalformedAnswer) and isinstance(bad, LLMError)
    assert bad.attempts == 2 and bad.answer == "still none" and "no JSON object found" in bad.parse_error
    assert "also after one repair request" in str(bad)
    assert good.data == {"verdict": "OK"}
    assert len(server.requests_matching("variant-a")) == 2  # one request + exactly one repair
    assert [p.name for p in tmp_path.iterdir()] and len(list(tmp_path.iterdir())) == 1  # only the good answer


# ---------------------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------------------


def test_cache_second_identical_call_makes_no_request_and_changes_make_one(server, fake_time, tmp_path):
    server.script(Answer('{"verdict": "OK"}', input_tokens=40, output_tokens=5), forever=True)
    with make_client(server, "openai", fake_time, cache_dir=tmp_path) as client:
        first = client.complete("sys", "bundle v1", SCHEMA, template_id="t1")
        second = client.complete("sys", "bundle v1", SCHEMA, template_id="t1")
        assert len(server.requests) == 1
        assert second.cached and not first.cached and second.text == first.text and second.attempts == 0
        assert client.stats.cache_hits == 1 and client.stats.input_tokens == 40  # a hit costs nothing
        client.complete("sys", "bundle v2", SCHEMA, template_id="t1")  # changed payload
        assert len(server.requests) == 2
        client.complete("sys", "bundle v1", SCHEMA, template_id="t2")  # changed template
        assert len(server.requests) == 3
    # A fresh client (a second run) with the same cache makes zero requests.
    with make_client(server, "openai", FakeTime(), cache_dir=tmp_path) as client2:
        assert client2.complete("sys", "bundle v1", SCHEMA, template_id="t1").cached
        assert client2.stats.requests == 0
    assert len(server.requests) == 3
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3 and all(p.suffix == ".json" and not p.name.startswith(".tmp") for p in files)
    entry = json.loads(files[0].read_text())
    assert set(entry) >= {"key", "provider", "model", "template_id", "text", "usage"}
    assert files[0].name == entry["key"] + ".json"


def test_cache_key_depends_on_model_and_provider(server, fake_time, tmp_path):
    server.script(Answer("x"), forever=True)
    for wire in WIRES:
        with make_client(server, wire, fake_time, cache_dir=tmp_path) as client:
            client.complete("s", "same prompt")
    config = ProviderConfig("openai", model="other-model", base_url=server.base_url)
    with LLMClient(config, cache_dir=tmp_path, sleep=fake_time.sleep) as client:
        client.complete("s", "same prompt")
    assert len(server.requests) == 3 and len(list(tmp_path.iterdir())) == 3


def test_corrupt_cache_file_is_reported_not_overwritten(server, fake_time, tmp_path):
    server.script(Answer("x"), forever=True)
    with make_client(server, "openai", fake_time, cache_dir=tmp_path) as client:
        client.complete("s", "u")
        [path] = tmp_path.iterdir()
        path.write_text("{truncated")
        with pytest.raises(CacheError, match="not valid JSON") as info:
            client.complete("s", "u")
    assert str(path) in str(info.value) and len(server.requests) == 1


# ---------------------------------------------------------------------------------------------------------------
# the key never leaks
# ---------------------------------------------------------------------------------------------------------------


def _leaks(exc: BaseException) -> list[str]:
    """Every text an exception can show: str, repr, formatted traceback (also with locals), and its chain."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc)),
             "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())]
    texts += [str(v) for v in vars(exc).values()]
    return [t for t in texts if KEY in t]


def test_planted_key_never_leaks(server, fake_time, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    # The server echoes the key in its 401 message, as some providers echo a partial key.
    server.script(Status(401, f"Incorrect API key provided: {KEY}"), match="case-401")
    server.script(ServerError(500, f"boom {KEY}"), match="case-500", forever=True)
    server.script(Slow(1.0), match="case-slow", forever=True)
    server.script(Drop("before_response"), match="case-drop", forever=True)
    server.script(Answer("not json"), Answer(f"still not json {KEY}"), match="case-malformed")
    server.script(Raw(f"<html>{KEY}</html>".encode()), match="case-raw")
    server.script(Answer('{"verdict": "OK"}'), match="case-good")
    cases = ["case-401", "case-500", "case-slow", "case-drop", "case-malformed", "case-raw", "case-good"]
    errors: list[BaseException] = []
    for wire in WIRES:
        with make_client(server, wire, fake_time, cache_dir=tmp_path, read_timeout=0.2, deadline_s=1.0,
                         max_retries=2) as client:
            for case in cases:
                try:
                    client.complete_json("s", case, SCHEMA)
                except LLMError as e:
                    errors.append(e)
            if wire == "openai":
                server.script(Status(401, f"Incorrect API key provided: {KEY}"), match="case-401")
                server.script(Answer("not json"), Answer(f"still not json {KEY}"), match="case-malformed")
                server.script(Raw(f"<html>{KEY}</html>".encode()), match="case-raw")
                server.script(Answer('{"verdict": "OK"}'), match="case-good")
    # Errors collected by complete_many (raised in worker threads) are just as clean.
    server.script(ServerError(503, f"busy {KEY}"), match="case-many", forever=True)
    with make_client(server, "openai", fake_time, deadline_s=0.5, max_retries=2) as client:
        many = client.complete_many([CompletionRequest("s", "case-many", SCHEMA, json=True)])
    assert isinstance(many[0], LLMError)
    errors.append(many[0])
    # Connection refused too.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    refused = ProviderConfig("anthropic", model="m", base_url=f"http://127.0.0.1:{port}", api_key=SecretStr(KEY))
    with LLMClient(refused, max_retries=1, sleep=fake_time.sleep, connect_timeout=0.3) as client:
        try:
            client.complete("s", "u")
        except LLMError as e:
            errors.append(e)
    assert len(errors) == 2 * 6 + 2 and server.unscripted == 0
    assert any(isinstance(e, MalformedAnswer) for e in errors)
    # The key really was sent (so the checks below are not vacuous) ...
    assert any(KEY in v for r in server.requests for v in r.headers.values())
    # ... and reached no error text, no chained exception, no log record and no file.
    for e in errors:
        assert _leaks(e) == [], repr(e)
        assert e.__cause__ is None and e.__context__ is None
    assert any("[REDACTED]" in str(e) for e in errors)  # the echoed key was scrubbed, not just absent
    assert KEY not in caplog.text
    assert all(KEY not in r.getMessage() for r in caplog.records)
    written = list(tmp_path.rglob("*"))
    assert written and all(KEY.encode() not in p.read_bytes() for p in written if p.is_file())
