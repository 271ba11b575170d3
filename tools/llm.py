"""A small LLM provider client for the reviewer, built on httpx only.

Two wire formats are spoken:

* ``openai``: OpenAI-compatible chat completions (``POST {base}/v1/chat/completions``), which also covers vLLM,
  llama.cpp, Ollama and DeepSeek. Auth is ``Authorization: Bearer <key>``. A JSON schema goes out as
  ``response_format = {"type": "json_schema", ...}``.
* ``anthropic``: the Anthropic messages API (``POST {base}/v1/messages``) with ``x-api-key`` and a pinned
  ``anthropic-version`` (2023-06-01). The system prompt goes in the top-level ``system`` field; ``max_tokens`` is
  always sent; no sampling parameters are sent. A JSON schema is given to the model as an instruction in the system
  prompt (this works with every Anthropic-compatible server; the answer is validated on our side anyway).

Endpoint rule: the path ``/v1/chat/completions`` (or ``/v1/messages``) is appended to ``REVIEW_BASE_URL``; when the
base URL already ends in ``/v1`` only ``/chat/completions`` (or ``/messages``) is appended, so both
``http://host:8000`` and ``http://host:8000/v1`` work.

``response_format`` fallback (openai only): some OpenAI-compatible servers reject ``response_format`` with a 400.
When a 400 answer mentions ``response_format``, the same request is sent once more without it, with the schema
written into the system prompt instead, and the client remembers for its lifetime that this server does not take
``response_format`` (later requests go without it directly). ``stats.format_fallbacks`` counts these. The cache key
is always computed from the request *with* ``response_format``, so the fallback does not change cache identity.

Retries: exponential backoff with full jitter (``uniform(0, min(cap, base * 2**n))``) on 429, 5xx, connect errors,
timeouts and dropped connections; ``retry-after-ms`` / ``Retry-After`` (seconds or HTTP date) are honoured, capped
at ``retry_after_cap_s``; 4xx other than 429 are not retried, nor is a 429 that reports an exhausted quota or spend
limit. ``deadline_s`` bounds one completion request, including its retries and the fallback; no retry starts when its
wait would cross the deadline, each attempt's timeouts are clipped to the time left, and a body that keeps dribbling
in past the deadline is abandoned (a read timeout alone would be reset by every blank keep-alive line).

Secrets: the key lives in a :class:`SecretStr` whose ``repr``/``str`` are redacted. It is only revealed inside the
function that builds one attempt's headers, whose frame is never part of a raised exception's traceback. Every error
message is scrubbed of the key, and :class:`LLMError` is always raised outside any ``except`` block, so it carries
neither ``__cause__`` nor ``__context__`` (no httpx request objects, which hold headers, hang off it). Cache files
hold only the answer text and usage, and are scrubbed of the key before writing. Scrubbing replaces the whole key,
any prefix of it of at least ``MIN_SCRUB_PREFIX`` characters, and the key split by whitespace; bodies are scrubbed
before they are cut into excerpts. httpcore's DEBUG trace of response headers is withheld (a server may echo the
key in a header).

Hostile answers: every JSON parse of untrusted bytes treats a 5,000-digit integer or deep nesting as a parse error,
answer parsing is linear in the answer's length, and :meth:`LLMClient.complete_many` turns whatever goes wrong
with one request into an :class:`LLMError` in that request's slot only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from impl.atomic import atomic_write_bytes

__all__ = [
    "ANTHROPIC_VERSION",
    "AnswerParseError",
    "CacheError",
    "ClientStats",
    "Completion",
    "CompletionRequest",
    "ConfigError",
    "LLMClient",
    "LLMError",
    "MalformedAnswer",
    "ProviderConfig",
    "SecretStr",
    "parse_json_answer",
]

log = logging.getLogger(__name__)

PROVIDERS = ("openai", "anthropic", "offline")
DEFAULT_BASE_URLS = {"openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com"}
KEY_ENV_VARS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
ANTHROPIC_VERSION = "2023-06-01"
CACHE_FORMAT = 1
MAX_BODY_BYTES = 16 * 1024 * 1024
REDACTED = "[REDACTED]"
MIN_SCRUB_PREFIX = 8  # a key prefix this long (or longer) is scrubbed wherever it appears
_SCHEMA_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PRINTABLE_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
# A key goes into a header; quotes and backslashes are excluded too, because an escaped repr of the key (as h11
# prints an illegal header) would then differ from the key and slip past scrubbing.
_KEY_RE = re.compile(r"^[\x21\x23-\x26\x28-\x5b\x5d-\x7e]+$")
# 429 answers that mean "out of money", not "slow down": retrying cannot help. The error body names them in its
# `code`, `type` or `details.error_code` (OpenAI-style: "insufficient_quota"); these are the names known.
_QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "enforced_spend_limit_reached",
    }
)


# --------------------------------------------------------------------------------------------------------------------
# Secrets and configuration
# --------------------------------------------------------------------------------------------------------------------


class SecretStr:
    """An API key whose ``repr``/``str``/format are redacted; ``reveal()`` returns the value.

    Copying returns the same object; pickling is refused so a key cannot be written to disk by accident.
    """

    __slots__ = ("_value", "_pattern")

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value
        self._pattern: re.Pattern | None = None

    def reveal(self) -> str:
        """Return the secret value (only for building request headers and scrubbing messages)."""
        return self._value

    def scrub(self, text: str) -> str:
        """``text`` with the key replaced by ``[REDACTED]``: whole, cut to a prefix of at least
        ``MIN_SCRUB_PREFIX`` characters (an excerpt boundary), and split by whitespace (a newline, a tab, or the
        space an excerpt folds them into). Linear: every character of the key is a fixed literal."""
        if self._pattern is None:
            chars = [re.escape(c) for c in self._value]
            m = min(MIN_SCRUB_PREFIX, len(chars))
            gap = r"(?:\s|\\[nrt])*"  # whitespace, or its JSON escape (a key holds no backslash)
            rest = "".join(f"(?:{gap}{c}" for c in chars[m:]) + ")?" * (len(chars) - m)
            self._pattern = re.compile(gap.join(chars[:m]) + rest)
        return self._pattern.sub(REDACTED, text)

    def __repr__(self) -> str:
        return "SecretStr('**********')"

    def __str__(self) -> str:
        return "**********"

    def __copy__(self) -> SecretStr:
        return self

    def __deepcopy__(self, memo: dict) -> SecretStr:
        return self

    def __reduce__(self):  # noqa: D105 - pickling a key is always a mistake
        raise TypeError("SecretStr cannot be pickled (it holds an API key)")


class _WithholdHeaders(logging.Filter):
    """Replaces the header lists in httpcore's DEBUG trace records by a note: a server that echoes the key in a
    response header would otherwise have it printed by any DEBUG logging configuration."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        event = msg.split(" ", 1)[0]
        if "headers" in event and event != msg:
            record.msg, record.args = f"{event} (headers withheld by tools.llm)", ()
        return True


