"""What the four AntiPaSTO specs share: float64 reference formulas and measurements made through the Probe.

Everything here is written from the equations (no import from impl/). The measurements read the
implementation's dense map D (y(x) = D x + y(0)) and its stored basis U, S, R (R = Vh or the oblique P):
D − W_res = U · core · R, so core = Uᵀ (D − W_res) R⁺ is the r×r map the variant applies in its S-coordinates.
With S set to 1 on the live adapter, core is exactly the trainable part (the gain, the rotation, the ablation).
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..schema import Claim, Constraint, Reference, TensorSpec

POOLS = ("rms", "mean_abs")
DROPOUT_REJECTED = Constraint("no separate adapter input: dropout must be 0", {"dropout": 0.1})
# What every AntiPaSTO spec declares alike: no adapter dropout, no quantized base (the init rewrites W), the
# identity within the same four roundings (see antipasto's spec), and these first constraints and reference.
SHARED = dict(dropout="rejected", quantized="raises", rewrites_base=True, identity_factor=1.0)
BASE_CONSTRAINTS = (Constraint("r is a positive integer", {"r": 0}), DROPOUT_REJECTED)
POOL_CONSTRAINT = Constraint("act_pool is rms or mean_abs", {"act_pool": "max"})
PAPER = Reference("AntiPaSTO paper", "https://arxiv.org/abs/2601.07473")


# ------------------------------------------------------------------------------------------ reference formulas


def gain(z: torch.Tensor) -> torch.Tensor:
    """f(z) = 1 + ELU(z): 1 + z for z > 0, exp(z) for z <= 0 (float64)."""
    return torch.where(z > 0, 1 + z, torch.exp(torch.clamp(z, max=0)))


def top_r(W: torch.Tensor, r: int):
    """The top-r singular triplets of W."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


