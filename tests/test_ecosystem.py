"""The outside libraries: environments from declared requirements (tools/envs.py), the ecosystem audit
(tools/ecosystem.py), the harness without PEFT, and a planted bug per library flagged by the property naming it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import ecosystem, envs

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("text", ["loralib", "loralib>=0.1", "loralib==0.1.*", "loralib==0.1.2; python_version>'3'",
                                  "loralib @ https://x/y.whl", "loralib==0.1.2,==0.1.3", "not a requirement!",
                                  "loralib==abc"])
def test_requirement_must_be_one_exact_version(text):
    with pytest.raises(envs.EnvError):
        envs.exact(text)


def test_exact_requirement_is_accepted():
    assert str(envs.exact("Loralib==0.1.2")) == "Loralib==0.1.2"


def _write(tmp_path, body: str) -> Path:
    f = tmp_path / "mine.py"
    f.write_text(body)
    return f


def test_declarations_read_without_import(tmp_path):
    f = _write(tmp_path, "import does_not_exist\n\nclass B:\n    name = 'mine'\n    requirements = ('mylib==1.2.3', "
                         "'dep==0.1')\n    without = ('peft',)\n    no_deps = ('mylib',)\n")
    (d,) = envs.declarations(f)
    assert (d.name, d.requirements, d.without, d.no_deps, d.library) == (
        "mine", ("mylib==1.2.3", "dep==0.1"), ("peft",), ("mylib",), "mylib")
    assert envs.declared("mine", str(f)) == d
    assert envs.declared("other", str(f)) is None


@pytest.mark.parametrize("body, message", [
    ("class B:\n    name = 'b'\n    requirements = tuple(['x==1'])\n", "literal"),
    ("class B:\n    name = 'b'\n    requirements = 'x==1'\n", "tuple of str"),
    ("class B:\n    name = 'b'\n    requirements = ()\n", "empty"),
    ("class B:\n    requirements = ('x==1',)\n", "name"),
    ("class B:\n    name = 'b'\n    requirements = ('x==1',)\n    no_deps = ('y',)\n", "not among"),
    ("class B:\n    name = 'b'\n    requirements = ('torch==2.0.0',)\n", "torch"),
    ("class B:\n    name = 'b'\n    requirements = ('x==1', 'X==2')\n", "twice"),
])
def test_bad_declarations_are_one_clear_error(tmp_path, body, message):
    with pytest.raises(envs.EnvError, match=message):
        envs.declarations(_write(tmp_path, body))


def test_shipped_backends_and_their_shared_environment():
    shipped = envs.shipped()
    assert {"loralib", "loralib-merged", "torchtune"} <= set(shipped)
    a, b = envs.declared("loralib"), envs.declared("loralib-merged")
    assert envs.env_dir(a) == envs.env_dir(b)  # one library, one environment
    assert envs.env_dir(a).name.startswith("verify-loralib-")
    assert envs.declared("impl") is None and envs.declared("lora-lite") is None


def test_version_replaces_the_library_requirement_only():
    d = envs.with_version(envs.declared("torchtune"), "0.5.0")
    assert d.requirements[0] == "torchtune==0.5.0" and "torchao==0.16.0" in d.requirements
    assert envs.library_version(d) == "0.5.0"
    assert envs.env_dir(d) != envs.env_dir(envs.declared("torchtune"))
    with pytest.raises(envs.EnvError):
        envs.with_version(d, "latest")


def test_constraints_drop_pins_of_required_and_left_out_packages():
    d = envs.Declared("x", ("peft==0.13.0",), ("bitsandbytes",), (), "", "peft")
    text = envs.constraints_for(d, "# c\ntorch==2.13.0\npeft==0.21.2\nbitsandbytes==0.50.2\n")
    assert text == "# c\ntorch==2.13.0\n"
    deps = envs.harness_dependencies(("peft", "bitsandbytes"))
    assert not any(x.startswith(("torch", "peft", "bitsandbytes")) for x in deps)


class _Pip:
    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, cmd, **kw):
        self.calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            py = Path(cmd[3]) / "bin" / "python"
            py.parent.mkdir(parents=True, exist_ok=True)
            py.write_text("")
        return subprocess.CompletedProcess(cmd, 1 if len(self.calls) == self.fail_at else 0, "", "ERROR: no such version")


def test_environment_is_built_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(envs, "ENVS", tmp_path)
    d = envs.declared("torchtune")
    pip = _Pip()
    py = envs.ensure(d, run=pip, log=lambda m: None)
    flat = [" ".join(map(str, c)) for c in pip.calls]
    assert py == envs.env_dir(d) / "bin" / "python"
    assert any("torch==2.13.0" in c for c in flat) and any("--no-deps -e" in c for c in flat)
    nodeps = next(c for c in flat if "--no-deps -c" in c)
    assert "torchtune==0.6.1" in nodeps and "torchao==0.16.0" in nodeps and "tiktoken" not in nodeps
    n = len(pip.calls)
    envs.ensure(d, run=pip, log=lambda m: None)
    assert len(pip.calls) == n  # the stamp matched: nothing installed again


def test_failed_install_is_one_line_and_leaves_no_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(envs, "ENVS", tmp_path)
    d = envs.declared("loralib")
    with pytest.raises(envs.EnvError, match="no such version"):
        envs.ensure(d, run=_Pip(fail_at=4), log=lambda m: None)
    assert not (envs.env_dir(d) / envs.STAMP).exists()


# ----------------------------------------------------------------------------------------------- per-release sets


def test_each_release_gets_its_own_requirement_set():
    """`release_requirements`: a previous release gets the co-requirements its own METADATA asks for; the pinned
    release keeps `requirements`. Read from the backends' source, nothing installed."""
    lit, ada = envs.declared("litgpt"), envs.declared("adapters")
    assert envs.with_version(lit, "0.4.13").requirements == ("litgpt==0.4.13", "lightning==2.4.0.dev20240728")
    assert envs.with_version(lit, "0.5.13").requirements == lit.requirements == ("litgpt==0.5.13", "lightning==2.6.6")
    assert envs.with_version(ada, "1.2.0").requirements == ("adapters==1.2.0", "transformers==4.51.3")
    assert envs.with_version(ada, "1.3.0").requirements == ("adapters==1.3.0", "transformers==4.57.6")
    assert envs.with_version(envs.declared("loralib"), "0.1.1").requirements == ("loralib==0.1.1",)
    assert envs.env_dir(envs.with_version(ada, "1.2.0")) != envs.env_dir(ada)


