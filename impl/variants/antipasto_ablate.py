r"""AntiPaSTO-Ablate: trainable directional ablation inside W's top-r output coordinates.

    W = W_res + U diag(S) R            (R = Vh, top-r or Wanda-selected; or the CorDA-oriented P if cov_orient)
    h = diag(S) R x                    (the r output coordinates of the top-r path)
    Ĉ = orthonormal(c)                 (c (r, k): reduced QR, Gram–Schmidt in column order)
    ã = clamp(a, 0, 1)
    h' = h − coeff · Ĉ diag(ã) Ĉᵀ h = M h,     M = I − coeff · Ĉ diag(ã) Ĉᵀ
    y' = W_res x + b + U h'

M has eigenvalue 1 − coeff·ã_j along ĉ_j and 1 on the rest, so for coeff in [0, 1] every eigenvalue lies in
[0, 1]: ‖M‖₂ <= 1 and, U having orthonormal columns, the layer cannot amplify its rank-r path. coeff is a
runtime knob (coeff = 0 is the identity for any c, a; coeff < 0 adds the directions back, i.e. amplifies).
With ã = 1, coeff = 1 it is Arditi-style directional ablation of the directions U ĉ_j, per layer.

Start: a = init_a (0.05) and c ~ N(0, 1/r): the one DECLARED non-identity start, a 5 % shrink along U ĉ (per
token ‖y' − W x‖ <= coeff · init_a · ‖W x‖ up to rounding). a = 0 would sit on the clamp's boundary, where one
step downwards kills the gradient of a and c for good; a and c get no gradient while a is outside [0, 1].

Data (optional): with calibration data the basis is re-chosen from the non-padding tokens: the CorDA
orientation (cov_orient = True: SVD of W C_ε^{1/2}, P = V̂_rᵀ C_ε^{−1/2}, stored in the `Vh` slot, so `Vh` is
then oblique) or, unlike the reference (which ignores data unless cov_orient), the Wanda selection of W's own
singular directions, so that data passed is never silently unused. Merge: W' = W_res + U M diag(S) R.

References:
- AntiPaSTO paper: https://arxiv.org/abs/2601.07473
- canonical code (branch antipasto-variants):
  https://github.com/wassname/lora-lite/blob/09dcfe0d41c9209fcfb072a71d23356f11f80c46/src/lora_lite/variants/antipasto_ablate.py
- directional ablation: https://arxiv.org/abs/2406.11717
- CorDA orientation: https://arxiv.org/abs/2406.05223
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import TensorDecl, register
from ._svd import POOLS, SVDBasis, check_choice, check_positive, covariance_orient, select_by_activation


def orthonormal(c: torch.Tensor) -> torch.Tensor:
    """Ĉ (r, k) with orthonormal columns spanning c's, by reduced QR (column j orthogonalised against 1..j−1)."""
    return torch.linalg.qr(c, mode="reduced").Q


def ablation_core(h: torch.Tensor, C: torch.Tensor, a: torch.Tensor, coeff: float) -> torch.Tensor:
    """h' = h − coeff · Ĉ diag(ã) Ĉᵀ h on the last dimension of h (row convention)."""
    return h - coeff * ((h @ C) * a) @ C.T


@register
class AntiPaSTOAblate(SVDBasis):
    name = "antipasto_ablate"
    fields = {"k": 1, "init_a": 0.05, "coeff": 1.0, "cov_orient": False, "cov_eps": 1e-3, "act_pool": "rms"}
    knobs = ("coeff",)
    data = "optional"

    @classmethod
    def validate(cls, cfg):
        if cfg.k < 1 or cfg.k >= cfg.r:
            raise ConfigError(
                f"field 'k': expected 1 <= k < r={cfg.r} ablation directions (k = r directions span the whole top-r "
                f"space, where equal strengths make the directions c a dead parameter), got {cfg.k!r}"
            )
        check_positive("init_a", cfg.init_a, upper=1.0)
        check_positive("cov_eps", cfg.cov_eps)
        check_choice("act_pool", cfg.act_pool, POOLS)

    def tensors(self, d_in, d_out, cfg):
        r, k, a0 = cfg.r, cfg.k, float(cfg.init_a)
        return {
            **self.basis(d_in, d_out, cfg),
            "c": TensorDecl((r, k), lambda t, g: t.normal_(0.0, r**-0.5, generator=g)),
            "a": TensorDecl((k,), lambda t, g: t.fill_(a0)),
        }

    def choose(self, W, X, cfg):
        if cfg.cov_orient:
            return covariance_orient(W, X, cfg.r, cfg.cov_eps)
        return select_by_activation(W, X, cfg.r, cfg.act_pool)

    def directions(self, ad) -> torch.Tensor:
        """Ĉ, the orthonormalised ablation directions."""
        return orthonormal(ad.c)

    def strength(self, ad) -> torch.Tensor:
        """ã = clamp(a, 0, 1)."""
        return ad.a.clamp(0.0, 1.0)

    def forward(self, ad, x, y):
        dt = ad.c.dtype
        U, S, R = self.factors(ad, dt)
        h = (x.to(dt) @ R.T) * S
        h = ablation_core(h, self.directions(ad), self.strength(ad), ad.knobs["coeff"])
        return y + (h @ U.T).to(y.dtype)

    def merged(self, ad, W, b):
        U, S, R = self.factors(ad, torch.float64)
        M = ablation_core(torch.eye(ad.cfg.r, dtype=torch.float64), self.directions(ad).double(),
                          self.strength(ad).double(), ad.knobs["coeff"])  # symmetric, so rows = columns
        return W.double() + U @ (M * S) @ R, b
