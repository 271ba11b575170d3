"""The backend protocol: a library that knows nothing of lora-verify (examples/tinylib.py) is verified through a
backend module (examples/tinylib_backend.py); capabilities it lacks are n/a with its reason, cases it cannot take
are not drawn, its own errors count as refusals, and a bug planted in the library is flagged by its property."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import PROPERTIES
from harness.backends import BACKENDS, load_backend_module, make
from harness.backends.protocol import CAPABILITIES, Fields, lacks
from harness.engine import run_property
from spec import SPECS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def tinylib_backend(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import tinylib_backend

    return tinylib_backend.TinylibBackend


def test_the_property_library_and_the_specs_import_no_runtime():
    """No generic property imports impl (impl is one backend among others); no spec carries a library mapping."""
    for rel in ("harness/probes.py", "harness/properties.py", "harness/differential.py"):
        tree = ast.parse((ROOT / rel).read_text())
        mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in mods if m and (m == "impl" or m.startswith("impl."))], rel
    import spec.schema

    assert "peft" not in spec.schema.Spec.__dataclass_fields__
    assert not hasattr(spec.schema, "PeftMap")


def test_a_missing_capability_is_na_with_the_backends_reason(tinylib_backend):
    be, lora = tinylib_backend(), SPECS.get("lora")
    assert lacks(be, lora, "detach") is None
    assert "tinylib has no merge" in lacks(be, lora, "detach", "merge")
    for prop, reason in (("merge", "tinylib has no merge"), ("layout", "nn.Linear layers only"),
                         ("quantized", "nn.Linear layers only"), ("config_constraints", "when it wraps a layer")):
        res = run_property(PROPERTIES[prop], lora, be, "ci")
        assert res.status == "na" and reason in res.detail, (prop, res.detail)
    with pytest.raises(ValueError, match="unknown capability"):
        lacks(be, lora, "teleport")
    assert set(CAPABILITIES) >= {p for prop in PROPERTIES.values() for p in prop.needs}


def test_cases_the_backend_cannot_take_are_not_drawn(tinylib_backend):
    """tinylib has no rsLoRA: with `supports` the rsLoRA cases are not drawn and the oracle passes; without it,
    they are, and the oracle flags tinylib's plain alpha/r scale on them."""
    lora = SPECS.get("lora")
    assert run_property(PROPERTIES["oracle"], lora, tinylib_backend(), "ci").status == "pass"

    res = run_property(PROPERTIES["oracle"], lora, _without_supports(tinylib_backend)(), "ci")
    assert res.status == "fail" and "oracle" in res.detail and "'rslora': True" in res.example

    class Nothing(tinylib_backend):
        def supports(self, spec, case):
            return "takes no case at all"

    res = run_property(PROPERTIES["oracle"], lora, Nothing(), "ci")
    assert res.status == "na" and "supports none of the drawn cases: takes no case at all" in res.detail


def _without_supports(base):
    """The backend class with its `supports` hook removed."""
    return type("Unfiltered", (base,), {"__getattribute__": _hide("supports")})


def _hide(attr):
    def get(self, name):
        if name == attr:
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    return get


def test_the_libraries_own_errors_count_as_refusals(tinylib_backend):
    """ia3 rejects dropout with tinylib's own error, which the backend declares as its config refusal."""
    res = run_property(PROPERTIES["dropout"], SPECS.get("ia3"), tinylib_backend(), "ci")
    assert res.status == "pass", res.detail


def test_fields_and_backend_modules(tmp_path):
    from harness.strategies import Case
    import torch

    f = Fields.of({"r": 8, "alpha": 16.0}, Case(3, 4, False, torch.float32, 0, {"r": 2}), {"dropout": 0.1})
    assert (f.r, f.alpha, f.dropout) == (2, 16.0, 0.1) and dict(f.fields) == {"r": 2, "alpha": 16.0, "dropout": 0.1}
    with pytest.raises(AttributeError, match="no field 'rank'"):
        f.rank
    empty = tmp_path / "empty_backend.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ValueError, match="registered no backend"):
        load_backend_module(str(empty))
    mine = tmp_path / "mine_backend.py"
    mine.write_text("from harness.backends import register\n\n@register\nclass Mine:\n    name = 'mine-test'\n")
    try:
        assert load_backend_module(str(mine)) == ["mine-test"]
        assert make("mine-test").name == "mine-test"
    finally:
        BACKENDS.pop("mine-test", None)
    with pytest.raises(KeyError, match="unknown backend 'nope'"):
        make("nope")


def _verify(tmp_path, library: str):
    """verify through the worked example on the properties the planted bug touches (every property on tinylib,
    pass or n/a, is tests/test_backend_conformance.py's)."""
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "tinylib.py").write_text(library)
    out = tmp_path / "verify.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.verify", "--backend-module", str(EXAMPLES / "tinylib_backend.py"),
         "--variants", "lora,ia3", "--properties", "identity_at_init,oracle,trainable_set,detach_restores,"
         "checkpoint_roundtrip,merge", "-n", "0", "--json", str(out), "--profile", "ci"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{lib}:{ROOT}"},
    )
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_verify_through_a_backend_module_flags_a_planted_bug(tmp_path):
    """The library as written passes; the same library with its LoRA scale dropped fails the oracle."""
    src = (EXAMPLES / "tinylib.py").read_text()
    proc, data = _verify(tmp_path, src)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert data["backend"] == "tinylib" and data["backend_version"] == "0.1"
    status = {(r["variant"], r["property"]): r["status"] for r in data["results"]}
    assert status[("lora", "oracle")] == status[("ia3", "checkpoint_roundtrip")] == "pass"
    assert status[("lora", "merge")] == "na"
    broken = src.replace("return y + (lora_scale(cfg) * (", "return y + ((")
    assert broken != src
    proc, data = _verify(tmp_path, broken)
    assert proc.returncode != 0
    failed = {(r["variant"], r["property"]) for r in data["results"] if r["status"] == "fail"}
    assert ("lora", "oracle") in failed and not any(v == "ia3" for v, _ in failed)
    assert "minimal example" in proc.stdout
