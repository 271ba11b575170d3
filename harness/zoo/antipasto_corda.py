"""antipasto_corda mutants: a silent fallback to the plain SVD, PEFT's C-whitening in place of C^{1/2}."""
import torch

from impl.variants._svd import damped_roots, install, top_r
from impl.variants.antipasto_corda import AntiPaSTOCorDA

from . import Mutant


class FallbackWithoutData(AntiPaSTOCorDA):
    """Accepts a missing calibration set and silently keeps the plain top-r SVD (every run a no-op)."""

    data = "optional"

    def init(self, ad, W, cfg):
        W = ad.weight().detach().double()
        return install(ad, W, *top_r(W, cfg.r), right=self.right)


class WhitenWithC(AntiPaSTOCorDA):
    """SVD(W C_ε) and P = V̂ᵀ C_ε⁻¹ (PEFT's form) where the spec says C_ε^{1/2}: not the data-metric optimum."""

    def choose(self, W, X, cfg):
        half, _ = damped_roots(X, cfg.cov_eps)
        C = half @ half
        U, S, Vh = torch.linalg.svd(W.double() @ C, full_matrices=False)
        return U[:, : cfg.r], S[: cfg.r], Vh[: cfg.r] @ torch.linalg.inv(C)


MUTANTS = [
    Mutant("antipasto_corda.fallback_without_data", FallbackWithoutData, "data_path",
           "attach without calibration data silently falls back to the plain SVD"),
    Mutant("antipasto_corda.whiten_with_C", WhitenWithC, "init_formula",
           "whitening with C instead of C^{1/2} (PEFT's SVD(W C)): another, suboptimal top-r subspace"),
]
