"""The diffs a reviewer reads first: what changed in a variant since the previous audit, and how our variant lines
up, function by function, with its pinned reference.

* `changes_since(commit, paths, root)`: the unified diff (git) of the variant's spec and implementation files
  between the commit of the previous audit and the working tree, with per-file counts.
* `side_by_side(ours, theirs)`: our file's functions aligned with the reference's (by the names they use and
  their own names), each pair
  printed as rows `ours-line | code || theirs-line | code`, so a divergence shows with line numbers in both.
* `diff_line_origin` / `check_diff_quote`: a quote that cites lines of a unified diff is verified against the
  files themselves: a removed or context line must exist at the base commit, an added or context line in the
  working tree.
"""
from __future__ import annotations

import ast
import difflib
import keyword
import math
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")
MIN_SIMILARITY = 0.25  # below this a function has no counterpart in the reference
NAME_BONUS = 0.25  # the two functions' own names share a word
COMMON = {"self", "cls", "torch", "nn", "F", "x"}
COLUMN = 72  # width of our side in a side-by-side row


def git(root: Path, *args: str) -> str | None:
    """stdout of a git command in `root`, or None when git or the revision is not there."""
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, errors="replace",
                           timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def commit_of(sidecar: dict, sidecar_path: Path, root: Path) -> str | None:
    """The commit an audit describes: the commit that added its sidecar (an audit is committed with the tree it
    reviewed), else, for an audit not committed yet, the HEAD it recorded when the tree was clean."""
    out = (git(root, "log", "-n", "1", "--diff-filter=A", "--format=%H", "--", str(sidecar_path)) or "").strip()
    if out:
        return out
    if sidecar.get("dirty", True):
        return None
    return valid_commit(sidecar.get("commit"), root)


def valid_commit(ref: object, root: Path) -> str | None:
    """`ref` as the full commit id git resolves it to in `root` (impl.untrusted: never an option or revision
    syntax), None when it is not one: only such an id reaches `git show`."""
    from impl.untrusted import FULL_COMMIT, UntrustedInput, check_ref, git_commit

    try:
        ref = check_ref(ref, "the previous audit's commit")
        return ref if FULL_COMMIT.fullmatch(ref) else git_commit(root, ref, "the previous audit's commit")
    except UntrustedInput:
        return None


def _read(f: Path) -> list[str] | None:
    """The lines of a working-tree file, bytes that are not UTF-8 decoded as U+FFFD (as the review's bundle reads
    them, so one such file never ends a review); None when it is not a file."""
    return f.read_bytes().decode("utf-8", errors="replace").splitlines() if f.is_file() else None


def base_problem(root: Path, commit: str) -> str | None:
    """Why `commit` cannot serve as the base of a diff in `root` (its object is missing, or the clone is shallow
    and the commit is at or beyond its boundary, so the previous audit's commit was not really found), else
    None."""
    if git(root, "cat-file", "-e", f"{commit}^{{commit}}") is None:
        return f"its commit {commit[:12]} is not in this repository"
    if (git(root, "rev-parse", "--is-shallow-repository") or "").strip() == "true":
        shallow = (git(root, "rev-parse", "--git-path", "shallow") or "").strip()
        boundary = set()
        if shallow:
            f = Path(shallow) if Path(shallow).is_absolute() else root / shallow
            boundary = set(f.read_text().split()) if f.is_file() else set()
        if commit in boundary or not boundary:
            return (f"this clone is shallow and {commit[:12]} is its boundary, not necessarily the commit of that "
                    "audit (`git fetch --unshallow` first)")
    return None


def file_at(root: Path, commit: str, path: str) -> list[str] | None:
    """The lines of `path` at `commit`, None when it did not exist there (or `commit` is not a full commit id)."""
    from impl.untrusted import FULL_COMMIT

    if not isinstance(commit, str) or not FULL_COMMIT.fullmatch(commit):
        return None
    out = git(root, "show", f"{commit}:{path}")
    return None if out is None else out.splitlines()


def changes_since(commit: str, paths: Sequence[str], root: Path) -> dict:
    """{"base", "files": [{path, status, added, removed}], "diff": [unified diff lines]} for the given files."""
    files, diff = [], []
    for path in paths:
        old = file_at(root, commit, path)
        new_file = root / path
        new = _read(new_file)
        if old == new:
            files.append({"path": path, "status": "unchanged", "added": 0, "removed": 0})
            continue
        lines = list(difflib.unified_diff(old or [], new or [], f"a/{path}", f"b/{path}", n=3, lineterm=""))
        added = sum(1 for x in lines if x.startswith("+") and not x.startswith("+++"))
        removed = sum(1 for x in lines if x.startswith("-") and not x.startswith("---"))
        status = "added" if old is None else "removed" if new is None else "modified"
        files.append({"path": path, "status": status, "added": added, "removed": removed})
        diff += lines
    return {"base": commit, "files": files, "diff": diff}


def diff_line_origin(diff: Sequence[str], index: int) -> tuple[str, str, int] | None:
    """For line `index` (0-based) of a unified diff: (path, side, line number), side 'old' for a removed line,
    'new' for an added or context line; None for headers."""
    path, old_no, new_no = None, 0, 0
    for i, line in enumerate(diff[: index + 1]):
        if line.startswith("+++ "):
            path = line[4:].removeprefix("b/")
            continue
        if line.startswith("--- "):
            continue
        m = HUNK.match(line)
        if m:
            old_no, new_no = int(m.group(1)), int(m.group(2))
            continue
        if i == index:
            if path is None or not line or line[0] not in " +-":
                return None
            return (path, "old", old_no) if line[0] == "-" else (path, "new", new_no)
        if line.startswith("-"):
            old_no += 1
        elif line.startswith("+"):
            new_no += 1
        elif line.startswith(" "):
            old_no, new_no = old_no + 1, new_no + 1
    return None


