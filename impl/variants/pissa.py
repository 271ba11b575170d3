r"""PiSSA: principal singular values and singular vectors adaptation (Meng et al., 2024).

    W = U S Vᵀ (in fp32),   S̃_r = S_r / s,   A = diag(√S̃_r) Vh_r,   B = U_r diag(√S̃_r)
    W_res = W − s · B̃ Ã                     (B̃, Ã: the factors already rounded to their storage dtype)
    y' = W_res x + b + s · B A drop(x),      s = alpha / r   (rsLoRA: alpha / sqrt(r))

The top-r singular triplets of W become the trainable factors and the rest stays in the (frozen) base weight,
so W_res + s · B A = W at init up to one rounding of W_res: the identity holds within a dtype tolerance, not
bitwise. Pre-dividing S_r by s (PEFT's convention) gives A and B the same magnitudes for every alpha, so the
update dynamics do not depend on alpha. The residual is built from the rounded factors, in at least fp32
(float64 for a float64 base), so that the only error left is the rounding of W_res into the base dtype. The
runtime writes W_res into the base, keeps the original for a bit-exact detach and saves W_res in the
checkpoint; load restores it and never recomputes the SVD. Merge: W' = W_res + s · B A.

Quantized (bitsandbytes) layers are refused: rewriting a quantized weight would mean dequantizing, rewriting
and silently re-quantizing it.

References:
- paper: https://arxiv.org/abs/2404.02948 (section 3: W split by its SVD into the adapter and W^res;
  the paper's A = U_r S_r^½ is our B, its B = S_r^½ V_rᵀ our A)
- canonical code: https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/layer.py (pissa_init)
- authors' code: https://github.com/GraphPKU/PiSSA
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import TensorDecl, register
from .lora import LoRA, lora_scale


def principal_factors(W: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (diag(√(S_r/s)) Vh_r, U_r diag(√(S_r/s))) from the SVD W = U S Vh, taken in fp32 (paper
    section 3, with PEFT's division of S_r by the scale s). s · B A is then the best rank-r approximation of W."""
    U, S, Vh = torch.linalg.svd(W.float().contiguous(), full_matrices=False)
    root = (S[:r] / s).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


def residual(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """W_res = W − s · B A (paper section 3), from the factors as stored (already rounded), in at least fp32."""
    dt = torch.promote_types(W.dtype, torch.float32)
    return W.to(dt) - s * (B.to(dt) @ A.to(dt))


@register
class PiSSA(LoRA):
    """LoRA's forward and merge on the residual base; only the init differs."""

    name = "pissa"
    quantized = False
    rewrites_base = True

    @classmethod
    def validate(cls, cfg):
        """alpha > 0: the init divides the singular values by s = alpha / r."""
        if cfg.alpha <= 0:
            raise ConfigError(f"field 'alpha': pissa divides S_r by alpha / r, so alpha must be > 0, got {cfg.alpha}")

    def tensors(self, d_in, d_out, cfg):
        return {"A": TensorDecl((cfg.r, d_in), "empty"), "B": TensorDecl((d_out, cfg.r), "empty")}

    def init(self, ad, W, cfg):
        s = lora_scale(cfg.alpha, cfg.r, cfg.rslora)
        A, B = self.factors(W, cfg.r, s)
        ad.A.copy_(A)
        ad.B.copy_(B)
        # the residual against the base weight at its own precision (W is an fp32 copy; a float64 base keeps
        # its float64 bits), from the rounded factors
        return residual(ad.weight().detach(), ad.A, ad.B, s)

    def factors(self, W, r, s):
        """(A, B) from W's top-r singular triplets (principal_factors)."""
        return principal_factors(W, r, s)
