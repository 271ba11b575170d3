"""Sessions: lint, verify (main job), tests, zoo, fetch, review, cost, timeline (lora-lite's history), peft_history,
ecosystem (the outside libraries, each in its own environment).

Every session uses the virtualenv backend with pip (uv would not see the local CPU torch wheel and would
download CUDA builds) and installs with `-c constraints.txt`, which pins torch, peft and bitsandbytes exactly.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import nox
import nox.command

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "verify", "tests"]
# nox probes for uv on every run and logs "uv binary not found." (this project never uses uv)
logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")

ROOT = Path(__file__).parent
CONSTRAINTS = ROOT / "constraints.txt"


STAMP = "lora-verify-install.stamp"


def install_key(constraints: Path = CONSTRAINTS) -> str:
    """sha256 over what decides the installed packages: pyproject.toml, the constraints file and this file (which
    holds the install commands)."""
    h = hashlib.sha256()
    for f in (ROOT / "pyproject.toml", constraints, Path(__file__)):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def install(session: nox.Session, constraints: Path = CONSTRAINTS) -> None:
    """Install the project (editable) and its pinned dependencies into the session's virtualenv, unless the
    stamp in that virtualenv says this pyproject.toml, constraints file and noxfile are already installed there.
    (Source edits need no reinstall: the install is editable. Remove the stamp or the virtualenv to force one.)"""
    stamp = Path(session.virtualenv.location) / STAMP
    key = install_key(constraints)
    if stamp.is_file() and stamp.read_text() == key:
        session.log(f"install skipped: {stamp.name} matches pyproject.toml, {constraints.name} and noxfile.py")
        return
    session.install("-c", str(constraints), "torch==2.13.0")
    session.install("-c", str(constraints), "-e", ".[test]")
    stamp.write_text(key)


def _pop_option(args: list[str], name: str) -> str | None:
    """Remove `name VALUE` or `name=VALUE` from args and return VALUE."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if a.startswith(name + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


@nox.session
def verify(session: nox.Session) -> None:
    """Run every property on every variant; print the variant x property table; write build/verify/<backend>.json.

    `-- --variants lora,dora`, `-- --variant-module path/or.module`, `-- --backend peft`,
    `-- --backend peft --peft-version 0.13.2` (a separate environment with that PEFT release), `-- --device cuda`,
    `-- --backend loralib [--version 0.1.1]` (an outside library whose backend declares `requirements`: its own
    environment, tools/envs.py), `-- --backend lora-lite --ref COMMIT [--repo PATH_OR_URL]` (lora-lite at that commit, in an environment with
    its dependencies; writes build/verify/lora-lite-<commit>.json), `-- --backend-module path/or.module`.
    """
    args = list(session.posargs)
    py = library_env(session, args)
    if py is not None:  # a backend declaring `requirements`: its own environment .nox/verify-<library>-<hash>/
        session.run(str(py), "-m", "tools.verify", *args, external=True, env={"OMP_NUM_THREADS": "1"})
        return
    if _option(args, "--backend") == "lora-lite":  # --backend lora-lite --ref C [--repo R]: its own environment, that commit's deps
        py = lora_lite_env(session, _option(args, "--ref"), _option(args, "--repo") or LORA_LITE_URL)
        session.run(str(py), "-m", "tools.verify", *args, external=True, env={"OMP_NUM_THREADS": "1"})
        return
    peft_version = _pop_option(args, "--peft-version")
    if not peft_version:
        install(session)
        session.run("python", "-m", "tools.verify", *args, env={"OMP_NUM_THREADS": "1"})
        return
    # Audit another PEFT release: its own environment .nox/verify-peft-<version>/ holding only that release, in
    # front of this session's pinned environment (tools/peft_history.py); the project's own peft requirement
    # takes no part in that install. A release that cannot be installed or imported: one line, exit 2.
    backend = _pop_option(args, "--backend")
    if backend not in (None, "peft"):  # never verify PEFT under another backend's request
        session.error(f"--peft-version verifies the PEFT backend; it cannot go with --backend {backend}")
    install(session)
    session.run("python", "-m", "tools.peft_history", "one", peft_version, *args, env={"OMP_NUM_THREADS": "1"})


