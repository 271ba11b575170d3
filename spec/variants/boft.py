"""Spec of BOFT, butterfly orthogonal finetuning (Liu et al. 2024), with one butterfly factor: a block-diagonal
Cayley rotation of the input side and a trainable per-output magnitude."""
import torch
from hypothesis import strategies as st

from ..schema import Claim, Constraint, Deviation, Reference, Spec, TensorSpec, register
from ._peft_only import no_conv1d


def cayley(A):
    """R = (I + S)(I − S)⁻¹ with S = (A − Aᵀ)/2 the skew-symmetric part of the block A: orthogonal, det +1."""
    S = 0.5 * (A - A.T)
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    return (eye + S) @ torch.linalg.inv(eye - S)


def rotation(R):
    """diag(cayley(A_1), ..., cayley(A_r)) from the (1, r, b, b) blocks of the single butterfly factor."""
    return torch.block_diag(*(cayley(A) for A in R[0]))


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


def fields(draw, d_in, d_out):
    """r = the number of blocks: a divisor of d_in leaving blocks of at least 2 × 2."""
    return {"r": draw(st.sampled_from([k for k in range(1, d_in + 1) if d_in % k == 0 and d_in // k >= 2]), label="r")}


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
