r"""LoRA: low-rank adaptation (Hu et al., 2021).

    y' = W x + b + s · B A drop(x),    s = alpha / r   (rsLoRA: s = alpha / sqrt(r), Kalajdzievski 2023)

A (r, d_in) starts kaiming-uniform, B (d_out, r) starts at zero, so the delta is exactly 0 at init in every
dtype. Dropout acts on the adapter input only. Merge: W' = W + s · B A.

References:
- paper: https://arxiv.org/abs/2106.09685 (eq. 3)
- rsLoRA: https://arxiv.org/abs/2312.03732
- canonical code: https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/layer.py
"""
from __future__ import annotations

import math

import torch

from ..registry import TensorDecl, Variant, register


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """Δy = s · B A x, in the row convention x @ Aᵀ @ Bᵀ, computed in A's dtype."""
    return (x.to(A.dtype) @ A.t() @ B.t()) * s


def lora_add(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """y + s · B A x with the second matmul accumulating into y and the scale inside it (one addmm: no separate
    scale and sum passes over the output, one output buffer fewer); in A's dtype, cast once to y's dtype.
    B = 0 adds exactly 0, so the result is y bit for bit."""
    h = x.to(A.dtype) @ A.t()
    out = torch.addmm(y.to(A.dtype).reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(), alpha=s)
    return out.view(y.shape).to(y.dtype)


@register
class LoRA(Variant):
    name = "lora"
    fields = {"rslora": False}

    def tensors(self, d_in, d_out, cfg):
        return {"A": TensorDecl((cfg.r, d_in), "kaiming"), "B": TensorDecl((d_out, cfg.r), "zeros")}

    def forward(self, ad, x, y):
        s = lora_scale(ad.cfg.alpha, ad.cfg.r, ad.cfg.rslora)
        return lora_add(y, ad.drop(x), ad.A, ad.B, s)

    def merged(self, ad, W, b):
        s = lora_scale(ad.cfg.alpha, ad.cfg.r, ad.cfg.rslora)
        return W + s * (ad.B.float() @ ad.A.float()), b
