"""Validation of values that come from outside the project (a command line, a JSON file, another repository's
pyproject): one function per kind, used by every reader of that kind (the noxfile, tools/, the lora-lite backend).

* `check_ref` / `git_commit`: a git ref is a full hex commit id, or a plain ref name that git resolves to exactly
  one commit (`git rev-parse --verify --end-of-options REF^{commit}`); never an option (a leading `-`), never a
  range or path syntax (`..`, `:`, `@{`, spaces, control characters).
* `git_repository`: a local folder is a git repository (a work tree or a bare git dir), never a folder to use as
  it is; the git arguments that address it.
* `requirements`: dependency specs from another project go to pip only as PEP 508 names with version specifiers
  (parsed by `packaging`): no pip options, no `-r`, no URL or file references, no environment markers.
* `contained`: a path named by an input is relative, has no `..`, and resolves (symlinks followed) inside the root.

Each refusal is an `UntrustedInput` (a ValueError) whose message names the value and the rule it broke, one line.
Only the standard library is imported at module level (the noxfile imports this module from nox's interpreter).
"""
from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

GIT_TIMEOUT_S = 60.0
FULL_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # sha1 or sha256 object names, lower-case hex
_REF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+/-]*")
MAX_REF_CHARS = 200


class UntrustedInput(ValueError):
    """A value from outside the project that breaks the rule for its kind; the message is one line."""


def _show(value: object, limit: int = 80) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[:limit] + "...'"


# ----------------------------------------------------------------------------------------------- git refs


def check_ref(ref: object, what: str = "ref") -> str:
    """`ref` when it is a full hex commit id or a plain ref name (branch, tag, abbreviated id); else
    UntrustedInput. Plain: letters, digits and `_ . + / -`, not starting with `-` or `.`, no `..`, `//`, `/.`,
    no trailing `/`, `.` or `.lock`: what `git check-ref-format` allows, less every revision syntax."""
    if not isinstance(ref, str) or not ref:
        raise UntrustedInput(f"{what} {_show(ref)}: a git ref must be a non-empty string")
    if ref.startswith("-"):
        raise UntrustedInput(f"{what} {_show(ref)}: a git ref never starts with '-' (it would be read as an option)")
    if len(ref) > MAX_REF_CHARS:
        raise UntrustedInput(f"{what} {_show(ref)}: longer than {MAX_REF_CHARS} characters")
    if FULL_COMMIT.fullmatch(ref):
        return ref
    if (not _REF_NAME.fullmatch(ref) or ".." in ref or "//" in ref or "/." in ref or ref.endswith(("/", ".", ".lock"))):
        raise UntrustedInput(f"{what} {_show(ref)}: not a commit id or a plain ref name (letters, digits, "
                             "'_.+/-'; no '..', ':', '@{', '^', '~', spaces or a leading '-')")
    return ref


def git_repository(repo: str | Path) -> list[str]:
    """The git arguments addressing local repository `repo` (`-C REPO` for a work tree, `--git-dir=REPO` for a
    bare git dir); UntrustedInput when `repo` is neither."""
    p = Path(repo)
    if (p / ".git").exists():
        return ["-C", str(p)]
    if (p / "HEAD").is_file() and (p / "objects").is_dir():
        return [f"--git-dir={p}"]
    raise UntrustedInput(f"{_show(str(repo))} is not a git repository (a work tree or a bare git dir)")


def git_commit(repo: str | Path, ref: object, what: str = "ref", timeout_s: float = GIT_TIMEOUT_S) -> str:
    """The full commit id `ref` names in the local repository `repo` (checked by `check_ref`, resolved by
    `git rev-parse --verify --end-of-options REF^{commit}`); UntrustedInput in one line otherwise."""
    ref = check_ref(ref, what)
    where = git_repository(repo)
    try:
        p = subprocess.run(["git", *where, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"],
                           capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise UntrustedInput(f"{what} {_show(ref)}: git rev-parse did not answer within {timeout_s:g} s") from None
    except OSError as e:
        raise UntrustedInput(f"{what} {_show(ref)}: git cannot run ({e})") from None
    out = p.stdout.strip()
    if p.returncode != 0 or not FULL_COMMIT.fullmatch(out):
        raise UntrustedInput(f"{what} {_show(ref)}: no such commit in {repo}")
    return out


# ----------------------------------------------------------------------------------------------- requirements


def requirements(specs: Iterable[object], what: str = "dependency") -> list[str]:
    """Each spec as `name[extras]<specifiers>` (PEP 508, normalised by `packaging`), in order; UntrustedInput
    for anything else: a pip option (`--index-url=..`, `-r FILE`, `-e ..`), a URL or file reference
    (`name @ file:///..`), an environment marker, a string that does not parse."""
    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise UntrustedInput(f"{what} {_show(spec)}: not a requirement string")
        if spec.lstrip().startswith("-"):
            raise UntrustedInput(f"{what} {_show(spec)}: a pip option, not a requirement")
        try:
            req = Requirement(spec)
        except InvalidRequirement as e:
            why = str(e).splitlines()[0]
            raise UntrustedInput(f"{what} {_show(spec)}: not a PEP 508 requirement ({why})") from None
        if req.url:
            raise UntrustedInput(f"{what} {_show(spec)}: a URL or file reference; only names and versions are "
                                 "installed")
        if req.marker is not None:
            raise UntrustedInput(f"{what} {_show(spec)}: an environment marker; only names and versions are installed")
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}{req.specifier}")
    return out


def requirement_name(spec: str) -> str:
    """The canonical project name of a requirement `requirements` accepted (`Torch>=2` -> `torch`)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return canonicalize_name(Requirement(spec).name)


# ----------------------------------------------------------------------------------------------- paths


def contained(root: str | Path, path: object, what: str = "path") -> Path:
    """`root / path` resolved, when `path` is a relative path without `..` whose resolution (symlinks followed)
    stays inside `root`; UntrustedInput otherwise."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise UntrustedInput(f"{what} {_show(path)}: not a non-empty path string")
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or path.startswith("~") or re.match(r"^[A-Za-z]:", path):
        raise UntrustedInput(f"{what} {_show(path)}: an absolute path; only paths inside the repository are read")
    if ".." in pure.parts:
        raise UntrustedInput(f"{what} {_show(path)}: '..' leaves the repository")
    base = Path(root).resolve()
    full = (base / pure).resolve()
    if full != base and base not in full.parents:
        raise UntrustedInput(f"{what} {_show(path)}: resolves outside the repository (a symlink out of it)")
    return full


def file_name(name: object, what: str = "name") -> str:
    """`name` when it can be one file name inside a folder (no separator, not `.`/`..`, no leading `-` or `.`,
    printable); UntrustedInput otherwise."""
    if (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}", name)):
        raise UntrustedInput(f"{what} {_show(name)}: not usable as a file name (letters, digits, '_.+-' only)")
    return name
