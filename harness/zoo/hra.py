"""hra mutants: the gated dead start, the reflections in reverse order, the reflections on the output side."""
from impl.registry import TensorDecl
from impl.variants.hra import HRA, householder_apply, householder_right, paired_init, reflect

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


class OutputSide(HRA):
    """The reflections act on W's output side, y' = H W x + b for W H x + b: u_i sized d_out. On a square layer a
    wrong value; on a non-square one a tensor shaped for the other side."""

    side = "output"

    def tensors(self, d_in, d_out, cfg):
        return {"U": TensorDecl((cfg.r, d_out), paired_init)}

    def forward(self, ad, x, y):
        b = ad.bias()
        lin = y if b is None else y - b.to(y.dtype)
        out = householder_apply(lin.to(ad.U.dtype), ad.U).to(y.dtype)
        return out if b is None else out + b.to(y.dtype)

    def merged(self, ad, W, b):
        return householder_right(W.t().contiguous(), ad.U.detach().float()).t(), b


MUTANTS = [
    Mutant("hra.gated_dead_start", GatedDeadStart, "gradient_pattern",
           "gated form x + g·(Hx − x) with g = 0 at init: dead gradient for the reflection vectors"),
    Mutant("hra.reverse_order", ReverseOrder, "oracle", "reflections applied in reverse order (H_0 first)"),
    Mutant("hra.output_side", OutputSide, "oracle", "the reflections act on W's output side (H W for W H)"),
]