def check_diff_quote(diff: Sequence[str], start: int, end: int, base: str, root: Path) -> tuple[bool, str]:
    """Every diff line cited (1-based, inclusive) exists in its file at its side: the base commit for a removed
    line, the working tree for an added or context line."""
    cache: dict[tuple[str, str], list[str] | None] = {}
    for i in range(start - 1, end):
        origin = diff_line_origin(diff, i)
        if origin is None:
            continue
        path, side, no = origin
        if (path, side) not in cache:
            if side == "old":
                cache[(path, side)] = file_at(root, base, path)
            else:
                f = root / path
                cache[(path, side)] = _read(f)
        text = cache[(path, side)]
        if text is None or not (1 <= no <= len(text)) or text[no - 1] != diff[i][1:]:
            where = f"{base[:12]}" if side == "old" else "the working tree"
            return False, f"diff line {i + 1} cites {path}:{no}, which does not hold that text at {where}"
    return True, "matches"


# ----------------------------------------------------------------------------------------------- side by side


def functions(lines: Sequence[str]) -> list[tuple[str, int, int]]:
    """(qualified name, first line, last line) of every function and method of a Python file (1-based)."""
    try:
        tree = ast.parse("\n".join(lines) + "\n")
    except SyntaxError:
        return []
    out: list[tuple[str, int, int]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                out.append((prefix + child.name, start, child.end_lineno or child.lineno))
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(tree, "")
    return out


def identifiers(lines: Sequence[str]) -> set[str]:
    """The names a function uses (comments, keywords and `self`/`torch` left out)."""
    words = set(re.findall(r"[A-Za-z_]\w*", "\n".join(line.split("#", 1)[0] for line in lines)))
    return words - set(keyword.kwlist) - COMMON


def name_words(qualified: str) -> set[str]:
    """Words of a function's own name, 4+ characters, cut to 4 (so merged ~ merge, forward_input ~ forward)."""
    return {w[:4] for w in qualified.rsplit(".", 1)[-1].lower().split("_") if len(w) >= 4}


def align(ours: Sequence[str], theirs: Sequence[str]) -> list[dict]:
    """Each of our functions with the reference function most like it, when one is like it at all.

    Likeness = the share of our function's names (weighted by rarity: a name used by few functions of the two
    files says more) that the reference function uses too, plus NAME_BONUS when their own names share a word.
    Research code and libraries name the same math differently and cut it differently (a paper-style helper
    against a library method), so several of ours may align with one of theirs.
    """
    fa, fb = functions(ours), functions(theirs)
    ids = {("a", f[0]): identifiers(ours[f[1] - 1:f[2]]) for f in fa}
    ids.update({("b", f[0]): identifiers(theirs[f[1] - 1:f[2]]) for f in fb})
    df: dict[str, int] = {}
    for words in ids.values():
        for w in words:
            df[w] = df.get(w, 0) + 1
    weight = {w: math.log((len(ids) + 1) / c) for w, c in df.items()}
    pairs = []
    for a in fa:
        mine = ids[("a", a[0])]
        total = sum(weight[w] for w in mine)
        if not total:
            continue
        best = None
        for b in fb:
            shared = sum(weight[w] for w in mine & ids[("b", b[0])]) / total
            score = min(1.0, shared + (NAME_BONUS if name_words(a[0]) & name_words(b[0]) else 0.0))
            if score >= MIN_SIMILARITY and (best is None or score > best[0]):
                best = (score, b)
        if best is not None:
            b = best[1]
            pairs.append({"ours": a[0], "ours_lines": [a[1], a[2]], "theirs": b[0], "theirs_lines": [b[1], b[2]],
                          "similarity": round(best[0], 2)})
    return pairs


def side_by_side(ours: Sequence[str], theirs: Sequence[str], ours_path: str, theirs_path: str) -> tuple[list[str], list[dict]]:
    """The aligned function pairs as text rows (and the pairs): `=` same line, `~` changed, `<` only ours,
    `>` only theirs."""
    pairs = align(ours, theirs)
    out = [f"side-by-side: ours {ours_path} (left) against the reference {theirs_path} (right); "
           "rows: mark ours-line | code || theirs-line | code; = same, ~ changed, < only ours, > only theirs"]
    for p in pairs:
        (a0, a1), (b0, b1) = p["ours_lines"], p["theirs_lines"]
        out.append(f"== {p['ours']} ({ours_path}:{a0}-{a1}) <-> {p['theirs']} ({theirs_path}:{b0}-{b1}), "
                   f"similarity {p['similarity']:.2f}")
        left, right = ours[a0 - 1:a1], theirs[b0 - 1:b1]
        sm = difflib.SequenceMatcher(None, [x.strip() for x in left], [x.strip() for x in right], autojunk=False)
        for op, i0, i1, j0, j1 in sm.get_opcodes():
            mark = {"equal": "=", "replace": "~", "delete": "<", "insert": ">"}[op]
            for k in range(max(i1 - i0, j1 - j0)):
                li, rj = i0 + k, j0 + k
                lt = f"{a0 + li:>5} | {left[li]}" if li < i1 else ""
                rt = f"{b0 + rj:>5} | {right[rj]}" if rj < j1 else ""
                out.append(f"{mark} {lt[:COLUMN]:<{COLUMN}} || {rt}".rstrip())
    if not pairs:
        out.append(f"no function of {ours_path} has a counterpart in {theirs_path} (similarity below {MIN_SIMILARITY})")
    return out, pairs