def test_a_release_set_replaces_by_name_and_adds(tmp_path):
    f = _write(tmp_path, "class B:\n    name = 'mylib'\n    requirements = ('mylib==2.0', 'dep==5.0', 'other==1.0')\n"
                         "    release_requirements = {'<2': ('dep==4.1', 'extra==0.3'), '>=2.1,<3': ('dep==6.0',)}\n")
    (d,) = envs.declarations(f)
    assert envs.with_version(d, "1.7").requirements == ("mylib==1.7", "dep==4.1", "other==1.0", "extra==0.3")
    assert envs.with_version(d, "2.2").requirements == ("mylib==2.2", "dep==6.0", "other==1.0")
    assert envs.with_version(d, "2.0.1").requirements == ("mylib==2.0.1", "dep==5.0", "other==1.0")  # none matches


@pytest.mark.parametrize("rel, message", [
    ("'latest'", "must be a dict"),
    ("{'newest': ('dep==1',)}", "is not a version specifier"),
    ("{'<2': 'dep==1'}", "non-empty tuple of str"),
    ("{'<2': ()}", "non-empty tuple of str"),
    ("{'<2': ('dep>=1',)}", "not pinned to one exact version"),
    ("{'<2': ('mylib==1.0',)}", "lists the library mylib itself"),
    ("{'<2': ('dep==1', 'Dep==2')}", "twice"),
    ("{'<2': ('torch==2.0.0',)}", "torch"),
])
def test_bad_release_sets_are_one_clear_error(tmp_path, rel, message):
    body = f"class B:\n    name = 'mylib'\n    requirements = ('mylib==2.0', 'dep==5.0')\n    release_requirements = {rel}\n"
    with pytest.raises(envs.EnvError, match=message) as e:
        envs.declarations(_write(tmp_path, body))
    assert "\n" not in str(e.value)


def test_overlapping_release_sets_are_refused_for_the_version_both_match(tmp_path):
    f = _write(tmp_path, "class B:\n    name = 'mylib'\n    requirements = ('mylib==2.0', 'dep==5.0')\n"
                         "    release_requirements = {'<2': ('dep==4.0',), '>=1.5,<3': ('dep==4.5',)}\n")
    (d,) = envs.declarations(f)
    assert envs.with_version(d, "1.2").requirements == ("mylib==1.2", "dep==4.0")
    with pytest.raises(envs.EnvError, match=r"mylib 1.7 matches 2 `release_requirements` specifiers") as e:
        envs.with_version(d, "1.7")
    assert "\n" not in str(e.value)


