"""The specs of VeRA, LoHa, LoKr and AdaLoRA (no impl variant) have teeth: PEFT 0.21.2 as released passes the
property, and the same PEFT with a planted defect (monkeypatched) fails it."""
import pytest
import torch

peft = pytest.importorskip("peft")

from peft.tuners.adalora.layer import AdaLoraLayer  # noqa: E402
from peft.tuners.loha import layer as loha_layer  # noqa: E402
from peft.tuners.lokr import layer as lokr_layer  # noqa: E402
from peft.tuners.vera.layer import Linear as VeraLinear  # noqa: E402

from harness import PROPERTIES  # noqa: E402
from harness.backends import ImplBackend  # noqa: E402
from harness.backends.peft import PeftBackend  # noqa: E402
from harness.engine import run_property  # noqa: E402
from spec import SPECS  # noqa: E402

_VERA_FORWARD = VeraLinear.forward


def _vera_ignores_d(self, x, *args, **kwargs):
    """VeRA with Λ_d dropped (d read as ones): the forward no longer scales A x per rank."""
    real = self.vera_lambda_d["default"]
    self.vera_lambda_d["default"] = torch.nn.Parameter(torch.ones_like(real))
    try:
        return _VERA_FORWARD(self, x, *args, **kwargs)
    finally:
        self.vera_lambda_d["default"] = real


def _loha_unscaled(w1a, w1b, w2a, w2b, scale):
    """LoHa with the alpha / r scale dropped."""
    return (w1a @ w1b) * (w2a @ w2b)


def _lokr_swapped(w1, w2, scale=1.0):
    """LoKr with the Kronecker factors in the wrong order (W2 ⊗ W1)."""
    return torch.kron(w2.contiguous(), w1) * scale


def _adalora_random_lambda(self, adapter_name):
    """AdaLoRA with Λ drawn at random instead of starting at 0."""
    torch.nn.init.normal_(self.lora_E[adapter_name], std=0.02)
    torch.nn.init.normal_(self.lora_A[adapter_name], std=0.02)
    torch.nn.init.normal_(self.lora_B[adapter_name], std=0.02)


PLANTED = {
    "vera": ("oracle", lambda mp: mp.setattr(VeraLinear, "forward", _vera_ignores_d)),
    "loha": ("oracle", lambda mp: mp.setattr(loha_layer, "make_weight", _loha_unscaled)),
    "lokr": ("oracle", lambda mp: mp.setattr(lokr_layer, "make_kron", _lokr_swapped)),
    "adalora": ("init_formula", lambda mp: mp.setattr(AdaLoraLayer, "reset_lora_parameters", _adalora_random_lambda)),
}


@pytest.mark.parametrize("variant", sorted(PLANTED))
def test_released_peft_passes_and_a_planted_defect_fails(variant, monkeypatch):
    prop, plant = PLANTED[variant]
    spec, be = SPECS.get(variant), PeftBackend()
    ok = run_property(PROPERTIES[prop], spec, be, "zoo")
    assert ok.status == "pass", ok.detail
    plant(monkeypatch)
    bad = run_property(PROPERTIES[prop], spec, be, "zoo")
    assert bad.status == "fail" and bad.failure_kind == "assertion", bad.detail


@pytest.mark.parametrize("variant", sorted(PLANTED))
def test_spec_without_impl_variant_is_na_on_impl(variant):
    res = run_property(PROPERTIES["oracle"], SPECS.get(variant), ImplBackend(), "zoo")
    assert res.status == "na" and "not implemented here" in res.detail


def test_lokr_tensors_follow_the_rank_and_shape():
    """Which Kronecker factors are full or factored depends on r and the widths: the PEFT layer holds exactly the
    tensors the spec declares present (64 = 8·8: W2 is factored below r = 4, full from r = 4)."""
    from harness.strategies import Case
    from harness.probes import cfg_of, setup

    spec, be = SPECS.get("lokr"), PeftBackend()
    for r, both in ((1, False), (4, False), (1, True)):
        case = Case(d_in=64, d_out=64, bias=False, dtype=torch.float32, seed=0,
                    fields={"r": r, "alpha": 2.0, "decompose_both": both})
        s = setup(spec, be, case)
        present = {t.name for t in spec.present(64, 64, cfg_of(spec, be, case))}
        assert set(be.tensors(s.model)) == present


