"""A researcher's second day (issue 37): deterministic inference after attach/load into an eval() model, declared
deviations that cannot match by accident, a tiny start judged only where the dtype can represent it, an init left
unchecked shown as such, and a selection's own results file."""
from __future__ import annotations

import contextlib

import pytest
import torch

import impl
from harness import PROPERTIES
from harness.backends import ImplBackend
from harness.engine import run_property
from harness.models import single
from impl import TensorDecl, Variant
from impl.registry import REGISTRY
from spec import SPECS, Spec, TensorSpec
from spec.schema import Deviation


# ----------------------------------------------------------------------------------------------- eval() after attach


@pytest.mark.parametrize("variant", ["lora", "dora", "delora"])
def test_attach_and_load_into_eval_model_are_deterministic(variant, tmp_path):
    torch.manual_seed(0)
    W = torch.randn(6, 5, dtype=torch.float64)
    model = single(W, None, torch.float32, "linear", "cpu").eval()
    impl.attach(model, impl.config(variant, r=2, alpha=4.0, dropout=0.5, target_names=(r"^layer$",)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    x = torch.randn(3, 5)
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)
    impl.save(model, tmp_path / "a.safetensors")
    fresh = single(W, None, torch.float32, "linear", "cpu").eval()
    impl.load(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        z1, z2 = fresh(x), fresh(x)
    assert torch.equal(z1, z2) and torch.equal(z1, y1)
    fresh.train()  # and the adapter follows the host back into train mode: dropout acts again
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.equal(fresh(x), fresh(x))


# ----------------------------------------------------------------------------------------------- Deviation.match


def test_deviation_match_is_token_bounded():
    d = Deviation("identity_at_init", "why", match="measured 0")
    assert d.matches("declared start size 0.01, measured 0 in float32")
    assert not d.matches("declared start size 0.01, measured 0.0286 in float32")
    assert not Deviation("dropout", "why", match="accepted").matches("dropout=0.3 unaccepted")
    assert Deviation("layout", "why", match="Conv1D").matches("refused (Conv1D)")
    assert Deviation("p", "why", match=r"eps\(torch\.float64\)").matches("beyond 64 eps(torch.float64) here")
    assert Deviation("p", "why").matches("anything at all")  # no match: every failure of the property
    with pytest.raises(ValueError, match="not a regular expression"):
        Deviation("p", "why", match="eps(")


def test_every_declared_match_compiles():
    for name in SPECS.names():
        for d in SPECS.get(name).deviations:
            assert d.matches(d.match.replace("\\", "")) or "\\" not in d.match, (name, d.property, d.match)


# ----------------------------------------------------------------------------------------------- tiny starts

TINY = 1e-5  # a paper-scale start: B ~ N(0, 1e-5²) on a frozen kaiming A


class TinyStart(Variant):
    name = "h37_tiny_start"
    zero = False  # the bug: B = 0, so the declared start is not there

    def tensors(self, d_in, d_out, cfg):
        return {"A": TensorDecl((cfg.r, d_in), "kaiming", trainable=False), "B": TensorDecl((d_out, cfg.r), "empty")}

    def init(self, ad, W, cfg):
        if not self.zero:
            ad.B.normal_(0.0, TINY)
        return None

    def forward(self, ad, x, y):
        return y + ((ad.drop(x).to(ad.B.dtype) @ ad.A.to(ad.B.dtype).t() @ ad.B.t()) * (ad.cfg.alpha / ad.cfg.r)).to(y.dtype)


class TinyStartZero(TinyStart):
    name = "h37_tiny_start_zero"
    zero = True


def _oracle(W, b, T, x, cfg, knobs, xd=None):
    xd = x if xd is None else xd
    return x @ W.T + (0 if b is None else b) + (cfg.alpha / cfg.r) * (xd @ T["A"].T @ T["B"].T)


def _spec(name):
    return Spec(name=name, title="tiny start", equation="y = W x + s B A x", oracle=_oracle,
                tensors=(TensorSpec("A", "(r, d_in)", "kaiming-uniform", trainable=False),
                         TensorSpec("B", "(d_out, r)", f"N(0, {TINY}²)")),
                param_count="d_out * r", identity="non_identity", init_shrink=1e-3)


@contextlib.contextmanager
def registered(cls):
    REGISTRY.register(cls)
    try:
        yield _spec(cls.name)
    finally:
        REGISTRY.unregister(cls.name)


def test_tiny_start_is_judged_only_where_the_dtype_represents_it():
    with registered(TinyStart) as spec:
        res = run_property(PROPERTIES["identity_at_init"], spec, ImplBackend())
    assert res.status == "pass", res.detail
    assert "judged in float32" in res.detail and "judged in float64" in res.detail
    assert "not judged in bfloat16" in res.detail  # 1e-5 rounds back to the base there


def test_a_missing_tiny_start_still_fails_where_it_is_representable():
    with registered(TinyStartZero) as spec:
        res = run_property(PROPERTIES["identity_at_init"], spec, ImplBackend())
    assert res.status == "fail" and "measured 0 in float" in res.detail, res.detail


# ----------------------------------------------------------------------------------------------- unchecked init


class XSBug(Variant):
    """LoRA-XS's frozen factors with a planted bug: A = U_r (its S_r left out), B = V_rᵀ; R trainable."""

    name = "h37_xs_bug"

    def tensors(self, d_in, d_out, cfg):
        return {"A": TensorDecl((d_out, cfg.r), "empty", trainable=False),
                "B": TensorDecl((cfg.r, d_in), "empty", trainable=False), "R": TensorDecl((cfg.r, cfg.r), "zeros")}

    def init(self, ad, W, cfg):
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        ad.A.copy_(U[:, :cfg.r])  # the bug: U_r S_r
        ad.B.copy_(Vh[:cfg.r])
        return None

    def forward(self, ad, x, y):
        return y + (ad.drop(x).float() @ ad.B.float().t() @ ad.R.t() @ ad.A.float().t()).to(y.dtype)


def _xs_oracle(W, b, T, x, cfg, knobs, xd=None):
    xd = x if xd is None else xd
    return x @ W.T + (0 if b is None else b) + xd @ T["B"].T @ T["R"].T @ T["A"].T


def _xs_init(W, cfg, X):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return {"A": U[:, :cfg.r] * S[:cfg.r], "B": Vh[:cfg.r]}


def _xs_spec(**over):
    return Spec(name="h37_xs_bug", title="LoRA-XS", equation="y = W x + A R B x", oracle=_xs_oracle,
                tensors=(TensorSpec("A", "(d_out, r)", "U_r S_r from the SVD of W", trainable=False),
                         TensorSpec("B", "(r, d_in)", "V_r^T from the SVD of W", trainable=False),
                         TensorSpec("R", "(r, r)", "zeros")),
                param_count="r * r", sign_free={"A": 1, "B": 0}, **over)


def test_a_derived_init_without_init_oracle_is_shown_unchecked():
    from harness.engine import table

    spec = _xs_spec()
    assert "'A' (U_r S_r from the SVD of W)" in spec.unchecked_init()
    with registered(XSBug):
        res = run_property(PROPERTIES["init_formula"], spec, ImplBackend())
        assert res.status == "na" and res.unchecked and "UNCHECKED" in res.detail
        assert " U" in table([res.to_json()], [spec.name], ["init_formula"]).splitlines()[1]
        caught = run_property(PROPERTIES["init_formula"], _xs_spec(init_oracle=_xs_init), ImplBackend())
    assert caught.status == "fail" and "'A'" in caught.detail, caught.detail  # the oracle, once declared, sees it
    lora = run_property(PROPERTIES["init_formula"], SPECS.get("hra"), ImplBackend())  # random init: plain n/a
    assert lora.status == "na" and not lora.unchecked


# ----------------------------------------------------------------------------------------------- a user's run


def test_a_selection_writes_its_own_file_quietly_and_names_the_frame(tmp_path):
    """A user's variant with a planted scale bug and a noisy third-party logger and warning: verify of the
    selection writes its own results file under the working folder (never build/verify/impl.json), reports its
    first run as new, prints neither noise line, names the forward that produced the wrong output, and wraps its
    summary lines at word boundaries."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = (root / "examples" / "scaled_lora.py").read_text()
    planted = src.replace("s = ad.cfg.alpha / ad.cfg.r\n", "s = ad.cfg.alpha\n", 1)
    assert planted != src
    planted = planted.replace("import torch\n", "import logging\nimport warnings\n\nimport torch\n"
                              "logging.getLogger('thirdparty').warning('NOISY-LOG at import')\n", 1)
    planted = planted.replace("    def forward(self, ad, x, y):\n", "    def forward(self, ad, x, y):\n"
                              "        warnings.warn('NOISY-WARN', FutureWarning)\n", 1)
    mod = tmp_path / "my_variant.py"
    mod.write_text(planted)
    line = planted.splitlines().index("    def forward(self, ad, x, y):") + 1
    cmd = [sys.executable, "-m", "tools.verify", "--variant-module", str(mod), "--variants", "scaled_lora",
           "--properties", "oracle,merge", "-n", "0"]
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    name = "impl-scaled_lora-oracle+merge-with-my_variant.json"
    assert (tmp_path / "build" / "verify" / name).is_file() and not (tmp_path / "build" / "verify" / "impl.json").exists()
    flat = " ".join(out.split())  # summary lines wrap
    assert "every result is new (2; 2 failing: scaled_lora/oracle, scaled_lora/merge)" in flat, out[-3000:]
    assert "NOISY" not in out
    assert f"[judged: {mod}:{line} in ScaledLoRA.forward]" in " ".join(proc.stdout.split()), proc.stdout[-3000:]
    fail_lines = [x for x in proc.stdout.splitlines() if x.startswith(("FAIL ", "          "))]
    assert fail_lines and all(len(x) <= 120 for x in fail_lines)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "no status changed" in proc.stdout and (tmp_path / "build" / "verify" / name.replace(".json", ".prev.json")).is_file()


# ----------------------------------------------------------------------------------------------- the docs


def _python_blocks(path):
    import re

    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_every_documented_snippet_builds():
    """Every python block of the variant author's docs runs as written; a block that registers a variant is
    compiled here and run by the test of its own page (tests/test_newcomer.py, tests/test_readme.py)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    blocks = [(p, b) for p in (root / "docs" / "writing_a_variant.md", root / "README.md") for b in _python_blocks(p)]
    assert len(blocks) >= 3
    for path, block in blocks:
        code = compile(block, str(path), "exec")
        if "register(" not in block and "impl.attach" not in block:
            exec(code, {"__name__": "doc_snippet"})


def test_the_numbers_the_docs_state_are_the_codes():
    import re
    from pathlib import Path

    from hypothesis import settings

    from harness import strategies, tolerance

    doc = (Path(__file__).resolve().parents[1] / "docs" / "writing_a_variant.md").read_text()
    acc = tolerance.ACCUMULATION
    assert (f"k = {acc[torch.float32]:g} (float32, float64), {acc[torch.bfloat16]:g} (bfloat16), "
            f"{acc[torch.float16]:g} (float16)") in doc
    assert acc[torch.float64] == acc[torch.float32] and tolerance.BACKWARD == 2.0 and "twice that" in doc
    assert f"to {strategies.MAX_DIM}, `d_out != d_in`" in doc
    assert f"{settings.get_profile('verify').max_examples} examples per property" in doc
    assert f"`--profile dev`: {settings.get_profile('dev').max_examples}" in doc
    src = Path(strategies.__file__).read_text()
    assert "st.sampled_from([2.0, 3.0, 5.0, 12.0])" in src and re.search(r"`alpha` from \{2, 3, 5, 12\}", doc)
    assert "st.integers(0, 2**16)" in src and f"a seed from 0 to {2**16}" in doc
    assert f"eps is 2^-{-int(__import__('math').log2(torch.finfo(torch.bfloat16).eps))}" in doc


# ----------------------------------------------------------------------------------------------- the new user's variant


DIAG = ("lora_diag", "lora_diag_bug_scale", "lora_diag_bug_merge", "lora_diag_bug_init")


@pytest.fixture(scope="module")
def lora_diag():
    """examples/lora_diag.py registered for this module's tests, and gone after them (other tests count the specs)."""
    import sys
    from pathlib import Path

    impl.load_variant_module(str(Path(__file__).resolve().parents[1] / "examples" / "lora_diag.py"))
    yield
    for name in DIAG:
        REGISTRY.unregister(name)
        SPECS._specs.pop(name, None)
    sys.modules.pop("user_variant_lora_diag", None)


@pytest.mark.parametrize("variant, prop", [("lora_diag", None), ("lora_diag_bug_scale", "oracle"),
                                           ("lora_diag_bug_merge", "merge"),
                                           ("lora_diag_bug_init", "init_distribution")])
def test_the_new_users_planted_bugs_are_flagged(lora_diag, variant, prop):
    """examples/lora_diag.py (written from the docs): each planted bug fails the property that names it, and the
    correct variant passes those properties."""
    props = [prop] if prop else ["oracle", "merge", "init_distribution"]
    for p in props:
        res = run_property(PROPERTIES[p], SPECS.get(variant), ImplBackend(), profile="zoo")  # no shrinking
        assert res.status == ("fail" if prop else "pass"), (p, res.detail)
        if prop:
            assert res.failure_kind == "assertion" and "[judged: " in res.detail, res.detail
