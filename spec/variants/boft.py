"""Spec of BOFT, butterfly orthogonal finetuning (Liu et al. 2024), with one butterfly factor: a block-diagonal
Cayley rotation of the input side and a trainable per-output magnitude."""
import torch

from ..schema import Claim, Constraint, Deviation, Reference, Spec, TensorSpec, register
from ._peft_only import no_conv1d
from .oft import cayley, fields


def rotation(R):
    """diag(R_1, ..., R_r), R_k = cayley(S_k) (OFT's Cayley transform) with S_k = (A_k − A_kᵀ)/2 the skew part of
    the k-th of the (1, r, b, b) blocks of the single butterfly factor: orthogonal, det +1."""
    return torch.block_diag(*(cayley(0.5 * (A - A.T)) for A in R[0]))


def dense(W, b, T, cfg, knobs):
    """The adapted layer as one matrix: diag(s) W R (rotation on the input side, magnitude on the output side);
    the bias is not scaled."""
    return T["s"] * (W @ rotation(T["R"]))


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = s ⊙ (W R x) + b; float64, row convention."""
    y = x @ dense(W, b, T, cfg, knobs).T
    return y if b is None else y + b


def init_oracle(W, cfg, X):
    """A = 0 (R = I) and s = 1."""
    n = W.shape[1] // cfg.r
    return {"R": torch.zeros(1, cfg.r, n, n, dtype=W.dtype), "s": torch.ones(W.shape[0], 1, dtype=W.dtype)}


def gram_pair(probe):
    """(W, W') with W' the dense map measured on the implementation after setting the magnitude s to 1: the
    rotation alone must keep W's neuron Gram matrix."""
    probe.set("s", torch.ones(probe.case.d_out, 1, dtype=torch.float64))
    return probe.base_weight(), probe.dense_map()


SPEC = register(
    Spec(
        name="boft",
        title="BOFT: butterfly orthogonal finetuning (one butterfly factor) with a magnitude vector",
        equation=r"y = s \odot (W R x) + b,\quad R = \mathrm{diag}(R_1,\dots,R_r),\ R_k = (I + S_k)(I - S_k)^{-1},\ "
                 r"S_k = \tfrac12 (A_k - A_k^\top),\ b = d_{in}/r",
        tensors=(
            TensorSpec("R", "(1, r, d_in // r, d_in // r)", "zeros (R = I); one butterfly factor of r full b × b blocks "
                                                            "A_k, of which only the skew part S_k acts",
                       zero_grad_at_init=""),
            TensorSpec("s", "(d_out, 1)", "ones"),
        ),
        param_count="r * (d_in // r) ** 2 + d_out",
        macs="d_in * d_in + ew(d_out)",  # x times the dense d_in × d_in rotation (as PEFT forms it), the magnitude
        macs_per_forward="solve(r * (d_in // r) ** 3)",
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        identity="tolerance",
        dropout="rejected",
        fields=fields,
        max_rank="d_in",
        constraints=(Constraint("r divides d_in", {"r": 0}),),
        claims=(
            Claim("input_side", "gram_preserving", gram_pair,
                  "with s = 1 the rotation acts on the input side: W' W'ᵀ = W Wᵀ (R is orthogonal)"),
        ),
        references=(
            Reference("paper (§4: butterfly-structured orthogonal matrices, Cayley blocks, magnitude s)",
                      "https://arxiv.org/abs/2311.06243"),
            Reference("PEFT 0.21.2 BOFT layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/boft/layer.py"),
        ),
        deviations=no_conv1d("BOFT", "peft/tuners/boft/model.py:130 (v0.21.2)") + (
            Deviation("dropout", "PEFT's BOFT has no adapter-input dropout: its boft_dropout replaces whole blocks "
                      "by I (multiplicative dropout), which the mapping leaves at 0; a dropout field is accepted and "
                      "has no effect", backend="peft",
                      source="peft/tuners/boft/layer.py:299 (MultiplicativeDropoutLayer)", match="accepted"),
        ),
        notes="Only one butterfly factor (m = 1, a plain block-diagonal R) is specified: without its CUDA extension "
              "PEFT silently forces boft_n_butterfly_factor to 1 (peft/tuners/boft/layer.py:282-286), so m > 1 "
              "cannot be verified on CPU. Identity at init is 'tolerance': PEFT subtracts the bias, scales by s = 1 "
              "and adds the bias back ((y − b) + b rounds). alpha is unused.",
    )
)
