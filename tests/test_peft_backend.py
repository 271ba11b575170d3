"""The PEFT backend flags a defect planted in PEFT, adapts to what a release lacks, and never hangs; the
differential oracles flag a shared misreading; a declared deviation's size is held to 0.5x-2x."""
import dataclasses
import types
from unittest import mock

import pytest
import torch

peft = pytest.importorskip("peft")

from peft.tuners.lora.dora import DoraLinearLayer  # noqa: E402

from spec import SPECS  # noqa: E402
from harness.backends import ImplBackend  # noqa: E402
from harness.engine import case_of, run_property  # noqa: E402
from harness.backends.peft import Mapped, PeftBackend, PeftHang  # noqa: E402
from harness import PROPERTIES
from harness.probes import setup  # noqa: E402
from harness.backends.peft_maps import MAPS, PeftMap  # noqa: E402
from spec.schema import Deviation  # noqa: E402
from harness.strategies import Case, base_weight, calibration  # noqa: E402

_REAL_DORA_FORWARD = DoraLinearLayer.forward


def _dora_bias_scaled(self, x, *, base_layer, base_result=None, **kw):
    """PEFT's DoRA with a planted defect: the bias is not taken out before the magnitude rescale, so it is
    scaled by m/n like the rest of the base output ."""
    no_bias = types.SimpleNamespace(weight=base_layer.weight, bias=None)
    return _REAL_DORA_FORWARD(self, x, base_layer=no_bias, base_result=base_result, **kw)


def _run(prop, spec, be):
    return run_property(PROPERTIES[prop], spec, be, "zoo")


def test_planted_dora_bias_defect_is_flagged_by_the_peft_backend():
    spec, be = SPECS.get("dora"), PeftBackend()
    assert _run("bias_invariance", spec, be).status == "pass"
    with mock.patch.object(DoraLinearLayer, "forward", _dora_bias_scaled):
        res = _run("bias_invariance", spec, be)
    assert res.status == "fail" and res.failure_kind == "assertion", res
    assert "differs from the bias" in res.detail


def test_planted_dora_bias_defect_is_flagged_by_the_differential_oracle():
    spec = SPECS.get("dora")
    assert _run("reference_equivalence", spec, ImplBackend()).status == "pass"
    with mock.patch.object(DoraLinearLayer, "forward", _dora_bias_scaled):
        res = _run("reference_equivalence", spec, ImplBackend())
    assert res.status == "fail" and res.failure_kind == "assertion", res
    assert "PEFT's" in res.detail


def test_mapped_views_share_storage_and_gradients():
    """hra's U is PEFT's hra_u transposed: writes go through, and the gradient reads and clears PEFT's."""
    spec, be = SPECS.get("hra"), PeftBackend()
    case = Case(d_in=6, d_out=4, bias=True, dtype=torch.float32, seed=3, fields={"r": 2, "alpha": 2.0})
    s = setup(spec, be, case)
    U = be.tensors(s.model)["U"]
    raw = s.model.layer.hra_u["default"]
    assert isinstance(U, Mapped) and tuple(U.shape) == (2, 6) and tuple(raw.shape) == (6, 2)
    with torch.no_grad():
        U.copy_(torch.arange(12.0).reshape(2, 6))
    assert torch.equal(raw.detach(), torch.arange(12.0).reshape(2, 6).t())
    s.model(s.x).sum().backward()
    assert torch.equal(be.tensors(s.model)["U"].grad, raw.grad.t())
    be.tensors(s.model)["U"].grad = None
    assert raw.grad is None


def test_what_a_release_lacks_is_not_applicable_with_the_reason(monkeypatch):
    """Feature detection: a config class or a config field the installed release lacks makes the variant n/a."""
    lora, pm = SPECS.get("lora"), MAPS["lora"]
    monkeypatch.setitem(MAPS, "lora", dataclasses.replace(pm, config="NoSuchConfig"))
    res = _run("oracle", lora, PeftBackend())
    assert res.status == "na" and "NoSuchConfig" in res.detail
    res = _run("reference_equivalence", lora, ImplBackend())
    assert res.status == "na" and "NoSuchConfig" in res.detail
    monkeypatch.setitem(MAPS, "lora", PeftMap(config="LoraConfig", kwargs=lambda cfg: {"r": cfg.r, "no_such": 1},
                                              tensors=pm.tensors))
    res = _run("oracle", lora, PeftBackend())
    assert res.status == "na" and "no_such" in res.detail


