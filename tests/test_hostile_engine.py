"""Hostile input, engine and verify side (issue 35): crashes of any kind are rows (4), backend names never paths (5),
a per-property deadline (7), a clean torch state per item (8), capped row texts (10), one bad value never loses
the run (12), shipped backend names not spoofable and --backend never dropped (13), one line for what cannot be
loaded (14). The misbehaving backend of the verify runs is tests/hostile_backend.py."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

import harness.backends as backends
from harness import PROPERTIES
from harness.backends import ImplBackend, load_backend_module, register
from harness.engine import TEXT_CAP, run_property
from spec import SPECS

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "tests" / "hostile_backend.py"
LORA = SPECS.get("lora")


def verify(tmp_path: Path, hostile: str, variants: str, workers: str, *extra: str, json_name: str = "out.json"):
    """tools.verify on the hostile backend (property gradient_pattern, profile ci): (process, its JSON or None)."""
    out = tmp_path / json_name
    proc = subprocess.run(
        [sys.executable, "-m", "tools.verify", "--backend-module", str(HOSTILE), "--variants", variants,
         "--properties", "gradient_pattern", "--profile", "ci", "-n", workers, "--json", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "HOSTILE": hostile, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return proc, (json.loads(out.read_text()) if out.is_file() else None)


def rows(data: dict) -> dict[str, dict]:
    return {r["variant"]: r for r in data["results"]}


# ------------------------------------------------------------------ one -n 0 run: os._exit, a state leak, a version object
PREVIOUS = '{"results": [], "schema": "an earlier run"}\n'


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    """-n 0: dora's attach calls os._exit(3); ia3's leaves grad mode off and float64 as the default dtype; lora is
    correct. The backend's version is an object; a previous JSON is at the output path."""
    tmp = tmp_path_factory.mktemp("serial")
    (tmp / "out.json").write_text(PREVIOUS)
    proc, data = verify(tmp, "dora=exit,ia3=leak", "dora,ia3,lora", "0")
    return proc, data, tmp


def test_os_exit_under_n0_is_a_crash_row_and_the_run_goes_on(serial_run):  # class 4
    proc, data, _ = serial_run
    assert data is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    dora = rows(data)["dora"]
    assert (dora["status"], dora["failure_kind"]) == ("fail", "crash")
    assert "died while running it (exit status 3" in dora["detail"]
    assert rows(data)["lora"]["status"] == "pass"  # the items after it ran
    assert data["summary"]["fail"] >= 1 and " 0 fail" not in proc.stdout
    assert proc.returncode == 1


def test_torch_state_leaked_by_one_item_does_not_reach_the_next(serial_run):  # class 8
    proc, data, _ = serial_run
    assert data is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert rows(data)["ia3"]["status"] == "fail"  # the leaking item itself
    assert rows(data)["lora"]["status"] == "pass", rows(data)["lora"]["detail"]


def test_the_table_and_the_json_are_written_and_the_previous_json_kept(serial_run):  # class 12
    proc, data, tmp = serial_run
    assert "legend:" in proc.stdout and "lora" in proc.stdout  # the table
    assert data is not None and data["backend"] == "hostile"
    assert (tmp / "out.prev.json").read_text() == PREVIOUS  # the previous run, kept beside it


def test_an_unserialisable_backend_version_is_refused_before_the_run(tmp_path):  # class 12, at its root
    """check_backend refuses a version that is not a str in one line, before any property runs."""
    proc, data = verify(tmp_path, "version=object", "lora", "0")
    assert proc.returncode == 6 and data is None
    assert "version is" in proc.stderr and "not a str or None" in proc.stderr and "Traceback" not in proc.stderr


def test_a_value_json_cannot_hold_is_written_as_its_text():  # class 12: nothing else can lose the results
    from harness.engine import encode_json

    class Odd:
        def __str__(self) -> str:
            return "odd-value"

    assert "odd-value" in encode_json({"x": Odd()}).decode()


def test_the_previous_json_stays_when_the_new_one_cannot_be_encoded(tmp_path, monkeypatch):  # class 12
    """keep_previous copies: until the new JSON replaces it, the previous one stays at its path."""
    from harness.plugin import keep_previous

    path = tmp_path / "r.json"
    path.write_text(PREVIOUS)
    prev, why = keep_previous(path)
    assert path.read_text() == PREVIOUS and prev.read_text() == PREVIOUS and isinstance(why, list)