_HTTP_LOGGERS = ("httpcore.http11", "httpcore.http2", "httpcore.connection", "httpcore.proxy", "httpcore.socks")


def withhold_http_headers() -> None:
    """Install :class:`_WithholdHeaders` on httpcore's loggers (once; every LLMClient calls this)."""
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithholdHeaders) for f in logger.filters):
            logger.addFilter(_WithholdHeaders())


class ConfigError(ValueError):
    """A provider setting is missing or invalid. The message names the setting, never a key's value."""


def _validate_base_url(url: str, name: str) -> str:
    """Return ``url`` without a trailing slash, or raise ConfigError naming ``name``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name} must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise ConfigError(f"{name} has no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        # Do not echo the URL: it holds credentials.
        raise ConfigError(f"{name} must not contain credentials (user:password@); put the key in the key variable")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must not have a query string or fragment: {url!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{name} has an invalid port: {url!r}") from None
    return url.rstrip("/")


def _validate_model(model: str, name: str) -> str:
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"{name} is not set; an LLM provider needs a model name")
    model = model.strip()
    if not _PRINTABLE_TOKEN_RE.fullmatch(model):
        raise ConfigError(f"{name} must be a model name without spaces or control characters, got {model!r}")
    return model


@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    """Which provider to call, where, with which model and key.

    ``provider`` is ``openai``, ``anthropic`` or ``offline``. For the two online providers ``model`` is required and
    ``base_url`` defaults to the provider's hosted API. ``max_output_tokens`` is sent as ``max_tokens`` to Anthropic
    (which requires it); nothing is sent to OpenAI-compatible servers (some reject ``max_tokens``).
    """

    provider: str
    model: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = dataclasses.field(default=None, repr=False)
    anthropic_version: str = ANTHROPIC_VERSION
    max_output_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.api_key is not None:
            if not isinstance(self.api_key, SecretStr):
                raise ConfigError("api_key must be a SecretStr (so that it is never printed)")
            if not _KEY_RE.fullmatch(self.api_key.reveal()):
                raise ConfigError("api_key contains whitespace, quotes, backslashes, control or non-ASCII characters")
        if self.provider == "offline":
            return
        object.__setattr__(self, "model", _validate_model(self.model or "", "model"))
        base = self.base_url if self.base_url is not None else DEFAULT_BASE_URLS[self.provider]
        object.__setattr__(self, "base_url", _validate_base_url(base, "base_url"))
        if not isinstance(self.max_output_tokens, int) or self.max_output_tokens < 1:
            raise ConfigError(f"max_output_tokens must be a positive int, got {self.max_output_tokens!r}")
        if not isinstance(self.anthropic_version, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}",
                                                                           self.anthropic_version):
            raise ConfigError(f"anthropic_version must look like 2023-06-01, got {self.anthropic_version!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProviderConfig:
        """Read ``REVIEW_PROVIDER``, ``REVIEW_BASE_URL``, ``REVIEW_MODEL`` and the provider's key variable.

        ``REVIEW_PROVIDER`` unset or empty means ``offline`` (no other variable is read then). The key
        (``OPENAI_API_KEY`` or ``ANTHROPIC_API_KEY``) is required when ``REVIEW_BASE_URL`` is unset (the hosted API)
        and optional otherwise (local servers such as vLLM or llama.cpp need none). Errors name the variable and
        never echo a key.
        """
        env = os.environ if environ is None else environ
        raw_provider = (env.get("REVIEW_PROVIDER") or "").strip().lower()
        if not raw_provider:
            return cls(provider="offline")
        if raw_provider not in PROVIDERS:
            raise ConfigError(
                f"REVIEW_PROVIDER must be one of {', '.join(PROVIDERS)} (or unset for offline), "
                f"got {env.get('REVIEW_PROVIDER')!r}"
            )
        if raw_provider == "offline":
            return cls(provider="offline")
        model = _validate_model(env.get("REVIEW_MODEL") or "", "REVIEW_MODEL")
        raw_base = (env.get("REVIEW_BASE_URL") or "").strip()
        base_url = _validate_base_url(raw_base, "REVIEW_BASE_URL") if raw_base else None
        key_var = KEY_ENV_VARS[raw_provider]
        raw_key = (env.get(key_var) or "").strip()
        if not raw_key:
            if base_url is None:
                raise ConfigError(
                    f"{key_var} is not set; REVIEW_PROVIDER={raw_provider} with the hosted API "
                    f"(REVIEW_BASE_URL unset) needs a key"
                )
            api_key = None
        else:
            if not _KEY_RE.fullmatch(raw_key):
                raise ConfigError(f"{key_var} contains whitespace, quotes, backslashes, control or non-ASCII "
                                  f"characters")
            api_key = SecretStr(raw_key)
        return cls(provider=raw_provider, model=model, base_url=base_url, api_key=api_key)

    @property
    def is_offline(self) -> bool:
        """True when no LLM is to be asked."""
        return self.provider == "offline"

    @property
    def endpoint(self) -> str:
        """The full URL that requests are POSTed to (see the module docstring for the rule)."""
        if self.is_offline:
            raise ConfigError("the offline provider has no endpoint")
        assert self.base_url is not None
        suffix = "/chat/completions" if self.provider == "openai" else "/messages"
        base = self.base_url
        return base + suffix if base.endswith("/v1") else base + "/v1" + suffix


# --------------------------------------------------------------------------------------------------------------------
# Results and errors
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Completion:
    """One model answer.

    ``usage`` is ``{"input_tokens": int, "output_tokens": int}`` for the calls that produced the answer (both rounds
    summed after a repair). On a cache hit (``cached=True``) it is the usage recorded when the answer was first
    fetched; nothing was spent this time and ``client.stats`` does not count it. ``attempts`` is the number of HTTP
    requests made for this answer (0 on a cache hit). ``data`` is the parsed JSON object (``complete_json`` only).
    """

    text: str
    usage: Mapping[str, int]
    cached: bool
    provider: str
    model: str
    attempts: int = 0
    data: dict | None = None
    repaired: bool = False


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """One request for :meth:`LLMClient.complete_many`; ``json=True`` runs it through ``complete_json``."""

    system: str
    user: str
    schema: dict | None = None
    schema_name: str = "answer"
    template_id: str = ""
    json: bool = False


@dataclasses.dataclass(frozen=True)
class ClientStats:
    """A snapshot of what a client has done so far.

    ``requests``: HTTP requests sent (every attempt); ``cache_hits``; ``input_tokens``/``output_tokens``: summed over
    every answered request (cache hits excluded); ``retries``: attempts after a retryable failure; ``repairs``: repair
    requests sent by ``complete_json``; ``format_fallbacks``: requests re-sent without ``response_format``.
    """

    requests: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    retries: int = 0
    repairs: int = 0
    format_fallbacks: int = 0


class LLMError(Exception):
    """A request failed. ``status`` is the last HTTP status (None if no answer came), ``attempts`` the requests made.

    The message names the provider, the endpoint's host and path, the status and what happened; it never holds
    the API key.
    """

    def __init__(self, message: str, status: int | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.attempts = attempts

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status!r}, attempts={self.attempts!r})"


class MalformedAnswer(LLMError):
    """The answer was not a JSON object, also after one repair request. ``answer`` is the last bad answer."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 0, *, answer: str = "",
                 parse_error: str = "") -> None:
        super().__init__(message, status, attempts)
        self.answer = answer
        self.parse_error = parse_error


