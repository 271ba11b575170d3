"""Spec of DeLoRA (Bini et al. 2025): normalised rank-one terms, a trainable strength λ, per-channel weight norms."""
import torch
from hypothesis import strategies as st

from ..schema import Claim, Constraint, Deviation, Reference, Spec, TensorSpec, register

CLAMP = 1e-4  # PEFT clamps each rank-one term's factor norms at 1e-4


def delta_weight(W, T, cfg):
    """ΔW = (λ/r) B Ξ A diag(w), Ξ_ii = 1/(max(‖a_i‖,1e-4) max(‖b_i‖,1e-4)), w_j = ‖W_:,j‖ (the paper's
    λ‖W‖/r · BΞA with PEFT's per-input-channel norm)."""
    A, B, lam = T["A"], T["B"], T["lam"]
    w = W.norm(dim=0)
    xi = 1.0 / (A.norm(dim=1).clamp_min(CLAMP) * B.norm(dim=0).clamp_min(CLAMP))
    return (lam / cfg.r) * (B * xi[None, :]) @ A * w[None, :]


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W x + b + ΔW x_d; float64, row convention. The weight norms w are recomputed here from W (DeLoRA
    does not rewrite the base), not read from the implementation's buffer."""
    xd = x if xd is None else xd
    y = x @ W.T + (0 if b is None else b)
    return y + xd @ delta_weight(W, T, cfg).T


def dense(W, b, T, cfg, knobs):
    """The adapted layer as one matrix: W + ΔW (the bias is unchanged)."""
    return W + delta_weight(W, T, cfg)


def init_oracle(W, cfg, X):
    """B = 0 (identity for any λ), λ = lambda0, w = ‖W_:,j‖ per input channel. A is random (kaiming-uniform)."""
    return {
        "B": torch.zeros(W.shape[0], cfg.r, dtype=W.dtype),
        "lam": torch.tensor([cfg.lambda0], dtype=W.dtype),
        "wnorm": W.norm(dim=0),
    }


def update_over_bound(p):
    """‖ΔW‖₂ / (|λ| · max_j ‖W_:,j‖), with ΔW = (dense map − W) measured on the implementation: at most 1, since
    each normalised rank-one term has spectral norm ≤ 1, their mean over r terms too, and diag(w) adds max w."""
    dW = p.dense_map() - p.base_weight()
    lam = p.tensors()["lam"].abs().max()
    bound = lam * p.base_weight().norm(dim=0).max()
    return torch.linalg.matrix_norm(dW, ord=2) / bound


SPEC = register(
    Spec(
        name="delora",
        title="DeLoRA: decoupled low-rank adaptation",
        equation=(r"y = W x + b + \frac{\lambda}{r}\,B\,\Xi\,A\,(w \odot \mathrm{drop}(x)),\ "
                  r"\Xi_{ii} = \frac{1}{\max(\lVert a_i\rVert,10^{-4})\max(\lVert b_i\rVert,10^{-4})},\ "
                  r"w_j = \lVert W_{:,j}\rVert"),
        tensors=(
            TensorSpec("A", "(r, d_in)", "kaiming-uniform(a=sqrt 5)",
                       zero_grad_at_init="B = 0, so dL/dA = (λ/r) Ξ Bᵀ (dL/dy) (w ⊙ x)ᵀ = 0 (the clamped ‖b_i‖ passes no gradient)"),
            TensorSpec("B", "(d_out, r)", "zeros"),
            TensorSpec("lam", "(1,)", "lambda0 (15, PEFT's and the paper's default)",
                       zero_grad_at_init="B = 0, so ΔW = 0 for every λ and dL/dλ = 0"),
            TensorSpec("wnorm", "(d_in,)", "‖W_:,j‖ per input channel, from the (dequantized) weight", trainable=False),
        ),
        param_count="r * (d_in + d_out) + 1",
        macs="r * (d_in + d_out) + ew(r)",  # x (A ⊙ w)ᵀ (impl folds w into A), the per-rank gain, Bᵀ into y
        # the norms of A's rows and B's columns, Ξ λ / r, and folding w into A
        macs_per_forward="ew(r * (2 * d_in + d_out) + 3 * r)",
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        identity="bitwise",
        min_width=2,
        claims=(
            Claim("bounded_update", "bounded", update_over_bound,
                  "‖ΔW‖₂ ≤ |λ| · max_j ‖W_:,j‖ (normalised rank-one terms scaled by λ/r and the channel norms)",
                  bound=1.0),
        ),
        constraints=(
            Constraint("r is a positive integer", {"r": 0}),
            Constraint("lambda0 is a finite number", {"lambda0": float("inf")}),
            Constraint("dropout in [0, 1)", {"dropout": 1.0}),
        ),
        references=(
            Reference("paper (section 3: ΔW = λ‖W‖/r · B Ξ A)", "https://arxiv.org/abs/2503.18225"),
            Reference("PEFT 0.21.2 DeLoRA layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/delora/layer.py"),
            Reference("authors' code", "https://github.com/ExplainableML/DeLoRA"),
        ),
        deviations=(
            Deviation("layout", "PEFT 0.21.2's DeLoRA adapts torch.nn.Linear only (TypeError on transformers' "
                      "Conv1D)", backend="peft", source="peft/tuners/delora/model.py:102-106", match="Conv1D"),
            Deviation("model_oracle", "PEFT 0.21.2's DeLoRA adapts torch.nn.Linear only (TypeError on GPT-2's "
                      "Conv1D projections)", backend="peft", source="peft/tuners/delora/model.py:102-106",
                      match="Conv1D"),
            Deviation("unmerge_restores", "PEFT 0.21.2's DeLoRA adapts torch.nn.Linear only (TypeError on "
                      "transformers' Conv1D)", backend="peft", source="peft/tuners/delora/model.py:102-106",
                      match="Conv1D"),
        ),
        notes=(
            "Follows PEFT: per-input-channel norms w = ‖W_:,j‖ (dim 0) kept as a persistent frozen buffer in the "
            "frozen-tensor dtype, norms of a_i and b_i clamped at 1e-4, λ of shape (1,) starting at 15. Shapes with "
            "out_features = 1 are not drawn (min_width 2): there each column b_i of B is a scalar whose normalised "
            "value is its sign, so B has an exactly zero gradient for every value (PEFT alike). The common "
            "field alpha is unused (λ is the strength). Unlike PEFT, which fails at creation on bitsandbytes layers "
            "(norm of the packed storage), w is taken from the dequantized weight, so quantized layers work."
        ),
        fields=lambda draw, d_in, d_out: {"lambda0": draw(st.sampled_from([15.0, 0.1, 3.0, -2.0]), label="lambda0")},
    )
)
