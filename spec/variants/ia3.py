"""Spec of (IA)³ on the output side (Liu et al. 2022): a learned gate on the attention k / v outputs."""
import torch

from ..schema import Constraint, Deviation, Reference, Spec, TensorSpec, register


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = g ⊙ (W x + b): the gate multiplies the whole output, bias included; float64, row convention."""
    y = x @ W.T + (0 if b is None else b)
    return y * T["g"]


def init_oracle(W, cfg, X):
    """g = 1 exactly, one gate per output unit."""
    return {"g": torch.ones(W.shape[0], dtype=W.dtype)}


SPEC = register(
    Spec(
        name="ia3",
        title="(IA)³ output-side gate (attention keys and values)",
        equation=r"y = g \odot (W x + b),\quad g \in \mathbb{R}^{d_{out}},\ g_0 = \mathbf{1}",
        tensors=(TensorSpec("g", "(d_out,)", "ones"),),
        param_count="d_out",
        max_rank=None,  # a gate has no rank: r is not used
        macs="ew(d_out)",  # the gate: one multiply per output, no matmul
        macs_per_forward="0",
        oracle=oracle,
        init_oracle=init_oracle,
        identity="bitwise",
        bias="scaled",
        bias_note="the gate multiplies W x + b, so the bias is gated too (paper §3.3 and PEFT's ia3 on a "
                  "non-feed-forward target: y = l ⊙ (W x + b))",
        dropout="rejected",
        roles=("k", "v"),
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
        notes="r and alpha are accepted (common config fields) but unused: the gate has one entry per output "
              "unit. Merge: W' = diag(g) W, b' = g ⊙ b.",
    )
)
