r"""DeLoRA: decoupled low-rank adaptation, angles and strength apart (Bini et al., 2025).

    ΔW = (λ / r) · B Ξ A · diag(w),   Ξ = diag(1 / (max(‖a_i‖, 1e-4) · max(‖b_i‖, 1e-4))),   w_j = ‖W_{:,j}‖
    y' = W x + b + (λ / r) · B Ξ A (w ⊙ drop(x))

a_i is row i of A (r, d_in), b_i column i of B (d_out, r): each rank-one term b_i a_iᵀ is normalised to unit
Frobenius (and spectral) norm, so the update's strength is the trainable scalar λ alone, times the norm of
each input channel of the pretrained weight. Hence ‖ΔW‖₂ ≤ |λ| · max_j w_j for any A and B. The norms are
clamped at 1e-4 as in PEFT (not an ε added): a zero column of B gets a finite, large gain.

w (d_in,) is computed once at attach from the weight's values (a dequantized copy on bitsandbytes layers,
never the packed storage) and kept as a persistent frozen buffer, saved with the adapter. B starts at 0, so
the update is exactly 0 at init for every λ (bitwise identity); λ starts at lambda0 = 15 (PEFT's and the
paper's default): with λ = 0 every gradient would be 0 at step 0. At init A and λ have zero gradient (B = 0)
and B a non-zero one. Dropout acts on the adapter input (PEFT's module_dropout is element-wise dropout there).
alpha is unused: λ plays its role. Merge: W' = W + ΔW. The forward folds w into A's columns (an r × d_in
product per forward) and accumulates the second matmul into y (delora_add).

References:
- paper: https://arxiv.org/abs/2503.18225 (section 3: ΔW = λ‖W‖/r · B Ξ A, with the per-input-channel norm)
- canonical code: https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/delora/layer.py
- authors' code: https://github.com/ExplainableML/DeLoRA
"""
from __future__ import annotations

import torch

from ..registry import TensorDecl, Variant, register

NORM_CLAMP = 1e-4


def input_channel_norms(W: torch.Tensor) -> torch.Tensor:
    """w_j = ‖W_{:,j}‖₂: the norm of each input channel (column) of W (d_out, d_in), over the output dim."""
    return torch.linalg.vector_norm(W, dim=0)


def xi(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Ξ_ii = 1 / (max(‖a_i‖, 1e-4) · max(‖b_i‖, 1e-4)): the normaliser of each rank-one term b_i a_iᵀ."""
    An = torch.linalg.vector_norm(A, dim=1).clamp_min(NORM_CLAMP)
    Bn = torch.linalg.vector_norm(B, dim=0).clamp_min(NORM_CLAMP)
    return 1.0 / (An * Bn)


def delora_delta(xd: torch.Tensor, A, B, lam, w, r: int) -> torch.Tensor:
    """Δy = (λ/r) · B Ξ A (w ⊙ x_d), in the row convention, computed in A's dtype."""
    h = (xd.to(A.dtype) * w.to(A.dtype)) @ A.t()
    return (h * (lam / r * xi(A, B))) @ B.t()


def delora_add(y: torch.Tensor, xd: torch.Tensor, A, B, lam, w, r: int) -> torch.Tensor:
    """y + (λ/r) · B Ξ A (w ⊙ x_d), the same product as delora_delta with w folded into A's columns (an r × d_in
    product per forward instead of a pass over the tokens' inputs) and the last matmul accumulating into y (one
    addmm); in A's dtype, cast once to y's dtype. B = 0 adds exactly 0."""
    dt = A.dtype
    h = (xd.to(dt) @ (A * w.to(dt)).t()) * (lam / r * xi(A, B))
    out = torch.addmm(y.to(dt).reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t())
    return out.view(y.shape).to(y.dtype)


def delora_weight(A, B, lam, w, r: int) -> torch.Tensor:
    """ΔW = (λ/r) · B Ξ A · diag(w): the dense update (d_out, d_in)."""
    return (B * (lam / r * xi(A, B))) @ A * w[None, :]


@register
class DeLoRA(Variant):
    name = "delora"
    fields = {"lambda0": 15.0}

    def tensors(self, d_in, d_out, cfg):
        return {
            "A": TensorDecl((cfg.r, d_in), "kaiming"),
            "B": TensorDecl((d_out, cfg.r), "zeros"),
            "lam": TensorDecl((1,), "empty"),
            "wnorm": TensorDecl((d_in,), "empty", trainable=False),
        }

    def init(self, ad, W, cfg):
        ad.lam.fill_(cfg.lambda0)
        # from the weight at its own precision (at least fp32; W is an fp32 copy, a float64 base keeps its bits)
        Wd = ad.weight().detach()
        ad.wnorm.copy_(self.norms(Wd.to(torch.promote_types(Wd.dtype, torch.float32))))
        return None

    def norms(self, W):
        """The frozen per-input-channel norms w of the dense weight W (input_channel_norms)."""
        return input_channel_norms(W)

    def forward(self, ad, x, y):
        return delora_add(y, ad.drop(x), ad.A, ad.B, ad.lam, ad.wnorm, ad.cfg.r)

    def merged(self, ad, W, b):
        return W + delora_weight(ad.A.float(), ad.B.float(), ad.lam.float(), ad.wnorm.float(), ad.cfg.r), b
