"""lora-lite's source for verify, and the timeline of verify over its history.

    python -m tools.lora_lite timeline --repo PATH [--refs C1,C2 | --branch main] [--variants ..] [--properties ..]

Source: `--repo` is a local git clone (harness.backends.lora_lite extracts `git archive COMMIT`) or a GitHub
repository URL, whose archive of the commit (`<repo>/archive/<commit>.tar.gz`) `fetch_archive` downloads through
tools.fetch's capped downloader. The archive's sha256 is recorded in .cache/lora-lite/sha256.json on its first
fetch (never committed) and every later download must match it.

Timeline: one verify run per commit, in its own process (one lora_lite per process), each writing
build/verify/lora-lite-<commit>.json; commits whose src/lora_lite tree equals the previous commit's reuse its result.
Then one table, build/verify/lora-lite-timeline.{md,json}: a row per (variant, property) that is not a pass or n/a
at some commit, a column per commit, so a reader sees when each property started and stopped failing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from impl.atomic import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "lora-lite"
OUT = ROOT / "build" / "verify"
GIT_TIMEOUT_S = 60.0
VERIFY_TIMEOUT_S = 3600.0  # one commit's verify in the timeline
MARK = {"pass": ".", "fail": "F", "deviation": "D", "na": "-"}


def is_url(repo: str) -> bool:
    return re.match(r"^https?://", repo) is not None


class SourceError(RuntimeError):
    """lora-lite's source cannot be had or trusted (a refused archive, a malformed sha256.json, a bad ref or
    dependency): one line, no traceback."""


def known_digests(lock: Path) -> dict[str, str]:
    """{commit: archive sha256} of cache/sha256.json; SourceError in one line when it is not that shape."""
    if not lock.exists():
        return {}
    try:
        known = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{lock}: not readable JSON ({type(e).__name__}: {str(e)[:120]}); fix or delete it") from None
    if not isinstance(known, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in known.items()):
        raise SourceError(f"{lock}: not a {{commit: sha256}} object; fix or delete it")
    return known


def fetch_archive(repo_url: str, commit: str, cache: Path = CACHE, client=None) -> Path:
    """GitHub's archive of `commit` extracted into cache/<commit> (src/lora_lite inside); its sha256 recorded on
    the first fetch and checked on every later one; the extracted tree's sha256 recorded beside it and checked on
    every use. `commit` must be a full 40-hex id (a branch moves). Extraction is capped (members, unpacked bytes:
    harness.backends.lora_lite.unpack)."""
    from harness.backends.lora_lite import SourceRefused, checked_tree, record_tree, unpack
    from tools.fetch import FetchRefused, Limits, download_capped

    if not is_url(repo_url):
        raise SourceError(f"{repo_url!r} is not an http(s) URL; a local clone is passed as --repo PATH")
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise ValueError(f"a GitHub archive needs a full 40-hex commit id, not {commit!r} (a name can move)")
    dest = cache / commit
    lock = cache / "sha256.json"
    known = known_digests(lock)
    try:
        if (dest / "src" / "lora_lite").is_dir():
            return checked_tree(dest, commit)
    except SourceRefused as e:
        raise SourceError(str(e)) from None
    import httpx

    url = f"{repo_url.rstrip('/')}/archive/{commit}.tar.gz"
    own = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0), follow_redirects=False)
    try:
        data = download_capped(client, url, Limits(max_file_bytes=64 * 1024 * 1024))
    except FetchRefused as e:
        raise RuntimeError(f"cannot fetch {url}: {e}") from None
    finally:
        if own:
            client.close()
    digest = hashlib.sha256(data).hexdigest()
    cache.mkdir(parents=True, exist_ok=True)
    if known.get(commit, digest) != digest:
        raise RuntimeError(f"{url}: sha256 {digest} differs from the {known[commit]} recorded on its first fetch")
    tmp = Path(tempfile.mkdtemp(dir=cache))
    try:
        try:
            unpack(data, tmp / "x", url, mode="r:gz")
        except SourceRefused as e:
            raise SourceError(str(e)) from None
        tops = list((tmp / "x").iterdir())  # GitHub puts everything under <name>-<commit>/
        if len(tops) != 1 or not (tops[0] / "src" / "lora_lite").is_dir():
            raise SourceError(f"{url}: the archive holds no <top>/src/lora_lite (found {[p.name for p in tops]})")
        top = tops[0].rename(tmp / commit)
        record_tree(top)
        (tmp / (commit + ".tree-sha256")).rename(cache / (commit + ".tree-sha256"))
        top.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    known[commit] = digest
    atomic_write_bytes(lock, (json.dumps(known, indent=1, sort_keys=True) + "\n").encode())
    return dest


def local_source(ref: str, repo: str, cache: Path = CACHE) -> tuple[str, str]:
    """(full commit id, folder holding that commit's extracted source) as the backend takes them: a URL's archive
    fetched into the cache, a local git repository (work tree or bare git dir) resolved with git and its commit's
    tree extracted (never what is checked out). Any other folder goes to the backend as is (it accepts only a
    source this harness extracted, by its full commit id)."""
    from harness.backends.lora_lite import extract
    from impl.untrusted import UntrustedInput, check_ref, git_commit, git_repository

    try:
        check_ref(ref, "--ref")
        if is_url(repo):
            return ref, str(fetch_archive(repo, ref, cache))
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", repo):
            raise SourceError(f"--repo {repo}: only http(s) URLs are fetched")
        try:
            git_repository(repo)
        except UntrustedInput:
            return ref, repo
        commit = git_commit(repo, ref, "--ref")
        return commit, str(extract(Path(repo), commit, cache))
    except UntrustedInput as e:
        raise SourceError(str(e)) from None


def dependencies(pyproject: str) -> list[str]:
    """The [project] dependencies of a lora-lite pyproject.toml as pip may take them: each one validated as a
    PEP 508 name with versions (impl.untrusted.requirements), `torch` itself left out by its exact name
    (constraints.txt pins it; torchvision or torchmetrics stay). SourceError in one line otherwise."""
    import tomllib

    from impl.untrusted import UntrustedInput, requirement_name, requirements

    try:
        deps = tomllib.loads(pyproject).get("project", {}).get("dependencies", [])
    except tomllib.TOMLDecodeError as e:
        raise SourceError(f"lora-lite's pyproject.toml does not parse: {e}") from None
    if not isinstance(deps, list):
        raise SourceError("lora-lite's [project] dependencies is not a list")
    try:
        return [d for d in requirements(deps, "lora-lite dependency") if requirement_name(d) != "torch"]
    except UntrustedInput as e:
        raise SourceError(str(e)) from None


def pyproject_at(repo: str, ref: str, cache: Path = CACHE) -> tuple[str, str]:
    """(full commit id, pyproject.toml text) of lora-lite at `ref` in a local git repository; for a URL, of the
    archive already fetched into `cache` (`python -m tools.verify --fetch-only`)."""
    from impl.untrusted import UntrustedInput, check_ref, git_commit, git_repository

    try:
        if is_url(repo):
            commit = check_ref(ref, "--ref")
            path = cache / commit / "pyproject.toml"
            if not re.fullmatch(r"[0-9a-f]{40}", commit) or not path.is_file():
                raise SourceError(f"no fetched archive of {ref!r} in {cache} (a URL needs a full 40-hex commit id)")
            return commit, path.read_text(encoding="utf-8")
        commit = git_commit(repo, ref, "--ref")
        p = subprocess.run(["git", *git_repository(repo), "show", f"{commit}:pyproject.toml"], capture_output=True,
                           text=True, timeout=GIT_TIMEOUT_S, check=False)
    except UntrustedInput as e:
        raise SourceError(str(e)) from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"git show {commit[:12]}:pyproject.toml did not answer within {GIT_TIMEOUT_S:g} s") from None
    if p.returncode != 0:
        raise SourceError(f"lora-lite {commit[:12]} has no pyproject.toml in {repo}")
    return commit, p.stdout


# ----------------------------------------------------------------------------------------------- timeline


def history(repo: Path, branch: str) -> list[tuple[str, str, str | None]]:
    """(commit, subject, src/lora_lite tree id or None) for the branch's first-parent history, oldest first."""
    from harness.backends.lora_lite import _git
    from impl.untrusted import git_commit

    head = git_commit(repo, branch, "--branch")
    out = []
    log = _git(repo, "log", "--first-parent", "--reverse", "--format=%H %s", head, "--", text=True).stdout
    for line in log.splitlines():
        commit, _, subject = line.partition(" ")
        try:
            tree = _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}:src/lora_lite", text=True).stdout.strip()
        except subprocess.CalledProcessError:
            tree = None
        out.append((commit, subject, tree or None))
    return out


