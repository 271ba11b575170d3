"""One environment per outside library: `.nox/verify-<name>-<hash>/`, built from a backend's declared requirements.

A backend class declares what its library needs as class attributes, read here from its source file without
importing it (the noxfile reads them before any environment exists):
- `requirements: tuple[str, ...]`: PEP 508 requirement strings with exact versions (`"loralib==0.1.2"`). The
  library's own requirement is the one whose name is the backend's `name` (else the first); `--version X` replaces
  its version.
- `without: tuple[str, ...]`: harness dependencies left out of the environment (e.g. `("peft",)`: the reference
  properties are then n/a, saying PEFT is not importable).
- `no_deps: tuple[str, ...]`: names among the requirements installed with `pip --no-deps` (a library whose
  declared dependencies would replace the pinned torch or transformers, or that lists what it does not import).
- `release_requirements: dict[str, tuple[str, ...]]`: per-release co-requirements, for `--version` (and the
  ecosystem's previous minor): a PEP 440 version specifier (`"<0.5"`) -> exact requirements that replace the
  requirements of the same name (or are added) when the library's version matches it. At most one specifier may
  match a version; none matching keeps `requirements` as they are. The library's own requirement is never listed
  there (its version is `--version`'s).
Each value must be a literal (tuple of strings, dict of str -> tuple of strings) in the class body.

The environment holds torch==2.13.0 (constraints.txt), the harness (`-e . --no-deps`), the harness's other
dependencies from pyproject.toml (but torch and `without`) and the requirements; its folder name hashes all of
those, and a stamp inside it records that the install finished, so a second run reuses it.

This module needs only the standard library and `packaging` (the noxfile imports it).
"""
from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
ENVS = ROOT / ".nox"
BACKENDS = ROOT / "harness" / "backends"
STAMP = "lora-verify-env.stamp"
FIELDS = ("name", "requirements", "without", "no_deps", "release_requirements")


class EnvError(ValueError):
    """A backend's declaration or an environment that cannot be built: one line naming the problem."""


@dataclass(frozen=True)
class Declared:
    """What a backend class declares about its environment (read from its source)."""

    name: str
    requirements: tuple[str, ...]
    without: tuple[str, ...] = ()
    no_deps: tuple[str, ...] = ()
    source: str = ""
    library: str = field(default="", compare=False)  # the canonical name of the library's own requirement
    releases: tuple[tuple[str, tuple[str, ...]], ...] = ()  # release_requirements, as (specifier, requirements)


def exact(text: str, where: str = "") -> Requirement:
    """A PEP 508 requirement pinned to one exact version (`name==X`, no URL, no marker); else EnvError."""
    try:
        req = Requirement(text)
    except InvalidRequirement as e:
        raise EnvError(f"{where}requirement {text!r} is not a PEP 508 requirement: {e}") from None
    if req.url or req.marker:
        raise EnvError(f"{where}requirement {text!r}: only a name and an exact version (no URL, no marker)")
    specs = list(req.specifier)
    if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
        raise EnvError(f"{where}requirement {text!r} is not pinned to one exact version (write name==X.Y.Z)")
    try:
        Version(specs[0].version)
    except InvalidVersion:
        raise EnvError(f"{where}requirement {text!r}: {specs[0].version!r} is not a version") from None
    return req


def _literal(node: ast.AST, what: str, where: str):
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError):
        raise EnvError(f"{where}`{what}` must be a literal (a str, a tuple of str, or a dict of str to tuples of str)") from None


