"""Spec of LoKr, low-rank Kronecker product adaptation (LyCORIS, Yeh et al. 2024), PEFT's shapes and init.

No impl variant: the impl backend reports every property `na`; the PEFT backend verifies PEFT's LoKr.
"""
import math

import torch
from hypothesis import strategies as st

from ..schema import Constraint, Reference, Spec, TensorSpec, register
from ._peft_only import no_conv1d


def fac(n: int) -> tuple[int, int]:
    """n = m · k with m ≤ k and m the largest divisor of n not above sqrt(n) (LyCORIS' balanced split, its
    factor = -1): 64 -> (8, 8), 12 -> (3, 4), 13 -> (1, 13)."""
    m = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return m, n // m


def full1(d_in, d_out, cfg) -> bool:
    """W1 is a full (a, c) matrix unless decompose_both and r < max(a, c) / 2 (then W1 = W1a W1b)."""
    return not (cfg.decompose_both and cfg.r < max(fac(d_out)[0], fac(d_in)[0]) / 2)


def full2(d_in, d_out, cfg) -> bool:
    """W2 is a full (b, d) matrix unless r < max(b, d) / 2 (then W2 = W2a W2b)."""
    return not (cfg.r < max(fac(d_out)[1], fac(d_in)[1]) / 2)


def delta(T, cfg):
    """ΔW = s · W1 ⊗ W2 (Kronecker), s = alpha / r; W1 (a, c), W2 (b, d) with d_out = a·b, d_in = c·d."""
    W1 = T["W1"] if "W1" in T else T["W1a"] @ T["W1b"]
    W2 = T["W2"] if "W2" in T else T["W2a"] @ T["W2b"]
    a, c = W1.shape
    b, d = W2.shape
    kron = (W1[:, None, :, None] * W2[None, :, None, :]).reshape(a * b, c * d)  # (W1 ⊗ W2)[i b + j, k d + l]
    return (cfg.alpha / cfg.r) * kron


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W x + b + ΔW x; float64, row convention."""
    y = x @ (W + delta(T, cfg)).T
    return y if b is None else y + b


def dense(W, b, T, cfg, knobs):
    return W + delta(T, cfg)


def init_oracle(W, cfg, X):
    """The first Kronecker factor starts at 0: W1 = 0, or W1a = 0 when W1 is factored (so ΔW = 0)."""
    d_out, d_in = W.shape
    a, c = fac(d_out)[0], fac(d_in)[0]
    if full1(d_in, d_out, cfg):
        return {"W1": torch.zeros(a, c, dtype=W.dtype)}
    return {"W1a": torch.zeros(a, cfg.r, dtype=W.dtype)}


def fields(draw, d_in, d_out):
    return {"decompose_both": draw(st.booleans(), label="decompose_both")}


_F1 = "not (decompose_both and r < max(fac(d_out)[0], fac(d_in)[0]) / 2)"
_F2 = "not (r < max(fac(d_out)[1], fac(d_in)[1]) / 2)"
_A, _B, _C, _D = "fac(d_out)[0]", "fac(d_out)[1]", "fac(d_in)[0]", "fac(d_in)[1]"
_ZW1 = "W1 = 0, so W1 ⊗ dW2 = 0"

SPEC = register(
    Spec(
        name="lokr",
        title="LoKr: low-rank Kronecker product",
        equation=r"y = W x + b + \frac{\alpha}{r}\,(W_1 \otimes W_2)\,x,\quad W_1 = W_{1a} W_{1b}\text{ or full},\ "
                 r"W_2 = W_{2a} W_{2b}\text{ or full}",
        tensors=(
            TensorSpec("W1", f"({_A}, {_C})", "zeros", when=_F1),
            TensorSpec("W1a", f"({_A}, r)", "zeros", when=f"not ({_F1})"),
            TensorSpec("W1b", f"(r, {_C})", "kaiming-uniform(a=sqrt 5)", when=f"not ({_F1})",
                       zero_grad_at_init="W1a = 0: dL/dW1b = W1aᵀ (…) = 0"),
            TensorSpec("W2", f"({_B}, {_D})", "kaiming-uniform(a=sqrt 5)", when=_F2, zero_grad_at_init=_ZW1),
            TensorSpec("W2a", f"({_B}, r)", "kaiming-uniform(a=sqrt 5)", when=f"not ({_F2})", zero_grad_at_init=_ZW1),
            TensorSpec("W2b", f"(r, {_D})", "kaiming-uniform(a=sqrt 5)", when=f"not ({_F2})", zero_grad_at_init=_ZW1),
        ),
        param_count=f"({_A} * {_C} if {_F1} else r * ({_A} + {_C})) + ({_B} * {_D} if {_F2} else r * ({_B} + {_D}))",
        macs="d_in * d_out",  # F.linear with the dense ΔW per token
        macs_per_forward=f"(0 if {_F1} else {_A} * r * {_C}) + (0 if {_F2} else {_B} * r * {_D}) + ew(2 * d_in * d_out)",
        oracle=oracle,
        init_oracle=init_oracle,
        dense=dense,
        identity="bitwise",
        dropout="rejected",  # LoKr has rank and module dropout (training only), no adapter-input dropout
        max_rank=None,  # r picks full or factored Kronecker factors; PEFT accepts any r > 0
        fields=fields,
        defaults={"decompose_both": False},
        formula_names={"fac": fac},
        constraints=(Constraint("r is a positive integer", {"r": 0}),),
        references=(
            Reference("LyCORIS paper (§3.3, LoKr)", "https://arxiv.org/abs/2309.14859"),
            Reference("PEFT 0.21.2 lokr layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lokr/layer.py"),
        ),
        deviations=no_conv1d("LoKr (LyCORIS tuner)", "peft/tuners/lycoris_utils.py:242 (_create_new_module, v0.21.2)",
                             wraps="torch.nn.Linear, Conv1d and Conv2d", match="not supported"),
        notes="No impl variant. d_out = a·b and d_in = c·d are split by `fac` (PEFT's decompose_factor = -1); "
              "a prime width gives a 1 × n factor. PEFT's rank_dropout / module_dropout (training only) are left "
              "at 0.",
    )
)