def test_peft_eva_without_enough_tokens_is_stopped_not_hung():
    """PEFT's EVA cycles the data forever when no batch has r tokens; the backend stops it with its own error
    (not an AdapterError, which would read as PEFT's clear refusal)."""
    spec, be = SPECS.get("eva"), PeftBackend()
    case = Case(d_in=6, d_out=5, bias=False, dtype=torch.float32, seed=0, fields={"r": 3, "alpha": 2.0, "rslora": False})
    s = setup(spec, be, case, attach=False)
    W, _ = base_weight(case)
    d1 = calibration(case, W, 3)
    few = [{"x": d1[0]["x"][:1, :2], "attention_mask": d1[0]["attention_mask"][:1, :2]}]
    with pytest.raises(PeftHang, match="fewer tokens than r"):
        be.attach(s.model, spec, case, few)


def test_model_oracle_gives_peft_eva_calibration_it_converges_on_and_still_catches_a_wrong_scale(monkeypatch):
    """model_oracle's calibration batches held 14 tokens each: PEFT's EVA (every release 0.14.0-0.21.2) needs 348
    passes over them to converge at r = 8 on the GPT-2 model, so the backend's bound stopped it and the oracle never
    ran. With CAL_TOKENS a row it converges and the check runs; on impl it still flags an EVA forward that scales
    by alpha instead of alpha / r."""
    from harness import differential
    from harness.probes import Falsified
    from harness.zoo import Mutant, installed
    from impl.variants.eva import EVA
    from impl.variants.lora import lora_add

    class AlphaScale(EVA):
        def forward(self, ad, x, y):
            return lora_add(y, ad.drop(x), ad.A, ad.B, ad.cfg.alpha)

    spec, prop = SPECS.get("eva"), PROPERTIES["model_oracle"]
    drawn = (Case(d_in=8, d_out=9, bias=False, dtype=torch.float64, seed=0,
                  fields={"r": 8, "alpha": 2.0, "rslora": False}), "gpt2")  # the history's minimal example
    prop.check(spec, PeftBackend(), drawn)
    prop.check(spec, ImplBackend(), drawn)
    with installed(Mutant("eva.alpha_scale", AlphaScale, "model_oracle", "alpha instead of alpha / r")) as bad:
        with pytest.raises(Falsified, match="per-layer oracle"):
            prop.check(bad, ImplBackend(), drawn)
    monkeypatch.setattr(differential, "CAL_TOKENS", 8)  # the batches as they were
    with pytest.raises(PeftHang):
        prop.check(spec, PeftBackend(), drawn)


def test_a_declared_deviation_size_is_held_to_half_to_twice():
    """The shared rsLoRA misreading, declared as a deviation with its size on a fixed case: reported as a
    deviation while the size holds, a failure once the declared size is off by more than 2x."""
    from harness.zoo import installed
    from harness.zoo.shared_misreadings import MUTANTS

    m = next(m for m in MUTANTS if m.name == "lora.shared_rslora_plain_scale")
    fixed = {"d_in": 6, "d_out": 5, "bias": True, "dtype": "float32", "seed": 1,
             "fields": {"r": 4, "alpha": 3.0, "rslora": True}}
    with installed(m) as spec:
        prop = PROPERTIES["reference_equivalence"]
        with pytest.raises(AssertionError) as exc:
            prop.check(spec, ImplBackend(), case_of(fixed))
        size = exc.value.size
        assert size > 0.1  # alpha/r instead of alpha/sqrt(r) at r = 4 halves the adapter's contribution
        for declared, status in ((size * 1.3, "deviation"), (size * 3.0, "fail"), (size / 3.0, "fail")):
            dev = Deviation("reference_equivalence", "test: plain scale", size=declared, case=fixed)
            res = run_property(prop, dataclasses.replace(spec, deviations=(dev,)), ImplBackend(), "zoo")
            assert res.status == status, (declared, size, res)


