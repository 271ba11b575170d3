r"""Shared machinery of the AntiPaSTO family: a frozen SVD basis, the base residual, data-chosen bases.

    W = W_res + U diag(S) R,      R = Vh (orthonormal rows) or P (oblique, covariance-oriented)
    y' = W_res x + b + U core(diag(S) R x)

U (d_out, r), S (r,) and R (r, d_in) are frozen persistent buffers in the config's storage dtype; only a small
core is trainable. The variant returns W_res to the runtime, which writes it into the base weight, keeps the
original for a bit-exact detach and saves the residual in the checkpoint (load never recomputes an SVD or
needs calibration data). W_res is formed from the factors *as stored* (rounded to their dtype first), in
float64, so W_res + U S R reconstructs W up to one rounding of W_res into the base dtype.

Every decomposition here is a one-time init and is computed in float64 (accuracy over speed: the factors are
then rounded once into their storage dtype).

Basis choices (each returns the r chosen triplets in descending-S order):
- `top_r`: the plain truncated SVD of W (Eckart–Young in the Frobenius norm).
- `select_by_activation`: re-ranks W's own singular directions by how strongly the calibration tokens drive
  them (Wanda-style): score_i = S_i · pool_t |x_t · v_i| over the non-padding tokens, pool = rms or mean_abs;
  keep the r highest scores.
- `covariance_orient`: C = E[x xᵀ] over the non-padding tokens, damped C_ε = Q (max(Λ, 0) + ε) Qᵀ,
  SVD(W C_ε^{1/2}) = Û Ŝ V̂ᵀ, U = Û_r, S = Ŝ_r, P = V̂_rᵀ C_ε^{−1/2}. U S P is the minimiser of
  ‖(W − B) C_ε^{1/2}‖_F = E‖(W − B) x‖² (x with second moment C_ε) over rank-r B, and P C_ε Pᵀ = I_r.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..registry import TensorDecl, Variant

POOLS = ("rms", "mean_abs")


def gain(z: torch.Tensor) -> torch.Tensor:
    """f(z) = 1 + ELU(z) = 1 + z for z > 0, exp(z) for z <= 0, evaluated as where(z > 0, 1 + z, exp(min(z, 0))).

    f > 0 down to z ≈ −104 in fp32 (−745 in fp64), where exp underflows to exactly 0, so f >= 0 everywhere;
    1 + ELU(z) written literally is exactly 0 already for z <= −16.6 in fp32 (the 1 + absorbs exp(z) − 1).
    f' = exp(z) in (0, 1] for z <= 0 and 1 above: |f'| <= 1. The min(z, 0) keeps the branch not taken finite,
    so the gradient never becomes NaN (exp overflowing at large z would make it inf · 0)."""
    return torch.where(z > 0, 1 + z, torch.exp(torch.clamp(z, max=0)))


def top_r(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-r singular triplets (U_r, S_r, Vh_r) of W, float64."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


def activation_pool(proj: torch.Tensor, pool: str) -> torch.Tensor:
    """pool_t |proj_t| per column: root mean square ('rms') or mean absolute value ('mean_abs')."""
    if pool == "rms":
        return proj.pow(2).mean(0).sqrt()
    if pool == "mean_abs":
        return proj.abs().mean(0)
    raise ConfigError(f"field 'act_pool': expected one of {POOLS}, got {pool!r}")


def select_by_activation(W: torch.Tensor, X: torch.Tensor, r: int, pool: str):
    """The r singular triplets of W with the highest score_i = S_i · pool_t |x_t · v_i| over the tokens X
    (N, d_in), kept in descending-S order; float64. Re-ranks W's own singular vectors, never re-orients them."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    score = S * activation_pool(X.double() @ Vh.T, pool)
    idx = torch.topk(score, r).indices.sort().values
    return U[:, idx], S[idx], Vh[idx]