class CacheError(LLMError):
    """A response cache file exists but cannot be used (it is reported, never silently overwritten)."""


class AnswerParseError(ValueError):
    """No JSON object could be extracted from an answer; the message says why."""


# --------------------------------------------------------------------------------------------------------------------
# Tolerant JSON extraction
# --------------------------------------------------------------------------------------------------------------------

_FENCE_OPEN_RE = re.compile(r"[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[A-Za-z0-9_+.-]*)")
_MAX_PROSE_STARTS = 200
_JSON_ERRORS = (ValueError, RecursionError)  # ValueError: also a 5,000-digit integer; RecursionError: deep nesting


def _fenced_blocks(text: str) -> list[str]:
    """Bodies of fenced code blocks, those labelled ``json`` first, then the others, each group in order.

    A block opens on a line starting with 3+ backticks or tildes (and an optional language) and closes at the
    first later line that ends with the same fence (its trailing run of that character is at least as long).
    Linear time: each line's trailing run is computed once, and a running maximum from the end says in O(1)
    whether an opener closes anywhere at all (a regex with a lazy body and a backreference took quadratic
    time on many unclosed fences: 35 s for 40 kB).
    """
    lines = text.split("\n")
    tails = []  # (fence character or "", length of the trailing run of it)
    for line in lines:
        s = line.rstrip(" \t")
        c = s[-1:] if s[-1:] in ("`", "~") else ""
        tails.append((c, len(s) - len(s.rstrip(c)) if c else 0))
    longest = {"`": [0] * (len(lines) + 1), "~": [0] * (len(lines) + 1)}  # longest run at or after line k
    for k in range(len(lines) - 1, -1, -1):
        for c, row in longest.items():
            row[k] = max(row[k + 1], tails[k][1] if tails[k][0] == c else 0)
    labelled, other = [], []
    i = 0
    while i < len(lines) - 1:
        m = _FENCE_OPEN_RE.match(lines[i])
        if m is None or longest[m.group("fence")[0]][i + 1] < len(m.group("fence")):
            i += 1  # not an opener, or its fence closes nowhere after it
            continue
        fence = m.group("fence")
        j = i + 1
        while not (tails[j][0] == fence[0] and tails[j][1] >= len(fence)):
            j += 1
        before = lines[j].rstrip(" \t")[: -len(fence)].rstrip(" \t")
        body = "\n".join(lines[i + 1 : j] + ([before] if before else []))
        (labelled if m.group("lang").lower() == "json" else other).append(body)
        i = j + 1
    return labelled + other


