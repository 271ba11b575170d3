r"""AntiPaSTO-CorDA: the AntiPaSTO gain in a covariance-oriented (oblique) basis.

    C = E[x xᵀ]  over the non-padding calibration tokens (uncentred),   C_ε = Q (max(Λ, 0) + ε) Qᵀ
    SVD(W C_ε^{1/2}) = Û Ŝ V̂ᵀ,   U = Û_r,  S = Ŝ_r,  P = V̂_rᵀ C_ε^{−1/2}  (r, d_in), oblique
    W_res = W − U diag(S) P                         (by subtraction, from the rounded factors: exact to one rounding)
    S_eff = S ⊙ f(coeff · g̃),  f(z) = where(z > 0, 1 + z, exp(min(z, 0))),  g̃ = min(g, 0) if suppress_only
    y' = W_res x + b + U (S_eff ⊙ P x)

P C_ε Pᵀ = I_r: P's rows are orthonormal in the damped data metric, not the Euclidean one; U has orthonormal
columns. U S P is the minimiser of ‖(W − B) C_ε^{1/2}‖_F = E‖(W − B) x‖² over rank-r B (x with second moment
C_ε): the rank-r part that moves the outputs most on the data. g starts at 0 (a tolerance-class identity);
`coeff` is a runtime knob (coeff = 0 is the identity); the gain is antipasto's (never negative, derivative
bounded by 1; suppress_only with coeff >= 0 only attenuates).

Calibration data is REQUIRED: attach without it is a clear error, never a silent fallback to the plain SVD
(which made every run of an earlier version identical to antipasto). The basis is chosen in the group init
only; until then U, S, P are 0 and the base is untouched, so the calibration pass sees the original layer.

Differs from PEFT's CorDA (and the paper's prose), which take SVD(W C_f) with C_f = C + d·mean(diag C)·I and
V = (V̂ᵀ C_f⁻¹)ᵀ: that whitens with C, not C^{1/2}. The two give the same U and the same U S P when C is
proportional to I (S and P then differ by a common scalar), and different top-r subspaces in general; only the
C^{1/2} form is the Eckart–Young optimum above. Only the paper's IPM mode (keep the top r) is implemented.
Merge: W' = W_res + U diag(S_eff) P.

References:
- CorDA paper: https://arxiv.org/abs/2406.05223
- canonical code (branch antipasto-variants):
  https://github.com/wassname/lora-lite/blob/5f9d90d8b83c09eeb86ba11b7aa9f03c9bbf6d71/src/lora_lite/variants/antipasto_corda.py
- PEFT 0.21.2 CorDA (the SVD(W C) form): https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/corda.py
- AntiPaSTO paper: https://arxiv.org/abs/2601.07473
"""
from __future__ import annotations

from ..registry import register
from ._svd import check_positive, covariance_orient
from .antipasto import AntiPaSTO


@register
class AntiPaSTOCorDA(AntiPaSTO):
    name = "antipasto_corda"
    fields = {"coeff": 1.0, "suppress_only": False, "cov_eps": 1e-3}
    data = "required"
    right = "P"

    @classmethod
    def validate(cls, cfg):
        check_positive("cov_eps", cfg.cov_eps)

    def init(self, ad, W, cfg):
        """Nothing before the data: U, S, P stay 0 (the adapter adds exactly 0) and the base is not rewritten."""
        return None

    def choose(self, W, X, cfg):
        return covariance_orient(W, X, cfg.r, cfg.cov_eps)
