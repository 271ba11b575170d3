r"""AntiPaSTO-Rot: additive singular-value deltas plus a block-diagonal Cayley rotation of the singular basis.

    W = W_res + U diag(S) Vh                           (top-r SVD, or the Wanda-selected r directions)
    y' = W_res x + b + U R_uᵀ diag(S + δ) R_v Vh x     (rotate_basis: V → R_u = I; U → R_v = I, R_u from rot_T;
                                                        both → R_v from rot_T, R_u from rot_T_u; none → both I)
    R = blockdiag(R_1 … R_{r/bs}),   R_k = (I − X_k)⁻¹ (I + X_k),   X_k = A_k / 2
    A_k = c · tanh(Â_k / c),   Â_k = ½ (T_k − T_kᵀ),   T_k = the strict upper triangle filled from rot_T[k]
    c = 2 tan(θ_max / 2) / sqrt(bs (bs − 1) / 2)

The Cayley map of a skew matrix is orthogonal with det +1. The clamp makes the angle bound HARD for every block
size: a real skew A has eigenvalues ±iλ_j with ‖A‖_F² = 2 Σ λ_j² >= 2 ‖A‖₂², and |A_ij| < c gives
‖A‖_F² < bs (bs − 1) c², so ‖A‖₂ < 2 tan(θ_max / 2); the Cayley angle of an eigenvalue iλ/2 of X is
2 atan(λ / 2) < θ_max. For bs = 2 the scale factor is 1, i.e. exactly the reference's elementwise clamp; for
bs > 2 the reference's unscaled clamp only bounds each entry (measured: 1.10 rad at bs = 4, 1.82 rad at bs = 8
for θ_max = 0.5), which is why it is scaled here.

Cost: the rotation acts on the r-dimensional coordinates (p = Vh x, then R_v p; R_uᵀ h before U), never on the
d_in- or d_out-dimensional basis: one r×r block-diagonal matmul per token per rotated basis (r² multiply-adds,
faster in practice than a per-block product with r·bs) plus r/bs tiny bs×bs solves per forward, against the
r (d_in + d_out) of the basis itself. Measured on CPU (Linear 1024×1024, 8×128 tokens, r = 16, bs = 4, forward
plus backward, paired medians): 1.01x-1.03x antipasto for the whole layer and 1.05x-1.14x for the adapter path
alone, where rebuilding the rotated basis each forward (the reference's way) measured 1.47x-1.53x.

rot_T (and rot_T_u, for 'both') hold the r/bs blocks' bs(bs−1)/2 skew entries; 'none' has neither.
δ (r,) and rot_T start at 0: R = I exactly and y' = W x up to the rounding of W_res (a tolerance-class identity;
the reference's δ₀ = 4e-4 + N(0, 4e-4) start is not an identity and is not used). S + δ can change sign: no
claim is made about it. With calibration data the basis is the Wanda selection with mean_abs pooling (the
reference's) or rms. Merge: W' = W_res + U R_uᵀ diag(S + δ) R_v Vh.

References:
- AntiPaSTO paper (SVD adapter with Cayley rotations): https://arxiv.org/abs/2601.07473
- canonical code (branch antipasto-variants):
  https://github.com/wassname/lora-lite/blob/5f9d90d8b83c09eeb86ba11b7aa9f03c9bbf6d71/src/lora_lite/variants/antipasto_rot.py
- Cayley transform of skew-symmetric matrices: https://en.wikipedia.org/wiki/Cayley_transform#Matrix_map
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..registry import TensorDecl, register
from ._svd import POOLS, SVDBasis, check_choice, select_by_activation

ROTATE = ("V", "U", "both", "none")


def skew_blocks(T: torch.Tensor, bs: int) -> torch.Tensor:
    """Â_k = ½ (T_k − T_kᵀ) for each row of T (n_blocks, bs(bs−1)/2) placed in the strict upper triangle."""
    rows, cols = torch.triu_indices(bs, bs, offset=1, device=T.device)
    A = T.new_zeros(T.shape[0], bs, bs)
    A[:, rows, cols] = T
    return 0.5 * (A - A.transpose(-1, -2))


def clamp_limit(theta: float, bs: int) -> float:
    """c = 2 tan(θ/2) / sqrt(bs(bs−1)/2): |A_ij| < c keeps every Cayley rotation angle below θ (docstring)."""
    return 2.0 * math.tan(theta / 2.0) / math.sqrt(bs * (bs - 1) / 2.0)


def cayley(A: torch.Tensor) -> torch.Tensor:
    """R = (I − A/2)⁻¹ (I + A/2), batched over the leading dimension."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    X = A / 2
    return torch.linalg.solve(eye - X, eye + X)


