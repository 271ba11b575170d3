"""Spec of (IA)³ on the input side (Liu et al. 2022): a learned gate on a feed-forward down projection's input.

The same gate as `ia3` (same constraints, references and PEFT deviation), on the other side of W."""
from dataclasses import replace

import torch

from ..schema import TensorSpec, register
from .ia3 import SPEC as OUTPUT_SIDE


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W (g ⊙ x) + b: the gate scales the input features; the bias is untouched; float64, row convention."""
    y = (x * T["g"]) @ W.T
    return y if b is None else y + b


def init_oracle(W, cfg, X):
    """g = 1 exactly, one gate per input feature."""
    return {"g": torch.ones(W.shape[1], dtype=W.dtype)}


SPEC = register(
    replace(
        OUTPUT_SIDE,
        name="ia3_ff",
        title="(IA)³ input-side gate (feed-forward down projection)",
        equation=r"y = W (g \odot x) + b,\quad g \in \mathbb{R}^{d_{in}},\ g_0 = \mathbf{1}",
        tensors=(TensorSpec("g", "(d_in,)", "ones"),),
        param_count="d_in",
        macs="ew(d_in)",  # the gate: one multiply per input, no matmul
        oracle=oracle,
        init_oracle=init_oracle,
        bias="passthrough",
        bias_note="",
        roles=("down",),
        notes="r and alpha are accepted (common config fields) but unused: the gate has one entry per input "
              "feature. Merge: W' = W diag(g), b' = b.",
    )
)
