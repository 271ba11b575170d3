"""Spec of AntiPaSTO-Rot: S + δ and a block-diagonal Cayley rotation of W's top-r singular basis."""
import math

import torch
from hypothesis import strategies as st

from ..schema import Claim, Constraint, Reference, Spec, TensorSpec, register
from . import _antipasto_common as common

ROTATE = ("V", "U", "both", "none")
N_ROT = "{'none': 0, 'V': 1, 'U': 1, 'both': 2}[rotate_basis]"  # rotated bases, in the spec's formulas


def rotation(T: torch.Tensor, bs: int, theta: float) -> torch.Tensor:
    """Blocks R_k = Cayley(A_k) = (I − A_k/2)⁻¹ (I + A_k/2), A_k = c tanh(½(T_k − T_kᵀ) / c),
    c = 2 tan(θ/2) / sqrt(bs(bs−1)/2), T_k the strict upper triangle filled from row k of T; (n, bs, bs)."""
    n = T.shape[0]
    iu = torch.triu_indices(bs, bs, 1)
    up = torch.zeros(n, bs, bs, dtype=T.dtype)
    up[:, iu[0], iu[1]] = T
    A = 0.5 * (up - up.transpose(1, 2))
    c = 2 * math.tan(theta / 2) / math.sqrt(bs * (bs - 1) / 2)
    A = c * torch.tanh(A / c)
    eye = torch.eye(bs, dtype=T.dtype).expand(n, bs, bs)
    return torch.linalg.inv(eye - A / 2) @ (eye + A / 2)


def dense_rotations(T, cfg):
    """(R_v, R_u) as dense (r, r) block-diagonal matrices (identity where a basis is not rotated): rot_T
    rotates V (U under 'U'), rot_T_u rotates U under 'both'."""
    eye = torch.eye(cfg.r, dtype=torch.float64)
    R = lambda name: torch.block_diag(*rotation(T[name], cfg.block_size, cfg.max_rotation_angle))  # noqa: E731
    rb = cfg.rotate_basis
    R_v = R("rot_T") if rb in ("V", "both") else eye
    R_u = R("rot_T") if rb == "U" else R("rot_T_u") if rb == "both" else eye
    return R_v, R_u


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W_res x + b + U R_uᵀ diag(S + δ) R_v Vh x; float64, row convention. W is the residual W_res."""
    R_v, R_u = dense_rotations(T, cfg)
    y = x @ W.T + (0 if b is None else b)
    return y + (x @ (R_v @ T["Vh"]).T * (T["S"] + T["delta"])) @ (T["U"] @ R_u.T).T


def dense(W, b, T, cfg, knobs):
    """The second formulation: D = W_res + U R_uᵀ diag(S + δ) R_v Vh built as one (d_out, d_in) matrix."""
    R_v, R_u = dense_rotations(T, cfg)
    return W + T["U"] @ R_u.T @ torch.diag(T["S"] + T["delta"]) @ R_v @ T["Vh"]



def init_oracle(W, cfg, X):
    """The top-r SVD of W (or, with data, the r singular triplets with the largest S_i · pool_t |x_t · v_i|);
    δ = 0 and rot_T = 0 (R = I); the base becomes W − U S Vh."""
    U, S, Vh = common.top_r(W, cfg.r) if X is None else common.wanda_select(W, X, cfg.r, cfg.act_pool)
    out = {**common.basis_init(W, U, S, Vh, "Vh"), "delta": torch.zeros(cfg.r, dtype=W.dtype)}
    shape = (cfg.r // cfg.block_size, cfg.block_size * (cfg.block_size - 1) // 2)
    for name in {"V": ["rot_T"], "U": ["rot_T"], "both": ["rot_T", "rot_T_u"], "none": []}[cfg.rotate_basis]:
        out[name] = torch.zeros(shape, dtype=W.dtype)
    return out


def measured_rotations(probe) -> list[torch.Tensor]:
    """R_v and R_u measured on the implementation: with S = 1 and δ = 0 the core Uᵀ (D − W_res) Vhᵀ is R_uᵀ R_v,
    so each is read with the other rotation's parameters set to 0. Returned as their diagonal blocks."""
    T, cfg = probe.tensors(), probe.cfg
    probe.set("delta", torch.zeros_like(T["delta"]))
    bs, rb = cfg.block_size, cfg.rotate_basis
    mats = []
    if rb == "both":  # the core is R_uᵀ R_v: read each rotation with the other's entries at 0
        probe.set("rot_T_u", torch.zeros_like(T["rot_T_u"]))
        mats.append(common.core(probe, "Vh"))
        probe.set("rot_T_u", T["rot_T_u"])
        probe.set("rot_T", torch.zeros_like(T["rot_T"]))
        mats.append(common.core(probe, "Vh").T)
    else:
        M = common.core(probe, "Vh")
        mats.append(M.T if rb == "U" else M)
    n = cfg.r // bs
    return [torch.stack([M[k * bs:(k + 1) * bs, k * bs:(k + 1) * bs] for k in range(n)]) for M in mats]


def rotation_blocks(probe):
    return torch.cat(measured_rotations(probe))


