"""Layouts and storage of the layers the runtime adapts, in one place.

Every variant sees a dense weight W of shape (d_out, d_in) in the column-vector convention y = W x + b.
The transpose of transformers' Conv1D (weight stored as (d_in, d_out)) and the dequantization of
bitsandbytes layers happen here and nowhere else.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib

import torch
from torch import nn

try:  # bitsandbytes is optional
    import bitsandbytes as bnb

    _BNB4 = (bnb.nn.Linear4bit,)
    _BNB8 = (bnb.nn.Linear8bitLt,)
except Exception:  # pragma: no cover - bnb absent
    bnb = None
    _BNB4 = _BNB8 = ()


def kind(module: nn.Module) -> str | None:
    """'bnb4', 'bnb8', 'linear', 'conv1d' or None for a module the runtime cannot adapt."""
    if _BNB4 and isinstance(module, _BNB4):
        return "bnb4"
    if _BNB8 and isinstance(module, _BNB8):
        return "bnb8"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def is_quantized(module: nn.Module) -> bool:
    return kind(module) in ("bnb4", "bnb8")


def dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an adaptable layer."""
    if kind(module) == "conv1d":
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return int(module.in_features), int(module.out_features)


def _bnb8_scale(module: nn.Module) -> torch.Tensor:
    """The int8 row scales. bitsandbytes on CPU moves them from weight.SCB to layer.state.SCB after the first
    forward, so read whichever holds them."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise RuntimeError("bitsandbytes 8-bit layer has no SCB scale in weight or state")
    return scb


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a dense (d_out, d_in) tensor: a view for Linear, the transpose for Conv1D, a
    dequantized copy (never written back) for bitsandbytes layers."""
    k = kind(module)
    w = module.weight
    if k == "linear":
        return w
    if k == "conv1d":
        return w.t()
    if k == "bnb4":
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacked the weight for its AVX512-bf16 CPU kernel on an eval-mode forward; undo the
            # layout on a copy of its state (the inverse mutates the state it is given)
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state).reshape(module.out_features, module.in_features)
    if k == "bnb8":
        cb = w.data if w.data.dtype == torch.int8 else getattr(w, "CB", None)
        if cb is None or cb.dtype != torch.int8:
            return w.data.float()  # not quantized yet: still the dense fp weight
        return cb.float() * _bnb8_scale(module).float().unsqueeze(1) / 127.0
    raise TypeError(f"cannot read the weight of a {type(module).__name__}")


def write_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write a dense (d_out, d_in) weight into the layer's own storage and dtype."""
    k = kind(module)
    if k == "linear":
        module.weight.data.copy_(W.to(module.weight.dtype))
    elif k == "conv1d":
        module.weight.data.copy_(W.t().to(module.weight.dtype))
    else:
        raise TypeError(f"cannot write the weight of a {type(module).__name__} ({k})")


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer computes in (the compute dtype for quantized layers)."""
    k = kind(module)
    if k == "bnb4":
        return module.compute_dtype or torch.float32
    if k == "bnb8":
        return torch.float32
    return module.weight.dtype


@contextlib.contextmanager
def no_cpu_repack(model: nn.Module):
    """Keep bitsandbytes 4-bit layers in their storage format during an eval-mode, no-grad pass (calibration).

    On CPUs with AVX512-bf16, bitsandbytes repacks a Linear4bit's weight in place on its first eval-mode no-grad
    forward (absmax rounded to bf16, a new nibble layout; it asserts d_out % 32 == 0). That silently changes
    the quantized base model and breaks `dense_weight`, so a calibration pass must not trigger it.
    """
    pinned = [m for m in model.modules()
              if kind(m) == "bnb4" and getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in pinned:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m in pinned:
            m.support_avx512bf16_for_cpu = True


def hold_cpu_layout(module: nn.Module) -> bool | None:
    """Stop bitsandbytes from repacking a 4-bit weight for its AVX512-bf16 CPU kernel while an adapter is
    attached: the repack rounds the scales to bf16 in place (the base weight moves by ~1e-2) and the kernel then
    computes in bf16, so the adapted layer would no longer equal the adapter around F.linear(x, W_deq, b).
    Returns the previous setting for `release_cpu_layout`, or None for other layers."""
    if kind(module) != "bnb4" or not hasattr(module, "support_avx512bf16_for_cpu"):
        return None
    prev = module.support_avx512bf16_for_cpu
    module.support_avx512bf16_for_cpu = False
    return prev


def release_cpu_layout(module: nn.Module, prev: bool | None) -> None:
    if prev is not None:
        module.support_avx512bf16_for_cpu = prev


def weight_hash(module: nn.Module) -> str:
    """sha256 of the dense weight's bytes (dequantized for quantized layers), in (d_out, d_in) layout."""
    W = dense_weight(module).detach().contiguous().cpu()
    if W.dtype == torch.bfloat16:
        data = W.view(torch.int16).numpy().tobytes()
    else:
        data = W.numpy().tobytes()
    h = hashlib.sha256(str(W.dtype).encode() + str(tuple(W.shape)).encode())
    h.update(data)
    return h.hexdigest()