def _labels_never_read(model_input, peft_config):
    """PEFT 0.14.0-0.16.0's LM input preparation (tuners/lora/eva.py:252 there): `hasattr(model_input, "labels")`
    on a dict batch is never true, so tokens labelled -100 enter EVA's SVD despite use_label_mask=True."""
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and hasattr(model_input, "labels"):
        mask = torch.logical_and(mask, model_input["labels"] != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def test_label_mask_flags_peft_eva_that_never_applies_its_label_mask():
    """The backend runs PEFT's own mask helper (bound as initialize_lora_eva_weights' default, so its code is
    swapped in place): with the old release's code, label_mask fails on PEFT's EVA."""
    from peft.tuners.lora import eva

    spec, be = SPECS.get("eva"), PeftBackend()
    assert _run("label_mask", spec, be).status == "pass"
    fn = eva.prepare_model_inputs_fn_language_modeling
    real, fn.__code__ = fn.__code__, _labels_never_read.__code__
    try:
        res = _run("label_mask", spec, be)
    finally:
        fn.__code__ = real
    assert res.status == "fail" and res.failure_kind == "assertion", res
    assert "tokens labelled -100 change the init" in res.detail, res.detail


def test_training_step_says_when_a_library_left_its_own_state_trainable():
    """PEFT 0.21.2's cast_adapter_dtype re-wraps AdaLoRA's frozen ranknum of a bf16 model in a fresh nn.Parameter
    (requires_grad=True, tuners_utils.py:2745), so training moves it. training_step counted it, as every tensor
    outside the spec's, as a base tensor; its message now says the library left it trainable. The same defect
    planted on float32 (where 0.21.2 keeps ranknum frozen) is flagged alike."""
    spec, be, prop = SPECS.get("adalora"), PeftBackend(), PROPERTIES["training_step"]
    case = Case(d_in=2, d_out=1, bias=False, dtype=torch.float32, seed=0, fields={"r": 1, "alpha": 2.0})
    prop.check(spec, be, case)
    real = PeftBackend.attach

    def attach_ranknum_trainable(self, model, *a, **kw):
        out = real(self, model, *a, **kw)
        self._layer(model).ranknum["default"].requires_grad_(True)
        return out

    with mock.patch.object(PeftBackend, "attach", attach_ranknum_trainable):
        with pytest.raises(AssertionError, match="'layer.ranknum.default' changed in training .*left trainable"):
            prop.check(spec, be, case)
    if peft.__version__ == "0.21.2":  # the real defect, on the history's minimal example
        with pytest.raises(AssertionError, match="'layer.ranknum.default' changed in training .*left trainable"):
            prop.check(spec, be, case.with_(dtype=torch.bfloat16))


def test_a_release_that_refuses_targets_of_different_shapes_makes_the_whole_model_checks_na(monkeypatch):
    """peft 0.11.1's VeRA refuses target layers of different shapes ("VeRA only supports a single dimension
    size"), which every whole-model check adapts (q/k/v of a GQA model): n/a naming the release and PEFT's words,
    never a crash row. A refusal of one shape as well is no shape rule: no n/a then."""
    import harness.backends.peft as backend
    from harness.engine import run_property

    real = backend._peft.get_peft_model

    def shape_rule(model, cfg, *a, **k):
        if len({m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)}) > 1:
            raise ValueError("Multiple target layers with different dimensions were specified. VeRA only supports a "
                             "single dimension size.")
        return real(model, cfg, *a, **k)

    monkeypatch.setattr(backend._peft, "get_peft_model", shape_rule)
    why = PeftBackend().unsupported(SPECS.get("vera"), "model")
    assert why.startswith(f"peft {backend.VERSION} refuses vera on target layers of different shapes") and \
        "VeRA only supports a single dimension size" in why
    r = run_property(PROPERTIES["model_oracle"], SPECS.get("vera"), PeftBackend(), profile="ci")
    assert r.status == "na" and "single dimension size" in r.detail

    def refuses_all(model, cfg, *a, **k):
        raise ValueError("no")

    monkeypatch.setattr(backend._peft, "get_peft_model", refuses_all)
    assert PeftBackend().unsupported(SPECS.get("vera"), "model") is None
    monkeypatch.setattr(backend._peft, "get_peft_model", real)
    assert PeftBackend().unsupported(SPECS.get("vera"), "model") is None  # 0.12.0 on: VeRA takes mixed shapes


def test_dropout_live_is_na_where_the_release_has_no_adapter_input_dropout(monkeypatch):
    """PEFT's BoneConfig (the miss mapping before 0.17.1) has no dropout field: dropout_live, like dropout and
    eval_deterministic, needs the backend's dropout capability, so it is n/a there instead of 'dropout is not
    applied' (a dropout the backend never passed to PEFT)."""
    import harness.backends.peft as backend

    spec = SPECS.get("miss")
    monkeypatch.setattr(backend, "release_map", lambda s: dataclasses.replace(backend.peft_map(s), input_dropout=False))
    for name in ("dropout", "dropout_live", "eval_deterministic"):
        r = run_property(PROPERTIES[name], spec, PeftBackend(), profile="ci")
        assert r.status == "na" and "no adapter-input dropout field" in r.detail, (name, r.status, r.detail)
