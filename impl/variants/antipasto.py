r"""AntiPaSTO: a gain on each of W's top-r singular values, 1 + ELU shaped (family branch of lora-lite).

    W = W_res + U diag(S) Vh                       (top-r SVD, or the r directions the data drives hardest)
    S_eff = S ⊙ f(coeff · g̃),   g̃ = min(g, 0) if suppress_only else g
    f(z) = 1 + ELU(z) = where(z > 0, 1 + z, exp(min(z, 0)))
    y' = W_res x + b + U (S_eff ⊙ Vh x)

g (r,) starts at 0, so f = 1 and y' = W x up to the rounding of W_res (a tolerance-class identity). `coeff` is a
runtime knob read on every forward (coeff = 0 is the identity for any g; coeff < 0 swaps amplify and
suppress). The gain is never negative (no sign flip of a singular value, unlike S(1 + z)) and its derivative
is bounded by 1 (|∂S_eff,i/∂g_i| <= S_i |coeff|, unlike exp). With suppress_only and coeff >= 0 the layer can
only attenuate (S_eff <= S); a g that steps above 0 then gets zero gradient and stays (weight decay moves it).

With calibration data (optional) the basis is W's own r singular directions with the highest
score_i = S_i · rms_t |x_t · v_i| (or mean_abs) over the non-padding tokens (Wanda-style selection) instead of
the top r; the residual is then saved in the checkpoint. Merge: W' = W_res + U diag(S_eff) Vh.

References:
- AntiPaSTO paper (the S-space adapter; this gain is the library's later 1 + ELU form):
  https://arxiv.org/abs/2601.07473
- canonical code (branch antipasto-variants; the 1 + ELU gain, identical maths at ef69c88):
  https://github.com/wassname/lora-lite/blob/5f9d90d8b83c09eeb86ba11b7aa9f03c9bbf6d71/src/lora_lite/variants/antipasto.py
- ELU: https://arxiv.org/abs/1511.07289; Wanda's |W|·‖x‖ score: https://arxiv.org/abs/2306.11695 (eq. 1)
"""
from __future__ import annotations

import torch

from ..registry import TensorDecl, register
from ._svd import POOLS, SVDBasis, check_choice, gain, select_by_activation


def effective_singular_values(S: torch.Tensor, g: torch.Tensor, coeff: float, suppress_only: bool) -> torch.Tensor:
    """S_eff = S ⊙ f(coeff · g̃), g̃ = min(g, 0) under suppress_only."""
    if suppress_only:
        g = torch.clamp(g, max=0)
    return S * gain(coeff * g)


@register
class AntiPaSTO(SVDBasis):
    name = "antipasto"
    fields = {"coeff": 1.0, "suppress_only": False, "act_pool": "rms"}
    knobs = ("coeff",)
    data = "optional"

    @classmethod
    def validate(cls, cfg):
        check_choice("act_pool", cfg.act_pool, POOLS)

    def tensors(self, d_in, d_out, cfg):
        return {**self.basis(d_in, d_out, cfg), "g": TensorDecl((cfg.r,), "zeros")}

    def choose(self, W, X, cfg):
        return select_by_activation(W, X, cfg.r, cfg.act_pool)

    def s_eff(self, ad, dt: torch.dtype) -> torch.Tensor:
        """S_eff in dtype dt, with the live knob."""
        return effective_singular_values(ad.S.to(dt), ad.g.to(dt), ad.knobs["coeff"], ad.cfg.suppress_only)

    def forward(self, ad, x, y):
        dt = ad.g.dtype
        U, _, R = self.factors(ad, dt)
        h = (x.to(dt) @ R.T) * self.s_eff(ad, dt)
        return y + (h @ U.T).to(y.dtype)

    def merged(self, ad, W, b):
        U, _, R = self.factors(ad, torch.float64)
        return W.double() + (U * self.s_eff(ad, torch.float64)) @ R, b
