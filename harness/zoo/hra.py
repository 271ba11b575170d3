"""hra mutants: the gated dead start, the reflections in reverse order."""
from impl.registry import TensorDecl
from impl.variants.hra import HRA, householder_apply, reflect

from . import Mutant


class GatedDeadStart(HRA):
    """The anchor's gated form x' = x + g·(H x − x) with g = 0 at init: identity, but no gradient reaches U."""

    def tensors(self, d_in, d_out, cfg):
        return {**super().tensors(d_in, d_out, cfg), "g": TensorDecl((1,), "zeros")}

    def forward_input(self, ad, x):
        x32 = x.to(ad.U.dtype)
        return (x32 + ad.g * (householder_apply(x32, ad.U) - x32)).to(x.dtype)


class ReverseOrder(HRA):
    """H_0 applied to x first (x' = H_{r−1} ⋯ H_0 x): PEFT's product W H_0 ⋯ H_{r−1} read the wrong way round."""

    def forward_input(self, ad, x):
        v = x.to(ad.U.dtype)
        for i in range(ad.U.shape[0]):
            v = reflect(v, ad.U[i])
        return v.to(x.dtype)


MUTANTS = [
    Mutant("hra.gated_dead_start", GatedDeadStart, "gradient_pattern",
           "gated form x + g·(Hx − x) with g = 0 at init: dead gradient for the reflection vectors"),
    Mutant("hra.reverse_order", ReverseOrder, "oracle", "reflections applied in reverse order (H_0 first)"),
]
