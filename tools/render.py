"""Render a review run (build/review/review.json, written by `python -m tools.review`) into the audit
`audits/variants_review_vN.md`, with its machine-readable sidecar `audits/variants_review_vN.json`.

Usage::

    python -m tools.render [--review build/review/review.json] [--audits audits]

Numbering and exclusivity. N is one more than the highest N among the existing `variants_review_v*.md` and
`variants_review_v*.json` files. The audit body is rendered for that N, written to a temporary file in the
audits folder, fsynced, and then `os.link`ed to its final name: link(2) fails if the name exists, so an
existing audit is never overwritten, even by two renders racing for the same N. The sidecar is claimed first
(the same exclusive way), then the audit. The loser of a race re-reads the folder, takes the next N, re-renders
(the title and the changes section depend on N; the winner's sidecar is complete by then, so the loser
compares itself with it) and tries again.

Changes since the previous audit. The previous audit is the newest one below N that exists whole (its audit
and its sidecar) when rendering starts: a sidecar whose audit is missing (a render killed between the two
claims) is skipped, so "Compared with vN" never links to a file that does not exist. A render killed mid-write
leaves at most a git-ignored temporary file, which the next write into the folder removes (impl/atomic.py). Findings are matched by their stable identity (`id`, see tools/review.py: a hash of the
variant, the finding's category, the cited path and the enclosing symbol or a line anchor, never the free
text), only over variants reviewed in both runs, and only verified findings take part (unverified ones are
never shown as fact, so they can be neither new nor resolved). Verdict changes are listed per variant.

Determinism. The body is a pure function of the review JSON, the zoo results it embeds and the previous
sidecar: findings and tables are sorted, numbers are formatted with fixed precision, and nothing reads the
clock. Run statistics (date, durations, cache hits, tokens, requests, hashes, commit) appear only in the one
provenance block at the end.

Escaping. Jinja has no Markdown escaper and the text we render is untrusted (model answers, reference files,
verify details), so autoescape is off (Bandit B701 flags that: it is deliberate) and every value goes through an
explicit filter: `md_inline`, `md_cell` (tables), `code_span`, `code_block` (a fence longer than any backtick run
in the text) and `md_url`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
from impl.atomic import create_exclusive

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "audits" / "templates"
AUDIT_TEMPLATE = "variants_review.md.j2"
SIDECAR_SCHEMA = "lora-verify/audit/1"
REVIEW_SCHEMA = "lora-verify/review/1"
AUDIT_NAME = re.compile(r"^variants_review_v([1-9][0-9]{0,8})\.(md|json)$")
SEVERITIES = ("high", "medium", "low", "info")
VERDICTS = ("OK", "Partial", "BUGGY")


class RenderError(Exception):
    """The review JSON or the audits folder cannot be rendered; the message says which and why."""


# ----------------------------------------------------------------------------------------------- Markdown filters


class Escaped(str):
    """Text a filter below already made safe for Markdown: the environment's finalize passes it as it is (any
    str operation on it gives a plain str again, which finalize escapes)."""


_ENTITY = re.compile(r"&(?=#[0-9]{1,8};|#[xX][0-9a-fA-F]{1,8};|[A-Za-z][A-Za-z0-9]{0,31};)")
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")
_LINK_JOIN = re.compile(r"\]([(\[:])")
_AUTOLINK = re.compile(r"(?i)\b(https?|ftp)(:)(?=//)|\b(www)(\.)(?=[A-Za-z0-9])")


def repro_list(folder: Path, root: Path) -> list[dict]:
    """An audit's standalone reproductions (folder/*.py): each as its file (relative to root) and its claim, the
    first paragraph of its docstring on one line."""
    import ast

    out = []
    for f in sorted(folder.glob("*.py")):
        doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))) or ""
        out.append({"file": f.relative_to(root).as_posix(), "claim": " ".join(doc.split("\n\n")[0].split())})
    return out


def md_text(value: Any) -> Escaped:
    """The one escaping filter every value from input passes through (the environment's finalize, so a template
    cannot forget it): HTML and Markdown link syntax neutralised, nothing else touched, so text without such
    syntax renders byte for byte as it is. An HTML tag, comment or autolink opener `<x` becomes `&lt;x`, an
    entity `&name;` `&amp;name;`, a link or image join `](`, `][`, `]:` gets its `]` backslash-escaped, a bare
    URL's `http://` / `www.` its `:` / `.` (GitHub links bare URLs), and line breaks become spaces (a value never
    starts a block)."""
    if isinstance(value, Escaped):
        return value
    s = str(value)
    s = _ENTITY.sub("&amp;", s)
    s = _TAG_OPEN.sub("&lt;", s)
    s = _LINK_JOIN.sub(r"\\]\1", s)
    s = _AUTOLINK.sub(lambda m: (m.group(1) + "\\:") if m.group(1) else (m.group(3) + "\\."), s)
    return Escaped(s.replace("\r\n", " ").replace("\n", " ").replace("\r", " "))


def _escaped(f: Callable[..., str]) -> Callable[..., Escaped]:
    """A filter whose output is already Markdown-safe (finalize leaves it alone)."""

    def wrapped(*a: Any, **k: Any) -> Escaped:
        return Escaped(f(*a, **k))

    wrapped.__name__, wrapped.__doc__ = f.__name__, f.__doc__
    return wrapped

_INLINE_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~<>])")


def md_inline(text: Any) -> str:
    """Text safe in running Markdown: `&` as an entity, Markdown/HTML metacharacters backslash-escaped,
    newlines folded to spaces (so a value can never start a heading, list or HTML block)."""
    s = str(text).replace("&", "&amp;")
    s = _INLINE_SPECIAL.sub(r"\\\1", s)
    return " ".join(s.split("\n")).replace("\r", " ")


def md_cell(text: Any) -> str:
    """Text safe in a Markdown table cell: `md_inline`, with line breaks kept as `<br>` (a raw `|` would end
    the cell; md_inline escapes it)."""
    s = str(text).replace("\r\n", "\n").replace("\r", "\n")
    return "<br>".join(md_inline(part) for part in s.split("\n"))


def _longest_run(text: str, ch: str) -> int:
    runs = re.findall(re.escape(ch) + "+", text)
    return max((len(r) for r in runs), default=0)


def code_span(text: Any) -> str:
    """An inline code span that survives backticks in the text: the delimiter is one backtick longer than the
    longest backtick run inside, padded with spaces when the text starts or ends with a backtick."""
    s = " ".join(str(text).splitlines())
    ticks = "`" * (_longest_run(s, "`") + 1)
    pad = " " if (s.startswith("`") or s.endswith("`") or not s.strip()) else ""
    return f"{ticks}{pad}{s}{pad}{ticks}"


def code_block(text: Any, lang: str = "") -> str:
    """A fenced code block whose fence (at least three backticks) is longer than any backtick run in the text,
    so nothing inside can close it early. Ends without a trailing newline."""
    s = str(text).rstrip("\n")
    fence = "`" * max(3, _longest_run(s, "`") + 1)
    return f"{fence}{lang}\n{s}\n{fence}"


def md_url(url: Any) -> str:
    """A link target: only http(s) URLs and relative paths pass; spaces, parentheses and angle brackets are
    percent-encoded so the URL cannot end the Markdown link early."""
    s = str(url)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", s) and not re.match(r"^https?://", s):
        raise RenderError(f"refusing a link that is neither http(s) nor a relative path: {s!r}")
    for ch, enc in ((" ", "%20"), ("(", "%28"), (")", "%29"), ("<", "%3C"), (">", "%3E"), ('"', "%22"),
                    ("\n", ""), ("\r", "")):
        s = s.replace(ch, enc)
    return s


def fmt_err(x: Any) -> str:
    """A worst error with three significant digits, or an em dash when none was measured."""
    if x is None:
        return "—"
    return f"{float(x):.3g}"


def make_env(templates_dir: str | os.PathLike[str] = TEMPLATES, markdown: bool = True) -> jinja2.Environment:
    """The Jinja environment shared by the audits (variants review, PEFT history, cost) and the review prompt.

    StrictUndefined: a missing variable is an error, never an empty string. autoescape=False on purpose: the
    output is Markdown, which Jinja cannot escape; the filters above do it explicitly, and for an audit
    (`markdown`) every other printed value passes through `md_text` (finalize). The review prompt
    (`markdown=False`) shows the model the files as they are.
    """
    env = jinja2.Environment(  # autoescape off on purpose (Bandit B701): Markdown, escaped by the filters
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        **({"finalize": md_text} if markdown else {}),
    )
    safe = {f.__name__: _escaped(f) for f in (md_inline, md_cell, code_span, code_block, md_url, fmt_err)}
    env.filters.update(md_text=md_text, **safe)
    return env


def template_sha256(templates_dir: str | os.PathLike[str], name: str) -> str:
    """Hash of a template's source (it identifies the prompt in the LLM cache key and the audit's provenance)."""
    return hashlib.sha256((Path(templates_dir) / name).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- atomic writes




# ----------------------------------------------------------------------------------------------- numbering


def audit_numbers(audits_dir: Path) -> list[int]:
    """Every N used by an audit or a sidecar in the folder, sorted."""
    if not audits_dir.is_dir():
        return []
    return sorted({int(m.group(1)) for p in audits_dir.iterdir() if (m := AUDIT_NAME.match(p.name))})


def next_number(audits_dir: Path) -> int:
    return max(audit_numbers(audits_dir), default=0) + 1


def audit_path(audits_dir: Path, n: int, ext: str = "md") -> Path:
    return audits_dir / f"variants_review_v{n}.{ext}"


def previous_sidecar(audits_dir: Path, below: int) -> tuple[int, dict] | None:
    """The newest sidecar with a number below `below` whose audit exists too, or None. A sidecar that is not
    ours is an error, not silently skipped (the changes section would otherwise be wrong)."""
    for n in sorted((n for n in audit_numbers(audits_dir) if n < below), reverse=True):
        p = audit_path(audits_dir, n, "json")
        if not p.is_file() or not audit_path(audits_dir, n, "md").is_file():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RenderError(f"{p}: unreadable sidecar ({e}); the changes section needs it") from None
        if not isinstance(data, dict) or data.get("schema") != SIDECAR_SCHEMA:
            raise RenderError(f"{p}: not an audit sidecar (schema {SIDECAR_SCHEMA} expected)")
        return n, data
    return None


# ----------------------------------------------------------------------------------------------- sidecar and changes


def _sev_rank(f: Mapping[str, Any]) -> int:
    return SEVERITIES.index(f["severity"]) if f.get("severity") in SEVERITIES else len(SEVERITIES)


def sort_findings(findings: list[dict]) -> list[dict]:
    """Deterministic order: severity, then the first cited path and line, then the identity."""
    def key(f: dict):
        ev = f.get("evidence") or [{}]
        first = ev[0]
        return (_sev_rank(f), f.get("variant", ""), str(first.get("path", "")), int(first.get("start_line") or 0),
                f["id"])
    return sorted(findings, key=key)


def make_sidecar(review: Mapping[str, Any], number: int) -> dict:
    """What the next audit is compared with: verdicts and findings by identity (no run statistics)."""
    findings = []
    for r in review["reviews"]:
        for f in r["findings"] + r["unverified"]:
            findings.append({"id": f["id"], "variant": f["variant"], "severity": f["severity"],
                             "category": f["category"], "source": f["source"], "verified": f["verified"],
                             "claim": f["claim"][:300]})
    findings.sort(key=lambda f: (f["variant"], f["id"], not f["verified"]))
    return {
        "schema": SIDECAR_SCHEMA,
        "number": number,
        "mode": review["mode"],
        "variants": [r["variant"] for r in review["reviews"]],
        "subset": review["subset"],
        "verdicts": {r["variant"]: r["verdict"] for r in review["reviews"]},
        "findings": findings,
        "commit": review.get("provenance", {}).get("commit"),
        "dirty": review.get("provenance", {}).get("dirty", True),
        # what a later LLM review carries over for a variant whose files did not change
        "llm": {r["variant"]: {"verdict": r["llm_verdict"], "summary": r["llm_summary"],
                               "findings": [f for f in r["findings"] + r["unverified"] if f["source"] == "llm"]}
                for r in review["reviews"] if review["mode"] == "llm" and not r.get("llm_error")},
    }


def diff_runs(previous: tuple[int, dict] | None, current: Mapping[str, Any]) -> dict:
    """New, resolved and persisting verified findings (by identity) and verdict changes, over the variants
    reviewed in both runs."""
    if previous is None:
        return {"previous": None}
    n, prev = previous
    both = [v for v in current["variants"] if v in prev.get("variants", [])]
    only_now = [v for v in current["variants"] if v not in prev.get("variants", [])]
    only_before = [v for v in prev.get("variants", []) if v not in current["variants"]]

    def verified(side: Mapping[str, Any]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for f in side.get("findings", []):
            if f.get("verified") and f.get("variant") in both:
                out.setdefault(f["id"], f)
        return out

    now, before = verified(current), verified(prev)

    def order(fs: list[dict]) -> list[dict]:
        return sorted(fs, key=lambda f: (f["variant"], _sev_rank(f), f["id"]))

    verdicts = []
    for v in both:
        a, b = prev.get("verdicts", {}).get(v), current["verdicts"].get(v)
        if a != b:
            verdicts.append({"variant": v, "before": a or "—", "after": b})
    return {
        "previous": n,
        "compared": both,
        "only_now": only_now,
        "only_before": only_before,
        "new": order([f for i, f in now.items() if i not in before]),
        "resolved": order([f for i, f in before.items() if i not in now]),
        "persisting": order([f for i, f in now.items() if i in before]),
        "verdicts": verdicts,
    }


# ----------------------------------------------------------------------------------------------- rendering


def check_review(review: Any) -> dict:
    """Refuse a review JSON that is not ours, naming what is wrong."""
    if not isinstance(review, dict) or review.get("schema") != REVIEW_SCHEMA:
        raise RenderError(f"not a review run (schema {REVIEW_SCHEMA} expected)")
    for key in ("mode", "provider", "model", "subset", "reviews", "provenance", "inputs"):
        if key not in review:
            raise RenderError(f"review JSON lacks '{key}'")
    for r in review["reviews"]:
        for key in ("variant", "verdict", "findings", "unverified", "properties", "pinned", "bundle"):
            if key not in r:
                raise RenderError(f"review of {r.get('variant', '?')!r} lacks '{key}'")
        if r["verdict"] not in VERDICTS:
            raise RenderError(f"review of {r['variant']!r}: verdict {r['verdict']!r} not in {VERDICTS}")
        if r["verdict"] != "BUGGY" and any(f.get("severity") == "high" for f in r["findings"]):
            raise RenderError(f"review of {r['variant']!r}: verdict {r['verdict']} contradicts its verified high "
                              "finding (the audit's rule: a verified high finding makes it BUGGY)")
    return review


def _link(target: str | None, audits_dir: Path, root: Path) -> str | None:
    """Evidence links are stored as 'repo:<path>#L..' (a file of this repository) or an absolute URL."""
    if not target:
        return None
    if target.startswith("repo:"):
        rel, _, frag = target[5:].partition("#")
        path = os.path.relpath(root / rel, audits_dir).replace(os.sep, "/")
        return path + (f"#{frag}" if frag else "")
    return target


def _row(r: Mapping[str, Any], zoo: Mapping[str, Any]) -> dict:
    failing = [p["property"] for p in r["properties"] if p["status"] == "fail"]
    high = sum(f["severity"] == "high" for f in r["findings"])
    z = zoo.get(r["variant"])
    return {
        "variant": r["variant"],
        "verdict": r["verdict"],
        "note": r.get("verdict_note") or "",
        "failing": failing,
        "verified": len(r["findings"]),
        "high": high,
        "unverified": len(r["unverified"]),
        "zoo": f"{z['detected']}/{z['total']}" if z else "—",
    }


def audit_context(review: Mapping[str, Any], number: int, previous: tuple[int, dict] | None,
                  audits_dir: Path, root: Path) -> dict:
    """Everything the audit template needs, computed here so the template only lays it out."""
    sidecar = make_sidecar(review, number)
    zoo = review.get("zoo") or {}
    zoo_rows = zoo.get("variants", {}) if zoo else {}
    variants = []
    for r in review["reviews"]:
        props = r["properties"]
        diff = [p for p in props if p["property"].startswith("reference_")]
        findings = []
        for group in ("findings", "unverified"):
            out = []
            for f in sort_findings(r[group]):
                ev = [dict(e, href=_link(e.get("link"), audits_dir, root)) for e in f["evidence"]]
                out.append(dict(f, evidence=ev))
            findings.append(out)
        pinned = []
        for p in r["pinned"]:
            anchors = [dict(a, href=_link(a.get("link"), audits_dir, root)) for a in p.get("anchors", [])]
            pinned.append(dict(p, anchors=anchors))
        r = {"changes": None, "alignments": [], "llm_carried": False, **r}
        variants.append(dict(r, spec_properties=[p for p in props if not p["property"].startswith("reference_")],
                             differential=diff, verified=findings[0], unverified_sorted=findings[1],
                             pinned_links=pinned, files=r["bundle"]["files"]))
    return {
        "number": number,
        "review": review,
        "offline": review["mode"] == "offline",
        "rows": [_row(r, zoo_rows) for r in review["reviews"]],
        "variants": variants,
        "changes": diff_runs(previous, sidecar),
        "zoo": zoo,
        "sidecar_name": audit_path(audits_dir, number, "json").name,
        "provenance": review["provenance"],
        "inputs": review["inputs"],
        "not_reviewed": review.get("not_reviewed") or {},
    }


def render_audit(review: Mapping[str, Any], number: int, previous: tuple[int, dict] | None,
                 audits_dir: Path, *, root: Path = ROOT, templates_dir: Path = TEMPLATES) -> str:
    """The audit's Markdown text for number N (pure: no clock, no filesystem writes)."""
    env = make_env(templates_dir)
    ctx = audit_context(check_review(review), number, previous, audits_dir, root)
    return env.get_template(AUDIT_TEMPLATE).render(**ctx)


