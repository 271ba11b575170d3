"""Tolerances of docs/conventions.md §3: relative to the adapter's own contribution, derived from the dtype.

    err = ‖y − y*‖ / (‖Δy‖ + eps·‖y*‖),   Δy = y* − y_base,   norms = max-abs over the whole tensor

and a comparison passes when ‖y − y*‖ <= k · eps(dtype) · (‖Δy‖ + ‖y*‖), with k = ACCUMULATION[dtype] times a
factor the spec declares. The base k allows for sums over a few dozen terms; it is never tuned per variant.
"""
from __future__ import annotations

import torch

ACCUMULATION = {torch.float64: 64.0, torch.float32: 64.0, torch.bfloat16: 4.0, torch.float16: 8.0}
# A gradient runs the forward's chain of roundings and then the backward's: twice the allowance of an output.
BACKWARD = 2.0


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def maxabs(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def scaled_error(y: torch.Tensor, y_ref: torch.Tensor, y_base: torch.Tensor | None, dtype: torch.dtype) -> float:
    """‖y − y*‖ / (‖Δy‖ + eps·‖y*‖): the error at the scale of the adapter's contribution."""
    y, y_ref = y.detach().double(), y_ref.detach().double()
    delta = maxabs(y_ref - y_base.detach().double()) if y_base is not None else maxabs(y_ref)
    return maxabs(y - y_ref) / (delta + eps(dtype) * maxabs(y_ref) + 1e-300)


def bound(y_ref: torch.Tensor, y_base: torch.Tensor | None, dtype: torch.dtype, factor: float = 1.0) -> float:
    """The largest ‖y − y*‖ a correct implementation may show."""
    y_ref = y_ref.detach().double()
    delta = maxabs(y_ref - y_base.detach().double()) if y_base is not None else maxabs(y_ref)
    return ACCUMULATION[dtype] * factor * eps(dtype) * (delta + maxabs(y_ref)) + 1e-300


def close(y, y_ref, y_base, dtype, factor: float = 1.0) -> tuple[bool, float]:
    """(passes, scaled error) for an implementation output y against a reference y_ref."""
    err = maxabs(y.detach().double() - y_ref.detach().double())
    return err <= bound(y_ref, y_base, dtype, factor), scaled_error(y, y_ref, y_base, dtype)