# ------------------------------------------------------------------ -n 2: a worker that segfaults, SystemExit
def test_a_killed_worker_and_system_exit_are_crash_rows_under_xdist(tmp_path):  # class 4
    proc, data = verify(tmp_path, "dora=segv,ia3=sysexit", "dora,ia3,lora", "2")
    assert data is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = rows(data)
    assert (got["dora"]["status"], got["dora"]["failure_kind"]) == ("fail", "crash")
    assert "crashed while running" in got["dora"]["detail"]
    assert (got["ia3"]["status"], got["ia3"]["failure_kind"]) == ("fail", "crash")
    assert got["ia3"]["detail"].startswith("SystemExit: 7")
    assert got["lora"]["status"] == "pass"
    assert data["summary"]["fail"] == 2 and proc.returncode == 1


# ------------------------------------------------------------------ class 4, in process
class Raising(ImplBackend):
    name = "raising"
    error: BaseException = SystemExit(7)

    def attach(self, *a, **k):
        raise self.error


def test_system_exit_in_a_backend_is_a_crash_row():  # class 4
    res = run_property(PROPERTIES["oracle"], LORA, Raising(), "ci")
    assert (res.status, res.failure_kind) == ("fail", "crash") and res.detail.startswith("SystemExit: 7")


def test_a_keyboard_interrupt_without_ctrl_c_is_a_crash_row():  # class 4
    be = Raising()
    be.error = KeyboardInterrupt()
    res = run_property(PROPERTIES["oracle"], LORA, be, "ci", interrupted=lambda: False)
    assert (res.status, res.failure_kind) == ("fail", "crash") and res.detail.startswith("KeyboardInterrupt")
    with pytest.raises(KeyboardInterrupt):  # the user's Ctrl-C still stops the run
        run_property(PROPERTIES["oracle"], LORA, be, "ci", interrupted=lambda: True)


# ------------------------------------------------------------------ class 5 and 13: names
@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(backends, "BACKENDS", {"impl": ImplBackend})


@pytest.mark.parametrize("name", ["../../tmp/evil", "a/b", ".hidden", "x" * 65, "ok\nname"])
def test_a_path_shaped_backend_name_is_refused(fresh_registry, name):  # class 5
    cls = type("Evil", (ImplBackend,), {"name": name})
    with pytest.raises(ValueError, match="is not a plain name"):
        register(cls)
    assert name not in backends.BACKENDS


def test_a_path_shaped_results_stem_is_refused():  # class 5
    from harness.plugin import results_path

    class Cfg:
        def getoption(self, name):
            return None

    be = ImplBackend()
    assert results_path(Cfg(), be) == Path("build/verify/impl.json")
    be.results_stem = "../../../tmp/evil"
    with pytest.raises(pytest.UsageError, match="is not a plain name"):
        results_path(Cfg(), be)


@pytest.mark.parametrize("name", ["peft", "impl", "lora-lite"])
def test_a_backend_module_cannot_take_a_shipped_name(fresh_registry, tmp_path, name):  # class 13
    with pytest.raises(ValueError, match="shipped backend"):
        register(type("Spoof", (ImplBackend,), {"name": name}))
    mod = tmp_path / f"spoof_{name.replace('-', '_')}.py"  # without register: straight into BACKENDS
    mod.write_text("import harness.backends as b\n"
                   f"b.BACKENDS[{name!r}] = type('Spoof', (b.ImplBackend,), {{'name': {name!r}}})\n")
    with pytest.raises(ValueError, match="shipped backend|replaced the registered backend"):
        load_backend_module(str(mod))
    assert backends.BACKENDS == {"impl": ImplBackend}