def wanda_select(W: torch.Tensor, X: torch.Tensor, r: int, pool: str):
    """W's r singular triplets with the largest S_i · pool_t |x_t · v_i| (pool: rms or mean of |·|), kept in
    descending-S order."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    a = (X @ Vh.T).abs()
    act = a.pow(2).mean(0).sqrt() if pool == "rms" else a.mean(0)
    keep = torch.sort(torch.argsort(S * act, descending=True)[:r]).values
    return U[:, keep], S[keep], Vh[keep]


def damped_moment(X: torch.Tensor, eps: float) -> torch.Tensor:
    """C_ε = Q (max(Λ, 0) + ε) Qᵀ for the uncentred second moment C = XᵀX / N = Q Λ Qᵀ."""
    lam, Q = torch.linalg.eigh(X.T @ X / X.shape[0])
    return (Q * (lam.clamp_min(0) + eps)) @ Q.T


def sym_power(C: torch.Tensor, p: float) -> torch.Tensor:
    """C^p for a symmetric positive definite C."""
    lam, Q = torch.linalg.eigh(C)
    return (Q * lam.pow(p)) @ Q.T


def corda_orient(W: torch.Tensor, X: torch.Tensor, r: int, eps: float):
    """(U_r, S_r, P): SVD(W C_ε^{1/2}) = Û Ŝ V̂ᵀ, P = V̂_rᵀ C_ε^{−1/2}."""
    C = damped_moment(X, eps)
    U, S, Vh = torch.linalg.svd(W @ sym_power(C, 0.5), full_matrices=False)
    return U[:, :r], S[:r], Vh[:r] @ sym_power(C, -0.5)


def basis_init(W, U, S, R, right: str) -> dict:
    """The deterministic init of a basis: the buffers and the residual base W − U diag(S) R."""
    return {"U": U, "S": S, right: R, "base_weight": W - (U * S) @ R}


# ------------------------------------------------------------------------------------------ field strategies


def negative_g(shape, gen) -> torch.Tensor:
    """Non-init values of the gain parameter g: in (−0.65, −0.05). Under suppress_only a g above 0 is clamped
    away and has zero gradient (it could not move in a training step), so perturbed values stay negative; the
    amplifying branch f(z > 0) is still reached through a negative coeff."""
    return -(0.05 + 0.6 * torch.rand(shape, generator=gen, dtype=torch.float64))


def coeff(draw) -> float:
    return draw(st.sampled_from([1.0, 0.5, 2.0, -1.0]), label="coeff")


def pool(draw) -> str:
    return draw(st.sampled_from(POOLS), label="act_pool")


# ------------------------------------------------------------------------------------------ measurements


def core(probe, right: str) -> torch.Tensor:
    """Uᵀ (D − W_res) R⁺ measured on the implementation, with S set to 1 (so it is the trainable core itself)."""
    T = probe.tensors()
    probe.set("S", torch.ones_like(T["S"]))
    D = probe.dense_map()
    return T["U"].T @ (D - probe.base_weight()) @ torch.linalg.pinv(T[right])


def noise_floor(probe, right: str) -> float:
    """An upper bound on the measurement error of one entry of `core` from the rounding of the outputs it is
    read from: each entry of D is the difference of two outputs, each rounded at most twice (the base output,
    then the adapter's added delta), so |ΔD_ab| <= 4 eps max|y|; projected on a unit column of U and a column
    of R⁺, the entry's error is at most sqrt(d_in d_out) · max‖R⁺ col‖ times that."""
    T = probe.tensors()
    eps = torch.finfo(probe.case.dtype).eps
    d_in, d_out = probe.case.d_in, probe.case.d_out
    x = torch.cat([torch.eye(d_in, dtype=torch.float64), torch.zeros(1, d_in, dtype=torch.float64)], 0)
    y_max = float(probe.output(x).abs().max())
    pinv_col = float(torch.linalg.pinv(T[right]).norm(dim=0).max())
    return 4 * eps * y_max * (d_in * d_out) ** 0.5 * pinv_col


def set_g(probe, scale: float, salt: int) -> torch.Tensor:
    """Set g to N(0, scale²) values of both signs (a claim's own saturated inputs) and return them."""
    g = torch.randn(probe.tensors()["g"].shape, generator=probe.case.gen(salt), dtype=torch.float64) * scale
    probe.set("g", g)
    return g


def gains(probe, right: str) -> torch.Tensor:
    """The measured gains f_i = S_eff,i / S_i (the diagonal of the core with S = 1)."""
    return torch.diagonal(core(probe, right))


def gain_nonnegative(right: str):
    def of(probe):
        """With g ~ N(0, 4²) (saturated, both signs): f_i + (measurement noise floor): a gain that reads as a hair
        below 0 from the rounding of an exact 0 passes; a negative gain (a sign-flipped singular value) does not."""
        set_g(probe, 4.0, 11)
        return gains(probe, right) + noise_floor(probe, right)
    return of


def gain_slope(right: str):
    def of(probe):
        """|f(z ± 1) − f(z)| from the implementation, stepping g by ±1/|coeff| (so z = coeff·g̃ moves by at most 1):
        by the mean value theorem it is <= sup |f'|, which the claim bounds by 1."""
        c = probe.knobs()["coeff"]
        g = set_g(probe, 1.0, 12)
        if c == 0:
            return torch.zeros(1, dtype=torch.float64)
        f0 = gains(probe, right)
        out = []
        for sign in (1.0, -1.0):
            probe.set("g", g + sign / abs(c))
            out.append((gains(probe, right) - f0).abs())
        return torch.cat(out)
    return of


def attenuation(right: str):
    def of(probe):
        """With suppress_only and coeff >= 0 (the knob set to |coeff|) and g ~ N(0, 1) (both signs), the measured
        gains; vacuous (0) for a config without suppress_only."""
        if not probe.cfg.suppress_only:
            return torch.zeros(1, dtype=torch.float64)
        set_g(probe, 1.0, 13)
        probe.set_knob("coeff", abs(probe.knobs()["coeff"]))
        return gains(probe, right)
    return of


def gain_family(right: str, u_doc: str, right_doc: str) -> dict:
    """The Spec fields the 1 + ELU gain variants (antipasto, antipasto_corda) share, `right` naming the right
    factor (Vh, or CorDA's oblique P): the frozen U, S, right factor and the trainable gate g (g = 0 is the
    identity), one parameter per direction, and the coeff knob."""
    return dict(
        tensors=(
            TensorSpec("U", "(d_out, r)", u_doc, trainable=False),
            TensorSpec("S", "(r,)", "their singular values", trainable=False),
            TensorSpec(right, "(r, d_in)", right_doc, trainable=False),
            TensorSpec("g", "(r,)", "zeros", perturb=negative_g),
        ),
        param_count="r",
        macs="r * (d_in + d_out) + ew(r)",
        macs_per_forward="ew(r)",
        sign_free={"U": 1, right: 0},
        identity="tolerance",
        knobs={"coeff": 0.0},
    )


def gain_claims(right: str) -> tuple:
    """The three claims on the 1 + ELU gain, measured on the layer (right factor `right`)."""
    return (
        Claim("gain_nonnegative", "nonnegative", gain_nonnegative(right),
              "the gain f(coeff·g) is never negative (no sign flip of a singular value), from saturated g"),
        Claim("gain_slope_bounded", "bounded", gain_slope(right),
              "|f(z ± 1) − f(z)| <= 1: the gain's derivative is bounded by 1 (|∂S_eff/∂g| <= S |coeff|)", bound=1.0),
        Claim("suppress_only_attenuates", "bounded", attenuation(right),
              "with suppress_only and coeff >= 0 every gain is <= 1 (S_eff <= S)", bound=1.0),
    )
