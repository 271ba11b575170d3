r"""HRA: Householder reflection adaptation (Yuan et al., 2024), applied to the layer's input.

    y' = W H x + b,    H = H_0 H_1 ⋯ H_{r−1},    H_i = I − 2 u_i u_iᵀ / max(‖u_i‖², ε)

u_i is row i of U (r, d_in). H_{r−1} acts on x first and H_0 last, as in PEFT (which forms W @ H). The
forward applies the product in its compact WY (UT) form, H = I − Uᵀ T U with T (r, r) upper triangular and
T⁻¹ = striu(U Uᵀ) + ½ diag(max(‖u_i‖², ε)) (Joffrain et al. 2006): per token two thin matmuls and one r × r one,
2 r·d_in + r² multiply-adds; per forward the Gram matrix U Uᵀ (r²·d_in) and one r × r triangular solve. The
dense d_in × d_in product is never formed. ε = 1e-12 is a floor on ‖u_i‖² so that a vector trained to zero
gives a finite (if meaningless) reflection instead of NaN; the UT form holds for any such scale.

Init (PEFT's symmetric init): r/2 vectors drawn kaiming-uniform and each repeated twice, so rows 2j and 2j+1
are equal and H_{2j} H_{2j+1} = I: H = I up to rounding at init, and every vector has a non-zero gradient
(the two of a pair get exactly opposite ones). r must therefore be even (checked at config time). r is at
most d_in: more reflections than input dimensions add nothing.

H is orthogonal with det(H) = (−1)^r = +1, so the adapted layer is W times a rotation of the input. Only the
input changes, so HRA works on bitsandbytes layers. There is no separate adapter input: dropout is
rejected. alpha is unused (PEFT's HRA has no scale either). Merge: W' = W H.

References:
- paper: https://arxiv.org/abs/2405.17484 (§3: the adapted weight W H^{(r)} with H^{(r)} = Π_i (I − 2 u_i u_iᵀ))
- canonical code: https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/hra/layer.py
- compact WY / UT transform: Joffrain, Low, Quintana-Ortí, van de Geijn, Van Zee, "Accumulating Householder
  transformations, revisited", ACM TOMS 32(2), 2006, https://doi.org/10.1145/1141885.1141886 (eq. 2 and §3)
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..registry import TensorDecl, Variant, register

NORM_FLOOR = 1e-12


def paired_init(t: torch.Tensor, gen: torch.Generator | None) -> None:
    """Fill U (r, d_in) with r/2 kaiming-uniform rows, each repeated twice (rows 2j and 2j+1 equal).

    The bound 1/sqrt(r/2) is that of kaiming-uniform(a=√5) on PEFT's (d_in, r/2) half matrix, whose fan-in is
    r/2; only the direction of each row matters to the forward, the scale sets the gradient size.
    """
    r, d_in = t.shape
    bound = 1.0 / math.sqrt(r // 2)
    half = torch.empty(r // 2, d_in, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
    t.copy_(half.repeat_interleave(2, dim=0).to(t.dtype))


def reflect(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """H_u v = v − 2 (v·u / max(‖u‖², ε)) u for row vectors v (..., d); H_u is symmetric, so this is also v H_u."""
    return v - (2.0 * (v @ u) / (u @ u).clamp_min(NORM_FLOOR)).unsqueeze(-1) * u


def householder_factor(U: torch.Tensor) -> torch.Tensor:
    """T (r, r), upper triangular, such that H_0 H_1 ⋯ H_{r−1} = I − Uᵀ T U (the UT transform):
    T⁻¹ = striu(U Uᵀ) + ½ diag(max(‖u_i‖², ε)), i.e. H_i = I − u_i u_iᵀ / τ_i with τ_i = ½ max(‖u_i‖², ε)."""
    G = U @ U.t()
    S = torch.triu(G, diagonal=1) + torch.diag(0.5 * G.diagonal().clamp_min(NORM_FLOOR))
    eye = torch.eye(U.shape[0], dtype=U.dtype, device=U.device)
    return torch.linalg.solve_triangular(S, eye, upper=True)


def householder_apply(x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """x' = H x = H_0 (H_1 (⋯ (H_{r−1} x))) for row vectors x (..., d_in), in the compact WY form:
    x' = x − ((x Uᵀ) Tᵀ) U (the same product as reflecting by H_{r−1} first, in three matmuls)."""
    T = householder_factor(U)
    return x - ((x @ U.t()) @ T.t()) @ U


def householder_right(W: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """W H = ((W H_0) H_1) ⋯ H_{r−1}: each row of W reflected by H_0 first (the merge)."""
    for i in range(U.shape[0]):
        W = reflect(W, U[i])
    return W


@register
class HRA(Variant):
    name = "hra"
    side = "input"
    dropout = False

    @classmethod
    def validate(cls, cfg):
        if cfg.r % 2:
            raise ConfigError(
                f"field 'r': hra needs an even r (its init pairs the reflections so that H = I), got r={cfg.r}"
            )

    @classmethod
    def check_layer(cls, cfg, d_in, d_out, name):
        if cfg.r > d_in:
            raise ValueError(f"r={cfg.r} reflections exceed the input width d_in={d_in} of layer '{name}'")

    def tensors(self, d_in, d_out, cfg):
        return {"U": TensorDecl((cfg.r, d_in), paired_init)}

    def forward_input(self, ad, x):
        return householder_apply(x.to(ad.U.dtype), ad.U).to(x.dtype)

    def merged(self, ad, W, b):
        # contiguous: the same summation order whatever the storage layout (Linear or transposed Conv1D)
        return householder_right(W.contiguous(), ad.U.detach().float()), b