def library_env(session: nox.Session, args: list[str]) -> Path | None:
    """The python of the environment of `--backend NAME` (a shipped backend, or one in `--backend-module FILE`)
    when that backend declares `requirements` (tools/envs.py): built once, then reused. `--version X` (removed from
    args) replaces the library's version. None: the backend declares none (the ordinary verify environment)."""
    sys.path.insert(0, str(ROOT))
    from tools import envs

    version = _pop_option(args, "--version")
    try:
        decl = envs.declared(_option(args, "--backend"), _option(args, "--backend-module"))
        if decl is None:
            if version:
                session.error("--version applies to a backend that declares `requirements` "
                              f"(shipped: {', '.join(sorted(envs.shipped()))})")
            return None
        return envs.ensure(envs.with_version(decl, version), log=session.log)
    except envs.EnvError as e:
        session.error(str(e))


@nox.session(default=False)
def ecosystem(session: nox.Session) -> None:
    """Every shipped outside library (the backends declaring `requirements`) at its pinned release and the previous
    minor, each in its own environment; renders audits/ecosystem.md (+ .json): `-- [--libraries loralib,torchtune]
    [--budget-s 3600] [--profile history] [-n 2] [--reuse]`. One progress line per library release."""
    install(session)
    session.run("python", "-m", "tools.ecosystem", "run", *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session(default=False)
def peft_history(session: nox.Session) -> None:
    """verify the PEFT backend against a range of PEFT releases, each in its own cached environment, and render
    audits/peft_history.md (+ .json): `-- --peft-versions 0.9.0..0.21.2 --budget-s 3600 [--all-patches]
    [--profile history] [-n 2] [--reuse]`. One progress line per release."""
    install(session)
    session.run("python", "-m", "tools.peft_history", "run", *session.posargs, env={"OMP_NUM_THREADS": "1"})


LORA_LITE_URL = "https://github.com/wassname/lora-lite"


def _option(args: list[str], name: str) -> str | None:
    """The VALUE of `name VALUE` or `name=VALUE` in args (left in place)."""
    rest = list(args)
    return _pop_option(rest, name)


def lora_lite_env(session: nox.Session, ref: str | None, repo: str) -> Path:
    """A virtualenv with this project and lora-lite's dependencies at `ref` (from its pyproject.toml): one per
    set of dependencies, under .nox/verify-lora-lite-<hash>/. The ref is resolved with git in the repository
    (impl.untrusted: never an option, never a path), the dependencies validated as PEP 508 names and versions
    before pip sees them (tools.lora_lite.dependencies). The commit's source is fetched or extracted by
    tools.verify itself."""
    import hashlib

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from impl.untrusted import UntrustedInput, check_ref
    from tools.lora_lite import SourceError, dependencies, is_url, pyproject_at

    if not ref:
        session.error("--backend lora-lite needs --ref COMMIT")
    try:
        check_ref(ref, "--ref")
        if is_url(repo):
            session.run(sys.executable, "-m", "tools.verify", "--fetch-only", "--ref", ref, "--repo", repo,
                        external=True)
        _, pyproject = pyproject_at(repo, ref)
        deps = dependencies(pyproject)
    except (UntrustedInput, SourceError) as e:
        session.error(str(e))
    venv = ROOT / ".nox" / f"verify-lora-lite-{hashlib.sha256(' '.join(sorted(deps)).encode()).hexdigest()[:10]}"
    py = venv / "bin" / "python"
    stamp = venv / STAMP
    if not (py.exists() and stamp.is_file() and stamp.read_text() == "\n".join(deps)):
        session.run(sys.executable, "-m", "venv", str(venv), external=True)
        try:
            session.run(str(py), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), "torch==2.13.0", external=True)
            session.run(str(py), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), "-e", ".[test]", "--", *deps,
                        external=True)
        except nox.command.CommandFailed:
            session.error(f"lora-lite {ref}'s dependencies {deps} cannot be installed (pip failed; see above)")
        stamp.write_text("\n".join(deps))
    return py


@nox.session(default=False)
def timeline(session: nox.Session) -> None:
    """verify lora-lite at every commit of its main branch (or `-- --refs C1,C2`) from a local clone
    (`-- --repo PATH`, required): build/verify/lora-lite-<commit>.json each, and the table
    build/verify/lora-lite-timeline.{md,json}. Runs in the environment of the newest commit's dependencies."""
    args = list(session.posargs)
    repo = _option(args, "--repo")
    if not repo:
        session.error("nox -s timeline -- --repo PATH_TO_A_LORA_LITE_CLONE")
    py = lora_lite_env(session, _option(args, "--branch") or "main", repo)
    session.run(str(py), "-m", "tools.lora_lite", "timeline", *args, external=True, env={"OMP_NUM_THREADS": "1"})


