"""The reviewer: per-variant bundles and prompts, findings whose quotes are checked, and an offline mode.

Usage::

    python -m tools.review [--variants dora,hra] [--offline] [--verify-json PATH] [--allow-stale]
                           [--zoo-json PATH] [--max-chars N] [--out build/review/review.json] [--audits audits]

It reads only JSON and files: the verify JSON (results, each variant's spec record and the mechanical findings
that follow from the records, written by `python -m tools.verify`), the repository files those records name, the
manifest and the reference cache, and the newest audit's sidecar. It refuses a verify JSON older than the code
(`--allow-stale` accepts it) instead of re-running verify: `nox -s review` runs fetch, zoo, verify, review and
render, each once and in that order. It (1) builds one bundle per variant, (2) asks the configured LLM, or none,
and (3) writes the review run to build/review/review.json and the prompts to build/review/prompts/;
`python -m tools.render` then renders audits/variants_review_vN.md.

Provider. `REVIEW_PROVIDER` (openai | anthropic | offline), `REVIEW_BASE_URL`, `REVIEW_MODEL` and the key in
`OPENAI_API_KEY` / `ANTHROPIC_API_KEY` (tools.llm.ProviderConfig.from_env). Unset or `offline`, or `--offline`:
no LLM is asked and the audit says so plainly; the findings are then only the mechanical ones below (which an
online review reports as well).

Bundle (what the model reads), per variant, every file with line numbers (`   12 | code`):
  * generated/spec/<v>.txt: the spec's declarations (equation, tensors, claims, constraints, deviations, ...),
    defaults included, as the verify JSON's spec record carries them;
  * the spec's source file and the variant's implementation file (located through the spec's oracle and the
    registered class, so users' own modules and zoo mutants work the same way);
  * impl modules the variant file imports (other than the runtime files);
  * generated/verify/<v>.txt: the variant's rows of the verify JSON;
  * the runtime files impl/{runtime,checkpoint,layers,config,registry}.py (every variant runs through them);
  * the variant's pinned reference files from the fetch cache (refs/manifest.toml), as refs/<id>/<path>;
  * generated/changes/<v>.diff: the unified diff of the variant's spec, implementation and impl modules it
    imports since the commit of the previous audit (tools.diffs; absent when nothing changed or no audit exists);
  * generated/side-by-side/<v>/<ref>.txt: our implementation's functions aligned with each pinned Python
    reference's, line numbers on both sides (tools.diffs.side_by_side).

Cap (`--max-chars`, default 200000 characters of numbered bundle text). When the bundle is larger, files are
cut in this order until it fits: reference files first, largest first; then side-by-side files; then runtime
files the variant does not import, largest first; then runtime files it imports; then other impl modules it
imports; then the changes. A file is cut at its tail (keeping its first lines, so line numbers stay true) when
keeping at least 40 of its lines makes the bundle fit, and dropped whole otherwise. The spec, the implementation
file, the spec's declarations and the verify results are never cut (the mechanical findings cite the verify
rows), but each verify row's detail and example is capped at MAX_ROW_TEXT characters and 20 lines (the cut is
noted in the row). If what is never cut still exceeds the cap, the variant's LLM request is not sent (its review
fails, naming the sizes): no request exceeds --max-chars. The prompt lists every cut; a quote citing a line the
model never saw is unverified.

Findings. The model answers one JSON object (FINDINGS_SCHEMA): a verdict (OK | Partial | BUGGY), a summary,
and findings, each with a severity (high | medium | low | info), a category, a claim and evidence as
(path, start_line, end_line, quote). Every quote is checked against the bundle at the cited lines, whitespace
normalised (runs of whitespace are one space; the quote must occur within the cited lines and be at least 12
characters or the whole cited text; a copied `   12 | ` prefix is ignored). A finding with any evidence that does
not match, or with no evidence, is kept apart as unverified and never shown as fact. A malformed answer gets one
repair request (tools.llm complete_json); if that fails too, that variant gets a clear error and the others go on.
A quote that cites lines of generated/changes/<v>.diff must, besides, hold in the files themselves: a removed
line at the previous audit's commit, an added or context line in the working tree (tools.diffs.check_diff_quote).

Mechanical findings (offline and online): verify failures (high), failing differential oracles `reference_*`
(high), declared deviations (info), oracles not applicable (low), spec claims and declarations that no property
checked (the property not run or not applicable: medium for claims and the equation, low otherwise), variants
without a pinned reference (medium), variants none of whose pinned references is in the cache (low), variants
absent from the verify JSON (medium) or without a registered implementation (high). Mechanical findings come from
our own records, so they are verified by construction; the lines they cite are checked all the same.

Verdict: the worst of the verdict of every verified finding, mechanical and the model's (BUGGY if a high one,
Partial if a medium one, else OK) and the model's own verdict; a model's BUGGY counts as BUGGY only when one of its
verified findings is high, otherwise as Partial. So a verified high finding decides, whatever the model says.
An answer that cannot be read (off the schema, or anything else going wrong with it) fails that variant only.

Identity. A finding's `id` is a hash of (variant, category, path, anchor): the anchor is the enclosing Python
symbol of the first cited line (e.g. `LoRA.forward`), else the whitespace-normalised text of that line, and for
mechanical findings a fixed key (`property:oracle`, `claim:<name>`, ...). The free text of a claim never enters
it, so a reworded finding about the same place keeps its identity across audits.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from impl.untrusted import UntrustedInput, contained, file_name
from tools.diffs import base_problem, check_diff_quote, side_by_side

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TEMPLATE = "review_prompt.md.j2"
REVIEW_SCHEMA = "lora-verify/review/1"
VERIFY_SCHEMA = "lora-verify/results/2"  # harness.engine.SCHEMA; any other is refused (tests assert they agree)
MAX_ROW_TEXT = 2000  # characters of one verify row's detail or example in the bundle (the rest is cut, noted)
DEFAULT_MAX_CHARS = 200_000
MIN_KEEP_LINES = 40
MIN_QUOTE_CHARS = 12
MAX_EXCERPT_LINES = 40
RUNTIME_FILES = ("impl/runtime.py", "impl/checkpoint.py", "impl/layers.py", "impl/config.py", "impl/registry.py")

SEVERITIES = ("high", "medium", "low", "info")
VERDICTS = ("OK", "Partial", "BUGGY")
LLM_CATEGORIES = ("scale", "init", "forward", "gradient", "dropout", "merge", "checkpoint", "dtype", "shape",
                  "config", "reference_mismatch", "spec_mismatch", "documentation", "test_gap", "other")
MECHANICAL_CATEGORIES = ("verify_failure", "oracle_mismatch", "declared_deviation", "oracle_unavailable",
                         "unchecked_claim", "no_reference", "reference_unavailable", "not_verified",
                         "no_implementation")

# Never cut; the rest is cut in the order of CUT_ORDER (see the module docstring).
NEVER_CUT = ("spec-declarations", "spec", "impl", "verify-results")
CUT_ORDER = ("reference", "side-by-side", "runtime", "runtime-imported", "impl-dependency", "changes")

FINDINGS_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": list(VERDICTS)},
        "summary": {"type": "string"},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "severity": {"type": "string", "enum": list(SEVERITIES)},
                    "category": {"type": "string", "enum": list(LLM_CATEGORIES)},
                    "claim": {"type": "string"},
                    "evidence": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "path": {"type": "string"},
                                "start_line": {"type": "integer"},
                                "end_line": {"type": "integer"},
                                "quote": {"type": "string"},
                            },
                            "required": ["path", "start_line", "end_line", "quote"],
                            "additionalProperties": False,
                        },
                    },
                },
                "required": ["severity", "category", "claim", "evidence"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["verdict", "summary", "findings"],
    "additionalProperties": False,
}


class ReviewError(Exception):
    """The review cannot run (bad arguments, unreadable inputs); the message names the problem."""


class AnswerShapeError(ValueError):
    """A parsed answer does not follow FINDINGS_SCHEMA where it matters (verdict, findings list)."""


# ----------------------------------------------------------------------------------------------- bundle


@dataclasses.dataclass(frozen=True)
class BundleFile:
    """One file of a bundle. `lines` is the whole file; `kept` how many leading lines the model sees.

    `link` is where a reader opens it: 'repo:<path>' for a file of this repository, a URL for a pinned GitHub
    file (line anchors are appended), None for generated text and files inside PyPI releases.
    """

    path: str
    role: str
    lines: tuple[str, ...]
    link: str | None = None
    kept: int | None = None  # None: whole

    @property
    def n_kept(self) -> int:
        return len(self.lines) if self.kept is None else self.kept

    def numbered(self, upto: int | None = None) -> str:
        """The first `upto` lines (default: those kept) as `  12 | code`."""
        n = self.n_kept if upto is None else upto
        return "\n".join(f"{i:>5} | {line}" for i, line in enumerate(self.lines[:n], 1))

    def chars(self, upto: int | None = None) -> int:
        n = self.n_kept if upto is None else upto
        return sum(8 + len(line) + 1 for line in self.lines[:n])  # "nnnnn | " + line + newline

    @property
    def cut(self) -> str:
        if self.kept is None or self.kept == len(self.lines):
            return "none"
        return "dropped" if self.kept == 0 else "tail"


@dataclasses.dataclass(frozen=True)
class Bundle:
    variant: str
    files: tuple[BundleFile, ...]
    notes: tuple[str, ...]
    max_chars: int
    over_cap: int  # characters above the cap that could not be cut (never-cut files)
    diff_base: str | None = None  # the commit a `changes` file diffs against (its quotes are checked there)
    root: Path | None = None  # the repository the `changes` file's paths are relative to

    def file(self, path: str) -> BundleFile | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def chars(self) -> int:
        return sum(f.chars() for f in self.files)

    def summary(self) -> dict:
        return {"chars": self.chars, "cap": self.max_chars, "over_cap": self.over_cap, "notes": list(self.notes),
                "files": [{"path": f.path, "role": f.role, "lines": len(f.lines), "kept_lines": f.n_kept,
                           "cut": f.cut} for f in self.files]}


def text_lines(text: str) -> tuple[str, ...]:
    """Lines as an editor numbers them: CRLF/CR are newlines; a final newline does not start another line."""
    t = text.replace("\r\n", "\n").replace("\r", "\n")
    if not t:
        return ()
    return tuple((t.removesuffix("\n")).split("\n"))


def _indent(label: str, text: str) -> list[str]:
    """`label: text`, with continuation lines of a multi-line text indented under it."""
    parts = str(text).splitlines() or [""]
    return [f"{label}{parts[0]}"] + [" " * len(label) + p for p in parts[1:]]


def verify_lines(variant: str, results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                 source: str) -> tuple[tuple[str, ...], dict[str, int]]:
    """The variant's verify rows as text lines, and the line of each property."""
    lines = [(f"verify results for '{variant}' (backend {meta.get('backend')}, profile {meta.get('profile')}, "
              f"device {meta.get('device')}; from {source})")]
    at: dict[str, int] = {}
    rows = [r for r in results if r.get("variant") == variant]
    if not rows:
        at["none"] = 2
        lines.append(f"no verify results for '{variant}'")
    for r in rows:
        at[r["property"]] = len(lines) + 1
        err = "" if r.get("worst_error") is None else f" worst_error={float(r['worst_error']):.3g}"
        kind = f" ({r['failure_kind']})" if r.get("failure_kind") else ""
        lines.append(f"{r['property']}: {r['status']}{kind}{err} examples={r.get('examples', 0)}")
        if r.get("detail"):
            lines += _indent("    detail: ", _capped(r["detail"]))
        if r.get("status") in ("fail", "deviation") and r.get("example"):
            lines += _indent("    example: ", _capped(r["example"]))
    return tuple(lines), at


