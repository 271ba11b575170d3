"""Spec of AdaLoRA on one layer (Zhang et al. 2023): the SVD-form increment P Λ Q with Λ starting at 0.

No impl variant: the impl backend reports every property `na`; the PEFT backend verifies PEFT's AdaLoRA. The
rank allocator (importance scores, budget schedule, masking of Λ during training) and the orthogonality
regulariser act on the training loop, not on the layer's forward, and are out of scope.
"""
import torch

from ..schema import Constraint, Reference, Spec, TensorSpec, register

EPS = 1e-5  # the authors' code divides by (ranknum + 1e-5) (QingruZhang/AdaLoRA loralib/adalora.py, SVDLinear)


def scale(cfg) -> float:
    """α / (r + ε), α = alpha (r when alpha is 0), ε = 1e-5: the authors' scale of P Λ Q."""
    return (cfg.alpha if cfg.alpha > 0 else float(cfg.r)) / (cfg.r + EPS)


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W x + b + s P Λ Q x_d, Λ = diag(E) (paper eq. 3: W = W0 + P Λ Q); float64, row convention."""
    xd = x if xd is None else xd
    y = x @ W.T + (0 if b is None else b)
    return y + scale(cfg) * ((xd @ T["Q"].T) * T["E"]) @ T["P"].T


def init_oracle(W, cfg, X):
    """Λ = 0 (paper §3.1: 'Λ is initialized with zero'), so the layer starts as the base layer."""
    return {"E": torch.zeros(cfg.r, dtype=W.dtype)}


SPEC = register(
    Spec(
        name="adalora",
        title="AdaLoRA: SVD-form increment P Λ Q (single layer, no rank allocator)",
        equation=r"y = W x + b + \frac{\alpha}{r + \epsilon}\,P \Lambda Q\,\mathrm{drop}(x),\quad "
                 r"\Lambda = \mathrm{diag}(E),\ \epsilon = 10^{-5}",
        tensors=(
            TensorSpec("P", "(d_out, r)", "N(0, 0.02²)", zero_grad_at_init="Λ = 0"),
            TensorSpec("E", "(r,)", "zeros"),
            TensorSpec("Q", "(r, d_in)", "N(0, 0.02²)", zero_grad_at_init="Λ = 0"),
        ),
        param_count="r * (d_in + d_out + 1)",
        macs="r * (d_in + d_out) + ew(r + d_out)",
        macs_per_forward="0",
        oracle=oracle,
        init_oracle=init_oracle,
        identity="bitwise",
        constraints=(Constraint("r is a positive integer", {"r": 0}),),
        references=(
            Reference("paper (eq. 3, §3.1)", "https://arxiv.org/abs/2303.10512"),
            Reference("authors' code (SVDLinear)", "https://github.com/QingruZhang/AdaLoRA/blob/f6968aae21e27eaa28e4f10d12e365cd716a6e80/loralib/loralib/adalora.py"),
            Reference("PEFT 0.21.2 adalora layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/adalora/layer.py"),
        ),
        notes="No impl variant. The scale's ε = 1e-5 is the authors' (and PEFT's) guard for a layer whose ranks were "
              "all pruned; the paper writes W0 + P Λ Q and leaves the scale to the code. Rank allocation is out of "
              "scope: on one layer at init every one of the r triplets is live.",
    )
)