def rotation_angles(probe):
    """The largest rotation angle of each measured block over max_rotation_angle (the claim: <= 1)."""
    blocks = rotation_blocks(probe)
    angles = torch.linalg.eigvals(blocks).angle().abs()
    return angles.amax(-1) / probe.cfg.max_rotation_angle


def fields(draw, d_in, d_out):
    lo = min(d_in, d_out)
    bs = draw(st.integers(2, min(4, lo)), label="block_size")
    r = bs * draw(st.sampled_from([1, lo // bs]) | st.integers(1, lo // bs), label="r / block_size")
    return {"r": r, "block_size": bs, "rotate_basis": draw(st.sampled_from(ROTATE), label="rotate_basis"),
            "max_rotation_angle": draw(st.sampled_from([0.5, 1.0, 2.5]), label="max_rotation_angle"),
            "act_pool": common.pool(draw)}


SPEC = register(
    Spec(
        name="antipasto_rot",
        title="AntiPaSTO-Rot: S + δ with a block-diagonal Cayley rotation of the singular basis",
        equation=(r"y = W_{res} x + b + U R_u^\top \mathrm{diag}(S + \delta) R_v V_h x,\quad "
                  r"R = \mathrm{blockdiag}\big((I - \tfrac{A_k}{2})^{-1}(I + \tfrac{A_k}{2})\big),\ "
                  r"A_k = c \tanh\!\big(\tfrac{T_k - T_k^\top}{2c}\big),\ c = \frac{2\tan(\theta_{max}/2)}{\sqrt{b(b-1)/2}}"),
        tensors=(
            TensorSpec("U", "(d_out, r)", "top-r (or data-selected) left singular vectors of W", trainable=False),
            TensorSpec("S", "(r,)", "their singular values", trainable=False),
            TensorSpec("Vh", "(r, d_in)", "their right singular vectors (rows)", trainable=False),
            TensorSpec("delta", "(r,)", "zeros"),
            TensorSpec("rot_T", "(r // block_size, block_size * (block_size - 1) // 2)",
                       "zeros (R = I); rotates V, or U under rotate_basis='U'", when="rotate_basis != 'none'"),
            TensorSpec("rot_T_u", "(r // block_size, block_size * (block_size - 1) // 2)",
                       "zeros (R = I); rotates U under rotate_basis='both'", when="rotate_basis == 'both'"),
        ),
        param_count=f"r + {N_ROT} * r * (block_size - 1) // 2",
        macs=f"r * (d_in + d_out) + {N_ROT} * r * r + ew(r)",  # the rotation: one r x r block-diagonal matmul
        macs_per_forward=f"solve({N_ROT} * r * block_size ** 2) + ew({N_ROT} * r * r)",  # Cayley solves; dense R built
        **common.SHARED,
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        sign_free={"U": 1, "Vh": 0},
        identity="tolerance",
        data="optional",
        fields=fields,
        min_width=2,
        constraints=(
            *common.BASE_CONSTRAINTS,
            Constraint("block_size divides r", {"r": 6, "block_size": 4}),
            Constraint("block_size >= 2 (a 1x1 block has no rotation parameter)", {"r": 4, "block_size": 1}),
            Constraint("rotate_basis is V, U, both or none", {"rotate_basis": "W"}),
            Constraint("max_rotation_angle in (0, pi)", {"max_rotation_angle": 0.0}),
            Constraint("max_rotation_angle in (0, pi)", {"max_rotation_angle": 4.0}),
            common.POOL_CONSTRAINT,
        ),
        claims=(
            Claim("rotation_orthogonal", "orthogonal_det1", rotation_blocks,
                  "every rotation block measured on the layer is orthogonal with det +1 (from saturated rot_T)",
                  saturate=20.0),
            Claim("rotation_angle_bounded", "bounded", rotation_angles,
                  "every rotation angle is <= max_rotation_angle, for every block size (from saturated rot_T)",
                  bound=1.0, saturate=20.0),
        ),
        references=(
            common.PAPER,
            Reference("lora-lite antipasto_rot (branch antipasto-variants)",
                      "https://github.com/wassname/lora-lite/blob/5f9d90d8b83c09eeb86ba11b7aa9f03c9bbf6d71/src/lora_lite/variants/antipasto_rot.py"),
        ),
        notes=(
            "rot_T exists unless rotate_basis='none', rot_T_u only under 'both' (declared with `when`). Differences from the reference: δ starts at 0, not "
            "4e-4 + N(0, 4e-4), so the start is the identity up to the SVD rounding; the elementwise clamp is "
            "scaled by 1/sqrt(bs(bs-1)/2), which makes the angle bound hard for every block size (identical to "
            "the reference for bs = 2, where its bound is already hard; the reference's unscaled clamp reaches "
            "1.10 rad at bs = 4 and 1.82 rad at bs = 8 for max_rotation_angle 0.5); the rotation is applied to the "
            "r-dimensional coordinates instead of rebuilding the rotated d_in x r basis each forward; the Wanda "
            "pooling is configurable (act_pool, default mean_abs as the reference) and skips padding tokens. "
            "S + δ may change sign (no claim). No PEFT counterpart (PEFT's OFT/BOFT rotate the input space, "
            "not an SVD basis)."
        ),
    )
)