def _loads(text: str) -> Any:
    """json.loads with every way untrusted text can fail turned into ValueError (deep nesting included)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def _require_object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise AnswerParseError(f"expected a JSON object in the {where}, got {kind}")
    return value


def parse_json_answer(text: str) -> dict:
    """Extract one JSON object from a model answer.

    Tried in order: the whole answer; fenced code blocks (``json``-labelled first); the first ``{`` from which a
    complete object decodes, ignoring prose before and after it. A parsed value that is not an object is an error.
    Raises :class:`AnswerParseError` with the parser's message (line and column) when nothing works.
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise AnswerParseError("the answer is empty (no JSON object)")
    candidates = [("whole answer", stripped)] + [
        (f"fenced block {i + 1}", body) for i, body in enumerate(_fenced_blocks(stripped))
    ]
    errors: list[str] = []
    for where, candidate in candidates:
        try:
            value = _loads(candidate)
        except ValueError as e:
            errors.append(f"{where}: {e}")
            continue
        return _require_object(value, where)
    # Prose around an object: try decoding from each '{', within a budget of scanned characters, so that many
    # '{' each followed by a long unterminated string cannot make this quadratic.
    decoder = json.JSONDecoder()
    budget = 4 * len(stripped) + 10_000
    for n, match in enumerate(re.finditer(r"\{", stripped)):
        if n >= _MAX_PROSE_STARTS or budget <= 0:
            break
        try:
            value, end = decoder.raw_decode(stripped, match.start())
        except json.JSONDecodeError as e:  # an unterminated string was read to the end; e.pos is its start
            budget -= (len(stripped) if e.msg.startswith("Unterminated") else e.pos + 1) - match.start()
            continue
        except _JSON_ERRORS:
            budget -= len(stripped) - match.start()
            continue
        budget -= end - match.start()
        if isinstance(value, dict):
            return value
    # Report the most informative error: a json-labelled fenced block if there was one, else the whole answer.
    best = errors[1] if len(candidates) > 1 else errors[0]
    head = stripped[:80].replace("\n", "\\n")
    raise AnswerParseError(
        f"no JSON object found in the answer ({len(stripped)} chars, starting {head!r}); {best}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Internal outcome of one HTTP attempt
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Reply:
    text: str
    usage: dict[str, int]


@dataclasses.dataclass(frozen=True)
class _Failure:
    """What went wrong in one attempt, as plain (already scrubbed) strings: never an exception object."""

    what: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None
    format_rejected: bool = False


def _parse_retry_after(headers: httpx.Headers, now_wall: float) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date); None if absent/invalid."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if value >= 0 and value == value:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
        return value if value >= 0 and value == value else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now_wall)


def _error_excerpt(body: str, scrub: Callable[[str], str], limit: int = 300) -> str:
    """The ``error.message`` of a JSON error body (both formats), else the start of the body as text; folded to
    one line and scrubbed (``scrub``) before it is cut, so no key prefix is left at the cut."""
    text = body.strip()
    try:
        data = _loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        parts = [str(err.get(k)) for k in ("type", "code") if err.get(k)]
        msg = str(err.get("message", ""))
        text = (f"[{', '.join(parts)}] " if parts else "") + msg
    text = scrub(" ".join(text.split()))
    return text if len(text) <= limit else text[:limit] + "..."


def _is_quota_exhausted(raw: bytes) -> bool:
    """True when a 429 body says the quota or spend limit is exhausted (OpenAI and Anthropic spellings)."""
    try:
        data = _loads(raw)
    except ValueError:
        return False
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return False
    details = err.get("details") if isinstance(err.get("details"), dict) else {}
    codes = {err.get("code"), err.get("type"), details.get("error_code")}
    return bool(codes & _QUOTA_CODES)


def _usage_int(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"usage.{key} is not a non-negative integer: {value!r}")
    return value