def test_adalora_frozen_ranknum_made_trainable_by_peft_in_bfloat16_is_flagged():
    """A PEFT 0.21.2 bug the AdaLoRA spec finds: on a bfloat16 layer, get_peft_model's adapter upcast re-creates
    every float parameter of the tuner layer as a trainable nn.Parameter (tuners_utils.py:2745,
    `submodule[adapter_name] = submodule[adapter_name].to(torch.float32)` into a ParameterDict), so the frozen rank
    count `ranknum` (the denominator of the scale) becomes trainable and AdamW moves it. In float32 it stays frozen."""
    from harness.probes import Falsified
    from harness.strategies import Case

    spec, be = SPECS.get("adalora"), PeftBackend()
    case = Case(d_in=2, d_out=1, bias=False, dtype=torch.float32, seed=0, fields={"r": 1, "alpha": 2.0})
    assert PROPERTIES["training_step"].check(spec, be, case) is None
    with pytest.raises(Falsified, match="ranknum"):
        PROPERTIES["training_step"].check(spec, be, case.with_(dtype=torch.bfloat16))


def test_loha_scale_rounded_to_float32_in_a_float64_model_is_flagged():
    """A PEFT 0.21.2 bug the LoHa spec finds: get_delta_weight passes the scale as `torch.tensor(alpha / r)`, a
    float32 0-dim tensor (loha/layer.py:193 and 201), so a float64 model's ΔW carries alpha / r rounded to float32
    (relative error ~1e-8). model_oracle (float64, whole model) sees it where alpha / r is not a float32 number
    (12 / 7) and not where it is (12 / 3)."""
    from harness.probes import Falsified
    from harness.strategies import Case

    spec, be = SPECS.get("loha"), PeftBackend()
    case = Case(d_in=5, d_out=3, bias=False, dtype=torch.float64, seed=398, fields={"r": 3, "alpha": 12.0})
    PROPERTIES["model_oracle"].check(spec, be, (case, "llama"))  # alpha / r = 4: passes
    with pytest.raises(Falsified, match="per-layer oracle"):
        PROPERTIES["model_oracle"].check(spec, be, (case.with_(fields={"r": 7, "alpha": 12.0}), "llama"))


def test_vera_frozen_pair_is_one_tensor_for_the_whole_model_in_peft():
    """VeRA's claim 'one frozen random pair shared by all layers' holds in PEFT: every adapted layer of a tiny
    Llama (q, v, down: three shapes) holds the same A and B storage, sized for the widest layer, and its own d, b.
    (tensor_sharing checks impl's per-shape sharing and its checkpoint; this is PEFT's model-wide form.)"""
    from harness.differential import _roles
    from harness.models import tiny
    from harness.strategies import Case

    spec, be = SPECS.get("vera"), PeftBackend()
    case = Case(d_in=4, d_out=4, bias=False, dtype=torch.float32, seed=0, fields={"r": 4, "alpha": 2.0})
    roles, names = _roles(spec, "llama")
    model = tiny("llama", 0)
    be.attach_model(model, spec, case, roles, names)
    layers = be.adapted_layers(model)
    assert len(layers) >= 3
    widths = {(base.in_features, base.out_features) for _, base, _ in layers.values()}
    assert len(widths) >= 2
    for name in ("A", "B"):
        ptrs = {ts[name].untyped_storage().data_ptr() for ts, _, _ in layers.values()}
        assert len(ptrs) == 1, name
    A = next(iter(layers.values()))[0]["A"]
    B = next(iter(layers.values()))[0]["B"]
    assert A.shape == (4, max(w[0] for w in widths)) and B.shape == (max(w[1] for w in widths), 4)
    for name in ("d", "b"):
        assert len({ts[name].untyped_storage().data_ptr() for ts, _, _ in layers.values()}) == len(layers), name
