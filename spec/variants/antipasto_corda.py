"""Spec of AntiPaSTO-CorDA: the 1 + ELU gain on the covariance-oriented (oblique) rank-r part of W."""
import torch
from hypothesis import strategies as st

from ..schema import Claim, Constraint, Reference, Spec, register
from . import _antipasto_common as common


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W_res x + b + U (S ⊙ f(coeff · g̃) ⊙ P x), f(z) = 1 + ELU(z); float64, row convention. W is W_res."""
    g = torch.clamp(T["g"], max=0) if cfg.suppress_only else T["g"]
    y = x @ W.T + (0 if b is None else b)
    return y + ((x @ T["P"].T) * (T["S"] * common.gain(knobs["coeff"] * g))) @ T["U"].T


def dense(W, b, T, cfg, knobs):
    """The second formulation: D = W_res + U diag(S ⊙ f(coeff · g̃)) P built as one (d_out, d_in) matrix."""
    g = torch.clamp(T["g"], max=0) if cfg.suppress_only else T["g"]
    return W + T["U"] @ torch.diag(T["S"] * common.gain(knobs["coeff"] * g)) @ T["P"]



def init_oracle(W, cfg, X):
    """C_ε = damped E[x xᵀ] over the non-padding tokens; SVD(W C_ε^{1/2}) = Û Ŝ V̂ᵀ; U = Û_r, S = Ŝ_r,
    P = V̂_rᵀ C_ε^{−1/2} (so P C_ε Pᵀ = I_r); g = 0; the base becomes W − U S P (so W_res + U S P = W)."""
    U, S, P = common.corda_orient(W, X, cfg.r, cfg.cov_eps)
    return {**common.basis_init(W, U, S, P, "P"), "g": torch.zeros(cfg.r, dtype=W.dtype)}


def weighted_error(W, B, half) -> float:
    """‖(W − B) C_ε^{1/2}‖_F = sqrt(E‖(W − B) x‖²) for x with second moment C_ε."""
    return float(((W - B) @ half).norm())


def optimality_gap(probe):
    """(E‖(W − B) x‖²)^{1/2} of the implementation's rank-r part B = W − W_res, minus that of two other rank-r
    choices (the plain top-r SVD, and PEFT's SVD(W C) form), over ‖W C_ε^{1/2}‖_F: the claim is that it is
    <= 0 (up to rounding), i.e. B is the Eckart–Young optimum in the data metric."""
    W = probe.original_weight()
    X = probe.calibration_tokens()
    C = common.damped_moment(X, probe.cfg.cov_eps)
    half = common.sym_power(C, 0.5)
    B = W - probe.base_weight()
    U, S, Vh = common.top_r(W, probe.cfg.r)
    U2, S2, Vh2 = common.top_r(W @ C, probe.cfg.r)
    alternatives = ((U * S) @ Vh, (U2 * S2) @ Vh2 @ torch.linalg.inv(C))
    ours = weighted_error(W, B, half)
    scale = float((W @ half).norm()) + 1e-300
    return torch.tensor([(ours - weighted_error(W, A, half)) / scale for A in alternatives], dtype=torch.float64)


def fields(draw, d_in, d_out):
    return {"coeff": common.coeff(draw), "suppress_only": draw(st.booleans(), label="suppress_only"),
            "cov_eps": draw(st.sampled_from([1e-3, 1e-1]), label="cov_eps")}


SPEC = register(
    Spec(
        name="antipasto_corda",
        title="AntiPaSTO-CorDA: 1 + ELU gain on the covariance-oriented rank-r part of W",
        equation=(r"\mathrm{SVD}(W C_\varepsilon^{1/2}) = \hat U \hat S \hat V^\top,\ P = \hat V_r^\top C_\varepsilon^{-1/2},\ "
                  r"W_{res} = W - U S P;\quad y = W_{res} x + b + U\,(S \odot f(c\,\tilde g) \odot P x)"),
        **common.gain_family("P", "left singular vectors of W C_ε^{1/2} (top r)",
                             "V̂_rᵀ C_ε^{−1/2}: oblique, P C_ε Pᵀ = I_r"),
        **common.SHARED,
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        data="required",
        fields=fields,
        constraints=(
            *common.BASE_CONSTRAINTS,
            Constraint("cov_eps > 0 (C_ε must be positive definite for C_ε^{-1/2})", {"cov_eps": 0.0}),
            Constraint("cov_eps > 0", {"cov_eps": -1.0}),
        ),
        claims=(
            *common.gain_claims("P"),
            Claim("eckart_young_in_data_metric", "bounded", optimality_gap,
                  "the rank-r part W − W_res minimises E‖(W − B) x‖² over rank-r B: no worse than the plain top-r "
                  "SVD or PEFT's SVD(W C) form", bound=0.0),
        ),
        references=(
            Reference("CorDA paper", "https://arxiv.org/abs/2406.05223"),
            Reference("lora-lite antipasto_corda (branch antipasto-variants)",
                      "https://github.com/wassname/lora-lite/blob/5f9d90d8b83c09eeb86ba11b7aa9f03c9bbf6d71/src/lora_lite/variants/antipasto_corda.py"),
            Reference("PEFT 0.21.2 CorDA (SVD(W C) form)",
                      "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/corda.py"),
            common.PAPER,
        ),
        notes=(
            "Differs from PEFT's CorDA (and the CorDA paper's prose): PEFT takes SVD(W C_f) with "
            "C_f = C + d·mean(diag C)·I (d from 0.01, doubled until C_f inverts well) and V = (V̂ᵀ C_f⁻¹)ᵀ, and its "
            "calibration normalises each call by max(X); ours takes SVD(W C_ε^{1/2}) with C_ε = Q(max(Λ,0) + ε)Qᵀ "
            "(absolute ε = cov_eps) over the non-padding tokens. When C ∝ I the two give the same U and the same "
            "rank-r product U S P (= the plain top-r of W; S and P then differ from PEFT's by a common scalar); in "
            "general their top-r subspaces differ, and only ours minimises E‖(W − B) x‖² (checked by the "
            "eckart_young claim against both). Only IPM (keep the top r) is implemented, not KPM. PEFT puts the "
            "factors in trainable LoRA A/B; here U, S, P are frozen and only the gain g (r) trains. Calibration data "
            "is required (attach without it is an error; no fallback to the plain SVD); the calibration pass sees "
            "the untouched base, because nothing is rewritten before the data arrive."
        ),
    )
)