def block_diag(R: torch.Tensor) -> torch.Tensor:
    """The dense (r, r) block-diagonal matrix of the blocks R (n_blocks, bs, bs)."""
    n, bs, _ = R.shape
    eye = torch.eye(n, dtype=R.dtype, device=R.device)
    return (eye[:, None, :, None] * R[:, :, None, :]).reshape(n * bs, n * bs)


def rotate(p: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Apply blockdiag(R) (R: (n_blocks, bs, bs)) to the last dimension of p (..., n_blocks · bs), as one r×r
    matmul: measured faster on CPU than a batched per-block product (einsum/bmm) at r = 16 to 256."""
    return p @ block_diag(R).T


@register
class AntiPaSTORot(SVDBasis):
    name = "antipasto_rot"
    fields = {"block_size": 4, "rotate_basis": "V", "max_rotation_angle": 0.5, "act_pool": "mean_abs"}
    data = "optional"

    @classmethod
    def validate(cls, cfg):
        check_choice("rotate_basis", cfg.rotate_basis, ROTATE)
        check_choice("act_pool", cfg.act_pool, POOLS)
        if not 0.0 < cfg.max_rotation_angle < math.pi:
            raise ConfigError(f"field 'max_rotation_angle': expected a value in (0, pi), got {cfg.max_rotation_angle!r}")
        if cfg.block_size < 2:
            raise ConfigError(
                f"field 'block_size': expected an int >= 2 (a 1x1 rotation has no parameter; use "
                f"rotate_basis='none'), got {cfg.block_size!r}"
            )
        cls.check_blocks(cfg)

    @classmethod
    def check_blocks(cls, cfg):
        """block_size divides r: the rotation is block-diagonal over the r coordinates."""
        if cfg.r % cfg.block_size:
            raise ConfigError(f"field 'block_size': {cfg.block_size} does not divide r={cfg.r}")

    def tensors(self, d_in, d_out, cfg):
        out = {**self.basis(d_in, d_out, cfg), "delta": TensorDecl((cfg.r,), "zeros")}
        bs = cfg.block_size
        shape = (cfg.r // bs, bs * (bs - 1) // 2)
        if cfg.rotate_basis != "none":
            out["rot_T"] = TensorDecl(shape, "zeros")
        if cfg.rotate_basis == "both":
            out["rot_T_u"] = TensorDecl(shape, "zeros")
        return out

    def choose(self, W, X, cfg):
        return select_by_activation(W, X, cfg.r, cfg.act_pool)

    def blocks(self, T: torch.Tensor, cfg) -> torch.Tensor:
        """The rotation blocks (n_blocks, bs, bs) from the trainable skew entries T."""
        bs = cfg.block_size
        c = clamp_limit(cfg.max_rotation_angle, bs)
        return cayley(c * torch.tanh(skew_blocks(T, bs) / c))

    def rotations(self, ad) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(R_v, R_u) blocks, None where that basis is not rotated: rot_T rotates V (U under rotate_basis='U'),
        rot_T_u rotates U under 'both'."""
        rb = ad.cfg.rotate_basis
        if rb == "none":
            return None, None
        R = self.blocks(ad.rot_T, ad.cfg)
        if rb == "both":
            return R, self.blocks(ad.rot_T_u, ad.cfg)
        return (R, None) if rb == "V" else (None, R)

    def forward(self, ad, x, y):
        dt = ad.delta.dtype
        U, S, Vh = self.factors(ad, dt)
        R_v, R_u = self.rotations(ad)
        p = x.to(dt) @ Vh.T
        if R_v is not None:
            p = rotate(p, R_v)
        h = p * (S + ad.delta)
        if R_u is not None:
            h = rotate(h, R_u.transpose(-1, -2))
        return y + (h @ U.T).to(y.dtype)

    def merged(self, ad, W, b):
        U, S, Vh = self.factors(ad, torch.float64)
        R_v, R_u = self.rotations(ad)
        if R_v is not None:
            Vh = block_diag(R_v.double()) @ Vh
        if R_u is not None:
            U = U @ block_diag(R_u.double()).T
        return W.double() + (U * (S + ad.delta.double())) @ Vh, b