def _noxfile(monkeypatch):
    """noxfile.py imported with a stand-in `nox` module (nox is not installed in the test environment)."""
    fake = types.ModuleType("nox")
    fake.options = types.SimpleNamespace()
    fake.Session = object
    fake.session = lambda *a, **k: a[0] if a and callable(a[0]) else (lambda f: f)
    fake.command = types.ModuleType("nox.command")
    fake.command.CommandFailed = type("CommandFailed", (Exception,), {})
    monkeypatch.setitem(sys.modules, "nox", fake)
    monkeypatch.setitem(sys.modules, "nox.command", fake.command)
    spec = importlib.util.spec_from_file_location("noxfile_under_test", ROOT / "noxfile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Session:
    def __init__(self, posargs, location):
        self.posargs, self.runs = posargs, []
        self.virtualenv = types.SimpleNamespace(location=str(location))

    def error(self, msg):
        raise RuntimeError(msg)

    def run(self, *args, **kw):
        self.runs.append(args)

    install = log = run


def test_nox_verify_never_drops_backend_for_peft_version(monkeypatch, tmp_path):  # class 13
    nf = _noxfile(monkeypatch)
    s = Session(["--backend", "impl", "--peft-version", "0.13.2"], tmp_path)
    with pytest.raises(RuntimeError, match="cannot go with --backend impl"):
        nf.verify(s)
    assert not any("tools.peft_history" in a for r in s.runs for a in r)
    ok = Session(["--backend", "peft", "--peft-version", "0.13.2", "--variants", "lora"], tmp_path)
    nf.verify(ok)
    assert ok.runs[-1][:5] == ("python", "-m", "tools.peft_history", "one", "0.13.2")


def test_tools_verify_refuses_peft_version_with_another_backend(capsys):  # class 13
    from tools.verify import main

    with pytest.raises(SystemExit) as e:
        main(["--backend", "impl", "--peft-version", "0.13.2"])
    assert e.value.code == 2 and "cannot go with --backend impl" in capsys.readouterr().err


# ------------------------------------------------------------------ class 7: deadline
class Sleeper(ImplBackend):
    name = "sleeper"

    def attach(self, *a, **k):
        time.sleep(10**6)


class Spinner(ImplBackend):
    name = "spinner"

    def attach(self, *a, **k):
        while True:
            pass


@pytest.mark.parametrize("backend", [Sleeper, Spinner])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # a signal landing in a gc callback
def test_a_backend_that_never_returns_is_a_failed_row_naming_the_limit(backend):  # class 7
    assert threading.current_thread() is threading.main_thread()  # the deadline is a signal: main thread only
    before = signal.getsignal(signal.SIGALRM)
    res = run_property(PROPERTIES["oracle"], LORA, backend(), "ci", deadline_s=0.5)
    assert (res.status, res.failure_kind) == ("fail", "crash")
    assert "deadline of 0.5 s" in res.detail and res.examples == 1
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert run_property(PROPERTIES["oracle"], LORA, ImplBackend(), "ci", deadline_s=0.5 * 10**4).status == "pass"


# ------------------------------------------------------------------ class 8: the suite's own items
LEAKY_TESTS = '''
import torch

KEEP = []

def test_a_leaks():
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(3)
    mode = torch.inference_mode()
    mode.__enter__()
    KEEP.append(mode)

def test_b_starts_clean():
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert torch.get_default_dtype() == torch.float32
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
'''


def test_the_suites_items_start_from_a_clean_torch_state(tmp_path):  # class 8
    (tmp_path / "test_leaky.py").write_text(LEAKY_TESTS)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-p", "no:randomly", f"--rootdir={tmp_path}", str(tmp_path / "test_leaky.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:]


def test_verify_items_start_with_grad_mode_on(monkeypatch):  # class 8: the plugin's wrapper, in process
    from harness.torch_state import CleanTorchState

    clean = CleanTorchState()
    torch.set_grad_enabled(False)
    wrapper = clean.pytest_runtest_protocol(None, None)
    try:
        next(wrapper)
        assert torch.is_grad_enabled()
    finally:
        wrapper.close()
        torch.set_grad_enabled(True)


# ------------------------------------------------------------------ class 10: a 5 MB exception message
class Loud(ImplBackend):
    name = "loud"

    def attach(self, *a, **k):
        raise RuntimeError("x" * 5_000_000)


def test_a_huge_exception_message_is_capped_in_the_row():  # class 10
    res = run_property(PROPERTIES["oracle"], LORA, Loud(), "ci")
    row = res.to_json()
    assert res.status == "fail" and len(json.dumps(row)) < 4 * TEXT_CAP
    assert f"{5_000_000 - TEXT_CAP} more characters cut" in row["detail"]
    assert len(res.detail) < 2 * TEXT_CAP  # capped where it was made, not only when stored


