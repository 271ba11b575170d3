"""Tolerances of docs/conventions.md §3: relative to the adapter's own contribution, derived from the dtype.

A comparison of an output y with a reference y* passes when

    ‖y − y*‖ <= k · eps(dtype) · (‖Δy‖ + ‖y*‖),   Δy = y* − y_base,   norms = max-abs over the whole tensor

with k = ACCUMULATION[dtype] times a factor the spec declares. The base k allows for sums over a few dozen terms;
it is never tuned per variant. Every comparison reports its *scaled error*: the measured error divided by the
error it is allowed (`within`), so a check fails exactly when its scaled error exceeds 1, and the number printed
with a failure says by how much.
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


def within(err: float, allowed: float) -> tuple[bool, float]:
    """(passes, scaled error) for a measured error against the largest error a correct implementation may show:
    the scaled error is err / allowed, and the check passes exactly when it is at most 1."""
    ratio = err / (allowed + 1e-300)
    return ratio <= 1.0, ratio


def bound(y_ref: torch.Tensor, y_base: torch.Tensor | None, dtype: torch.dtype, factor: float = 1.0) -> float:
    """The largest ‖y − y*‖ a correct implementation may show."""
    y_ref = y_ref.detach().double()
    delta = maxabs(y_ref - y_base.detach().double()) if y_base is not None else maxabs(y_ref)
    return ACCUMULATION[dtype] * factor * eps(dtype) * (delta + maxabs(y_ref)) + 1e-300


def close(y, y_ref, y_base, dtype, factor: float = 1.0) -> tuple[bool, float]:
    """(passes, scaled error) for an implementation output y against a reference y_ref."""
    err = maxabs(y.detach().double() - y_ref.detach().double())
    return within(err, bound(y_ref, y_base, dtype, factor))


def gradient_limit(dtype: torch.dtype, factor: float = 1.0) -> float:
    """The largest gradient error a correct implementation may show, per unit of the terms the gradient sums."""
    return BACKWARD * ACCUMULATION[dtype] * factor * eps(dtype)
