"""The quantization matrix on whole models (issue 21): every variant on a tiny Llama whose decoder linears are
bitsandbytes 4-bit (NF4) or 8-bit layers, built in code on the CPU from the same weights.

A variant whose spec declares `quantized = "works"` attaches by role (calibrated where its spec uses data),
starts at the quantized base's logits in its identity class (compared with the quantized base, never the
dense one), falls by MIN_FALL on the teacher task in 30 AdamW steps, round-trips through save -> load into a
freshly quantized model bit-exactly, refuses merge with a clear error, and detaches to the quantized base's
logits. A variant that declares "raises" is refused at attach with an error naming the layer, and the model
is left bit-identical. Observed == declared, cell by cell: the single-layer matrix `verify` prints, on whole
models.

The quantized models stay in training mode (no dropout in these configs, so it computes the same function as
eval mode): on CPUs with AVX512-bf16, bitsandbytes repacks a Linear4bit's weight in place on its first
eval-mode no-grad forward and computes with bf16 scales from then on, which would change the quantized base
between two forwards of the same test.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import impl
from spec import SPECS
from harness.backends import make_layer
from tests import e2e_support as e2e
from harness.models import tiny

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:MatMul8bitLt.*:UserWarning")]
one_thread = e2e.one_thread
LAYOUT = {4: "bnb4", 8: "bnb8"}


def quantized_llama(bits: int) -> nn.Module:
    """tiny("llama") with every nn.Linear of its decoder layers replaced by a bitsandbytes layer holding the
    same weight (lm_head stays dense, as bitsandbytes loading leaves it); in training mode (see above)."""
    model = tiny("llama")
    for parent in list(model.model.layers.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                b = None if child.bias is None else child.bias.detach().double()
                setattr(parent, child_name, make_layer(child.weight.detach().double(), b, torch.float32, LAYOUT[bits]))
    return model.train()


def _snapshot(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> list[str]:
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]


def test_quantized_model_is_quantized_where_the_roles_point():
    """The harness itself: every targeted role of every spec is a bitsandbytes layer in the quantized model."""
    for bits in LAYOUT:
        model = quantized_llama(bits)
        for name in e2e.variants():
            spec = SPECS.get(name)
            targets = impl.targeting.find_targets(model, e2e.e2e_config(name, "llama"))
            assert targets and all(impl.layers.is_quantized(m) for m in targets.values()), (name, bits)
            assert len(targets) == 2 * len(spec.roles)


@pytest.mark.parametrize("bits", sorted(LAYOUT))
@pytest.mark.parametrize("variant", e2e.variants())
def test_quantization_matrix_observed_equals_declared(variant, bits, tmp_path):
    spec = SPECS.get(variant)
    what = f"{variant}/bnb{bits}"
    model = quantized_llama(bits)
    probe, data = e2e.probe_batch(), e2e.train_batch()
    y_base = e2e.logits(model, probe)
    state = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        e2e.attach(model, variant, "llama")
    except impl.AttachError as err:
        observed, error = "raises", err
    else:
        observed, error = "works", None
    assert observed == spec.quantized, f"{what}: spec declares '{spec.quantized}', observed '{observed}' {error or ''}"

    if observed == "raises":
        assert "layer 'model.layers." in str(error), f"{what}: the error does not name the layer: {error}"
        assert not impl.is_attached(model)
        assert not _same(_snapshot(model), state), f"{what}: the refused attach changed {_same(_snapshot(model), state)}"
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert not any(m._forward_hooks or m._forward_pre_hooks or "adapter" in m._modules for m in model.modules())
        assert torch.equal(e2e.logits(model, probe), y_base)
        return

    e2e.check_identity(spec, e2e.logits(model, probe), y_base, torch.float32, what)
    target_logits = e2e.teacher_logits(model, lambda: quantized_llama(bits), variant, "llama", data)
    init = {n: p.detach().clone() for n, p in e2e.trainables(model).items()}
    before, after = e2e.train(model, data, target_logits)
    assert before > 0, f"{what}: the task is vacuous (teacher == student)"
    assert after <= (1 - e2e.MIN_FALL) * before, (
        f"{what}: loss {before:.4g} -> {after:.4g} (fall {1 - after / before:.1%}, required >= {e2e.MIN_FALL:.0%})")
    stuck = [n for n, p in e2e.trainables(model).items() if torch.equal(p.detach(), init[n])]
    assert not stuck, f"{what}: trainable tensors that never moved: {stuck}"
    leaks = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not leaks, f"{what}: frozen parameters received gradients: {leaks}"
    y_trained = e2e.logits(model, probe)
    assert not torch.equal(y_trained, y_base)

    path = tmp_path / "adapter.safetensors"
    impl.save(model, path)
    loaded = impl.load(quantized_llama(bits), path)
    assert torch.equal(e2e.logits(loaded, probe), y_trained), f"{what}: loaded logits differ from the trained ones"

    with pytest.raises(impl.MergeError, match="quantized layer 'model.layers."):
        impl.merge(loaded)
    assert impl.is_attached(loaded) and torch.equal(e2e.logits(loaded, probe), y_trained), f"{what}: a refused merge changed the model"

    impl.detach(model)
    assert torch.equal(e2e.logits(model, probe), y_base), f"{what}: detach does not restore the quantized base logits"
