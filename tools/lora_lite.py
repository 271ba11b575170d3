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
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from impl.atomic import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "lora-lite"
OUT = ROOT / "build" / "verify"
MARK = {"pass": ".", "fail": "F", "deviation": "D", "na": "-"}


def is_url(repo: str) -> bool:
    return re.match(r"^https?://", repo) is not None


def fetch_archive(repo_url: str, commit: str, cache: Path = CACHE, client=None) -> Path:
    """GitHub's archive of `commit` extracted into cache/<commit> (src/lora_lite inside); its sha256 recorded on
    the first fetch and checked on every later one. `commit` must be a full 40-hex id (a branch moves)."""
    from tools.fetch import FetchRefused, Limits, download_capped

    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise ValueError(f"a GitHub archive needs a full 40-hex commit id, not {commit!r} (a name can move)")
    dest = cache / commit
    if (dest / "src" / "lora_lite").is_dir():
        return dest
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
    lock = cache / "sha256.json"
    known = json.loads(lock.read_text()) if lock.exists() else {}
    if known.get(commit, digest) != digest:
        raise RuntimeError(f"{url}: sha256 {digest} differs from the {known[commit]} recorded on its first fetch")
    tmp = Path(tempfile.mkdtemp(dir=cache))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(tmp, filter="data")
        tops = list(tmp.iterdir())  # GitHub puts everything under <name>-<commit>/
        if len(tops) != 1 or not (tops[0] / "src" / "lora_lite").is_dir():
            raise RuntimeError(f"{url}: the archive holds no <top>/src/lora_lite (found {[p.name for p in tops]})")
        tops[0].rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    known[commit] = digest
    lock.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    return dest


def local_source(ref: str, repo: str) -> tuple[str, str]:
    """(ref, repo) as the backend takes them: a URL's archive fetched into the cache first."""
    return (ref, str(fetch_archive(repo, ref))) if is_url(repo) else (ref, repo)


# ----------------------------------------------------------------------------------------------- timeline


def history(repo: Path, branch: str) -> list[tuple[str, str, str | None]]:
    """(commit, subject, src/lora_lite tree id or None) for the branch's first-parent history, oldest first."""
    from harness.backends.lora_lite import _git

    out = []
    log = _git(repo, "log", "--first-parent", "--reverse", "--format=%H %s", branch, text=True).stdout
    for line in log.splitlines():
        commit, _, subject = line.partition(" ")
        try:
            tree = _git(repo, "rev-parse", f"{commit}:src/lora_lite", text=True).stdout.strip()
        except subprocess.CalledProcessError:
            tree = None
        out.append((commit, subject, tree))
    return out


def run_commit(commit: str, source: Path, args: list[str], out: Path) -> dict:
    """verify on one commit's extracted source, in its own process; its results JSON (or the error)."""
    path = out / f"lora-lite-{commit[:12]}.json"
    cmd = [sys.executable, "-m", "tools.verify", "--backend", "lora-lite", "--ref", commit, "--repo", str(source),
           "--json", str(path), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if not path.exists():
        return {"error": (proc.stdout + proc.stderr)[-2000:], "results": []}
    return json.loads(path.read_text())


def table(commits: list[dict]) -> tuple[str, list[str]]:
    """Markdown: a row per (variant, property) that is not pass/na somewhere, a column per commit."""
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
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append("legend: . pass  F fail  D declared deviation  - n/a  (blank) variant absent  x verify did not run")
    lines += ["", "| commit | subject | summary |", "|---|---|---|"]
    for c in commits:
        summary = (c.get("error") or "")[:80].replace("|", "/") or c.get("summary")
        lines.append(f"| {c['commit'][:7]} | {c['subject'][:60].replace('|', '/')} | {summary} |")
    lines += ["", "## Each failure", ""]
    for f in failures(commits, keys):
        lines.append(f"- **{f['key']}**: fails at {f['first']}..{f['last']}"
                     + (f", passes again at {f['fixed']}" if f["fixed"] else ", still failing at the last commit")
                     + f". At {f['first']}: {f['detail']}" + (f" (at {f['where']})" if f["where"] else "")
                     + f"; minimal example `{f['example']}`"
                     + (f". At {f['last']}: {f['last_detail']}" if f["last_detail"] != f["detail"] else ""))
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
             cache: Path = CACHE) -> dict:
    """Verify each commit of the branch (or only `refs`) and write the timeline table into `out`."""
    from harness.backends.lora_lite import extract

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
            data = run_commit(commit, extract(Path(repo), commit, cache), args, out)
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
    a = ap.parse_args(argv)
    args = ["--profile", a.profile, "-n", a.workers]
    for flag, value in (("--variants", a.variants), ("--properties", a.properties)):
        if value:
            args += [flag, value]
    timeline(a.repo, [r for r in a.refs.split(",") if r], a.branch, args, Path(a.out), Path(a.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