def declarations(path: Path) -> list[Declared]:
    """Every class in the file whose body assigns `requirements`, with its name, without and no_deps."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError) as e:
        raise EnvError(f"cannot read backend module {path}: {type(e).__name__}: {e}") from None
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        found = {}
        for stmt in node.body:
            if isinstance(stmt, ast.Assign):
                targets, value = stmt.targets, stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                targets, value = [stmt.target], stmt.value
            else:
                continue
            for t in targets:
                if isinstance(t, ast.Name) and t.id in FIELDS:
                    found[t.id] = _literal(value, t.id, f"{path.name}: class {node.name}: ")
        if "requirements" in found:
            out.append(validate(found, f"{path.name}: class {node.name}"))
    return out


def validate(found: dict, where: str) -> Declared:
    """A Declared from raw attribute values, checked: str name, tuples of str, exact PEP 508 requirements, and
    `no_deps` / `without` naming real names."""
    name = found.get("name")
    if not isinstance(name, str) or not name:
        raise EnvError(f"{where}: a backend declaring requirements needs a str `name`")
    vals = {}
    for key in ("requirements", "without", "no_deps"):
        v = found.get(key, ())
        if not isinstance(v, tuple) or not all(isinstance(s, str) for s in v):
            raise EnvError(f"{where}: `{key}` must be a tuple of str, got {v!r}")
        vals[key] = v
    reqs = [exact(r, f"{where}: ") for r in vals["requirements"]]
    if not reqs:
        raise EnvError(f"{where}: `requirements` is empty")
    names = [canonicalize_name(r.name) for r in reqs]
    if len(set(names)) != len(names):
        raise EnvError(f"{where}: a package is required twice in {vals['requirements']}")
    for key in ("without", "no_deps"):
        for n in vals[key]:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n):
                raise EnvError(f"{where}: `{key}` entry {n!r} is not a package name")
    bad = [n for n in vals["no_deps"] if canonicalize_name(n) not in names]
    if bad:
        raise EnvError(f"{where}: `no_deps` names {bad}, which are not among the requirements {names}")
    if any(canonicalize_name(n) == "torch" for n in names + [canonicalize_name(w) for w in vals["without"]]):
        raise EnvError(f"{where}: torch is pinned by constraints.txt; a backend neither requires nor leaves it out")
    lib = canonicalize_name(name) if canonicalize_name(name) in names else names[0]
    releases = release_sets(found.get("release_requirements", {}), lib, where)
    return Declared(name, tuple(str(r) for r in reqs), tuple(vals["without"]), tuple(vals["no_deps"]), where, lib,
                    releases)


def release_sets(raw, lib: str, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`release_requirements` checked: a dict of PEP 440 specifier -> a non-empty tuple of exact requirements, none
    of them the library itself, none twice; returned as sorted (specifier, requirements) pairs."""
    if not isinstance(raw, dict):
        raise EnvError(f"{where}: `release_requirements` must be a dict of version specifier -> tuple of str, "
                       f"got {raw!r}")
    out = []
    for spec, reqs in raw.items():
        try:
            if not isinstance(spec, str) or not str(SpecifierSet(spec)):
                raise InvalidSpecifier(spec)
        except InvalidSpecifier:
            raise EnvError(f"{where}: `release_requirements` key {spec!r} is not a version specifier "
                           f"(write e.g. \"<0.5\")") from None
        if not isinstance(reqs, tuple) or not reqs or not all(isinstance(r, str) for r in reqs):
            raise EnvError(f"{where}: `release_requirements[{spec!r}]` must be a non-empty tuple of str, got {reqs!r}")
        parsed = [exact(r, f"{where}: release_requirements[{spec!r}]: ") for r in reqs]
        names = [canonicalize_name(r.name) for r in parsed]
        if lib in names:
            raise EnvError(f"{where}: `release_requirements[{spec!r}]` lists the library {lib} itself; its version "
                           "is the release's (--version)")
        if len(set(names)) != len(names) or "torch" in names:
            raise EnvError(f"{where}: `release_requirements[{spec!r}]` names a package twice, or torch")
        out.append((str(SpecifierSet(spec)), tuple(str(r) for r in parsed)))
    return tuple(sorted(out))


def shipped() -> dict[str, Path]:
    """The shipped backends with their own environment: name -> module file, from harness/backends/__init__.py's
    LAZY table (read without importing it), those whose class declares requirements."""
    tree = ast.parse((BACKENDS / "__init__.py").read_text())
    lazy = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "LAZY" for t in node.targets):
            lazy = ast.literal_eval(node.value)
    out = {}
    for name, mod in lazy.items():
        f = BACKENDS / (mod.lstrip(".") + ".py")
        if f.is_file() and any(d.name == name for d in declarations(f)):
            out[name] = f
    return out


def declared(name: str | None, module: str | None = None) -> Declared | None:
    """The declaration of backend `name` (a shipped one, or one in the user's `module` file); None when that
    backend declares no requirements (it runs in the ordinary verify environment)."""
    if module:
        p = Path(module)
        if p.suffix != ".py":  # a dotted module name: its file under the repository
            p = ROOT / Path(*module.split(".")).with_suffix(".py")
        if not p.is_file():
            return None
        found = declarations(p)
        pick = [d for d in found if name is None or d.name == name]
        if len(pick) > 1:
            raise EnvError(f"{module} declares requirements for {[d.name for d in pick]}; pick one with --backend")
        return pick[0] if pick else None
    files = shipped()
    if name not in files:
        return None
    return next(d for d in declarations(files[name]) if d.name == name)


def release_set(decl: Declared, version: str) -> tuple[str, ...]:
    """The requirements for the library at `version`: `requirements` with the library's own pinned to it, and the
    co-requirements of the one `release_requirements` specifier the version matches (none: unchanged); two
    matching specifiers are an EnvError."""
    try:
        v = Version(version)
    except InvalidVersion:
        raise EnvError(f"--version {version!r} is not a version") from None
    hits = [(spec, reqs) for spec, reqs in decl.releases if SpecifierSet(spec).contains(v, prereleases=True)]
    if len(hits) > 1:
        raise EnvError(f"{decl.source}: {decl.library} {version} matches {len(hits)} `release_requirements` "
                       f"specifiers {[s for s, _ in hits]}; make them disjoint")
    over = {canonicalize_name(Requirement(r).name): r for r in (hits[0][1] if hits else ())}
    out = []
    for r in decl.requirements:
        n = canonicalize_name(Requirement(r).name)
        out.append(f"{Requirement(r).name}=={version}" if n == decl.library else over.pop(n, r))
    return tuple(out) + tuple(over.values())