def run_commit(commit: str, source: Path, args: list[str], out: Path, timeout_s: float = VERIFY_TIMEOUT_S) -> dict:
    """verify on one commit's extracted source, in its own process; its results JSON (or the error). A verify
    that runs past `timeout_s` is killed and the commit's row says so (naming the limit)."""
    path = out / f"lora-lite-{commit[:12]}.json"
    cmd = [sys.executable, "-m", "tools.verify", "--backend", "lora-lite", "--ref", commit, "--repo", str(source),
           "--json", str(path), *args]
    if path.exists():
        path.unlink()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"verify did not finish within the timeout of {timeout_s:g} s (killed)", "results": []}
    if not path.exists():
        return {"error": (proc.stdout + proc.stderr)[-2000:], "results": []}
    return json.loads(path.read_text())


def table(commits: list[dict]) -> tuple[str, list[str]]:
    """Markdown: a row per (variant, property) that is not pass/na somewhere, a column per commit. Every value
    from the repository or the results (commit subjects, variant and property names, details, examples) goes
    through tools.render's escaping (md_text; code_span for an example)."""
    from tools.render import code_span, md_text

    keys = []
    for c in commits:
        for r in c["results"]:
            k = f"{r['variant']}/{r['property']}"
            if r["status"] in ("fail", "deviation") and k not in keys:
                keys.append(k)
    head = "| variant/property | " + " | ".join(c["commit"][:7] for c in commits) + " |"
    lines = [head, "|---|" + "---|" * len(commits)]
    for k in keys:
        row = []
        for c in commits:
            st = {f"{r['variant']}/{r['property']}": r["status"] for r in c["results"]}
            row.append("x" if c.get("error") else MARK.get(st.get(k), " "))
        lines.append(f"| {md_text(k)} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append("legend: . pass  F fail  D declared deviation  - n/a  (blank) variant absent  x verify did not run")
    lines += ["", "| commit | subject | summary |", "|---|---|---|"]
    for c in commits:
        summary = (c.get("error") or "")[:80].replace("|", "/") or c.get("summary")
        lines.append(f"| {md_text(c['commit'][:7])} | {md_text(c['subject'][:60].replace('|', '/'))} | "
                     f"{md_text(summary)} |")
    lines += ["", "## Each failure", ""]
    for f in failures(commits, keys):
        lines.append(f"- **{md_text(f['key'])}**: fails at {f['first']}..{f['last']}"
                     + (f", passes again at {f['fixed']}" if f["fixed"] else ", still failing at the last commit")
                     + f". At {f['first']}: {md_text(f['detail'])}"
                     + (f" (at {md_text(f['where'])})" if f["where"] else "")
                     + f"; minimal example {code_span(f['example'])}"
                     + (f". At {f['last']}: {md_text(f['last_detail'])}" if f["last_detail"] != f["detail"] else ""))
    return "\n".join(lines) + "\n", keys


def _one_line(result: dict) -> str:
    return " ".join((result.get("detail") or "").split())[:300].replace("|", "/")


def failures(commits: list[dict], keys: list[str]) -> list[dict]:
    """Per (variant, property) that fails at some commit: the first and last failing commit, the first later
    commit where it passes, and the first failure's detail, crash site and minimal example."""
    out = []
    for k in keys:
        seen = [(c["commit"][:7], {f"{r['variant']}/{r['property']}": r for r in c["results"]}.get(k)) for c in commits]
        failing = [i for i, (_, r) in enumerate(seen) if r is not None and r["status"] == "fail"]
        if not failing:
            continue
        first, last = seen[failing[0]][1], seen[failing[-1]][1]
        fixed = next((c for c, r in seen[failing[-1] + 1:] if r is not None and r["status"] == "pass"), None)
        out.append({"key": k, "first": seen[failing[0]][0], "last": seen[failing[-1]][0], "fixed": fixed,
                    "detail": _one_line(first), "last_detail": _one_line(last), "where": first.get("where"),
                    "example": first.get("example")})
    return out


def timeline(repo: str, refs: list[str] | None, branch: str, args: list[str], out: Path = OUT,
             cache: Path = CACHE, timeout_s: float = VERIFY_TIMEOUT_S) -> dict:
    """Verify each commit of the branch (or only `refs`) and write the timeline table into `out`."""
    from harness.backends.lora_lite import extract
    from impl.untrusted import check_ref, git_repository

    git_repository(repo)
    for r in refs or []:
        check_ref(r, "--refs")
    hist = history(Path(repo), branch)
    if refs:
        hist = [h for h in hist if any(h[0].startswith(r) for r in refs)]
    commits, last_tree, last = [], None, None
    for commit, subject, tree in hist:
        if tree is None:
            commits.append({"commit": commit, "subject": subject, "results": [], "summary": "no src/lora_lite"})
            continue
        if tree == last_tree and last is not None:
            data = {**last, "same_source_as": last["commit"]}
        else:
            print(f"verify lora-lite {commit[:12]} ({subject[:50]})", flush=True)
            data = run_commit(commit, extract(Path(repo), commit, cache), args, out, timeout_s)
        data = {**data, "commit": commit, "subject": subject}
        commits.append(data)
        last_tree, last = tree, data
    md, keys = table(commits)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "lora-lite-timeline.md", md.encode())
    payload = {"schema": "lora-verify/timeline/1", "repo": repo, "rows": keys,
               "commits": [{k: c.get(k) for k in ("commit", "subject", "summary", "error", "same_source_as", "results")}
                           for c in commits]}
    atomic_write_bytes(out / "lora-lite-timeline.json", (json.dumps(payload, indent=1) + "\n").encode())
    print(md)
    return payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.lora_lite", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("timeline", help="verify each commit of a branch and write one timeline table")
    t.add_argument("--repo", required=True, help="a local git clone of lora-lite")
    t.add_argument("--branch", default="main")
    t.add_argument("--refs", default="", help="comma-separated commits (default: every commit of the branch)")
    t.add_argument("--variants", default="")
    t.add_argument("--properties", default="")
    t.add_argument("--profile", default="ci")
    t.add_argument("-n", "--workers", default="0")
    t.add_argument("--out", default=str(OUT), help="where the JSONs and the table go")
    t.add_argument("--cache", default=str(CACHE), help="where each commit's source is extracted")
    t.add_argument("--timeout-s", type=float, default=VERIFY_TIMEOUT_S, help="limit on one commit's verify")
    a = ap.parse_args(argv)
    if not (math.isfinite(a.timeout_s) and a.timeout_s > 0):
        ap.error(f"--timeout-s must be a finite positive number of seconds, not {a.timeout_s}")
    args = ["--profile", a.profile, "-n", a.workers]
    for flag, value in (("--variants", a.variants), ("--properties", a.properties)):
        if value:
            args += [flag, value]
    from impl.untrusted import UntrustedInput

    try:
        timeline(a.repo, [r for r in a.refs.split(",") if r], a.branch, args, Path(a.out), Path(a.cache), a.timeout_s)
    except (UntrustedInput, SourceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