RESOLUTION_IMPOSSIBLE = """ERROR: Cannot install adapters==1.2.0 and transformers==4.57.6 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested transformers==4.57.6
    adapters 1.2.0 depends on transformers~=4.51.3

Additionally, some packages in these conflicts have no matching distributions available for your environment:
    transformers

To fix this you could try to:
1. loosen the range of package versions you've specified
2. remove package versions to allow pip to attempt to solve the dependency conflict

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/#dealing-with-dependency-conflicts
"""


def test_an_unsatisfiable_set_is_one_line_naming_the_conflict(tmp_path, monkeypatch):
    """pip's ResolutionImpossible (the text pip 2x prints for adapters 1.2.0 beside 1.3.0's transformers) becomes
    one line naming both sides of the conflict and where a release's co-requirements are declared."""
    monkeypatch.setattr(envs, "ENVS", tmp_path)
    d = envs.Declared("adapters", ("adapters==1.2.0", "transformers==4.57.6"), library="adapters")

    def pip(cmd, **kw):
        if cmd[1:3] == ["-m", "venv"]:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 1 if "adapters==1.2.0" in cmd else 0, "", RESOLUTION_IMPOSSIBLE)

    with pytest.raises(envs.EnvError) as e:
        envs.ensure(d, run=pip, log=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg
    assert "The user requested transformers==4.57.6; adapters 1.2.0 depends on transformers~=4.51.3" in msg
    assert "release_requirements" in msg and not (envs.env_dir(d) / envs.STAMP).exists()


# ----------------------------------------------------------------------------------------------- the audit


@pytest.mark.parametrize("text", ["0", "-1", "inf", "nan", "soon"])
def test_budget_must_be_finite_positive(text):
    with pytest.raises(Exception):
        ecosystem.budget(text)
    assert ecosystem.budget("12.5") == 12.5


def test_previous_minor_else_previous_release():
    assert ecosystem.previous("0.6.1", ["0.6.1", "0.6.0", "0.5.0", "0.4.0"]) == ("0.5.0", "previous minor")
    assert ecosystem.previous("0.1.2", ["0.1.2", "0.1.1", "0.1.0"])[0] == "0.1.1"
    assert ecosystem.previous("1.0.0", ["1.0.0"]) == (None, "")


def _doc():
    def res(v, p, status, **kw):
        return {"variant": v, "property": p, "status": status, "detail": kw.get("detail", ""), "example": "Case()",
                "failure_kind": kw.get("kind"), "where": kw.get("where")}
    a = {"version": "1.0", "variants": ["lora", "dora"], "peft": True, "reused": False,
         "sites": {"dora": {"*": "liba/dora.py:10", "merge": "liba/merge.py:5"}},
         "results": [res("lora", "oracle", "pass"), res("dora", "merge", "fail", kind="assertion"),
                     res("dora", "oracle", "fail", kind="crash", where="/x/site-packages/liba/dora.py:12 in f: y"),
                     res("dora", "dropout_live", "deviation", detail="declared: \"it merges\""),
                     res("dora", "bias_invariance", "fail", kind="crash", where=f"{ROOT}/harness/probes.py:3 in g: z")]}
    b = {"version": "2.0", "variants": ["dora"], "peft": False, "reused": False, "sites": {},
         "results": [res("dora", "merge", "pass"), res("dora", "oracle", "na")]}
    return {"schema": ecosystem.SCHEMA, "run": {"date": "d", "profile": "history", "budget_s": 10, "seconds": 1,
                                                "budget_spent": False, "kept": [], "libraries": ["liba", "libb"]},
            "libraries": {"liba": {"backends": ["a"], "note": None, "releases": [
                {"version": "1.0", "role": "pinned", "status": "ran", "line": None, "seconds": 3, "reused": False,
                 "backends": {"a": a}}]},
                "libb": {"backends": ["b"], "note": None, "releases": [
                    {"version": "2.0", "role": "pinned", "status": "ran", "line": None, "seconds": 2, "reused": False,
                     "backends": {"b": b}},
                    {"version": "1.9", "role": "previous minor", "status": "error", "line": "does not import",
                     "seconds": 1, "reused": False, "backends": None}]}}}


def test_failures_classified_with_their_site():
    t = ecosystem.build(_doc()["libraries"])
    f = {(x["backend"], x["property"]): x for x in t["failures"]}
    assert f[("a", "merge")]["class"] == "real bug" and f[("a", "merge")]["site"] == "liba/merge.py:5"
    assert f[("a", "oracle")]["class"] == "real bug" and f[("a", "oracle")]["site"].startswith("liba/dora.py:12")
    assert f[("a", "dropout_live")]["class"] == "documented choice"
    assert f[("a", "bias_invariance")]["class"] == "harness limitation"
    shared = {r["variant"]: r for r in t["shared"]}
    assert set(shared) == {"dora"} and shared["dora"]["columns"] == ["a 1.0", "b 2.0"]
    merge = next(p for p in shared["dora"]["properties"] if p["property"] == "merge")
    assert merge["cells"] == {"a 1.0": "F", "b 2.0": "pass"}


def test_torchtune_dora_dropout_is_an_undocumented_choice_quoting_its_source():
    """torchtune's DoRA drops the LoRA branch's input only (dora.py:168,172,187-191): declared as a deviation read
    from the source, shown as an undocumented choice; only the train-mode mismatch is excused."""
    from harness.backends.torchtune import TorchtuneBackend
    from spec import SPECS

    be = object.__new__(TorchtuneBackend)  # the declaration needs no torchtune
    dev = be.deviation(SPECS.get("dora"), "dropout")
    assert dev.reason.startswith("undocumented") and "dora.py:168,172,187-191" in dev.source
    assert dev.matches("train-mode output is not the hand computation with the shared dropout mask (scaled error 2e4)")
    assert not dev.matches("eval-mode output differs from the no-dropout oracle (scaled error 3)")
    assert be.deviation(SPECS.get("lora"), "dropout") is None and be.deviation(SPECS.get("dora"), "oracle") is None
    r = {"status": "deviation", "detail": f"declared: {dev.reason} [{dev.source}]; observed: ..."}
    assert ecosystem.classify(r) == "undocumented choice"
    assert ecosystem.classify({**r, "detail": "declared: \"it merges\""}) == "documented choice"


def test_audit_renders_every_failure_and_release():
    md = ecosystem.render_markdown(_doc())
    assert "liba 1.0 (a), dora / merge: real bug" in md and "`liba/merge.py:5`" in md
    assert "documented choice" in md and "does not import" in md
    assert "### dora: liba, libb" in md


def test_crash_paths_are_portable_when_recorded(tmp_path, monkeypatch):
    """run_release records `where` and `detail` without this checkout's folder (or the environment's), so the audit
    JSON and its rendering are the same bytes from any folder."""
    monkeypatch.setattr(ecosystem, "RESULTS", tmp_path)
    env = f"{ROOT}/.nox/verify-liba-0123456789/lib/python3.11/site-packages"
    raw = [{"variant": "dora", "property": "oracle", "status": "fail", "failure_kind": "crash", "example": "Case()",
            "where": f"{env}/liba/dora.py:12 in f: y", "detail": f"RuntimeError: no [at {ROOT}/harness/probes.py:3 in g]"},
           {"variant": "lora", "property": "merge", "status": "pass", "detail": None, "where": None, "example": None}]
    (tmp_path / "a-1.0.json").write_text(json.dumps({"profile": "history", "backend_version": "1.0", "results": raw}))
    info = {"backend": "a", "version": "1.0", "variants": ["lora", "dora"], "sites": {}, "peft": False}
    monkeypatch.setattr(envs, "ensure", lambda decl, log=None: Path("python"))
    monkeypatch.setattr(ecosystem.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, json.dumps(info) + "\n", ""))
    decl = envs.Declared("a", ("liba==1.0",), library="liba")
    rec = ecosystem.run_release([decl], "1.0", "history", "1", True, [])
    got = rec["a"]["results"]
    assert got[0]["where"] == "liba/dora.py:12 in f: y"
    assert got[0]["detail"] == "RuntimeError: no [at harness/probes.py:3 in g]"
    assert got[1] == raw[1] and str(ROOT) not in json.dumps(rec)
    doc = _doc()
    doc["libraries"]["liba"]["releases"][0]["backends"] = {"a": {**rec["a"], "results": got}}
    here, listed = ecosystem.render_markdown(doc), ecosystem.repros()
    monkeypatch.setattr(ecosystem, "ROOT", tmp_path / "another" / "checkout")  # render from another folder
    monkeypatch.setattr(ecosystem, "repros", lambda: listed)  # (they are listed relative to the checkout)
    assert ecosystem.render_markdown(doc) == here and "liba/dora.py:12" in here


