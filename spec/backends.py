"""Backends: the implementation under verification, behind one small interface.

The generic properties talk to a backend, never to impl/ directly, so the same specs and properties verify
our `impl` and, through spec.backend_peft, PEFT's own implementations.
"""
from __future__ import annotations

import torch
from torch import nn

import impl
from impl import layers

from .schema import Spec
from .strategies import Case


class Single(nn.Module):
    """A one-layer model: the unit every property adapts. Extra keyword inputs (attention_mask) are ignored."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, attention_mask=None):
        return self.layer(x)


def make_layer(W: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype, layout: str = "linear",
               device: str = "cpu") -> nn.Module:
    """A base layer holding (W, b): layout linear | conv1d (transformers' transposed storage) | bnb4 | bnb8."""
    d_out, d_in = W.shape
    if layout == "linear":
        m = nn.Linear(d_in, d_out, bias=b is not None)
        m.weight.data = W.to(dtype).clone()
    elif layout == "conv1d":
        from transformers.pytorch_utils import Conv1D

        m = Conv1D(d_out, d_in)
        m.weight.data = W.t().to(dtype).contiguous().clone()
        if b is None:
            b = torch.zeros(d_out, dtype=torch.float64)  # Conv1D always has a bias
    elif layout in ("bnb4", "bnb8"):
        import bitsandbytes as bnb

        if layout == "bnb4":
            m = bnb.nn.Linear4bit(d_in, d_out, bias=b is not None, compute_dtype=torch.float32, quant_type="nf4")
            m.weight = bnb.nn.Params4bit(W.float().clone(), requires_grad=False, quant_type="nf4")
        else:
            m = bnb.nn.Linear8bitLt(d_in, d_out, bias=b is not None, has_fp16_weights=False)
            m.weight = bnb.nn.Int8Params(W.float().clone(), requires_grad=False, has_fp16_weights=False)
        if b is not None:
            m.bias = nn.Parameter(b.float().clone(), requires_grad=False)
        m = m.to("cpu")
        return m
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if b is not None:
        m.bias.data = b.to(dtype).clone()
    return m.to(device)


def single(W, b, dtype, layout="linear", device="cpu") -> Single:
    return Single(make_layer(W, b, dtype, layout, device))


class ImplBackend:
    """Our implementation: the public API of impl."""

    name = "impl"

    def applies(self, spec: Spec) -> str | None:
        return None if spec.name in impl.VARIANTS else f"variant '{spec.name}' is not registered in impl"

    def config(self, spec: Spec, case: Case, **over):
        return impl.config(spec.name, **{"target_names": (r"^layer$",), **case.fields, **over})

    def attach(self, model: nn.Module, spec: Spec, case: Case, calibration=None, **over) -> nn.Module:
        return impl.attach(model, self.config(spec, case, **over), calibration=calibration)

    def detach(self, model):
        impl.detach(model)

    def merge(self, model):
        impl.merge(model)

    def save(self, model, path):
        impl.save(model, path)

    def load(self, model, path):
        impl.load(model, path)

    def set_knob(self, model, name: str, value: float):
        impl.set_knobs(model, **{name: value})

    def knobs(self, model) -> dict[str, float]:
        return dict(impl.adapters(model)["layer"].knobs)

    def tensors(self, model) -> dict[str, torch.Tensor]:
        """Every adapter tensor of the single adapted layer, by spec name."""
        return impl.adapters(model)["layer"].tensors()

    def adapted_layers(self, model) -> dict[str, tuple[dict[str, torch.Tensor], nn.Module, dict[str, float]]]:
        """Every adapted layer of a whole model: name -> (its tensors by spec name, the layer, its knobs)."""
        return {n: (ad.tensors(), ad.layer, dict(ad.knobs)) for n, ad in impl.adapters(model).items()}

    def attach_model(self, model: nn.Module, spec: Spec, case: Case, roles: tuple[str, ...], names: tuple[str, ...],
                     calibration=None, **over) -> nn.Module:
        """Attach to a whole model, targeting the given architectural roles (`names`: the module names they are)."""
        return impl.attach(model, self.config(spec, case, target_names=(), target_roles=roles, **over),
                           calibration=calibration)

    def base_weight(self, model) -> torch.Tensor:
        """The adapted layer's current dense base weight (d_out, d_in)."""
        return layers.dense_weight(model.layer)

    def dequantized(self, layer) -> torch.Tensor:
        return layers.dense_weight(layer)

    def hooks_left(self, model) -> list[str]:
        left = []
        for n, m in model.named_modules():
            if m._forward_hooks or m._forward_pre_hooks or "adapter" in m._modules:
                left.append(n or "<root>")
        return left


BACKENDS = {"impl": ImplBackend}
