"""Gradient checkpointing and torch.compile of adapted models (issue 21), for every variant, from its spec.

Gradient checkpointing (transformers' `gradient_checkpointing_enable`, non-reentrant and reentrant) on tiny
Llama, Qwen and GPT-2 models: with every trainable tensor perturbed away from its init, the logits and the
gradient of every trainable tensor equal the eager run's within the fp32 tolerance, and the adapted layers
really run twice (forward + recompute). Variants that honour dropout run with dropout 0.1 under one seed:
checkpointing must replay the same dropout masks.

torch.compile(backend="aot_eager") of a tiny adapted Llama: the same logits and per-tensor gradients as eager,
at least one graph captured, and a runtime knob changed after compiling takes effect in the compiled model
(a knob baked into the graph as a constant would not). inductor takes ~30 s per model here and belongs in
the cost session. No variant declares a rejection of either, so none is allowed one.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import impl
from harness import tolerance as tol
from spec import SPECS
from tests import e2e_support as e2e
from harness.models import ARCHS, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = e2e.one_thread
DROPOUT = 0.1


def _loss_weights(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(5))


def _run(model, b, w, call=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward (through `call`, e.g. the compiled model, else the model) and backward under a fixed seed
    (the same dropout masks every time): the logits and the gradients of the model's trainable tensors."""
    for p in e2e.trainables(model).values():
        p.grad = None
    torch.manual_seed(0)
    y = (model if call is None else call)(**b).logits
    (y.float() * w).sum().backward()
    return y.detach(), e2e.grads_of(model)


def _adapted(variant, arch, **over):
    model = tiny(arch)
    e2e.attach(model, variant, arch, **over)
    e2e.perturb(model, variant)
    return model.train()


def _count_calls(model):
    """Count forwards of the adapted layers (a pre-hook beside the adapter's own)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    handles = [m.register_forward_pre_hook(hook) for m in impl.runtime.state_of(model).targets.values()]
    return calls, handles


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", e2e.variants())
def test_gradient_checkpointing_matches_eager(variant, arch, reentrant):
    spec = SPECS.get(variant)
    what = f"{variant}/{arch}/{'reentrant' if reentrant else 'non-reentrant'}"
    dropout = DROPOUT if spec.dropout == "honoured" else 0.0
    model = _adapted(variant, arch, dropout=dropout)
    b = e2e.train_batch()
    w = _loss_weights((*b["input_ids"].shape, model.config.vocab_size))
    calls, handles = _count_calls(model)
    y_ref, g_ref = _run(model, b, w)
    eager_calls = calls[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls[0] = 0
    y, g = _run(model, b, w)
    for h in handles:
        h.remove()
    assert calls[0] == 2 * eager_calls, f"{what}: adapted layers ran {calls[0]} times, expected {2 * eager_calls} (not checkpointed?)"
    ok, err = tol.close(y, y_ref, None, torch.float32, spec.identity_factor)
    assert ok, f"{what}: checkpointed logits differ from eager (scaled error {err:.3g})"
    e2e.assert_close_grads(g, g_ref, spec.identity_factor, what)
    assert len(g_ref) == sum(len(e2e.present_trainables(spec, ad)) for ad in impl.adapters(model).values())


@pytest.mark.parametrize("variant", e2e.variants())
def test_compile_aot_eager_matches_eager(variant):
    import torch._dynamo
    from torch._dynamo.utils import counters

    spec = SPECS.get(variant)
    model = _adapted(variant, "llama")
    b = e2e.train_batch()
    w = _loss_weights((*b["input_ids"].shape, model.config.vocab_size))
    y_ref, g_ref = _run(model, b, w)
    torch._dynamo.reset()  # a fresh cache: no recompile limit reached through earlier tests in this worker
    counters.clear()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        y, g = _run(model, b, w, compiled)
        assert counters["stats"]["unique_graphs"] >= 1, f"{variant}: torch.compile captured no graph"
        ok, err = tol.close(y, y_ref, None, torch.float32, spec.identity_factor)
        assert ok, f"{variant}: compiled logits differ from eager (scaled error {err:.3g})"
        e2e.assert_close_grads(g, g_ref, spec.identity_factor, f"{variant} compiled")
        for knob, identity_value in spec.knobs.items():
            impl.set_knobs(model, **{knob: identity_value})
            y_eager_knob, _ = _run(model, b, w)
            assert not torch.equal(y_eager_knob, y_ref), f"{variant}: setting {knob}={identity_value} changed nothing"
            y_knob, _ = _run(model, b, w, compiled)
            ok, err = tol.close(y_knob, y_eager_knob, y_ref, torch.float32, spec.identity_factor)
            assert ok, f"{variant}: after set_knobs({knob}={identity_value}) the compiled model differs from eager (scaled error {err:.3g})"
    finally:
        torch._dynamo.reset()