def test_rerun_replaces_only_the_named_columns_of_reused_results(tmp_path, monkeypatch):
    """--reuse --rerun P: the reused results keep every row but P's, which verify (asked for P only) replaces, and
    the stored results file carries the new rows for the next --reuse."""
    monkeypatch.setattr(ecosystem, "RESULTS", tmp_path)
    row = lambda v, p, st: {"variant": v, "property": p, "status": st, "detail": None, "where": None, "example": None}
    old = [row("lora", "oracle", "pass"), row("lora", "merge", "fail"), row("dora", "oracle", "pass")]
    (tmp_path / "a-1.0.json").write_text(json.dumps({"profile": "history", "backend_version": "1.0", "results": old}))
    info = {"backend": "a", "version": "1.0", "variants": ["lora", "dora"], "sites": {}, "peft": False}
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        if "verify" in cmd[2]:
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"results": [row("lora", "oracle", "fail"),
                                                                                   row("dora", "oracle", "na")]}))
        return subprocess.CompletedProcess(cmd, 0, json.dumps(info) + "\n", "")
    monkeypatch.setattr(envs, "ensure", lambda decl, log=None: Path("python"))
    monkeypatch.setattr(ecosystem.subprocess, "run", run)
    decl = envs.Declared("a", ("liba==1.0",), library="liba")
    rec = ecosystem.run_release([decl], "1.0", "history", "1", True, [], rerun=("oracle",))["a"]
    verify = [c for c in calls if "tools.verify" in c]
    assert len(verify) == 1 and verify[0][verify[0].index("--properties") + 1] == "oracle"
    assert sorted((x["variant"], x["property"], x["status"]) for x in rec["results"]) == [
        ("dora", "oracle", "na"), ("lora", "merge", "fail"), ("lora", "oracle", "fail")]
    assert rec["reused"] and rec["rerun"] == ["oracle"]
    assert json.loads((tmp_path / "a-1.0.json").read_text())["results"] == rec["results"]
    assert ecosystem.main(["run", "--rerun", "oracle"]) == 2  # without --reuse: one clear error


