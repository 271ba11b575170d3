"""Spec of DoRA (Liu et al. 2024): a trainable magnitude per output row times a LoRA-adapted direction."""
import math

import torch
from hypothesis import strategies as st

from ..schema import Claim, Constraint, Reference, Spec, TensorSpec, register

FLOOR = 1e-12  # the norm floor the spec declares (a zero row of W + sBA must give a finite output)


def scale(cfg) -> float:
    """s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """Eq. 5, y = (m/n) ⊙ (W + s B A) x + b with n = ‖W + s B A‖_row treated as a constant (§4.3), written with
    PEFT's treatment of dropout: y = W x + b + (m/n − 1) ⊙ W x_d + (m/n) ⊙ s B A x_d (x_d = x without dropout).
    float64, row convention; n floored at 1e-12."""
    xd = x if xd is None else xd
    s = scale(cfg)
    A, B, m = T["A"], T["B"], T["m"]
    n = (W + s * B.detach() @ A.detach()).norm(dim=1).clamp_min(FLOOR).detach()
    k = m / n
    y = x @ W.T + (0 if b is None else b)
    return y + (k - 1) * (xd @ W.T) + k * s * (xd @ A.T @ B.T)


def dense(W, b, T, cfg, knobs):
    """The adapted layer as one matrix: (m/n) ⊙ (W + s B A), n detached (the bias is unchanged)."""
    s = scale(cfg)
    V = W + s * T["B"] @ T["A"]
    n = (W + s * T["B"].detach() @ T["A"].detach()).norm(dim=1).clamp_min(FLOOR)  # a constant in backward (§4.3)
    return (T["m"] / n)[:, None] * V


def init_oracle(W, cfg, X):
    """m = ‖W‖ over each output row (so m/n = 1 at init); B = 0. A is random (kaiming-uniform)."""
    return {"m": W.norm(dim=1), "B": torch.zeros(W.shape[0], cfg.r, dtype=W.dtype)}


def row_norm_error(p):
    """| ‖M_i‖ − |m_i| | for each row i of the adapted layer's dense map M (measured on the implementation, the
    bias taken out), relative to the scale the layer computes at, max(max_i |m_i|, max_i ‖W_i + s B_i A‖): PEFT's
    delta form y + (m/n − 1)(y − b) rounds at the scale of W x, so a row with |m_i| ≪ n_i carries that
    rounding, not one relative to |m_i|."""
    T, W = p.tensors(), p.base_weight()
    n = (W + scale(p.cfg) * T["B"] @ T["A"]).norm(dim=1)
    m = T["m"].abs()
    return (p.dense_map().norm(dim=1) - m).abs() / max(float(m.max()), float(n.max()))


SPEC = register(
    Spec(
        name="dora",
        title="DoRA: weight-decomposed low-rank adaptation",
        equation=(r"y = \frac{m}{\lVert W + s B A\rVert_{row}} \odot (W + s\,B A)\,x + b"
                  r"\ \ (\lVert\cdot\rVert\ \text{detached});\ \text{dropout: } y = Wx + b + (\tfrac{m}{n}-1)\odot W x_d"
                  r" + \tfrac{m}{n}\odot s\,BA\,x_d"),
        tensors=(
            TensorSpec("A", "(r, d_in)", "kaiming-uniform(a=sqrt 5)",
                       zero_grad_at_init="B = 0, so dL/dA = (m/n) s Bᵀ (dL/dy) xᵀ = 0 (n is a constant in backward)"),
            TensorSpec("B", "(d_out, r)", "zeros"),
            TensorSpec("m", "(d_out,)", "row norms of W: ‖W_i,:‖"),
        ),
        param_count="r * (d_in + d_out) + d_out",
        # per token (eval, or dropout 0): x Aᵀ, then (m/n ⊙ B)ᵀ accumulated onto (m/n − 1) ⊙ (y − b) (impl's one
        # addmm); elementwise y − b, (m/n − 1)·, s·, the accumulate, the sum with y.
        # Train mode with dropout adds the matmul W x_d (d_in * d_out per token).
        macs="r * (d_in + d_out) + ew(5 * d_out)",
        # per forward: B A, then s·, W +, the row norms and m / n, and m / n folded into B's rows
        macs_per_forward="r * d_in * d_out + ew(3 * d_in * d_out + d_out + r * d_out)",
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        identity="bitwise",
        bias="passthrough",
        claims=(
            Claim("row_norm_is_magnitude", "bounded", row_norm_error,
                  "each row of the adapted weight (m/n)(W + sBA) has norm |m_i| (eq. 5: magnitude times unit "
                  "direction), to rounding at the layer's scale", bound=0.0),
        ),
        constraints=(
            Constraint("r is a positive integer", {"r": 0}),
            Constraint("alpha >= 0", {"alpha": -1.0}),
            Constraint("dropout in [0, 1)", {"dropout": 1.0}),
        ),
        references=(
            Reference("paper (eq. 5; section 4.3 for the detached norm)", "https://arxiv.org/abs/2402.09353"),
            Reference("PEFT 0.21.2 DoRA layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/dora.py"),
            Reference("PEFT 0.21.2 DoraLinearVariant (dropout path)",
                      "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/variants.py"),
        ),
        # PEFT's real DoRA bugs the peft backend finds (bf16 start off the base, bf16 input gradient, NaN on a
        # zero row, CPU bitsandbytes) are failures of PEFT, not declared deviations (issue 16 closing note).
        notes=(
            "Computed as PEFT's delta on the base output, y + (m/n − 1)(y − b) + (m/n) s B A x, which is bitwise "
            "the base output at init in every dtype (m and n come from the same function on the same bits). The "
            "bias passes through unscaled. The norm n is detached (paper §4.3, PEFT) and floored at 1e-12 (the "
            "dtype's smallest normal if larger): PEFT has no floor and gives NaN on a zero row of W + sBA. With "
            "dropout in train mode the magnitude correction uses W x_d (PEFT's treatment). Works on bitsandbytes "
            "layers by reading a dequantized copy of the weight on every forward (PEFT's 8-bit DoRA breaks after "
            "a first forward on CPU)."
        ),
        fields=lambda draw, d_in, d_out: {"rslora": draw(st.booleans(), label="rslora")},
    )
)
