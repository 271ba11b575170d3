"""A newcomer's own variant, end to end, from the documentation alone.

The VeRA-like worked example of docs/writing_a_variant.md (shared frozen matrices, its own rank rule, a
constant init) is copied into a temporary folder outside the repository and verified by the verify command
(what `nox -s verify -- --variant-module ...` runs after its install); planted bugs are reported where they are.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import impl
from harness.engine import changes, crash_site, table
from impl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "writing_a_variant.md"


def doc_example(name: str = "vera_x") -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (block,) = [b for b in blocks if f'name = "{name}"' in b]
    return block


def verify(tmp_path, module: Path, *extra: str, variant: str = "vera_x"):
    out = tmp_path / "verify.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.verify", "--variant-module", str(module), "--variants", variant, "-n", "0",
         "--json", str(out), "--profile", "ci", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    data = json.loads(out.read_text()) if out.exists() else None
    return proc, data, {r["property"]: r for r in data["results"]} if data else {}


def plant(tmp_path, old: str, new: str) -> tuple[Path, int]:
    """The documented example with one line changed, and a chatty library logger (DEBUG records on every
    attach) as third-party code has; returns (module path, the changed line's number)."""
    src = doc_example()
    assert src.count(old) == 1, old
    src = src.replace(old, new).replace("    def tensors(self, d_in, d_out, cfg):\n", "    def tensors(self, d_in, d_out, cfg):\n"
                                        "        CHATTY.debug('chatty library record')\n")
    mod = tmp_path / "vera_x.py"
    mod.write_text("import logging\nCHATTY = logging.getLogger('chatty')\nCHATTY.setLevel(logging.DEBUG)\n" + src)
    line = next(i for i, text in enumerate(mod.read_text().splitlines(), 1) if new in text)
    return mod, line


def test_documented_variant_passes_then_bugs_are_reported_where_they_are(tmp_path):
    assert not str(tmp_path.resolve()).startswith(str(ROOT))
    mod = tmp_path / "vera_x.py"
    mod.write_text(doc_example())
    proc, data, res = verify(tmp_path, mod)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert set(r["status"] for r in res.values()) <= {"pass", "na"}
    for name in ("oracle", "init_formula", "gradient_pattern", "checkpoint_roundtrip", "tensor_sharing", "merge"):
        assert res[name]["status"] == "pass", res[name]
    assert res["rank_limit"]["status"] == "na"  # the spec declares no rank limit (max_rank=None) ...
    assert "DEBUG" not in proc.stdout and "INTERNALERROR" not in proc.stdout

    # a shape bug in forward: every crash names the user's file and line, and the table marks it E
    mod, line = plant(tmp_path, "* ad.b).to(y.dtype)", "* ad.b[:2]).to(y.dtype)")
    proc, _, res = verify(tmp_path, mod, "--properties", "oracle,merge,init_formula")
    assert proc.returncode != 0
    for name in ("oracle", "merge"):
        r = res[name]
        assert r["status"] == "fail" and r["failure_kind"] == "crash", r
        assert r["where"].startswith(f"{mod}:{line} in forward"), r["where"]
        assert f"{mod}:{line}" in r["detail"] and r["example"].startswith("Case(")
    assert f"{mod}:{line}" in proc.stdout
    assert "chatty" not in proc.stdout + proc.stderr  # library logging stays off below ERROR ...
    assert re.search(r"^vera_x\s+E\s+E\s+\.\s*$", proc.stdout, flags=re.M), proc.stdout[-2000:]
    assert "new failures (2): vera_x/oracle, vera_x/merge" in proc.stdout  # against the run before it
    assert (tmp_path / "verify.prev.json").exists()

    # an init bug (d starts at 1.0, the paper's 0.1 in the spec): flagged by the property that names it
    mod, _ = plant(tmp_path, '"d": TensorDecl((cfg.r,), 0.1)', '"d": TensorDecl((cfg.r,), 1.0)')
    proc, _, res = verify(tmp_path, mod, "--properties", "init_formula,oracle", "--log-level", "DEBUG")
    assert proc.returncode != 0
    r = res["init_formula"]
    assert r["status"] == "fail" and r["failure_kind"] == "assertion" and "'d'" in r["detail"], r
    assert res["oracle"]["status"] == "pass"
    assert "fixed (1): vera_x/oracle" in proc.stdout
    assert "chatty library record" in proc.stdout + proc.stderr  # ... unless asked for


RESIDUAL_PROPS = "identity_at_init,init_formula,oracle,dropout,merge,merge_oracle,checkpoint_roundtrip,quantized"


def test_documented_residual_variant_passes_and_a_residual_bug_is_flagged_by_the_init_checks(tmp_path):
    """The OLoRA-like example of "Variants that rewrite the base weight": its oracle reads the residual as W, its
    init_oracle the original weight; it passes (float64 cases included, quantized layers refused without declaring
    `quantized = False`). A residual that drops the scale fails identity_at_init and init_formula, and the oracle,
    given the residual, cannot see it (the page's table)."""
    mod = tmp_path / "olora_x.py"
    mod.write_text(doc_example("olora_x"))
    proc, _, res = verify(tmp_path, mod, "--properties", RESIDUAL_PROPS, variant="olora_x")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {n: r["status"] for n, r in res.items()} == dict.fromkeys(RESIDUAL_PROPS.split(","), "pass")

    old = "return W - cfg.alpha / cfg.r * (ad.B.to(W.dtype) @ ad.A.to(W.dtype))"
    src = doc_example("olora_x")
    assert src.count(old) == 1
    mod.write_text(src.replace(old, "return W - ad.B.to(W.dtype) @ ad.A.to(W.dtype)"))
    proc, _, res = verify(tmp_path, mod, "--properties", "identity_at_init,init_formula,oracle", variant="olora_x")
    assert proc.returncode != 0
    assert res["identity_at_init"]["status"] == "fail" and "identity off by" in res["identity_at_init"]["detail"]
    r = res["init_formula"]
    assert r["status"] == "fail" and r["failure_kind"] == "assertion" and "'base_weight'" in r["detail"], r
    assert res["oracle"]["status"] == "pass"


def test_shared_frozen_tensors_declared_but_copied_are_flagged(tmp_path):
    mod, _ = plant(tmp_path, '"B": TensorDecl((d_out, cfg.r), "kaiming", trainable=False, shared=True)',
                   '"B": TensorDecl((d_out, cfg.r), "kaiming", trainable=False)')
    proc, _, res = verify(tmp_path, mod, "--properties", "tensor_sharing")
    assert proc.returncode != 0
    r = res["tensor_sharing"]
    assert r["status"] == "fail" and r["failure_kind"] == "assertion" and "'B' is declared shared" in r["detail"], r


def test_a_broken_user_module_gives_one_error_naming_file_and_line(tmp_path):
    mod, line = plant(tmp_path, "    def merged(self, ad, W, b):", "    def merged(self, ad, W, b)")
    proc, data, _ = verify(tmp_path, mod)
    assert proc.returncode != 0 and data is None
    out = (proc.stdout + proc.stderr).strip()
    assert "INTERNALERROR" not in out and "Traceback" not in out
    errors = [ln for ln in out.splitlines() if ln.startswith("ERROR")]
    assert errors == [f"ERROR: variant module {mod}: {mod}:{line}: SyntaxError: expected ':'"], out


def test_import_time_error_names_the_user_line(tmp_path):
    mod = tmp_path / "bad_import.py"
    mod.write_text("import torch\n\nx = torch.zeros(2) @ torch.zeros(3)\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(mod))}:3: RuntimeError"):
        impl.load_variant_module(str(mod))


def test_readme_and_docs_state_only_counts_the_code_gives():
    from harness import PROPERTIES
    from spec import SPECS

    actual = {"properties": len(PROPERTIES), "variants": len(SPECS.names())}
    for path in (ROOT / "README.md", DOC):
        for n, what in re.findall(r"\b(\d+) (properties|variants)\b", path.read_text()):
            assert int(n) == actual[what], f"{path.name} says {n} {what}; the code has {actual[what]}"


def test_documented_ad_names_exist_on_a_live_adapter():
    names = set(re.findall(r"`ad\.([a-z_]+)", DOC.read_text())) - {"A", "B"}
    assert {"cfg", "drop", "knobs", "weight", "d_in", "param_dtype"} <= names
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    impl.attach(model, impl.config("lora", r=2, target_names=(r"^0$",)))
    ad = impl.adapters(model)["0"]
    assert [n for n in sorted(names) if not hasattr(ad, n)] == []
    assert hasattr(ad, "A") and hasattr(ad, "B")


@pytest.mark.parametrize("kw, needle", [
    ({"init": "kaiming-uniform"}, "'zeros', 'ones', 'kaiming', 'empty'"),
    ({"init": True}, "is not one of"),
    ({"shared": True}, "only frozen tensors"),
    ({"shape": (2.0, 3)}, "shape must be a tuple"),
])
def test_tensor_decl_refuses_what_the_runtime_cannot_build(kw, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        impl.TensorDecl(**{"shape": (2, 3), **kw})


def test_constant_init_fills_every_entry():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    impl.attach(model, impl.config("lora", r=2, target_names=(r"^0$",)))
    ad = impl.adapters(model)["0"]
    t = ad.add("extra", impl.TensorDecl((3,), 0.25))
    assert torch.equal(t.detach(), torch.full((3,), 0.25))


def test_a_spec_without_rank_limit_draws_ranks_above_the_width():
    from hypothesis import find, settings
    from hypothesis.errors import NoSuchExample

    from harness.strategies import cases
    from spec import SPECS

    c = find(cases(SPECS.get("ia3")), lambda c: c.fields["r"] > min(c.d_in, c.d_out),
             settings=settings(derandomize=True, database=None))
    assert SPECS.get("ia3").max_rank is None and c.fields["r"] > min(c.d_in, c.d_out)
    lora = SPECS.get("lora")
    with pytest.raises(NoSuchExample):
        find(cases(lora), lambda c: c.fields["r"] > lora.rank_limit(c.d_in, c.d_out),
             settings=settings(derandomize=True, database=None, max_examples=50))


def test_changes_between_runs():
    prev = [{"variant": "v", "property": p, "status": s} for p, s in
            (("a", "pass"), ("b", "fail"), ("c", "na"), ("d", "pass"))]
    cur = [{"variant": "v", "property": p, "status": s} for p, s in
           (("a", "fail"), ("b", "pass"), ("c", "pass"), ("d", "pass"), ("e", "fail"))]
    assert changes(prev, cur) == {"new_failures": ["v/a"], "fixed": ["v/b"], "other": ["v/c: na -> pass"],
                                  "new": ["v/e: fail"]}


def test_crash_site_prefers_the_variant_file_and_table_marks_crashes(tmp_path):
    user = tmp_path / "user_mod.py"
    user.write_text("def f(x):\n    return g(x)\n\ndef g(x):\n    return x[5]\n")
    ns: dict = {}
    exec(compile(user.read_text(), str(user), "exec"), ns)
    try:
        ns["f"]([1])
    except IndexError as e:
        assert crash_site(e, {str(user)}) == f"{user}:5 in g: return x[5]"
    rows = [{"variant": "v", "property": "p", "status": "fail", "failure_kind": "crash"},
            {"variant": "v", "property": "q", "status": "fail", "failure_kind": "assertion"}]
    assert table(rows, ["v"], ["p", "q"]).splitlines()[1].split() == ["v", "E", "F"]


def test_verify_help_explains_the_flags_this_page_uses(capsys):
    """`python -m tools.verify --help` says what --variants, --properties, --variant-module, --json and -n take
    (a newcomer's trial found them bare)."""
    from tools.verify import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--variants VARIANTS comma-separated variant names", "legend, e.g. oracle,merge",
                   "registering a variant", "under the current folder", "0 or 1: one supervised process"):
        assert needle in text, needle
