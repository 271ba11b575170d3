"""Spec of PiSSA (Meng et al. 2024): LoRA whose factors start at the top-r singular triplets of W."""
import math

import torch
from hypothesis import strategies as st

from ..schema import Constraint, Deviation, Reference, Spec, TensorSpec, register


def scale(cfg) -> float:
    """s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W_res x + b + s B A x_d (the forward is LoRA's on the residual base); float64, row convention.
    W is the layer's current base weight, i.e. the residual W_res."""
    xd = x if xd is None else xd
    y = x @ W.T + (0 if b is None else b)
    return y + scale(cfg) * (xd @ T["A"].T @ T["B"].T)


def dense(W, b, T, cfg, knobs):
    """The adapted layer as one matrix: W_res + s B A (the bias is unchanged)."""
    return W + scale(cfg) * T["B"] @ T["A"]


def init_oracle(W, cfg, X):
    """W = U S Vh: A = diag(√(S_r/s)) Vh_r, B = U_r diag(√(S_r/s)) (paper section 3, with PEFT's S_r / s), and the
    base becomes W_res = W − U_r S_r Vh_r. Singular vectors are defined up to sign (sign_free)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = cfg.r
    root = (S[:r] / scale(cfg)).sqrt()
    return {
        "A": root[:, None] * Vh[:r],
        "B": U[:, :r] * root[None, :],
        "base_weight": W - (U[:, :r] * S[:r]) @ Vh[:r],
    }


SPEC = register(
    Spec(
        name="pissa",
        title="PiSSA: principal singular values and singular vectors adaptation",
        equation=(r"W = U S V^\top,\ A = \sqrt{S_r/s}\,V_r^\top,\ B = U_r\sqrt{S_r/s},\ "
                  r"W_{res} = W - s\,B A;\quad y = W_{res} x + b + s\,B A\,\mathrm{drop}(x),\ s = \alpha/r"),
        tensors=(
            TensorSpec("A", "(r, d_in)", "diag(sqrt(S_r / s)) Vh_r (top-r right singular vectors of W, fp32 SVD)"),
            TensorSpec("B", "(d_out, r)", "U_r diag(sqrt(S_r / s)) (top-r left singular vectors of W)"),
        ),
        param_count="r * (d_in + d_out)",
        macs="r * (d_in + d_out) + ew(d_out)",  # x Aᵀ, then Bᵀ; the scale s (LoRA's, on the residual base)
        macs_per_forward="0",
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        sign_free={"A": 0, "B": 1},
        identity="tolerance",
        identity_factor=1.0,
        rewrites_base=True,
        quantized="raises",
        constraints=(
            Constraint("r is a positive integer", {"r": 0}),
            Constraint("alpha > 0 (the init divides S_r by s = alpha / r)", {"alpha": 0.0}),
            Constraint("dropout in [0, 1)", {"dropout": 1.0}),
        ),
        references=(
            Reference("paper (section 3: A, B and W_res from the SVD of W)", "https://arxiv.org/abs/2404.02948"),
            Reference("PEFT 0.21.2 pissa_init", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/layer.py"),
            Reference("authors' code", "https://github.com/GraphPKU/PiSSA"),
        ),
        deviations=(
            Deviation("identity_at_init", "PEFT refuses to initialise PiSSA on a float64 base ('Please initialize "
                      "PiSSA under float32'); the PEFT backend initialises in float32 and casts, PEFT's recipe, so "
                      "the float64 identity holds only to the fp32 rounding of the SVD",
                      backend="peft", source="peft/tuners/lora/layer.py:432-436 (pissa_init)", match=r"eps\(torch\.float64\)"),
            Deviation("detach_restores", "PEFT's unload() leaves the residual W_res in the base layer: PiSSA's "
                      "rewrite of the base is not undone", backend="peft",
                      source="peft/tuners/lora/layer.py:462 (pissa_init overwrites the base weight); PEFT documents "
                             "the conversion path_initial_model_for_weight_conversion (peft_model.py:268)",
                      match="output after detach differs"),
            Deviation("disable_restores", "PEFT's disable_adapter() runs the residual model W_res, not the "
                      "original base", backend="peft", source="peft/tuners/lora/layer.py:462 (pissa_init overwrites the base)",
                      match="disabled differs from the base"),
        ),
        notes=(
            "Identity at init holds within a dtype tolerance (W_res is rounded into the base dtype), not bitwise. "
            "The SVD is taken in fp32, as PEFT's 'pissa' init; unlike PEFT, a float64 base is accepted (PEFT raises "
            "TypeError) and its residual is formed in float64 from the fp32-accurate factors. The residual is built "
            "from the factors as stored (rounded first). Only the exact SVD ('pissa') is implemented, not PEFT's "
            "randomised 'pissa_niter_k'. The residual is saved in the checkpoint and restored on load, which never "
            "recomputes the SVD. bitsandbytes layers are refused at attach (PEFT asks to dequantize first)."
        ),
        fields=lambda draw, d_in, d_out: {"rslora": draw(st.booleans(), label="rslora")},
    )
)
