"""Spec of AntiPaSTO with the 1 + ELU gain (lora-lite's family branch): S_eff = S ⊙ f(coeff · g) on W's top-r SVD."""
import torch
from hypothesis import strategies as st

from ..schema import Constraint, Reference, Spec, register
from . import _antipasto_common as common


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W_res x + b + U (S ⊙ f(coeff · g̃) ⊙ Vh x), g̃ = min(g, 0) under suppress_only, f(z) = 1 + ELU(z);
    float64, row convention. W is the layer's current base weight, i.e. the residual W_res."""
    g = torch.clamp(T["g"], max=0) if cfg.suppress_only else T["g"]
    s_eff = T["S"] * common.gain(knobs["coeff"] * g)
    y = x @ W.T + (0 if b is None else b)
    return y + ((x @ T["Vh"].T) * s_eff) @ T["U"].T


def dense(W, b, T, cfg, knobs):
    """The second formulation: D = W_res + U diag(S ⊙ f(coeff · g̃)) Vh built as one (d_out, d_in) matrix."""
    g = torch.clamp(T["g"], max=0) if cfg.suppress_only else T["g"]
    return W + T["U"] @ torch.diag(T["S"] * common.gain(knobs["coeff"] * g)) @ T["Vh"]



def init_oracle(W, cfg, X):
    """Without data: the top-r SVD of W; with data: W's r singular triplets with the largest
    S_i · pool_t |x_t · v_i| over the non-padding tokens (Wanda-style). g = 0; the base becomes W − U S Vh."""
    U, S, Vh = common.top_r(W, cfg.r) if X is None else common.wanda_select(W, X, cfg.r, cfg.act_pool)
    return {**common.basis_init(W, U, S, Vh, "Vh"), "g": torch.zeros(cfg.r, dtype=W.dtype)}


def fields(draw, d_in, d_out):
    return {"coeff": common.coeff(draw), "suppress_only": draw(st.booleans(), label="suppress_only"),
            "act_pool": common.pool(draw)}


SPEC = register(
    Spec(
        name="antipasto",
        title="AntiPaSTO: 1 + ELU gain on W's top-r singular values",
        equation=(r"W = W_{res} + U\,\mathrm{diag}(S)\,V_h,\quad S_{eff} = S \odot f(c\,\tilde g),\ "
                  r"f(z) = 1 + \mathrm{ELU}(z),\quad y = W_{res} x + b + U\,(S_{eff} \odot V_h x)"),
        **common.gain_family("Vh", "top-r (or data-selected) left singular vectors of W",
                             "their right singular vectors (rows)"),
        **common.SHARED,
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        # identity_factor = 1 (common.SHARED), derived: W_res + U S Vh equals W up to one rounding of W_res into
        # the base dtype (the factors are rounded before the residual is formed, in float64); the output adds the
        # base matmul's rounding, the cast of the fp32 delta and the final add: four roundings of at most eps/2
        # each at the scale of the output (the residual and the top-r path each stay within ~2 max|y|), i.e.
        # <= 4 eps max|y|, inside the property's 2 · ACCUMULATION · eps max|y| (8 eps in bf16) at factor 1. Measured over 400 drawn cases:
        # 0.96 eps max|y| (bf16), 1.9 (fp32), 2.6 (fp64).
        data="optional",
        fields=fields,
        constraints=(
            *common.BASE_CONSTRAINTS,
            common.POOL_CONSTRAINT,
            Constraint("coeff is a finite number", {"coeff": float("nan")}),
        ),
        claims=common.gain_claims("Vh"),
        references=(
            common.PAPER,
            Reference("lora-lite antipasto (1 + ELU, branch antipasto-variants)",
                      "https://github.com/wassname/lora-lite/blob/5f9d90d8b83c09eeb86ba11b7aa9f03c9bbf6d71/src/lora_lite/variants/antipasto.py"),
            Reference("Wanda (|W|·‖x‖ score)", "https://arxiv.org/abs/2306.11695"),
        ),
        notes=(
            "f is evaluated as where(z > 0, 1 + z, exp(min(z, 0))): positive down to z ≈ −104 in fp32 (−745 in "
            "fp64), where exp underflows to 0; the claim is f >= 0 for every z (the literal 1 + ELU(z) is exactly 0 "
            "already at z <= −16.6 in fp32, −6.25 in bf16). The reference computes 1 + F.elu in x's dtype; here the "
            "adapter path runs in the trainables' dtype (fp32) and is cast once. Init: U, S, Vh from a float64 "
            "SVD, rounded to the storage dtype, and W_res formed from the rounded factors (the reference forms it "
            "from unrounded fp32 factors). With data, the selection pools over non-padding tokens only (the "
            "reference includes padding) and re-derives the basis from the original W, not from W_res + U S Vh. "
            "No PEFT counterpart."
        ),
    )
)