def _capped(text: Any, limit: int = MAX_ROW_TEXT) -> str:
    """A verify row's text, at most `limit` characters and 20 lines, saying how much was cut."""
    s = str(text)
    lines = s.splitlines()
    if len(s) <= limit and len(lines) <= 20:
        return s
    kept = "\n".join(lines[:20])[:limit]
    return f"{kept} [... {len(s) - len(kept)} more characters cut]"


def repo_file(root: Path, path: Any, what: str) -> Path:
    """impl.untrusted.contained as the review's one-line error: a path named by the verify JSON is read only
    when it lies inside the repository (relative, no `..`, no symlink out)."""
    try:
        return contained(root, path, what)
    except UntrustedInput as e:
        raise ReviewError(f"refused: {e}") from None


def rel(path: Path, root: Path) -> str:
    """`path` relative to the repository root (POSIX), or absolute when it lies outside it."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


def read_lines(path: Path) -> tuple[str, ...]:
    return text_lines(path.read_bytes().decode("utf-8", errors="replace"))


def cap_files(files: Sequence[BundleFile], max_chars: int) -> tuple[tuple[BundleFile, ...], tuple[str, ...], int]:
    """Apply the cut rule (module docstring) and return the files, a note per cut, and what stays over the cap."""
    out = list(files)
    notes: list[str] = []
    over = sum(f.chars() for f in out) - max_chars
    for role in CUT_ORDER:
        if over <= 0:
            break
        idx = sorted((i for i, f in enumerate(out) if f.role == role), key=lambda i: (-out[i].chars(), out[i].path))
        for i in idx:
            if over <= 0:
                break
            f = out[i]
            sizes = [8 + len(line) + 1 for line in f.lines]
            size = sum(sizes)
            # the most leading lines we may keep so that cutting the rest removes at least `over` characters
            fit, kept_chars = 0, 0
            for k, c in enumerate(sizes, 1):
                if size - (kept_chars + c) < over:
                    break
                fit, kept_chars = k, kept_chars + c
            if fit >= MIN_KEEP_LINES:
                out[i] = dataclasses.replace(f, kept=fit)
                notes.append(f"{f.path} ({f.role}): kept lines 1-{fit} of {len(f.lines)}, the tail was cut")
                over -= size - kept_chars
            else:
                out[i] = dataclasses.replace(f, kept=0)
                notes.append(f"{f.path} ({f.role}): dropped whole ({len(f.lines)} lines)")
                over -= size
    return tuple(out), tuple(notes), max(over, 0)


# ----------------------------------------------------------------------------------------------- references


def symbol_spans(text: str) -> list[tuple[int, int, str, bool]]:
    """(start, end, qualified name, top_level) of every class and function in Python source; [] if it does not
    parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    spans: list[tuple[int, int, str, bool]] = []

    def walk(node: ast.AST, prefix: str, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                spans.append((start, child.end_lineno or child.lineno, name, top))
                walk(child, name + ".", False)
            else:
                walk(child, prefix, top)

    walk(tree, "", True)
    return spans


def symbol_at(lines: Sequence[str], line: int) -> str | None:
    """The innermost class/function containing `line` in Python source, e.g. 'LoRA.forward'."""
    best = None
    for start, end, name, _ in symbol_spans("\n".join(lines) + "\n"):
        if start <= line <= end and (best is None or start >= best[0]):
            best = (start, name)
    return best[1] if best else None


def line_link(base: str | None, start: int, end: int) -> str | None:
    if not base:
        return None
    return f"{base}#L{start}" if start == end else f"{base}#L{start}-L{end}"


def reference_anchors(variant: str, lines: Sequence[str], base: str | None, limit: int = 8) -> list[dict]:
    """Top-level classes and functions of a reference file whose names contain a word of the variant's name
    (words of 3+ characters: 'ia3' of ia3_ff, 'antipasto' of antipasto_rot), with their line ranges."""
    words = [w for w in variant.lower().split("_") if len(w) >= 3] or [variant.lower()]
    out = []
    for start, end, name, top in symbol_spans("\n".join(lines) + "\n"):
        if top and any(w in name.lower() for w in words):
            out.append({"symbol": name, "start": start, "end": end, "link": line_link(base, start, end)})
    return sorted(out, key=lambda a: a["start"])[:limit]


def pinned_references(variant: str, manifest: Sequence[Any], cache_dir: Path) -> tuple[list[dict], list[BundleFile]]:
    """The variant's manifest entries (with their cache status and anchors) and the present ones as files."""
    from tools.fetch import ManifestError, cached_path

    rows, files = [], []
    for e in manifest:
        if variant not in e.variants:
            continue
        try:
            path = cached_path(e, cache_dir)
            problem = None
        except ManifestError as exc:
            path, problem = None, str(exc)
        base = e.url if e.source == "github" else None
        where = f"{e.repo}@{e.commit}" if e.source == "github" else f"{e.package}=={e.version} ({e.artifact})"
        row = {"id": e.id, "source": e.source, "where": where, "path": e.path, "url": e.url,
               "sha256": e.sha256, "pinned": e.sha256 is not None, "licence": e.licence,
               "status": "present" if path else "missing", "problem": problem, "lines": 0, "anchors": [],
               "bundle_path": f"refs/{e.id}/{e.path}"}
        if path is not None:
            lines = read_lines(path)
            row["lines"] = len(lines)
            row["sha256"] = row["sha256"] or hashlib.sha256(path.read_bytes()).hexdigest()
            row["anchors"] = reference_anchors(variant, lines, base)
            files.append(BundleFile(row["bundle_path"], "reference", lines, base))
        rows.append(row)
    return rows, files


def build_bundle(variant: str, record: Mapping[str, Any], verify: Mapping[str, Any], verify_source: str,
                 manifest: Sequence[Any], cache_dir: Path, root: Path, max_chars: int,
                 changes: Mapping[str, Any] | None = None) -> tuple[Bundle, dict]:
    """The variant's bundle and what the audit needs besides (pinned rows, anchors for mechanical findings,
    the side-by-side alignments). `record` is the variant's spec record from the verify JSON; `changes` what
    changed in its files since the previous audit (tools.diffs.changes_since)."""
    files = [BundleFile(f"generated/spec/{variant}.txt", "spec-declarations", tuple(record["declarations"]))]
    paths = record["files"]
    for key, role in (("spec", "spec"), ("impl", "impl")):
        f = repo_file(root, paths[key], f"the verify JSON's files.{key} of {variant}") if paths.get(key) else None
        if f is not None and f.is_file():
            files.append(BundleFile(rel(f, root), role, read_lines(f), _repo_link(f, root)))
    if changes and changes["diff"]:
        files.append(BundleFile(f"generated/changes/{variant}.diff", "changes", tuple(changes["diff"])))
    runtime = {(root / p).resolve() for p in RUNTIME_FILES}
    deps = [repo_file(root, d, f"the verify JSON's files.impl_deps of {variant}") for d in paths.get("impl_deps", [])]
    imported = {d.resolve() for d in deps}
    for d in deps:
        if d.resolve() not in runtime and d.is_file():
            files.append(BundleFile(rel(d, root), "impl-dependency", read_lines(d), _repo_link(d, root)))
    v_lines, v_at = verify_lines(variant, verify.get("results", []), verify, verify_source)
    files.append(BundleFile(f"generated/verify/{variant}.txt", "verify-results", v_lines))
    for p in RUNTIME_FILES:
        f = root / p
        if f.is_file():
            role = "runtime-imported" if f.resolve() in imported else "runtime"
            files.append(BundleFile(p, role, read_lines(f), _repo_link(f, root)))
    pinned, ref_files = pinned_references(variant, manifest, cache_dir)
    impl_file = next((f for f in files if f.role == "impl"), None)
    alignments = []
    for ref in ref_files:
        if impl_file is None or not ref.path.endswith(".py"):
            continue
        rows, pairs = side_by_side(impl_file.lines, ref.lines, impl_file.path, ref.path)
        if pairs:
            sbs = f"generated/side-by-side/{variant}/{ref.path.removeprefix('refs/')}.txt"
            files.append(BundleFile(sbs, "side-by-side", tuple(rows)))
            alignments.append({"reference": ref.path, "link": ref.link, "bundle_path": sbs, "pairs": pairs})
    files += ref_files
    capped, notes, over = cap_files(files, max_chars)
    bundle = Bundle(variant, capped, notes, max_chars, over, changes["base"] if changes else None, root)
    return bundle, {"decl_at": record["declaration_at"], "verify_at": v_at, "pinned": pinned,
                    "alignments": alignments}


def _repo_link(path: Path, root: Path) -> str | None:
    r = rel(path, root)
    return None if r.startswith("/") else f"repo:{r}"


# ----------------------------------------------------------------------------------------------- quotes


_PREFIX = re.compile(r"^\s*\d+ \| ?")


def normalise(text: str) -> str:
    """Whitespace-normalised text: every run of whitespace (newlines included) becomes one space."""
    return " ".join(text.split())


def strip_prefixes(quote: str) -> str:
    """Remove our `   12 | ` line-number prefixes when every line of the quote carries one."""
    lines = quote.splitlines()
    if lines and all(_PREFIX.match(line) for line in lines if line.strip()):
        return "\n".join(_PREFIX.sub("", line, count=1) for line in lines)
    return quote


def find_quote(lines: Sequence[str], quote: str) -> tuple[int, int] | None:
    """First (start, end) line range whose normalised text contains the normalised quote, or None."""
    q = normalise(quote)
    if not q:
        return None
    parts, starts = [], []
    pos = 0
    for i, line in enumerate(lines, 1):
        n = normalise(line)
        if not n:
            continue
        starts.append((pos, i))
        parts.append(n)
        pos += len(n) + 1
    full = " ".join(parts)
    at = full.find(q)
    if at < 0:
        return None

    def line_of(offset: int) -> int:
        best = starts[0][1]
        for s, i in starts:
            if s > offset:
                break
            best = i
        return best

    return line_of(at), line_of(at + len(q) - 1)


def check_evidence(ev: Mapping[str, Any], bundle: Bundle) -> tuple[bool, str]:
    """Is the quote in the bundle at the cited lines (whitespace-normalised)? Returns (ok, reason)."""
    path, a, b, quote = ev["path"], ev["start_line"], ev["end_line"], ev["quote"]
    f = bundle.file(path)
    if f is None:
        return False, f"'{path}' is not a file of the bundle"
    if a < 1 or b < a:
        return False, f"bad line range {a}-{b}"
    if b > len(f.lines):
        return False, f"lines {a}-{b} lie beyond the end of '{path}' ({len(f.lines)} lines)"
    if b > f.n_kept:
        return False, f"lines {a}-{b} of '{path}' were cut from the bundle (the model saw lines 1-{f.n_kept})"
    q = normalise(strip_prefixes(quote))
    if not q:
        return False, "empty quote"
    cited = normalise(" ".join(f.lines[a - 1:b]))
    if q not in cited:
        found = find_quote(f.lines[: f.n_kept], strip_prefixes(quote))
        hint = f"; it occurs at lines {found[0]}-{found[1]}" if found else "; it occurs nowhere in the file"
        return False, f"quote not found at lines {a}-{b} of '{path}'{hint}"
    if len(q) < min(MIN_QUOTE_CHARS, len(cited)):
        return False, f"quote too short ({len(q)} characters) to identify lines {a}-{b}"
    if f.role == "changes" and bundle.diff_base and bundle.root is not None:
        return check_diff_quote(f.lines, a, b, bundle.diff_base, bundle.root)
    return True, "matches"


# ----------------------------------------------------------------------------------------------- identity


def finding_id(variant: str, category: str, path: str, anchor: str) -> str:
    """The stable identity of a finding: no free text, no line numbers unless nothing better exists."""
    key = "\x1f".join((variant, category.strip().lower(), path, anchor))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def anchor_of(ev: Mapping[str, Any], bundle: Bundle) -> str:
    """Enclosing Python symbol of the first cited line, else that line's normalised text, else the quote's."""
    f = bundle.file(ev["path"])
    a = ev["start_line"]
    if f is not None and 1 <= a <= len(f.lines):
        if f.path.endswith(".py"):
            sym = symbol_at(f.lines, a)
            if sym:
                return f"symbol:{sym}"
        text = normalise(f.lines[a - 1])
        if text:
            return f"line:{text[:120]}"
    return f"quote:{normalise(str(ev.get('quote', '')))[:120]}"


def _evidence_record(ev: Mapping[str, Any], bundle: Bundle) -> dict:
    ok, reason = check_evidence(ev, bundle)
    f = bundle.file(ev["path"])
    link = line_link(f.link, ev["start_line"], ev["end_line"]) if (f is not None and ok) else None
    # A verified quote is shown as the file's own lines (at most MAX_EXCERPT_LINES), not as the model's copy.
    excerpt = "\n".join(f.lines[ev["start_line"] - 1:min(ev["end_line"], ev["start_line"] - 1 + MAX_EXCERPT_LINES)]) \
        if (f is not None and ok) else None
    return {"path": ev["path"], "start_line": ev["start_line"], "end_line": ev["end_line"], "quote": ev["quote"],
            "ok": ok, "reason": reason, "link": link, "excerpt": excerpt}


def make_finding(variant: str, source: str, severity: str, category: str, claim: str,
                 evidence: Sequence[Mapping[str, Any]], bundle: Bundle, anchor: str | None = None,
                 anchor_path: str | None = None) -> dict:
    """A finding with its evidence checked; `verified` is False if any evidence fails (or, for a model's
    finding, if it has none)."""
    records = [_evidence_record(e, bundle) for e in evidence]
    if anchor is None:
        primary = records[0] if records else {"path": "", "start_line": 0, "quote": ""}
        anchor, anchor_path = anchor_of(primary, bundle), primary["path"]
    verified = all(r["ok"] for r in records) and (bool(records) or source == "mechanical")
    return {"id": finding_id(variant, category, anchor_path or "", anchor), "variant": variant, "source": source,
            "severity": severity, "category": category, "claim": claim, "anchor": anchor,
            "evidence": records, "verified": verified}


# ----------------------------------------------------------------------------------------------- model answers


def _enum(value: Any, allowed: Sequence[str], what: str) -> str:
    s = str(value).strip()
    for a in allowed:
        if s.lower() == a.lower():
            return a
    raise AnswerShapeError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def _evidence_item(raw: Any, i: int) -> dict:
    if not isinstance(raw, dict):
        raise AnswerShapeError(f"evidence {i} is not an object")
    missing = [k for k in ("path", "start_line", "end_line", "quote") if k not in raw]
    if missing:
        raise AnswerShapeError(f"evidence {i} lacks {', '.join(missing)}")
    try:
        a, b = int(raw["start_line"]), int(raw["end_line"])
    except (TypeError, ValueError, OverflowError):
        raise AnswerShapeError(f"evidence {i}: line numbers must be integers") from None
    path = str(raw["path"]).strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return {"path": path, "start_line": a, "end_line": b, "quote": str(raw["quote"])}


def parse_answer(data: Mapping[str, Any], variant: str, bundle: Bundle) -> tuple[str, str, list[dict], list[dict]]:
    """(verdict, summary, verified findings, unverified findings) from a model's parsed JSON answer.

    A missing or invalid verdict or findings list is an AnswerShapeError (the variant's review failed). A single
    malformed finding is kept as unverified with the reason, never dropped silently.
    """
    if "verdict" not in data:
        raise AnswerShapeError("the answer has no 'verdict'")
    verdict = _enum(data["verdict"], VERDICTS, "verdict")
    findings = data.get("findings")
    if not isinstance(findings, list):
        raise AnswerShapeError("'findings' is missing or not a list")
    verified, unverified = [], []
    for n, raw in enumerate(findings):
        try:
            if not isinstance(raw, dict):
                raise AnswerShapeError("not an object")
            severity = _enum(raw.get("severity", ""), SEVERITIES, "severity")
            cat = str(raw.get("category", "")).strip().lower()
            category = cat if cat in LLM_CATEGORIES else "other"
            claim = str(raw.get("claim", "")).strip()
            if not claim:
                raise AnswerShapeError("empty claim")
            ev_raw = raw.get("evidence")
            if not isinstance(ev_raw, list):
                raise AnswerShapeError("'evidence' is not a list")
            evidence = [_evidence_item(e, i) for i, e in enumerate(ev_raw)]
        except AnswerShapeError as e:
            text = json.dumps(raw, sort_keys=True, ensure_ascii=False)[:400]
            unverified.append({"id": finding_id(variant, "malformed", "", f"index:{n}"), "variant": variant,
                               "source": "llm", "severity": "info", "category": "malformed",
                               "claim": f"malformed finding ({e}): {text}", "anchor": f"index:{n}",
                               "evidence": [], "verified": False})
            continue
        f = make_finding(variant, "llm", severity, category, claim, evidence, bundle)
        if not evidence:
            f["evidence_note"] = "no evidence given"
        (verified if f["verified"] else unverified).append(f)
    return verdict, str(data.get("summary", "")).strip(), verified, unverified


# ----------------------------------------------------------------------------------------------- mechanical findings


def _ev_line(bundle: Bundle, path: str, line: int | None) -> list[dict]:
    f = bundle.file(path)
    if f is None or line is None or not (1 <= line <= len(f.lines)):
        return []
    return [{"path": path, "start_line": line, "end_line": line, "quote": f.lines[line - 1]}]


def mechanical_findings(variant: str, verify: Mapping[str, Any], bundle: Bundle, extra: Mapping[str, Any]) -> list[dict]:
    """The verify JSON's mechanical findings for the variant (from its records: see harness/records.py), with
    their evidence lines, plus those about its pinned references (from the manifest and the cache)."""
    docs = {"verify": (f"generated/verify/{variant}.txt", extra["verify_at"]),
            "spec": (f"generated/spec/{variant}.txt", extra["decl_at"])}
    out: list[dict] = []
    for f in (verify.get("findings") or {}).get(variant, []):
        evidence: list[dict] = []
        for doc, key in f.get("cite", []):
            path, at = docs[doc]
            evidence += _ev_line(bundle, path, at.get(key))
        path = f["cite"][0][0] if f.get("cite") else f["anchor"]
        out.append(make_finding(variant, "mechanical", f["severity"], f["category"], f["claim"], evidence, bundle,
                                anchor=f["anchor"], anchor_path=path))

    def add(severity: str, category: str, claim: str, evidence: list[dict], anchor: str, path: str) -> None:
        out.append(make_finding(variant, "mechanical", severity, category, claim, evidence, bundle,
                                anchor=anchor, anchor_path=path))

    if variant not in (verify.get("specs") or {}):
        add("medium", "not_verified", f"the verify JSON has no record of '{variant}': nothing about it was checked",
            _ev_line(bundle, docs["verify"][0], extra["verify_at"].get("none")), "verify", "verify")
    if not extra["pinned"]:
        add("medium", "no_reference", f"no reference file is pinned for '{variant}' in refs/manifest.toml: its "
            "code can be compared with nothing but its own spec",
            _ev_line(bundle, docs["spec"][0], extra["decl_at"].get("references")), "manifest", "refs")
    if extra["pinned"] and not any(p["status"] == "present" for p in extra["pinned"]):
        ids = ", ".join(p["id"] for p in extra["pinned"])
        add("low", "reference_unavailable", f"none of the {len(extra['pinned'])} reference files pinned for "
            f"'{variant}' could be read from the cache ({ids}); run `python -m tools.fetch`", [], "refs", "refs")
    return out


def verdict_of(findings: Iterable[Mapping[str, Any]]) -> str:
    sev = {f["severity"] for f in findings}
    return "BUGGY" if "high" in sev else "Partial" if "medium" in sev else "OK"


def combine_verdicts(mechanical: str, llm: str | None, llm_findings: Sequence[Mapping[str, Any]]) -> str:
    """The worst of the mechanical verdict, the verdict of the model's verified findings (a verified high one
    is BUGGY whatever the model says) and the model's own verdict, whose BUGGY needs a verified high finding of
    its own, else it counts as Partial."""
    worst = max(mechanical, verdict_of(llm_findings), key=VERDICTS.index)
    if llm is None:
        return worst
    if llm == "BUGGY" and not any(f["severity"] == "high" for f in llm_findings):
        llm = "Partial"
    return max(worst, llm, key=VERDICTS.index)


# ----------------------------------------------------------------------------------------------- prompts


def template_id(templates_dir: Path) -> str:
    from tools.render import template_sha256

    digest = hashlib.sha256((template_sha256(templates_dir, PROMPT_TEMPLATE)
                             + json.dumps(FINDINGS_SCHEMA, sort_keys=True)).encode()).hexdigest()
    return f"review_prompt:{digest[:16]}"


def render_prompt(bundle: Bundle, title: str, templates_dir: Path) -> tuple[str, str]:
    """(system, user) prompts for one variant, from audits/templates/review_prompt.md.j2."""
    from tools.render import make_env

    env = make_env(templates_dir, markdown=False)  # the prompt: the files as they are, not an audit
    files = [{"path": f.path, "role": f.role, "total": len(f.lines), "kept": f.n_kept, "cut": f.cut,
              "text": f.numbered(), "lang": "python" if f.path.endswith(".py") else "text"} for f in bundle.files]
    module = env.get_template(PROMPT_TEMPLATE).make_module({
        "variant": bundle.variant, "title": title, "files": files, "cut_notes": list(bundle.notes),
        "max_chars": bundle.max_chars, "over_cap": bundle.over_cap, "severities": SEVERITIES,
        "categories": LLM_CATEGORIES, "verdicts": VERDICTS,
        "schema": json.dumps(FINDINGS_SCHEMA, sort_keys=True), "min_quote": MIN_QUOTE_CHARS,
    })
    return str(module.system()).strip() + "\n", str(module.user()).strip() + "\n"


# ----------------------------------------------------------------------------------------------- the run


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def load_verify(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReviewError(f"{path}: no verify JSON; run `python -m tools.verify` (or drop --no-verify)") from None
    except ValueError as e:
        raise ReviewError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("lora-verify/results/"):
        raise ReviewError(f"{path}: not a verify results JSON (schema lora-verify/results/* expected)")
    if data["schema"] != VERIFY_SCHEMA:
        raise ReviewError(f"{path}: verify JSON schema {str(data['schema'])[:60]!r}, this review reads only "
                          f"{VERIFY_SCHEMA!r}; run `python -m tools.verify` again")
    if not isinstance(data.get("results"), list):
        raise ReviewError(f"{path}: verify JSON has no 'results' list")
    problem = verify_shape_problem(data)
    if problem:
        raise ReviewError(f"{path}: malformed verify JSON: {problem}")
    return data


def _strs(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, str) for i in x)


def verify_shape_problem(data: Mapping[str, Any]) -> str | None:
    """What in a verify JSON does not have the shape the review reads (the first such field), or None."""
    for i, r in enumerate(data["results"]):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("variant", "property", "status")):
            return f"results[{i}] is not a row with string variant, property and status"
        for k in ("detail", "example", "failure_kind", "where"):
            if r.get(k) is not None and not isinstance(r[k], str):
                return f"results[{i}].{k} is not a string"
        if r.get("worst_error") is not None and (isinstance(r["worst_error"], bool)
                                                 or not isinstance(r["worst_error"], (int, float))):
            return f"results[{i}].worst_error is not a number"
    for key in ("variants", "all_variants"):
        if data.get(key) is not None and not _strs(data[key]):
            return f"'{key}' is not a list of names"
    for key in ("specs", "findings", "not_applicable"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"'{key}' is not an object"
    for v, rec in (data.get("specs") or {}).items():
        if not isinstance(rec, dict):
            return f"specs.{v} is not an object"
        files = rec.get("files")
        if (not isinstance(files, dict) or not _strs(files.get("impl_deps", []))
                or any(files.get(k) is not None and not isinstance(files[k], str) for k in ("spec", "impl"))):
            return f"specs.{v}.files is not {{spec, impl: path or null, impl_deps: [paths]}}"
        if not _strs(rec.get("declarations")) or not isinstance(rec.get("declaration_at"), dict):
            return f"specs.{v} lacks its declarations / declaration_at"
        if not isinstance(rec.get("title"), str) or not isinstance(rec.get("equation"), str) \
                or not isinstance(rec.get("references"), list):
            return f"specs.{v} lacks its title / equation / references"
    return None


def zoo_summary(path: Path, root: Path) -> dict | None:
    """Per-variant detection from the zoo JSON (harness/zoo report()), or None when there is none."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        mutants = data["mutants"]
    except (ValueError, KeyError, TypeError) as e:
        raise ReviewError(f"{path}: not a zoo report ({e})") from None
    per: dict[str, dict] = {}
    for m in mutants:
        row = per.setdefault(m["variant"], {"detected": 0, "total": 0, "escaped": []})
        row["total"] += 1
        if m.get("detected"):
            row["detected"] += 1
        else:
            row["escaped"].append(m["mutant"])
    return {"path": rel(path, root), "detected": data.get("detected"), "total": data.get("total"),
            "variants": {k: per[k] for k in sorted(per)}}


def git_state(root: Path) -> dict:
    def run(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    dirty = run("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit or "unknown (not a git checkout)", "dirty": bool(dirty)}


def select_variants(requested: str | None, verify: Mapping[str, Any]) -> tuple[list[str], list[str] | None]:
    """(variants to review, the subset as asked or None when every spec is reviewed): the verify JSON's variants
    that the verified backend implements, by default; a review is a subset when it covers fewer than all the specs
    verify knew (`all_variants`) that the backend implements (a spec it has no counterpart of is `not_applicable`)."""
    absent = verify.get("not_applicable") or {}
    verified = sorted(v for v in verify.get("variants") or [] if v not in absent)
    every = sorted(v for v in verify.get("all_variants") or verified if v not in absent)
    want = sorted({v.strip() for v in (requested or "").split(",") if v.strip()}) if requested else verified
    unknown = [v for v in want if v not in verified]
    if unknown:
        why = "; ".join(absent[v] for v in unknown if v in absent)
        raise ReviewError(f"no verify results for variant(s) {', '.join(unknown)}"
                          + (f" ({why})" if why else "") + f"; the verify JSON has {', '.join(verified) or 'none'} "
                          "(run `nox -s verify` first)")
    if not want:
        raise ReviewError("--variants is empty")
    return want, (None if want == every else want)


def missing_record(variant: str) -> dict:
    """The spec record of a variant the verify JSON knows nothing about: no declarations, no files."""
    return {"title": variant, "equation": "", "references": [], "declarations": [f"no spec record for '{variant}' "
            "in the verify JSON"], "declaration_at": {}, "files": {"spec": None, "impl": None, "impl_deps": [],
                                                                  "impl_expected": False}}


def previous_audit(audits_dir: Path, root: Path) -> tuple[int, dict, str | None] | None:
    """(number, sidecar, commit) of the newest whole audit in `audits_dir`, or None."""
    from tools.diffs import commit_of
    from tools.render import audit_path, next_number, previous_sidecar

    prev = previous_sidecar(audits_dir, next_number(audits_dir))
    if prev is None:
        return None
    n, side = prev
    return n, side, commit_of(side, audit_path(audits_dir, n, "json"), root)


def review(variants: Sequence[str], *, root: Path = ROOT, verify_json: Path, config: Any, zoo_json: Path | None = None,
           manifest_path: Path | None = None, refs_cache: Path | None = None, llm_cache: Path | None = None,
           templates_dir: Path | None = None, max_chars: int = DEFAULT_MAX_CHARS, subset: Sequence[str] | None = None,
           prompts_dir: Path | None = None, client_options: Mapping[str, Any] | None = None,
           audits_dir: Path | None = None) -> dict:
    """Review `variants` and return the review run (the JSON tools.render renders).

    Reads the verify JSON (results, spec records, mechanical findings), the repository's files it names, the
    manifest and the reference cache, and the previous audit in `audits_dir` (default root/audits), against
    whose commit each variant's changes are diffed. `config` is a tools.llm.ProviderConfig; offline means no LLM
    is asked. A variant whose files did not change since a previous LLM audit is not asked again: that audit's
    model findings are carried over and their quotes checked anew. Each variant's LLM failure (an LLMError, a
    malformed answer after the repair, an answer off the schema) is recorded for that variant only.
    """
    from tools.diffs import changes_since
    from tools.fetch import DEFAULT_MANIFEST, load_manifest, resolve_cache_dir
    from tools.llm import CompletionRequest, LLMClient, LLMError

    t0 = time.monotonic()
    templates_dir = templates_dir or root / "audits" / "templates"
    manifest_path = manifest_path or (root / "refs" / "manifest.toml" if (root / "refs").is_dir() else DEFAULT_MANIFEST)
    manifest = load_manifest(manifest_path)
    cache_dir = resolve_cache_dir(refs_cache)
    verify = load_verify(verify_json)
    verify_source = rel(verify_json, root)
    offline = config.is_offline
    tid = template_id(templates_dir)
    prev = previous_audit(audits_dir or root / "audits", root)

    for v in variants:
        try:
            file_name(v, "variant")  # it names the prompt file and the bundle's generated files
        except UntrustedInput as e:
            raise ReviewError(f"refused: {e}") from None
    if prev is not None and prev[2]:
        problem = base_problem(root, prev[2])
        if problem:
            raise ReviewError(f"cannot diff against the previous audit v{prev[0]}: {problem}")
    entries = []
    for v in variants:
        record = (verify.get("specs") or {}).get(v) or missing_record(v)
        changes = None
        if prev is not None and prev[2] and v in prev[1].get("variants", []):
            f = record["files"]
            paths = [x for x in [f.get("spec"), f.get("impl"), *f.get("impl_deps", [])] if x]
            for x in paths:
                repo_file(root, x, f"the verify JSON's files of {v}")
            changes = {"previous": prev[0], **changes_since(prev[2], paths, root)}
        bundle, extra = build_bundle(v, record, verify, verify_source, manifest, cache_dir, root, max_chars, changes)
        system, user = render_prompt(bundle, record["title"], templates_dir)
        if prompts_dir is not None:
            from impl.atomic import atomic_write_bytes as atomic_write

            atomic_write(prompts_dir / f"{v}.md", f"<!-- system -->\n{system}\n<!-- user -->\n{user}".encode())
        mech = mechanical_findings(v, verify, bundle, extra)
        carried = None
        if not offline and changes is not None and not any(x["status"] != "unchanged" for x in changes["files"]):
            carried = (prev[1].get("llm") or {}).get(v)
        entries.append({"variant": v, "record": record, "bundle": bundle, "extra": extra, "system": system,
                        "user": user, "mechanical": mech, "changes": changes, "carried": carried})

    # --max-chars holds for every request: a bundle still over it after every cut is not sent
    too_big = {e["variant"]: (f"the bundle is {e['bundle'].chars} characters, over --max-chars {max_chars} even "
                              "after every cut (the spec, the implementation, its declarations and the verify rows "
                              "are never cut); not sent") for e in entries if e["bundle"].over_cap > 0}
    asked = [e for e in entries if e["carried"] is None and e["variant"] not in too_big]
    answers: dict[str, Any] = {}
    stats = None
    if not offline and asked:
        with LLMClient(config, cache_dir=llm_cache, **dict(client_options or {})) as client:
            reqs = [CompletionRequest(e["system"], e["user"], FINDINGS_SCHEMA, "review_findings", tid, json=True)
                    for e in asked]
            answers = {e["variant"]: a for e, a in zip(asked, client.complete_many(reqs))}
            stats = client.stats

    reviews = []
    for e in entries:
        v, record, bundle, carried = e["variant"], e["record"], e["bundle"], e["carried"]
        mech = e["mechanical"]
        llm_verdict = summary = error = None
        llm_ok: list[dict] = []
        llm_bad: list[dict] = []
        if carried is not None:
            llm_verdict, summary = carried.get("verdict"), carried.get("summary")
            for f in carried.get("findings", []):
                evidence = [{k: x[k] for k in ("path", "start_line", "end_line", "quote")} for x in f["evidence"]]
                g = make_finding(v, "llm", f["severity"], f["category"], f["claim"], evidence, bundle)
                (llm_ok if g["verified"] else llm_bad).append(g)
        elif not offline:
            ans = answers.get(v)
            if v in too_big:
                error = too_big[v]
            elif isinstance(ans, LLMError):
                error = str(ans)
            else:
                try:
                    llm_verdict, summary, llm_ok, llm_bad = parse_answer(ans.data or {}, v, bundle)
                except AnswerShapeError as exc:
                    error = f"the answer does not follow the findings schema: {exc}"
                except Exception as exc:  # noqa: BLE001 - a hostile answer fails its own variant only
                    llm_verdict, summary, llm_ok, llm_bad = None, None, [], []
                    error = f"the answer could not be read ({type(exc).__name__}: {str(exc)[:200]})"
        m_verdict = verdict_of(f for f in mech if f["verified"])
        verdict = combine_verdicts(m_verdict, llm_verdict, llm_ok)
        note = ""
        if error:
            note = "LLM review failed; mechanical verdict only"
        elif llm_verdict and llm_verdict != verdict:
            note = f"model said {llm_verdict}"
        if carried is not None:
            note = (note + "; " if note else "") + f"unchanged since v{e['changes']['previous']}: model not asked again"
        props = [{"property": r["property"], "status": r["status"], "worst_error": r.get("worst_error"),
                  "failure_kind": r.get("failure_kind"), "detail": (r.get("detail") or "")[:400],
                  "example": (r.get("example") or "")[:300] if r["status"] == "fail" else ""}
                 for r in verify.get("results", []) if r.get("variant") == v]
        ch = e["changes"]
        reviews.append({
            "variant": v, "title": record["title"], "equation": record["equation"],
            "spec_references": record["references"],
            "verdict": verdict, "verdict_note": note, "mechanical_verdict": m_verdict, "llm_verdict": llm_verdict,
            "llm_summary": summary, "llm_error": error, "llm_carried": carried is not None,
            "findings": [f for f in mech if f["verified"]] + llm_ok,
            "unverified": [f for f in mech if not f["verified"]] + llm_bad,
            "properties": props, "pinned": e["extra"]["pinned"], "bundle": bundle.summary(),
            "changes": None if ch is None else {k: ch[k] for k in ("previous", "base", "files")},
            "alignments": e["extra"]["alignments"],
            "prompt_sha256": hashlib.sha256((e["system"] + e["user"]).encode()).hexdigest(),
        })

    from tools.render import AUDIT_TEMPLATE, template_sha256

    zoo = zoo_summary(zoo_json, root) if zoo_json is not None else None
    stat = dataclasses.asdict(stats) if stats is not None else {}
    return {
        "schema": REVIEW_SCHEMA,
        "mode": "offline" if offline else "llm",
        "provider": config.provider,
        "model": None if offline else config.model,
        "subset": list(subset) if subset else None,
        "variants": list(variants),
        "not_reviewed": {v: why for v, why in sorted((verify.get("not_applicable") or {}).items())},
        "reviews": reviews,
        "zoo": zoo,
        "inputs": {
            "verify_json": verify_source,
            "verify_sha256": _sha256_file(verify_json),
            "verify_backend": verify.get("backend"),
            "verify_profile": verify.get("profile"),
            "manifest_sha256": _sha256_file(manifest_path),
            "zoo_sha256": _sha256_file(zoo_json) if zoo_json is not None else None,
            "prompt_template": tid,
            "audit_template_sha256": template_sha256(templates_dir, AUDIT_TEMPLATE),
            "max_chars": max_chars,
            "refs_cache": "default" if refs_cache is None else "custom",
        },
        "provenance": {
            **git_state(root),
            "generated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": round(time.monotonic() - t0, 2),
            "requests": stat.get("requests", 0),
            "cache_hits": stat.get("cache_hits", 0),
            "input_tokens": stat.get("input_tokens", 0),
            "output_tokens": stat.get("output_tokens", 0),
            "retries": stat.get("retries", 0),
            "repairs": stat.get("repairs", 0),
        },
    }


# ----------------------------------------------------------------------------------------------- verify freshness


def verify_is_stale(path: Path, variants: Sequence[str], root: Path) -> str | None:
    """Why the verify JSON must be regenerated (missing, older than a source file, lacking a variant), or None."""
    if not path.is_file():
        return f"{rel(path, root)} does not exist"
    mtime = path.stat().st_mtime
    for folder in ("impl", "spec", "harness"):
        for src in sorted((root / folder).rglob("*.py")):
            if src.stat().st_mtime > mtime:
                return f"{rel(src, root)} is newer than {rel(path, root)}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        have = set(data.get("variants") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        return f"{rel(path, root)} is unreadable"
    # every file the JSON names (each spec record's spec, impl and impl_deps), wherever it lies in the repository
    for v, rec in sorted((data.get("specs") or {}).items()) if isinstance(data.get("specs"), dict) else ():
        files = rec.get("files") if isinstance(rec, dict) else None
        named = ([files.get("spec"), files.get("impl"), *(files.get("impl_deps") or [])]
                 if isinstance(files, dict) else [])
        for name in (n for n in named if n):
            f = repo_file(root, name, f"the verify JSON's files of {v}")
            if not f.is_file():
                return f"{name} (named by {v}'s record) no longer exists"
            if f.stat().st_mtime > mtime:
                return f"{name} (named by {v}'s record) is newer than {rel(path, root)}"
    missing = [v for v in variants if v not in have]
    if missing:
        return f"{rel(path, root)} lacks {', '.join(missing)}"
    return None


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.review", description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="", help="comma-separated variants (default: every spec)")
    ap.add_argument("--offline", action="store_true", help="ask no LLM, whatever REVIEW_PROVIDER says")
    ap.add_argument("--verify-json", default=str(ROOT / "build" / "verify" / "impl.json"))
    ap.add_argument("--allow-stale", action="store_true", help="use the verify JSON even if older than the code")
    ap.add_argument("--zoo-json", default=str(ROOT / "build" / "zoo.json"))
    ap.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="bundle cap in characters")
    ap.add_argument("--out", default=str(ROOT / "build" / "review" / "review.json"))
    ap.add_argument("--audits", default=str(ROOT / "audits"))
    ap.add_argument("--llm-cache", default=str(ROOT / ".cache" / "llm"), help="response cache folder")
    a = ap.parse_args(argv)
    from tools.fetch import ManifestError
    from tools.llm import ConfigError, ProviderConfig

    try:
        if a.max_chars < 1000:
            raise ReviewError(f"--max-chars must be at least 1000, got {a.max_chars}")
        config = ProviderConfig(provider="offline") if a.offline else ProviderConfig.from_env()
        verify_json = Path(a.verify_json)
        variants, subset = select_variants(a.variants, load_verify(verify_json))
        why = None if a.allow_stale else verify_is_stale(verify_json, variants, ROOT)
        if why:
            raise ReviewError(f"the verify JSON is stale ({why}): run `nox -s verify` (or `python -m tools.verify`) "
                              "first, or pass --allow-stale")
        out = Path(a.out)
        run = review(variants, verify_json=verify_json, config=config, zoo_json=Path(a.zoo_json),
                     llm_cache=Path(a.llm_cache), max_chars=a.max_chars, subset=subset,
                     prompts_dir=out.parent / "prompts", audits_dir=Path(a.audits))
        from impl.atomic import atomic_write_bytes as atomic_write

        atomic_write(out, (json.dumps(run, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
        print(f"review: {run['mode']} review of {len(variants)} variant(s) -> {out}", file=sys.stderr)
        for r in run["reviews"]:
            err = f"  LLM ERROR: {r['llm_error']}" if r["llm_error"] else ""
            print(f"  {r['variant']:<18} {r['verdict']:<8} {len(r['findings'])} verified, "
                  f"{len(r['unverified'])} unverified{err}", file=sys.stderr)
        print("review: render the audit with `python -m tools.render`", file=sys.stderr)
    except (ReviewError, ConfigError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(r["llm_error"] for r in run["reviews"]) else 0


if __name__ == "__main__":
    sys.exit(main())