# ------------------------------------------------------------------ class 14: one line, a distinct exit code
BAD_MODULES = {"syntax": "def broken(:\n", "import": "import no_such_module_h35\n",
               "kbint": "raise KeyboardInterrupt\n", "sysexit": "raise SystemExit(5)\n"}


class Opts:
    def __init__(self, **o):
        self.o = o

    def getoption(self, name):
        return self.o.get(name)


@pytest.mark.parametrize("kind", sorted(BAD_MODULES))
def test_a_backend_module_that_fails_to_import_is_one_line(tmp_path, kind):  # class 14
    from harness.plugin import _backend

    mod = tmp_path / f"bad_{kind}.py"
    mod.write_text(BAD_MODULES[kind])
    with pytest.raises(pytest.UsageError) as e:
        _backend(Opts(backend_module=[str(mod)]))
    msg = str(e.value)
    assert "\n" not in msg and f"--backend-module {mod} cannot be loaded" in msg
    assert {"syntax": "SyntaxError", "import": "ModuleNotFoundError", "kbint": "KeyboardInterrupt",
            "sysexit": "SystemExit"}[kind] in msg


def test_keyboard_interrupt_at_backend_import_exits_4_with_one_line(tmp_path):  # class 14
    mod = tmp_path / "bad_kbint.py"
    mod.write_text(BAD_MODULES["kbint"])
    proc = subprocess.run([sys.executable, "-m", "tools.verify", "--backend-module", str(mod), "-n", "0",
                           "--json", str(tmp_path / "o.json")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]  # pytest's usage error: neither a verify failure (1) nor INTERNALERROR (3)
    assert "Traceback" not in out and "INTERNALERROR" not in out
    lines = [l for l in out.splitlines() if "cannot be loaded" in l]
    assert len(lines) == 1 and "KeyboardInterrupt" in lines[0]


def test_an_overlong_peft_version_is_one_line_before_any_file(monkeypatch, tmp_path, capsys):  # class 14
    from tools import peft_history as P

    monkeypatch.setattr(P, "ENVS", tmp_path / "envs")
    v = "1" * 300
    assert P.main(["one", v]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "300 characters" in err and len(err) < 300
    assert not (tmp_path / "envs").exists()
    from tools.verify import main

    with pytest.raises(SystemExit) as e:
        main(["--backend", "peft", "--peft-version", v])
    assert e.value.code == 2 and "300 characters" in capsys.readouterr().err


def test_a_cached_peft_environment_that_imports_badly_is_rebuilt_once(monkeypatch, tmp_path):  # class 14
    from tools import peft_history as P

    monkeypatch.setattr(P, "ENVS", tmp_path)
    version = "0.13.2"
    site = P.env_dir(version) / "site"
    (site / "peft").mkdir(parents=True)
    (site / "peft" / "__init__.py").write_text("raise ImportError('edited')\n")
    (P.env_dir(version) / P.STAMP).write_text(version)
    pips, good = [], {"rebuild": True}

    def pip(cmd, **kw):  # stands in for `pip install --target SITE peft==V`
        pips.append(cmd)
        (site / "peft").mkdir(parents=True, exist_ok=True)
        (site / "peft" / "__init__.py").write_text("" if good["rebuild"] else "raise ImportError('still')\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def probe(v, s, python=sys.executable):  # stands in for importing the release in a child process
        if "ImportError" in (s / "peft" / "__init__.py").read_text():
            raise P.ReleaseError(f"peft {v}: the PEFT backend does not import: ImportError")
        return {"version": v, "shims": [], "transformers": "x"}

    real = P.ensure_env
    monkeypatch.setattr(P, "ensure_env", lambda v, python=sys.executable: real(v, python, run=pip))
    monkeypatch.setattr(P, "probe", probe)
    monkeypatch.setattr(P.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0))
    assert P.verify_release(version, []) == 0 and len(pips) == 1  # rebuilt, then verified
    good["rebuild"] = False
    (site / "peft" / "__init__.py").write_text("raise ImportError('edited')\n")
    with pytest.raises(P.ReleaseError, match="does not import"):
        P.verify_release(version, [])
    assert len(pips) == 2  # once more, not in a loop
