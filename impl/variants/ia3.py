r"""(IA)³: learned element-wise gates (Liu et al., 2022), on the output side (ia3) or the input side (ia3_ff).

    ia3:     y' = g ⊙ (W x + b)          g ∈ R^{d_out}   (attention k / v; the bias is gated too)
    ia3_ff:  y' = W (g ⊙ x) + b          g ∈ R^{d_in}    (feed-forward down projection; the bias is not)

The gate starts at exactly 1.0, so both are bitwise the base layer at init in every dtype. The gate is a
trainable fp32 tensor whatever the base dtype (a bf16 gate at 1.0 cannot move under a small step). There is
no separate adapter input, so dropout is rejected. Only the output (ia3) or the input (ia3_ff) changes, so
both work on bitsandbytes layers. r and alpha are unused. Merge: ia3 W' = diag(g) W, b' = g ⊙ b;
ia3_ff W' = W diag(g), b' = b.

References:
- paper: https://arxiv.org/abs/2205.05638 (§3.3: l_k ⊙ K, l_v ⊙ V and (l_ff ⊙ γ(W_1 x)) W_2)
- canonical code: https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/ia3/layer.py
"""
from __future__ import annotations

import torch

from ..registry import TensorDecl, Variant, register


def gate_output(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """y' = g ⊙ y over the last (output) dim, computed in g's dtype and cast back to y's."""
    return (y.to(g.dtype) * g).to(y.dtype)


def gate_input(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x' = g ⊙ x over the last (input) dim, computed in g's dtype and cast back to x's."""
    return (x.to(g.dtype) * g).to(x.dtype)


class _Gate(Variant):
    """Shared declarations of both gates: no dropout, no use of r."""

    dropout = False

    @classmethod
    def check_layer(cls, cfg, d_in, d_out, name):
        """A gate fits any layer: r is not used."""


@register
class IA3(_Gate):
    name = "ia3"

    def tensors(self, d_in, d_out, cfg):
        return {"g": TensorDecl((d_out,), "ones")}

    def forward(self, ad, x, y):
        return gate_output(y, ad.g)

    def merged(self, ad, W, b):
        g = ad.g.detach().float()
        return g[:, None] * W, None if b is None else g * b


@register
class IA3FF(_Gate):
    name = "ia3_ff"
    side = "input"

    def tensors(self, d_in, d_out, cfg):
        return {"g": TensorDecl((d_in,), "ones")}

    def forward_input(self, ad, x):
        return gate_input(x, ad.g)

    def merged(self, ad, W, b):
        return W * ad.g.detach().float()[None, :], b
