"""Spec of OFT, orthogonal finetuning (Qiu et al. 2023), block-diagonal Cayley rotations of the input side."""
import torch
from hypothesis import strategies as st

from ..schema import Claim, Constraint, Deviation, Reference, Spec, TensorSpec, register
from ._peft_only import no_conv1d


def skew(q, b):
    """The b × b skew-symmetric matrix S with its strict upper triangle, read row by row, equal to q
    (S_ij = q_k for the k-th pair i < j in row-major order) and S_ji = −S_ij."""
    S = torch.zeros(b, b, dtype=q.dtype)
    i, j = torch.triu_indices(b, b, 1)
    S[i, j] = q
    return S - S.T


def cayley(S):
    """R = (I + S)(I − S)⁻¹ (paper eq. 4): orthogonal with det +1 for skew-symmetric S."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype)
    return (eye + S) @ torch.linalg.inv(eye - S)


def rotation(Q, d_in):
    """The block-diagonal R = diag(R_1, ..., R_r), R_k = cayley(skew(q_k)), block size b = d_in / r."""
    b = d_in // Q.shape[0]
    return torch.block_diag(*(cayley(skew(q, b)) for q in Q))


def dense(W, b, T, cfg, knobs):
    """The adapted layer as one matrix: W R (the rotation acts on the input side)."""
    return W @ rotation(T["Q"], W.shape[1])


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W R x + b; float64, row convention y = x (W R)ᵀ + b."""
    y = x @ dense(W, b, T, cfg, knobs).T
    return y if b is None else y + b


def init_oracle(W, cfg, X):
    """Q = 0, so R = I."""
    n = W.shape[1] // cfg.r
    return {"Q": torch.zeros(cfg.r, n * (n - 1) // 2, dtype=W.dtype)}


def input_map(probe):
    """R measured on the implementation: its tensors on a twin layer whose base weight is the d_in × d_in identity."""
    return probe.twin(d_out=probe.case.d_in, bias=False).dense_map()


def rotation_of(probe):
    return input_map(probe).unsqueeze(0)


def gram_pair(probe):
    """(W, W') with W' the adapted layer's dense map measured on the implementation."""
    return probe.base_weight(), probe.dense_map()


def fields(draw, d_in, d_out):
    """r = the number of blocks: a divisor of d_in leaving blocks of at least 2 × 2."""
    return {"r": draw(st.sampled_from([k for k in range(1, d_in + 1) if d_in % k == 0 and d_in // k >= 2]), label="r")}


SPEC = register(
    Spec(
        name="oft",
        title="OFT: orthogonal finetuning (block-diagonal Cayley rotation of the input)",
        equation=r"y = W R x + b,\quad R = \mathrm{diag}(R_1,\dots,R_r),\ R_k = (I + S_k)(I - S_k)^{-1},\ "
                 r"S_k = -S_k^\top \in \mathbb{R}^{b\times b},\ b = d_{in}/r",
        tensors=(TensorSpec("Q", "(r, (d_in // r) * (d_in // r - 1) // 2)",
                            "zeros (R = I): row k holds the strict upper triangle of S_k, row by row"),),
        param_count="r * (d_in // r) * (d_in // r - 1) // 2",
        macs="d_in * (d_in // r)",  # x through r blocks of b × b
        macs_per_forward="solve(r * (d_in // r) ** 3)",
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        identity="bitwise",
        dropout="rejected",
        fields=fields,
        max_rank="d_in",
        constraints=(Constraint("r divides d_in", {"r": 0}),),
        claims=(
            Claim("orthogonal", "orthogonal_det1", rotation_of,
                  "R (measured on the implementation) is orthogonal with det +1 (a Cayley transform)"),
            Claim("input_side", "gram_preserving", gram_pair,
                  "the rotation acts on the input side: W' W'ᵀ = W R Rᵀ Wᵀ = W Wᵀ (the neurons' Gram matrix is kept)"),
        ),
        references=(
            Reference("paper (§3, eq. 4: Cayley parametrisation, block-diagonal R)", "https://arxiv.org/abs/2306.07280"),
            Reference("PEFT 0.21.2 OFT layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/oft/layer.py"),
        ),
        deviations=no_conv1d("OFT", "peft/tuners/oft/model.py:143 (v0.21.2)") + (
            Deviation("dropout", "PEFT's OFT has no adapter-input dropout: its module_dropout replaces whole blocks "
                      "of R by I (multiplicative dropout), another operation, which the mapping leaves at 0; a "
                      "dropout field is accepted and has no effect", backend="peft",
                      source="peft/tuners/oft/layer.py:29-66 (MultiplicativeDropoutLayer)", match="accepted"),
        ),
        notes="The exact Cayley transform (PEFT: use_cayley_neumann=False); PEFT's default Cayley–Neumann "
              "approximation is the spec 'oft_neumann'. block_share, COFT and the multiplicative block dropout are "
              "not drawn. alpha is unused.",
    )
)
