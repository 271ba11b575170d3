"""Spec of LoHa, low-rank Hadamard product adaptation (FedPara, Hyeon-Woo et al. 2022; LyCORIS), PEFT's init.

No impl variant: the impl backend reports every property `na`; the PEFT backend verifies PEFT's LoHa.
"""
import torch

from ..schema import Constraint, Reference, Spec, TensorSpec, register
from ._peft_only import no_conv1d


def delta(T, cfg):
    """ΔW = s (B1 A1) ⊙ (B2 A2), s = alpha / r (FedPara eq. 2, W = (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ); LyCORIS' alpha/r scale)."""
    return (cfg.alpha / cfg.r) * ((T["B1"] @ T["A1"]) * (T["B2"] @ T["A2"]))


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W x + b + ΔW x; float64, row convention."""
    y = x @ (W + delta(T, cfg)).T
    return y if b is None else y + b


def init_oracle(W, cfg, X):
    """A2 = 0 (the second factor's product starts at 0, so ΔW = 0); the other three are random."""
    return {"A2": torch.zeros(cfg.r, W.shape[1], dtype=W.dtype)}


def dense(W, b, T, cfg, knobs):
    return W + delta(T, cfg)


SPEC = register(
    Spec(
        name="loha",
        title="LoHa: low-rank Hadamard product",
        equation=r"y = W x + b + \frac{\alpha}{r}\,\big((B_1 A_1) \odot (B_2 A_2)\big)\,x",
        tensors=(
            TensorSpec("B1", "(d_out, r)", "kaiming-uniform(a=sqrt 5)",
                       zero_grad_at_init="A2 = 0, so B2 A2 = 0 multiplies its gradient"),
            TensorSpec("A1", "(r, d_in)", "kaiming-uniform(a=sqrt 5)",
                       zero_grad_at_init="A2 = 0, so B2 A2 = 0 multiplies its gradient"),
            TensorSpec("B2", "(d_out, r)", "kaiming-uniform(a=sqrt 5)",
                       zero_grad_at_init="A2 = 0: dL/dB2 = (G ⊙ B1 A1) A2ᵀ = 0"),
            TensorSpec("A2", "(r, d_in)", "zeros"),
        ),
        param_count="2 * r * (d_in + d_out)",
        macs="d_in * d_out",  # F.linear with the dense ΔW per token
        macs_per_forward="2 * r * d_in * d_out + ew(2 * d_in * d_out)",
        oracle=oracle,
        init_oracle=init_oracle,
        dense=dense,
        identity="bitwise",
        dropout="rejected",  # LoHa has rank and module dropout (training only), no adapter-input dropout
        max_rank=None,  # the Hadamard product reaches rank r², PEFT accepts any r > 0
        constraints=(Constraint("r is a positive integer", {"r": 0}),),
        references=(
            Reference("FedPara paper (eq. 2, §3)", "https://arxiv.org/abs/2108.06098"),
            Reference("LyCORIS paper (§3.2, LoHa)", "https://arxiv.org/abs/2309.14859"),
            Reference("PEFT 0.21.2 loha layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/loha/layer.py"),
        ),
        deviations=no_conv1d("LoHa (LyCORIS tuner)", "peft/tuners/lycoris_utils.py:242 (_create_new_module, v0.21.2)",
                             wraps="torch.nn.Linear, Conv1d and Conv2d", match="not supported"),
        notes="No impl variant. Names: B_i (d_out, r), A_i (r, d_in) as in LoRA (FedPara's X_i, Y_iᵀ). PEFT's "
              "rank_dropout / module_dropout are training-time dropouts of rows / of the whole delta, not modelled "
              "(the PEFT backend leaves them at 0).",
    )
)