LINTERS = ("ruff==0.17.6", "mypy==2.4.1")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (a focused rule set: undefined names, unused imports, syntax and runtime errors; no style) over tests/
    too, and mypy over impl/, spec/, harness/, tools/ and examples/ (configured in pyproject.toml). mypy checks every annotated
    function, and the harness is typed against the backend protocols (harness/backends/protocol.py): a property
    calling a backend member that no protocol declares fails here.

    Why mypy and not pyright, measured on this tree (2 shared cores, same lenient settings, third-party packages
    absent so their types are Any): mypy 13.6 s wall / 3.7 s CPU cold, 1.0 s warm, 175 findings before the
    noisy codes were turned off, none in the properties' use of the backend; pyright 88-99 s wall / 23-25 s CPU
    every run, 182 findings (118 argument types on torch-as-Any), and it needs node and fetches its engine from
    npm on first use. Same catch on a planted undeclared member (an attr-defined error), 6x less CPU, a plain
    wheel: mypy. Only the linters are installed (no torch): seconds, not a multi-GB environment."""
    session.install(*LINTERS)
    session.run("ruff", "check", "impl", "spec", "harness", "tools", "examples", "tests")
    session.run("mypy")


def verify_python(session: nox.Session) -> str:
    """The python of verify's virtualenv (.nox/verify), which `tests` shares: one environment, one install. Built
    (virtualenv, then `install`'s packages and stamp) when it is not there or its stamp is stale."""
    venv = ROOT / ".nox" / "verify"
    py = venv / "bin" / "python"
    if not py.exists():
        session.run(sys.executable, "-m", "virtualenv", str(venv), external=True)
    stamp, key = venv / STAMP, install_key()
    if not (stamp.is_file() and stamp.read_text() == key):
        for what in (["torch==2.13.0"], ["-e", ".[test]"]):
            session.run(str(py), "-m", "pip", "install", "-c", str(CONSTRAINTS), *what, external=True)
        stamp.write_text(key)
    return str(py)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """verify (profile ci), then the test suite (runtime, engine, zoo, fetch, reviewer, audit, cost, real models)
    on 2 workers, in verify's environment. `-- ARGS` replaces the pytest arguments and skips the verify step.
    Writes nothing outside temporary folders: verify's JSON, Hypothesis' database, no pytest cache, no bytecode."""
    import tempfile

    py = verify_python(session)
    with tempfile.TemporaryDirectory(prefix="lora-verify-tests-") as tmp:
        env = {"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "HYPOTHESIS_STORAGE_DIRECTORY": tmp}
        if not session.posargs:
            session.run(py, "-m", "tools.verify", "--profile", "ci", "--json", f"{tmp}/impl.json", env=env,
                        external=True)
        session.run(py, "-m", "pytest", "-p", "no:cacheprovider", *(session.posargs or ["tests/", "-n", "2"]),
                    env=env, external=True)


@nox.session(default=False)
def zoo(session: nox.Session) -> None:
    """Run every zoo mutant through the property that names its bug; print the detection rate; write build/zoo.json."""
    install(session)
    session.run("python", "-m", "tools.zoo", *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session(default=False)
def fetch(session: nox.Session) -> None:
    """Fetch the pinned reference sources of refs/manifest.toml into the git-ignored cache .cache/refs/."""
    install(session)
    session.run("python", "-m", "tools.fetch", *session.posargs)


@nox.session(default=False)
def review(session: nox.Session) -> None:
    """The audit pipeline, each stage once and in order: fetch the pinned references, run the zoo, run verify
    (its JSON carries the results, the spec records and the mechanical findings), review (an LLM when
    REVIEW_PROVIDER, REVIEW_MODEL and the provider's key are set, else offline), render
    audits/variants_review_vN.md. `-- --variants dora,hra` reviews a subset; `-- --offline` asks no LLM."""
    install(session)
    env = {"OMP_NUM_THREADS": "1"}
    session.run("python", "-m", "tools.fetch", success_codes=[0, 1])
    session.run("python", "-m", "tools.zoo", env=env, success_codes=[0, 1])
    session.run("python", "-m", "tools.verify", env=env, success_codes=[0, 1])
    session.run("python", "-m", "tools.review", *session.posargs, env=env, success_codes=[0, 1])
    session.run("python", "-m", "tools.render")


@nox.session(default=False)
def cost(session: nox.Session) -> None:
    """Measure parameters, MACs, time and memory per variant beside PEFT and the frozen base; write audits/cost/."""
    install(session)
    session.run("python", "-m", "tools.cost", *session.posargs)
