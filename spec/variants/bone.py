"""Spec of Bone, block-affine adaptation (Kang 2024), as PEFT 0.21.2 ships it (MiSS with init_weights='bat'):
every r × r block of W is updated by W_ij B_i + B_i, one trainable block B_i per output block row."""
import torch
from hypothesis import strategies as st

from ..schema import Constraint, Deviation, Reference, Spec, TensorSpec, register
from ._peft_only import no_conv1d


def adapted_weight(W, B):
    """W' with blocks W'_ij = W_ij + W_ij B_i + B_i (i: output block, j: input block, blocks r × r)."""
    r = B.shape[-1]
    Wp = W.clone()
    for i in range(W.shape[0] // r):
        for j in range(W.shape[1] // r):
            blk = W[i * r:(i + 1) * r, j * r:(j + 1) * r]
            Wp[i * r:(i + 1) * r, j * r:(j + 1) * r] = blk + blk @ B[i] + B[i]
    return Wp


def dense(W, b, T, cfg, knobs):
    return adapted_weight(W, T["B"])


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W' x + b; float64, row convention."""
    y = x @ adapted_weight(W, T["B"]).T
    return y if b is None else y + b


def init_oracle(W, cfg, X):
    """B = 0 (W' = W)."""
    return {"B": torch.zeros(W.shape[0] // cfg.r, cfg.r, cfg.r, dtype=W.dtype)}


def fields(draw, d_in, d_out):
    """r divides both d_in and d_out (the blocks tile W)."""
    return {"r": draw(st.sampled_from([k for k in range(1, min(d_in, d_out) + 1) if d_in % k == 0 and d_out % k == 0]),
                      label="r")}


SPEC = register(
    Spec(
        name="bone",
        title="Bone: block-affine adaptation (PEFT's MiSS 'bat' mode)",
        equation=r"y = W' x + b,\quad W'_{ij} = W_{ij} + W_{ij} B_i + B_i \ \ (r \times r \text{ blocks})",
        tensors=(TensorSpec("B", "(d_out // r, r, r)", "zeros",
                            zero_grad_at_init=""),),
        param_count="d_out * r",
        macs="d_in * d_out",  # x times the rebuilt dense W'
        macs_per_forward="d_out * d_in * r + ew(2 * d_out * d_in)",
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        identity="bitwise",
        dropout="rejected",
        fields=fields,
        constraints=(Constraint("r divides d_in and d_out", {"r": 0}),),
        references=(
            Reference("paper (Bone, block-affine transformation)", "https://arxiv.org/abs/2409.15371v1"),
            Reference("PEFT 0.21.2 MiSS layer ('bat')", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/miss/layer.py"),
        ),
        deviations=no_conv1d("MiSS (Bone mode)", "peft/tuners/miss/model.py:136 (v0.21.2)") + (
            Deviation("dropout", "PEFT's Bone mode ignores miss_dropout (its forward rebuilds W' and never applies the "
                      "dropout module); the mapping passes none, and a dropout field has no effect", backend="peft",
                      source="peft/tuners/miss/layer.py:337-350 (the 'bat' branch of forward)", match="accepted"),
        ),
        notes="The blocks B_i are indexed by the output block row, as in PEFT. Shapes where r divides both widths only.",
    )
)
