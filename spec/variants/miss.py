"""Spec of MiSS (Kang 2025, 'MiSS: matrix shard sharing'): one trainable shard D, shared by every group of r input
columns, ΔW[:, j] = D[j mod r, :]."""
import torch
from hypothesis import strategies as st

from ..schema import Constraint, Deviation, Reference, Spec, TensorSpec, register
from ._peft_only import no_conv1d


def delta_weight(D, d_in):
    """ΔW (d_out, d_in) with column j equal to row (j mod r) of D: the shard repeated along the input."""
    r = D.shape[0]
    return D[torch.arange(d_in) % r].T


def dense(W, b, T, cfg, knobs):
    return W + delta_weight(T["D"], W.shape[1])


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W x + b + ΔW x_d = W x + b + Dᵀ Σ_g x_d[g r : (g+1) r] (the last group zero-padded); float64."""
    xd = x if xd is None else xd
    y = x @ W.T + (0 if b is None else b)
    return y + xd @ delta_weight(T["D"], W.shape[1]).T


def init_oracle(W, cfg, X):
    """D = 0."""
    return {"D": torch.zeros(cfg.r, W.shape[0], dtype=W.dtype)}


SPEC = register(
    Spec(
        name="miss",
        title="MiSS: matrix shard sharing (one shard D repeated along the input)",
        equation=r"y = W x + b + \Delta W\,\mathrm{drop}(x),\quad \Delta W_{:,j} = D_{j \bmod r,:}^{\top},\ "
                 r"D \in \mathbb{R}^{r \times d_{out}}",
        tensors=(TensorSpec("D", "(r, d_out)", "zeros"),),
        param_count="r * d_out",
        macs="d_in + r * d_out",  # the group sum of x, then Dᵀ
        macs_per_forward="0",
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        identity="bitwise",
        dropout="honoured",
        fields=lambda draw, d_in, d_out: {"r": draw(st.integers(1, d_in), label="r")},
        max_rank="d_in",
        constraints=(Constraint("r is a positive integer", {"r": 0}),),
        references=(
            Reference("paper (MiSS, §3)", "https://arxiv.org/abs/2409.15371"),
            Reference("PEFT 0.21.2 MiSS layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/miss/layer.py"),
        ),
        deviations=no_conv1d("MiSS", "peft/tuners/miss/model.py:136 (v0.21.2)") + (
            Deviation("dropout", "when r does not divide d_in, PEFT zero-pads x to a multiple of r before its dropout, "
                      "so the mask is drawn over the padded width: the same distribution on x, another random "
                      "stream than a mask over the d_in inputs", backend="peft",
                      source="peft/tuners/miss/layer.py:369-372 (F.pad, then dropout(x))", match="shared dropout mask"),
        ),
        notes="PEFT's default MiSS mode (init_weights=True). Its 'mini' mode (D of shape (r, mini_r) tiled along the "
              "output) is not specified. alpha is unused.",
    )
)
