"""The litgpt and adapters backends flag a bug planted in a copy of the library, by the property that names it.

Each test copies the installed library into tmp_path, breaks LoRA's scale there (alpha / r -> alpha / (r + 1)),
and runs the `oracle` property through the backend in a fresh process that imports the copy: it must fail on the
oracle (not crash), while the same run on the library as shipped passes. Skipped where the library is not
importable (the shared test environment has neither: each has its own, see the backends' `requirements`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, sys
from harness.backends import make
from harness.engine import run_property
from harness.probes import PROPERTIES
from spec import SPECS
import {package}
assert {package}.__file__.startswith(sys.argv[1]) == (sys.argv[2] == "planted"), {package}.__file__
res = run_property(PROPERTIES["oracle"], SPECS.get("lora"), make("{backend}"), profile="history")
print(json.dumps({{"status": res.status, "kind": res.failure_kind, "detail": res.detail}}))
"""


def _needs(package: str):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not importable here: the {package} backend runs in its own environment "
                    f"(harness/backends/{package}.py `requirements`)")


def _plant(tmp_path: Path, package: str, file: str, old: str, new: str) -> Path:
    src = Path(importlib.util.find_spec(package).origin).parent
    dest = tmp_path / package
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    f = dest / file
    text = f.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {f}"
    f.write_text(text.replace(old, new))
    return tmp_path


def _oracle(package: str, backend: str, path: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", RUN.format(package=package, backend=backend), str(path), mode],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package, file, old, new", [
    ("litgpt", "lora.py", "self.scaling = self.lora_alpha / self.r",
     "self.scaling = self.lora_alpha / (self.r + 1)"),
    ("adapters", "methods/lora.py", "self.scaling = self.lora_alpha / self.r",
     "self.scaling = self.lora_alpha / (self.r + 1)"),
])
def test_planted_scale_bug_is_flagged_by_the_oracle(tmp_path, package, file, old, new):
    _needs(package)
    shipped = _oracle(package, package, tmp_path / "none", "shipped")
    assert shipped["status"] == "pass", shipped
    planted = _oracle(package, package, _plant(tmp_path, package, file, old, new), "planted")
    assert planted["status"] == "fail" and planted["kind"] == "assertion", planted
    assert "oracle" in planted["detail"], planted


CHECKPOINT = """
import json, sys
from harness.backends import make
from harness.engine import run_property
from harness.probes import PROPERTIES
from spec import SPECS
import adapters
assert adapters.__file__.startswith(sys.argv[1]) == (sys.argv[2] == "planted"), adapters.__file__
res = run_property(PROPERTIES["checkpoint_roundtrip"], SPECS.get("ia3"), make("adapters"), profile="history")
print(json.dumps({"status": res.status, "kind": res.failure_kind, "detail": res.detail}))
"""


def test_adapters_checkpoint_goes_through_save_adapter_and_load_adapter(tmp_path):
    """The adapters backend's checkpoint is adapters' own save_adapter / load_adapter: IA3 round-trips bit-exactly
    as shipped, and a copy of adapters whose save_adapter leaves out the LoRA-family weights (its filter,
    adapters/loading.py) fails `checkpoint_roundtrip` on the loaded output."""
    _needs("adapters")

    def run(path: Path, mode: str) -> dict:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)]), "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", CHECKPOINT, str(path), mode], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    shipped = run(tmp_path / "none", "shipped")
    assert shipped["status"] == "pass", shipped
    planted = run(_plant(tmp_path, "adapters", "loading.py", '".loras.{}.".format(adapter_name) in x',
                         '".loras_left_out.{}.".format(adapter_name) in x'), "planted")
    assert planted["status"] == "fail" and "loaded output differs" in planted["detail"], planted
