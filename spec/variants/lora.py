"""Spec of LoRA (Hu et al. 2021) and its rsLoRA scale (Kalajdzievski 2023)."""
import math

import torch
from hypothesis import strategies as st

from ..schema import Constraint, Reference, Spec, TensorSpec, register


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W x + b + s B A x_d,  s = alpha/r (alpha/sqrt(r) with rsLoRA); float64, row convention."""
    xd = x if xd is None else xd
    s = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
    y = x @ W.T + (0 if b is None else b)
    return y + s * (xd @ T["A"].T @ T["B"].T)


def init_oracle(W, cfg, X):
    """B = 0 exactly; A is random (kaiming-uniform), so only B is deterministic."""
    return {"B": torch.zeros(W.shape[0], cfg.r, dtype=W.dtype)}


SPEC = register(
    Spec(
        name="lora",
        title="LoRA: low-rank adaptation",
        equation=r"y = W x + b + s\,B A\,\mathrm{drop}(x),\quad s = \alpha / r\ \ (\text{rsLoRA: } \alpha/\sqrt{r})",
        tensors=(
            TensorSpec("A", "(r, d_in)", "kaiming-uniform(a=sqrt 5)",
                       zero_grad_at_init="B = 0, so dL/dA = s Bᵀ (dL/dy) xᵀ = 0"),
            TensorSpec("B", "(d_out, r)", "zeros"),
        ),
        param_count="r * (d_in + d_out)",
        macs="r * (d_in + d_out) + ew(d_out)",  # x Aᵀ, then Bᵀ; the scale s
        macs_per_forward="0",
        oracle=oracle,
        init_oracle=init_oracle,
        identity="bitwise",
        constraints=(
            Constraint("r is a positive integer", {"r": 0}),
            Constraint("alpha >= 0", {"alpha": -1.0}),
            Constraint("dropout in [0, 1)", {"dropout": 1.0}),
        ),
        references=(
            Reference("paper (eq. 3)", "https://arxiv.org/abs/2106.09685"),
            Reference("rsLoRA paper", "https://arxiv.org/abs/2312.03732"),
            Reference("PEFT 0.21.2 lora layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/layer.py"),
        ),
        notes="rslora is drawn by the property engine, so both scales are checked.",
        fields=lambda draw, d_in, d_out: {"rslora": draw(st.booleans(), label="rslora")},
    )
)