def _extract_openai(data: Any) -> _Reply | str:
    """Text and usage of a chat-completions answer, or a string saying what is wrong with it."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        return "the response has no 'choices' list"
    choice = data["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        return "choices[0] has no 'message' object"
    finish = choice.get("finish_reason")
    content = message.get("content")
    if content is None:
        refusal = message.get("refusal")
        return f"the model refused: {refusal}" if refusal else f"the answer has no content (finish_reason={finish!r})"
    if isinstance(content, list):  # content parts, as some servers send
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        return f"message.content is {type(content).__name__}, not text"
    if finish == "length":
        return "the answer was cut off at the output token limit (finish_reason=length)"
    if finish == "content_filter":
        return "the answer was withheld by the provider's content filter (finish_reason=content_filter)"
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        return "'usage' is not an object"
    try:
        counts = {"input_tokens": _usage_int(usage, "prompt_tokens"),
                  "output_tokens": _usage_int(usage, "completion_tokens")}
    except ValueError as e:
        return str(e)
    return _Reply(content, counts)


def _extract_anthropic(data: Any) -> _Reply | str:
    """Text (the joined ``text`` blocks) and usage of a messages answer, or a string saying what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("content"), list):
        return "the response has no 'content' list"
    stop = data.get("stop_reason")
    if stop == "refusal":
        return "the model refused (stop_reason=refusal)"
    if stop in ("max_tokens", "model_context_window_exceeded"):
        return f"the answer was cut off (stop_reason={stop}); raise max_output_tokens or shrink the prompt"
    texts = [b["text"] for b in data["content"] if isinstance(b, dict) and b.get("type") == "text"
             and isinstance(b.get("text"), str)]
    if not texts:
        return f"the answer has no text block (stop_reason={stop!r})"
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        return "'usage' is not an object"
    try:
        # Anthropic reports cached prompt tokens separately; all of them were input.
        inp = sum(_usage_int(usage, k) for k in
                  ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        counts = {"input_tokens": inp, "output_tokens": _usage_int(usage, "output_tokens")}
    except ValueError as e:
        return str(e)
    return _Reply("".join(texts), counts)


def _schema_instruction(schema: dict) -> str:
    return (
        "Answer with exactly one JSON object and nothing else (no prose, no code fence). "
        "It must conform to this JSON schema:\n" + json.dumps(schema, indent=2, sort_keys=True)
    )


_REPAIR_PROMPT = (
    "Your previous answer could not be parsed as a JSON object: {error}\n"
    "Reply again with only the corrected JSON object, complete and valid, with no prose and no code fence."
)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------------------------


class LLMClient:
    """Calls one provider with retries, a deadline, bounded concurrency, a response cache and usage accounting.

    ``sleep``, ``rng`` and ``clock`` are injectable so tests can run the retry logic without waiting:
    ``sleep(seconds)`` performs a backoff wait, ``rng.uniform`` draws the jitter, ``clock()`` is a monotonic time in
    seconds used for the deadline. ``cache_dir=None`` disables the cache. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        config: ProviderConfig,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        deadline_s: float = 600.0,
        max_retries: int = 4,
        max_concurrency: int = 4,
        cache_dir: str | os.PathLike[str] | None = None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 8.0,
        retry_after_cap_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(config, ProviderConfig):
            raise TypeError(f"config must be a ProviderConfig, got {type(config).__name__}")
        if config.is_offline:
            raise ConfigError("REVIEW_PROVIDER is offline (or unset): no LLM client can be built; "
                              "run the offline review")
        for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout),
                            ("deadline_s", deadline_s), ("backoff_base_s", backoff_base_s),
                            ("backoff_cap_s", backoff_cap_s), ("retry_after_cap_s", retry_after_cap_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name, value, low in (("max_retries", max_retries, 0), ("max_concurrency", max_concurrency, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.config = config
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.deadline_s = float(deadline_s)
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_cap_s = float(backoff_cap_s)
        self.retry_after_cap_s = float(retry_after_cap_s)
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._rng_lock = threading.Lock()
        self._clock = clock
        self._lock = threading.Lock()
        self._stats = ClientStats()
        self._format_unsupported = False
        withhold_http_headers()
        url = httpx.URL(config.endpoint)
        self._url = str(url)
        self._where = f"{url.host}{':' + str(url.port) if url.port else ''}{url.path}"
        self._http = httpx.Client(
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            follow_redirects=False,
        )

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLMClient(provider={self.config.provider!r}, model={self.config.model!r}, endpoint={self._where!r})"

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counters (see :class:`ClientStats`)."""
        with self._lock:
            return self._stats

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._stats = dataclasses.replace(
                self._stats, **{k: getattr(self._stats, k) + v for k, v in deltas.items()}
            )

    # -- public API ----------------------------------------------------------------------------------------------

    def complete(self, system: str, user: str, schema: dict | None = None, schema_name: str = "answer", *,
                 template_id: str = "") -> Completion:
        """Ask the model once (with retries) and return its text; cached answers cost no request.

        ``schema`` asks for structured output (``response_format`` for openai, a system-prompt instruction for
        anthropic); the text is returned unparsed. ``template_id`` names the prompt template (id or hash) and is
        part of the cache key. Raises :class:`LLMError`.
        """
        self._check_inputs(system, user, schema, schema_name, template_id)
        turns = [("user", user)]
        key = self._cache_key(system, turns, schema, schema_name, template_id, kind="text")
        hit = self._cache_read(key)
        if hit is not None:
            self._count(cache_hits=1)
            return Completion(hit["text"], dict(hit["usage"]), True, self.config.provider, self.config.model or "")
        result = self._fetch(system, turns, schema, schema_name)
        self._cache_write(key, template_id, "text", result.text, result.usage, repaired=False)
        return result

    def complete_json(self, system: str, user: str, schema: dict | None = None, schema_name: str = "answer", *,
                      template_id: str = "") -> Completion:
        """Like :meth:`complete`, but the answer must hold a JSON object, returned parsed in ``Completion.data``.

        If the first answer does not parse, ONE repair request is sent (the conversation so far, the bad answer
        and the parse error); if that answer does not parse either, :class:`MalformedAnswer` is raised. Only an
        answer that parsed is cached, under the original request's key, so a repaired answer is also free the
        next time. A truncated or refused answer is an :class:`LLMError`, not repaired.
        """
        self._check_inputs(system, user, schema, schema_name, template_id)
        turns = [("user", user)]
        key = self._cache_key(system, turns, schema, schema_name, template_id, kind="json")
        hit = self._cache_read(key)
        if hit is not None:
            try:
                data = parse_json_answer(hit["text"])
            except AnswerParseError as e:
                problem = str(e)
            else:
                self._count(cache_hits=1)
                return Completion(hit["text"], dict(hit["usage"]), True, self.config.provider,
                                  self.config.model or "", data=data, repaired=bool(hit.get("repaired")))
            raise CacheError(self._scrub(f"cache file {self._cache_path(key)} holds an answer that does not "
                                         f"parse ({problem}); delete it"))
        first = self._fetch(system, turns, schema, schema_name)
        data, error = self._try_parse(first.text)
        if data is not None:
            self._cache_write(key, template_id, "json", first.text, first.usage, repaired=False)
            return dataclasses.replace(first, data=data)
        bad = first.text if first.text.strip() else "(empty answer)"
        repair_turns = turns + [("assistant", bad), ("user", _REPAIR_PROMPT.format(error=error))]
        self._count(repairs=1)
        log.info("%s %s: answer was not JSON (%s); sending one repair request", self.config.provider,
                 self._where, self._scrub(error))
        second = self._fetch(system, repair_turns, schema, schema_name)
        usage = {k: first.usage[k] + second.usage[k] for k in ("input_tokens", "output_tokens")}
        attempts = first.attempts + second.attempts
        data, error2 = self._try_parse(second.text)
        if data is None:
            raise MalformedAnswer(
                self._scrub(f"{self.config.provider} {self._where}: the answer was not a JSON object, also after "
                            f"one repair request ({attempts} requests): {error2}"),
                status=200, attempts=attempts, answer=self._scrub(second.text), parse_error=self._scrub(error2),
            )
        self._cache_write(key, template_id, "json", second.text, usage, repaired=True)
        return dataclasses.replace(second, usage=usage, attempts=attempts, data=data, repaired=True)

    def complete_many(self, requests: Sequence[CompletionRequest]) -> list[Completion | LLMError]:
        """Run requests on a pool of ``max_concurrency`` threads; results come back in request order.

        A request that fails yields an :class:`LLMError` (including :class:`MalformedAnswer`) in its slot and
        never stops the others: whatever a hostile answer makes go wrong while it is handled (an exception that
        is not an LLMError) becomes an LLMError naming the exception type, scrubbed of the key. Bad arguments are
        refused up front (TypeError/ValueError) before any request is sent.
        """
        reqs = list(requests)
        for i, r in enumerate(reqs):
            if not isinstance(r, CompletionRequest):
                raise TypeError(f"requests[{i}] must be a CompletionRequest, got {type(r).__name__}")
            self._check_inputs(r.system, r.user, r.schema, r.schema_name, r.template_id)
        if not reqs:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(reqs)),
                                                   thread_name_prefix="llm") as pool:
            futures = [pool.submit(self._run_request, r) for r in reqs]
        results: list[Completion | LLMError] = []
        for future in futures:
            exc = future.exception()
            if exc is None:
                results.append(future.result())
            elif isinstance(exc, LLMError):
                results.append(exc)
            else:
                detail = self._scrub(f"{type(exc).__name__}: {exc}")[:300]
                results.append(LLMError(f"{self.config.provider} {self._where}: handling this request failed "
                                        f"({detail})"))
        return results

    def _run_request(self, r: CompletionRequest) -> Completion:
        method = self.complete_json if r.json else self.complete
        return method(r.system, r.user, r.schema, r.schema_name, template_id=r.template_id)

    # -- request building ----------------------------------------------------------------------------------------

    @staticmethod
    def _check_inputs(system: Any, user: Any, schema: Any, schema_name: Any, template_id: Any) -> None:
        if not isinstance(system, str) or not isinstance(user, str):
            raise TypeError("system and user prompts must be str")
        if not user.strip():
            raise ValueError("the user prompt is empty")
        if schema is not None and not isinstance(schema, dict):
            raise TypeError(f"schema must be a dict (a JSON schema) or None, got {type(schema).__name__}")
        if not isinstance(schema_name, str) or not _SCHEMA_NAME_RE.fullmatch(schema_name):
            raise ValueError(f"schema_name must match [A-Za-z0-9_-]{{1,64}}, got {schema_name!r}")
        if not isinstance(template_id, str):
            raise TypeError("template_id must be a str")

    def _payload(self, system: str, turns: Sequence[tuple[str, str]], schema: dict | None, schema_name: str,
                 *, response_format: bool) -> dict:
        """The JSON body for the configured wire format. ``response_format`` only matters for openai + schema."""
        cfg = self.config
        if cfg.provider == "openai":
            sys_text = system
            extra: dict[str, Any] = {}
            if schema is not None:
                if response_format:
                    extra["response_format"] = {"type": "json_schema",
                                                "json_schema": {"name": schema_name, "strict": True,
                                                                "schema": schema}}
                else:
                    sys_text = (system + "\n\n" if system else "") + _schema_instruction(schema)
            messages = ([{"role": "system", "content": sys_text}] if sys_text else []) + [
                {"role": role, "content": content} for role, content in turns]
            return {"model": cfg.model, "messages": messages, **extra}
        sys_text = system
        if schema is not None:
            sys_text = (system + "\n\n" if system else "") + _schema_instruction(schema)
        payload: dict[str, Any] = {"model": cfg.model, "max_tokens": cfg.max_output_tokens}
        if sys_text:
            payload["system"] = sys_text
        payload["messages"] = [{"role": role, "content": content} for role, content in turns]
        return payload

    def _headers(self) -> dict[str, str]:
        """Request headers including auth. Only called inside :meth:`_attempt`; never stored or logged."""
        headers = {"content-type": "application/json", "accept": "application/json"}
        key = self.config.api_key
        if self.config.provider == "openai":
            if key is not None:
                headers["authorization"] = "Bearer " + key.reveal()
        else:
            headers["anthropic-version"] = self.config.anthropic_version
            if key is not None:
                headers["x-api-key"] = key.reveal()
        return headers

    def _scrub(self, text: str) -> str:
        """``text`` with the API key (whole, a prefix, or split by whitespace) replaced by ``[REDACTED]``."""
        key = self.config.api_key
        return key.scrub(text) if key is not None else text

    # -- sending -------------------------------------------------------------------------------------------------

    def _fetch(self, system: str, turns: Sequence[tuple[str, str]], schema: dict | None,
               schema_name: str) -> Completion:
        """Send one logical request (retries and the response_format fallback included), bypassing the cache."""
        deadline = self._clock() + self.deadline_s
        start = self._clock()
        use_rf = schema is not None and self.config.provider == "openai" and not self._format_unsupported
        body = self._payload(system, turns, schema, schema_name, response_format=use_rf)
        reply, attempts = self._send_with_retries(body, deadline, start, 0, allow_format_rejection=use_rf)
        if reply is None:  # the server rejected response_format: once more without it
            with self._lock:
                self._format_unsupported = True
            self._count(format_fallbacks=1)
            log.warning("%s %s rejected response_format; re-sending with the schema in the prompt",
                        self.config.provider, self._where)
            body = self._payload(system, turns, schema, schema_name, response_format=False)
            reply, attempts = self._send_with_retries(body, deadline, start, attempts, allow_format_rejection=False)
            assert reply is not None
        self._count(input_tokens=reply.usage["input_tokens"], output_tokens=reply.usage["output_tokens"])
        return Completion(reply.text, dict(reply.usage), False, self.config.provider, self.config.model or "",
                          attempts=attempts)

    def _backoff(self, retry_index: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**retry_index)]."""
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * (2.0 ** retry_index))
        with self._rng_lock:
            return self._rng.uniform(0.0, ceiling)

    def _send_with_retries(self, payload: dict, deadline: float, start: float, attempts: int, *,
                           allow_format_rejection: bool) -> tuple[_Reply | None, int]:
        """POST ``payload`` until it succeeds, fails for good, runs out of retries or of time.

        Returns ``(reply, attempts)``; ``reply`` is None only when ``allow_format_rejection`` and the server
        rejected ``response_format``. Raises :class:`LLMError` (outside any ``except`` block) otherwise.
        """
        body = _canonical(payload)
        retries = 0
        first_attempt = attempts
        last_http: _Failure | None = None  # the latest failure that had an HTTP status, for the final message
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise self._error(f"the deadline of {self.deadline_s:g} s ran out before an answer",
                                  None, attempts, start, last_http)
            attempts += 1
            self._count(requests=1)
            outcome = self._attempt(body, remaining, deadline, allow_format_rejection)
            if isinstance(outcome, _Reply):
                return outcome, attempts
            if outcome.format_rejected:
                return None, attempts
            if not outcome.retryable:
                raise self._error(outcome.what, outcome.status, attempts, start, last_http)
            if outcome.status is not None:
                last_http = outcome
            if attempts - first_attempt > self.max_retries:
                raise self._error(f"{outcome.what}; giving up after {self.max_retries} retries",
                                  outcome.status, attempts, start)
            if outcome.retry_after is not None:
                delay = min(outcome.retry_after, self.retry_after_cap_s)
                why = f"Retry-After {outcome.retry_after:g} s" + (
                    f" capped to {delay:g} s" if delay < outcome.retry_after else "")
            else:
                delay = self._backoff(retries)
                why = "backoff"
            if self._clock() + delay >= deadline:
                raise self._error(f"{outcome.what}; the deadline of {self.deadline_s:g} s leaves no time for the "
                                  f"next retry ({why}: {delay:.2f} s)", outcome.status, attempts, start)
            log.warning("%s %s: %s; retry %d/%d in %.2f s (%s)", self.config.provider, self._where, outcome.what,
                        retries + 1, self.max_retries, delay, why)
            self._count(retries=1)
            self._sleep(delay)
            retries += 1

    def _error(self, what: str, status: int | None, attempts: int, start: float,
               last_http: _Failure | None = None) -> LLMError:
        """The final error. When the last attempt got no HTTP answer, ``status`` falls back to the latest earlier
        one and the message says what that attempt got."""
        elapsed = self._clock() - start
        if status is None and last_http is not None:
            status = last_http.status
            what = f"{what}; the latest HTTP answer before it: {last_http.what}"
        status_text = f"HTTP {status}" if status is not None else "no HTTP status"
        msg = (f"{self.config.provider} request to {self._where} failed ({status_text}, {attempts} attempt"
               f"{'s' if attempts != 1 else ''}, {elapsed:.2f} s): {what}")
        return LLMError(self._scrub(msg), status=status, attempts=attempts)

    def _attempt(self, body: bytes, remaining: float, deadline: float,
                 allow_format_rejection: bool) -> _Reply | _Failure:
        """One POST. Returns the reply or a :class:`_Failure` made of scrubbed strings; never raises for I/O."""
        timeout = httpx.Timeout(min(self.read_timeout, remaining), connect=min(self.connect_timeout, remaining))
        chunks: list[bytes] = []
        try:
            with self._http.stream("POST", self._url, content=body, headers=self._headers(),
                                   timeout=timeout) as response:
                length = response.headers.get("content-length", "")
                expected = int(length) if length.isdigit() else None
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        return _Failure(f"the response body exceeds {MAX_BODY_BYTES} bytes", False,
                                        response.status_code)
                    chunks.append(chunk)
                    complete = expected is not None and response.num_bytes_downloaded >= expected
                    if not complete and self._clock() > deadline:
                        return _Failure(f"the deadline of {self.deadline_s:g} s ran out while the body was "
                                        f"still arriving", False, response.status_code)
                status = response.status_code
                resp_headers = response.headers
        except httpx.TimeoutException as e:
            kind = {httpx.ConnectTimeout: "connect timeout", httpx.ReadTimeout: "read timeout",
                    httpx.WriteTimeout: "write timeout", httpx.PoolTimeout: "connection pool timeout"}.get(
                type(e), "timeout")
            if remaining < max(self.read_timeout, self.connect_timeout):
                # The timeout was clipped to the time left: this is the deadline, not a slow server.
                return _Failure(f"the deadline of {self.deadline_s:g} s ran out during attempt "
                                f"({kind} after the {remaining:.2f} s left)", False)
            return _Failure(self._scrub(f"{kind} ({type(e).__name__}: {e})"), True)
        except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
            return _Failure(self._scrub(f"connection failed or dropped ({type(e).__name__}: {e})"), True)
        except httpx.HTTPError as e:
            return _Failure(self._scrub(f"request could not be sent ({type(e).__name__}: {e})"), False)
        raw = b"".join(chunks)
        return self._classify(status, resp_headers, raw, allow_format_rejection)

    def _classify(self, status: int, headers: httpx.Headers, raw: bytes,
                  allow_format_rejection: bool) -> _Reply | _Failure:
        """Turn a complete HTTP answer into a reply or a failure (retryable or not)."""
        if 200 <= status < 300:
            try:
                data = _loads(raw)
            except ValueError:
                head = self._scrub(raw.decode("utf-8", errors="replace"))[:120]  # scrubbed before the cut
                return _Failure(f"HTTP {status} but the body is not JSON (starts {head!r})", False, status)
            extracted = _extract_openai(data) if self.config.provider == "openai" else _extract_anthropic(data)
            if isinstance(extracted, str):
                return _Failure(self._scrub(f"unusable answer: {extracted}"), False, status)
            # An answer that echoes the key (only possible if a prompt held it) is scrubbed before anything
            # (cache, errors, the repair prompt, callers) sees it.
            return dataclasses.replace(extracted, text=self._scrub(extracted.text))
        # Scrubbed as raw text (JSON escapes of whitespace included) and again once decoded and folded, before
        # the excerpt is cut.
        excerpt = _error_excerpt(self._scrub(raw.decode("utf-8", errors="replace")), self._scrub)
        retry_after = _parse_retry_after(headers, time.time())
        if status == 429:
            if _is_quota_exhausted(raw):
                return _Failure(f"HTTP 429, quota or spend limit exhausted (not retried): {excerpt}", False, status)
            return _Failure(f"HTTP 429 (rate limited): {excerpt}", True, status, retry_after)
        if status >= 500:
            return _Failure(f"HTTP {status} (server error): {excerpt}", True, status, retry_after)
        if status == 400 and allow_format_rejection and "response_format" in raw.decode("utf-8", "replace"):
            return _Failure(f"HTTP 400 rejecting response_format: {excerpt}", False, status, format_rejected=True)
        if 300 <= status < 400:
            where = headers.get("location", "?")
            return _Failure(f"HTTP {status} redirect to {self._scrub(where)!r} (not followed; set REVIEW_BASE_URL "
                            f"to the final URL)", False, status)
        hint = {401: " (check the API key)", 403: " (the key lacks permission)", 404: " (check REVIEW_BASE_URL and "
                "REVIEW_MODEL)"}.get(status, "")
        return _Failure(f"HTTP {status}{hint}, not retried: {excerpt}", False, status)

    # -- JSON helpers --------------------------------------------------------------------------------------------

    @staticmethod
    def _try_parse(text: str) -> tuple[dict | None, str]:
        try:
            return parse_json_answer(text), ""
        except AnswerParseError as e:
            return None, str(e)

    # -- cache ---------------------------------------------------------------------------------------------------

    def _cache_key(self, system: str, turns: Sequence[tuple[str, str]], schema: dict | None, schema_name: str,
                   template_id: str, *, kind: str) -> str:
        """sha256 over provider, endpoint, model, template, kind and the full request payload (no auth)."""
        payload = self._payload(system, turns, schema, schema_name, response_format=True)
        material = {
            "cache_format": CACHE_FORMAT,
            "provider": self.config.provider,
            "endpoint": self._where,
            "model": self.config.model,
            "anthropic_version": self.config.anthropic_version if self.config.provider == "anthropic" else None,
            "template_id": template_id,
            "kind": kind,
            "payload": payload,
        }
        return hashlib.sha256(_canonical(material)).hexdigest()

    def _cache_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.json"

    def _cache_read(self, key: str) -> dict | None:
        """The stored entry for ``key``, None on a miss; a file that exists but is unusable is a CacheError."""
        if self.cache_dir is None:
            return None
        path = self._cache_path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            problem = f"cannot be read ({type(e).__name__})"
        else:
            problem = self._cache_problem(raw, key)
            if problem is None:
                return _loads(raw)
        raise CacheError(f"cache file {path} {problem}; delete it to fetch the answer again")

    @staticmethod
    def _cache_problem(raw: bytes, key: str) -> str | None:
        try:
            entry = _loads(raw)
        except ValueError:
            return "is not valid JSON"
        if not isinstance(entry, dict) or entry.get("cache_format") != CACHE_FORMAT:
            return f"is not a cache entry of format {CACHE_FORMAT}"
        if entry.get("key") != key:
            return "holds a different key than its name"
        usage = entry.get("usage")
        if not isinstance(entry.get("text"), str) or not isinstance(usage, dict) or not all(
                isinstance(usage.get(k), int) for k in ("input_tokens", "output_tokens")):
            return "lacks text or usage"
        return None

    def _cache_write(self, key: str, template_id: str, kind: str, text: str, usage: Mapping[str, int],
                     *, repaired: bool) -> None:
        """Store an answer atomically (temp file in the same folder, fsync, os.replace); no-op without a cache."""
        if self.cache_dir is None:
            return
        entry = {
            "cache_format": CACHE_FORMAT,
            "key": key,
            "provider": self.config.provider,
            "model": self.config.model,
            "template_id": template_id,
            "kind": kind,
            "repaired": repaired,
            "text": text,
            "usage": {"input_tokens": int(usage["input_tokens"]), "output_tokens": int(usage["output_tokens"])},
            "stored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        data = self._scrub(json.dumps(entry, indent=1, sort_keys=True, ensure_ascii=False)).encode("utf-8")
        atomic_write_bytes(self._cache_path(key), data)