def publish(audits_dir: Path, render_for: Callable[[int, tuple[int, dict] | None], tuple[str, dict]],
            *, on_rendered: Callable[[int, int], None] | None = None, max_tries: int = 100) -> tuple[int, Path]:
    """Claim the next free N: render for it, create its sidecar exclusively, then the audit.

    `render_for(n, previous)` returns (markdown, sidecar dict). `on_rendered(n, attempt)` is called after
    rendering and before claiming the name (tests use it to make two renders race for the same N).
    """
    audits_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(max_tries):
        n = next_number(audits_dir)
        previous = previous_sidecar(audits_dir, n)
        text, side = render_for(n, previous)
        if on_rendered is not None:
            on_rendered(n, attempt)
        md, js = audit_path(audits_dir, n, "md"), audit_path(audits_dir, n, "json")
        payload = (json.dumps(side, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        # The sidecar claims N first: a render that loses the race then finds it complete when it re-reads the
        # folder, and compares itself with it.
        if not create_exclusive(js, payload):
            _wait_for(md)  # another render took N: let it finish its audit, so that we compare with it
            continue  # and take the next one
        if not create_exclusive(md, text.encode("utf-8")):
            js.unlink()  # an audit vN without a sidecar appeared meanwhile: give N up, take the next one
            continue
        return n, md
    raise RenderError(f"could not claim an audit number in {audits_dir} after {max_tries} attempts")


def _wait_for(path: Path, timeout_s: float = 10.0) -> None:
    """Wait until `path` exists (a racing render's audit), at most timeout_s (it may have been killed)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def write_audit(review: Mapping[str, Any], audits_dir: Path, *, root: Path = ROOT, templates_dir: Path = TEMPLATES,
                on_rendered: Callable[[int, int], None] | None = None) -> Path:
    """Render the review to the next audits/variants_review_vN.md (and .json) and return the audit's path."""
    check_review(review)
    audits_dir = Path(audits_dir)

    def render_for(n: int, previous: tuple[int, dict] | None) -> tuple[str, dict]:
        return (render_audit(review, n, previous, audits_dir, root=root, templates_dir=templates_dir),
                make_sidecar(review, n))

    _, path = publish(audits_dir, render_for, on_rendered=on_rendered)
    return path


def load_review(path: Path) -> dict:
    try:
        return check_review(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise RenderError(f"{path}: no review JSON; run `python -m tools.review` first") from None
    except ValueError as e:
        raise RenderError(f"{path}: not valid JSON ({e})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.render", description=__doc__.splitlines()[0])
    ap.add_argument("--review", default=str(ROOT / "build" / "review" / "review.json"))
    ap.add_argument("--audits", default=str(ROOT / "audits"))
    a = ap.parse_args(argv)
    try:
        path = write_audit(load_review(Path(a.review)), Path(a.audits))
    except (RenderError, jinja2.TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"audit written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