def damped_roots(X: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_ε^{1/2}, C_ε^{−1/2}) of the uncentred second moment C = XᵀX / N of the tokens X (N, d_in), damped as
    C_ε = Q (max(Λ, 0) + ε) Qᵀ; float64."""
    X = X.double()
    C = X.T @ X / X.shape[0]
    lam, Q = torch.linalg.eigh(C)
    lam = lam.clamp_min(0) + eps
    return (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T


def covariance_orient(W: torch.Tensor, X: torch.Tensor, r: int, eps: float):
    """(U_r, S_r, P) with SVD(W C_ε^{1/2}) = Û Ŝ V̂ᵀ, U_r = Û[:, :r], S_r = Ŝ[:r], P = V̂ᵀ[:r] C_ε^{−1/2}; float64.
    U_r S_r P minimises E‖(W − B) x‖² over rank-r B for x with second moment C_ε, and P C_ε Pᵀ = I_r."""
    half, inv_half = damped_roots(X, eps)
    U, S, Vh = torch.linalg.svd(W.double() @ half, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r] @ inv_half


def install(ad, W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, R: torch.Tensor, right: str) -> torch.Tensor:
    """Store U, S and the right factor R (as `right`) in the adapter's buffers (rounding them to their storage
    dtype), and return the residual W_res = W − U S R formed in float64 from the ROUNDED factors."""
    ad.U.copy_(U)
    ad.S.copy_(S)
    getattr(ad, right).copy_(R)
    Uq, Sq, Rq = ad.U.double(), ad.S.double(), getattr(ad, right).double()
    return W.double() - (Uq * Sq) @ Rq


class SVDBasis(Variant):
    """A variant whose base weight becomes W_res around a frozen rank-r basis U, S, R (this module's docstring).

    Subclasses add their core's tensors and math and, for a data-driven basis, `choose(W, X, cfg)`."""

    dropout = False  # no separate adapter input: the core acts on W's own top-r path
    quantized = False  # rewrites the base weight
    rewrites_base = True
    right: ClassVar[str] = "Vh"

    def basis(self, d_in: int, d_out: int, cfg) -> dict[str, TensorDecl]:
        r = cfg.r
        return {
            "U": TensorDecl((d_out, r), "empty", trainable=False),
            "S": TensorDecl((r,), "empty", trainable=False),
            self.right: TensorDecl((r, d_in), "empty", trainable=False),
        }

    def init(self, ad, W, cfg):
        """The plain top-r basis of the base weight, read at its own precision (a float64 base keeps its bits)."""
        W = ad.weight().detach().double()
        return install(ad, W, *top_r(W, cfg.r), right=self.right)

    def choose(self, W: torch.Tensor, X: torch.Tensor, cfg):
        """(U, S, R) chosen with the calibration tokens X; float64."""
        raise NotImplementedError

    def group_init(self, adapters, acts, cfg):
        """Re-choose each layer's basis from its ORIGINAL weight (not the rounded residual plus factors) and the
        layer's non-padding calibration inputs; return the new residuals."""
        out = {}
        for name, ad in adapters.items():
            W = ad.original().detach().double()
            out[name] = install(ad, W, *self.choose(W, acts[name], cfg), right=self.right)
        return out

    def factors(self, ad, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, R) cast to the compute dtype dt (the trainables' dtype)."""
        return ad.U.to(dt), ad.S.to(dt), getattr(ad, self.right).to(dt)


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"field '{name}': expected one of {list(allowed)}, got {value!r}")


def check_positive(name: str, value: float, upper: float | None = None, upper_open: bool = True) -> None:
    """0 < value (< or <= upper); a ConfigError naming the field otherwise."""
    ok = value > 0 and math.isfinite(value)
    if upper is not None:
        ok = ok and (value < upper if upper_open else value <= upper)
    if not ok:
        rng = f"(0, {upper:g}{')' if upper_open else ']'}" if upper is not None else "> 0"
        raise ConfigError(f"field '{name}': expected a value in {rng}, got {value!r}")
