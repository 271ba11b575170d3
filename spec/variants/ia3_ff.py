"""Spec of (IA)³ on the input side (Liu et al. 2022): a learned gate on a feed-forward down projection's input."""
import torch

from ..schema import Constraint, Deviation, Reference, Spec, TensorSpec, register


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W (g ⊙ x) + b: the gate scales the input features; the bias is untouched; float64, row convention."""
    y = (x * T["g"]) @ W.T
    return y if b is None else y + b


def init_oracle(W, cfg, X):
    """g = 1 exactly, one gate per input feature."""
    return {"g": torch.ones(W.shape[1], dtype=W.dtype)}


SPEC = register(
    Spec(
        name="ia3_ff",
        title="(IA)³ input-side gate (feed-forward down projection)",
        equation=r"y = W (g \odot x) + b,\quad g \in \mathbb{R}^{d_{in}},\ g_0 = \mathbf{1}",
        tensors=(TensorSpec("g", "(d_in,)", "ones"),),
        param_count="d_in",
        max_rank=None,  # a gate has no rank: r is not used
        macs="ew(d_in)",  # the gate: one multiply per input, no matmul
        macs_per_forward="0",
        oracle=oracle,
        init_oracle=init_oracle,
        identity="bitwise",
        dropout="rejected",
        roles=("down",),
        constraints=(
            Constraint("dropout is rejected: there is no separate adapter input", {"dropout": 0.1}),
            Constraint("dropout in [0, 1)", {"dropout": 1.0}),
        ),
        references=(
            Reference("paper (§3.3)", "https://arxiv.org/abs/2205.05638"),
            Reference("PEFT 0.21.2 ia3 layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/ia3/layer.py"),
        ),
        deviations=(
            Deviation("unmerge_restores", "PEFT's IA3 unmerge divides the merged weight by l + 1e-8 (a guard against "
                      "division by zero) and warns 'Unmerge result can be inaccurate for (IA)^3': gates near 0 do not "
                      "restore the base weight", backend="peft",
                      source="peft/tuners/ia3/layer.py:157-163", match="unmerge_adapter does not restore"),
        ),
        notes="r and alpha are accepted (common config fields) but unused: the gate has one entry per input "
              "feature. Merge: W' = W diag(g), b' = b.",
    )
)