def test_unknown_library_is_refused():
    with pytest.raises(ecosystem.EcosystemError, match="unknown"):
        ecosystem.pick("loralib,nope", {"loralib": []})


# ----------------------------------------------------------------------------------------------- without PEFT


def test_harness_runs_without_peft(tmp_path):
    """With `import peft` failing, the spec oracle still runs and the PEFT references are n/a, saying why."""
    out = tmp_path / "r.json"
    (tmp_path / "no_peft" / "peft").mkdir(parents=True)  # every process of the run (verify's child too) sees it
    (tmp_path / "no_peft" / "peft" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'peft'\", name='peft')\n")
    p = subprocess.run([sys.executable, "-m", "tools.verify", "--variants", "lora", "--properties",
                        "oracle,reference_equivalence", "-n", "0", "--profile", "ci", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path / 'no_peft'}:{ROOT}"})
    assert out.is_file(), p.stdout[-2000:] + p.stderr[-2000:]
    rows = {r["property"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["oracle"]["status"] == "pass"
    assert rows["reference_equivalence"]["status"] == "na"
    assert "peft is not installed" in rows["reference_equivalence"]["detail"]


# ----------------------------------------------------------------------------------------------- planted bugs


def _library_python(library: str) -> str:
    """A python that imports the library: this one (loralib is a test dependency), else its environment from
    tools/envs.py, built here under CI; otherwise the test is skipped with the reason."""
    if importlib.util.find_spec(library) is not None:
        return sys.executable
    decl = envs.declared(library)
    py = envs.env_dir(decl) / "bin" / "python"
    if (envs.env_dir(decl) / envs.STAMP).is_file():
        return str(py)
    if os.environ.get("CI"):
        return str(envs.ensure(decl, log=lambda m: None))
    pytest.skip(f"{library} is not importable here and its environment {envs.env_dir(decl).name} is not built "
                f"(`nox -s verify -- --backend {library}` builds it; CI builds it in this test)")


@pytest.mark.parametrize("library", ["loralib", "torchtune"])
def test_planted_bug_is_flagged_by_the_property_naming_it(library):
    py = _library_python(library)
    p = subprocess.run([py, str(ROOT / "tests" / "planted_library.py"), library], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["clean"]["status"] == "pass", r["clean"]
    assert r["bug"]["status"] == "fail" and r["bug"]["failure_kind"] == "assertion", r["bug"]
    assert "oracle" in r["bug"]["detail"]


# ----------------------------------------------------------------------------------------------- not importable


@pytest.mark.parametrize("backend, module, blocked", [
    ("loralib", "harness.backends.loralib:LoralibBackend", "loralib"),
    ("torchtune", "harness.backends.torchtune:TorchtuneBackend", "torchtune"),
    ("litgpt", "harness.backends.litgpt:LitgptBackend", "litgpt"),
    ("adapters", "harness.backends.adapters:AdaptersBackend", "adapters"),
])
def test_a_backend_whose_library_does_not_import_says_which_nox_command_builds_it(monkeypatch, backend, module,
                                                                                    blocked):
    """One helper (harness/backends/library.py) for the four shipped libraries: one line, naming the command."""
    import importlib

    mod, cls = module.split(":")
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` raises ImportError
    for name in [n for n in sys.modules if n.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(RuntimeError) as e:
        getattr(importlib.import_module(mod), cls)()
    msg = str(e.value)
    assert "\n" not in msg and f"`nox -s verify -- --backend {backend}` builds its environment" in msg
    assert "(ModuleNotFoundError: " in msg and blocked in msg.split(" does not import")[0]


def test_loralib_merged_declares_every_embedding_kind_it_does_not_drive():
    """loralib-merged drives MergedLinear only: layer_kinds' embedding and scaled-embedding checks are n/a with its
    reason, never a crash in its attach_kind (a harness limitation the audit once showed)."""
    pytest.importorskip("loralib")
    from harness.backends import make
    from harness.engine import run_property
    from harness.probes import PROPERTIES
    from spec import SPECS

    be = make("loralib-merged")
    for kind in ("embedding", "scaled_embedding"):
        assert "MergedLinear" in be.unsupported(SPECS.get("lora"), kind)
    r = run_property(PROPERTIES["layer_kinds"], SPECS.get("lora"), be, "history")
    assert r.status in ("pass", "na") and r.failure_kind is None and "drives MergedLinear only" not in (r.detail or ""), \
        (r.status, r.detail)


def test_litgpt_before_0_5_declares_its_interleaved_fused_rows():
    """litgpt 0.4.x places a partly enabled fused q/k/v update on interleaved rows (its zero_pad docstring, lora.py:301);
    the spec's layout is 0.5's [q | k | v]: those cases are declared with the quote, all-enabled ones still run."""
    from harness.backends.litgpt import LitgptBackend
    from harness.strategies import Case
    from spec import SPECS

    def case(**enable):
        fields = {"r": 1, "alpha": 2.0, "head_size": 1, "n_head": 2, "n_query_groups": 2,
                  "enable_q": True, "enable_k": True, "enable_v": True, **enable}
        return Case(d_in=3, d_out=6, bias=False, dtype=torch.float32, seed=0, fields=fields, batch=(2, 3), device="cpu")

    qkv = SPECS.get("lora_qkv")
    be = object.__new__(LitgptBackend)  # the declaration needs no litgpt
    be.version = "0.4.13"
    assert "interleaved" in be.supports(qkv, case(enable_q=False, enable_k=False))
    assert be.supports(qkv, case()) is None
    be.version = "0.5.13"
    assert be.supports(qkv, case(enable_q=False, enable_k=False)) is None


def test_adapters_release_without_a_config_class_makes_the_variant_na():
    """adapters 1.2.x exports no DoRAConfig: dora is n/a for that release with the reason, never a crash row."""
    import types

    from harness.backends.adapters import AdaptersBackend
    from spec import SPECS

    be = object.__new__(AdaptersBackend)  # no adapters needed: its module is a stand-in
    be.ad, be.version = types.SimpleNamespace(LoRAConfig=object, IA3Config=object, VeraConfig=object), "1.2.0"
    assert be.applies(SPECS.get("lora")) is None and be.applies(SPECS.get("vera")) is None
    assert "adapters 1.2.0 has no DoRAConfig" in be.applies(SPECS.get("dora"))
    be.ad.DoRAConfig = object
    assert be.applies(SPECS.get("dora")) is None