def with_version(decl: Declared, version: str | None) -> Declared:
    """The declaration with the library's own requirement at `version` and that release's co-requirements
    (`release_set`); None: unchanged."""
    if not version:
        return decl
    return Declared(decl.name, release_set(decl, version), decl.without, decl.no_deps, decl.source, decl.library,
                    decl.releases)


def library_version(decl: Declared) -> str:
    r = next(Requirement(r) for r in decl.requirements if canonicalize_name(Requirement(r).name) == decl.library)
    return next(iter(r.specifier)).version


def harness_dependencies(without: tuple[str, ...] = ()) -> list[str]:
    """pyproject.toml's dependencies but torch (installed first, pinned) and `without`."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    drop = {"torch"} | {canonicalize_name(w) for w in without}
    return [d for d in deps if canonicalize_name(Requirement(d).name) not in drop]


def constraints_for(decl: Declared, base: str) -> str:
    """constraints.txt's text without the pins of packages the backend requires or leaves out."""
    drop = {canonicalize_name(Requirement(r).name) for r in decl.requirements} | {canonicalize_name(w) for w in decl.without}
    kept = []
    for line in base.splitlines(True):
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m and not line.lstrip().startswith("#") and canonicalize_name(m.group(1)) in drop:
            continue
        kept.append(line)
    return "".join(kept)


def env_key(decl: Declared) -> str:
    """sha256 over what decides the environment: the requirements, without, no_deps, the harness's dependencies,
    constraints.txt and the Python version."""
    h = hashlib.sha256()
    for part in (sorted(decl.requirements), sorted(decl.without), sorted(decl.no_deps),
                 harness_dependencies(decl.without), CONSTRAINTS.read_text(), sys.version_info[:2]):
        h.update(repr(part).encode() + b"\0")
    return h.hexdigest()


def env_dir(decl: Declared) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", decl.library).strip("-")  # backends of one library share its environments
    return ENVS / f"verify-{slug}-{env_key(decl)[:10]}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _last_line(text: str) -> str:
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1]


def _pip_failure(text: str) -> str:
    """pip's failure in one line; for ResolutionImpossible, the conflicting requirements pip names ("The conflict
    is caused by: ...") and where to declare a release's own co-requirements."""
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    if not any("ResolutionImpossible" in l for l in lines):
        return _last_line(text)
    cause = []
    if "The conflict is caused by:" in lines:
        for l in lines[lines.index("The conflict is caused by:") + 1:]:
            if l.startswith(("To fix", "ERROR", "Additionally")):
                break
            cause.append(l)
    return ("pip cannot resolve the requirements (ResolutionImpossible): " + ("; ".join(cause) or _last_line(text))
            + ". Pin the co-requirements this release needs in the backend's `release_requirements`")


def ensure(decl: Declared, python: str = sys.executable, log=print, run=subprocess.run) -> Path:
    """The environment's python: built once (venv, torch, the harness --no-deps, its dependencies, the
    requirements), then reused while its stamp matches. EnvError in one line when pip cannot build it."""
    venv = env_dir(decl)
    py = venv / "bin" / "python"
    stamp = venv / STAMP
    key = env_key(decl)
    if py.exists() and stamp.is_file() and stamp.read_text() == key:
        log(f"{decl.name}: reusing {_shown(venv)}")
        return py
    log(f"{decl.name}: building {_shown(venv)} ({', '.join(decl.requirements)})")
    venv.parent.mkdir(parents=True, exist_ok=True)
    cons = venv.with_name(venv.name + ".constraints.txt")
    cons.write_text(constraints_for(decl, CONSTRAINTS.read_text()))
    plain = [r for r in decl.requirements if canonicalize_name(Requirement(r).name)
             not in {canonicalize_name(n) for n in decl.no_deps}]
    nodeps = [r for r in decl.requirements if r not in plain]
    steps = [[python, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", "-c", str(cons), "torch==2.13.0"],
             [str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
             [str(py), "-m", "pip", "install", "-q", "-c", str(cons), *harness_dependencies(decl.without), *plain]]
    if nodeps:
        steps.append([str(py), "-m", "pip", "install", "-q", "--no-deps", "-c", str(cons), *nodeps])
    for cmd in steps:
        p = run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        if p.returncode != 0:
            raise EnvError(f"{decl.name}: `{' '.join(cmd[2:5])} ...` failed: {_pip_failure(p.stderr or p.stdout)}")
    stamp.write_text(key)
    return py


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.envs NAME [--version X] [--backend-module FILE]`: build (or reuse) the environment and print
    its python."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tools.envs", description=main.__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--version", default=None)
    ap.add_argument("--backend-module", default=None)
    a = ap.parse_args(argv)
    try:
        decl = declared(a.name, a.backend_module)
        if decl is None:
            raise EnvError(f"backend {a.name!r} declares no requirements (shipped: {sorted(shipped())})")
        print(ensure(with_version(decl, a.version), log=lambda m: print(m, file=sys.stderr)))
        return 0
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
