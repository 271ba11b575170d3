"""Spec of VeRA, vector-based random matrix adaptation (Kopiczko et al. 2024), PEFT's init.

No impl variant: the impl backend reports every property `na`; the PEFT backend verifies PEFT's VeRA.
"""
import torch
from hypothesis import strategies as st

from ..schema import Constraint, Reference, Spec, TensorSpec, register


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W x + b + Λ_b B Λ_d A x_d  (paper eq. 1, h = W0 x + Λ_b B Λ_d A x); float64, row convention."""
    xd = x if xd is None else xd
    d_out, d_in = W.shape
    A, B = T["A"][:, :d_in], T["B"][:d_out, :]  # one pair for the whole model, sized for its widest layer
    y = x @ W.T + (0 if b is None else b)
    return y + ((xd @ A.T) * T["d"]) @ B.T * T["b"]


def init_oracle(W, cfg, X):
    """Paper §3: d starts at a constant (d_initial), b at 0 (so the layer starts as the base layer)."""
    return {"d": torch.full((cfg.r,), float(cfg.d_initial), dtype=W.dtype),
            "b": torch.zeros(W.shape[0], dtype=W.dtype)}


def fields(draw, d_in, d_out):
    return {"d_initial": draw(st.sampled_from([0.1, 1.0]), label="d_initial")}


SPEC = register(
    Spec(
        name="vera",
        title="VeRA: frozen random projections shared by all layers, trainable scaling vectors",
        equation=r"y = W x + b + \Lambda_b B \Lambda_d A\,\mathrm{drop}(x),\quad \Lambda_d = \mathrm{diag}(d),\ "
                 r"\Lambda_b = \mathrm{diag}(b)",
        tensors=(
            # PEFT draws A and B with kaiming-uniform(a=0) from a fixed generator: U(±sqrt(6 / fan_in))
            TensorSpec("A", "(r, d_in)", "kaiming-uniform(fan_in=d_in / 6), frozen, shared", trainable=False,
                       shared=True),
            TensorSpec("B", "(d_out, r)", "kaiming-uniform(fan_in=r / 6), frozen, shared", trainable=False,
                       shared=True),
            TensorSpec("d", "(r,)", "d_initial", zero_grad_at_init="b = 0, so the delta d scales is 0"),
            TensorSpec("b", "(d_out,)", "zeros"),
        ),
        param_count="r + d_out",
        macs="r * (d_in + d_out) + ew(r + d_out)",
        macs_per_forward="0",
        oracle=oracle,
        init_oracle=init_oracle,
        identity="bitwise",
        max_rank=None,  # A and B are random projections: r may exceed the layer's width
        fields=fields,
        defaults={"d_initial": 0.1},
        constraints=(Constraint("r is a positive integer", {"r": 0}),),
        references=(
            Reference("paper (eq. 1, §3.1-3.2)", "https://arxiv.org/abs/2310.11454"),
            Reference("PEFT 0.21.2 vera layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/vera/layer.py"),
        ),
        notes="No impl variant. The oracle takes A's leading d_in columns and B's leading d_out rows (a no-op where "
              "A, B have the layer's shape): one pair serves layers of every width. alpha is unused (VeRA has no "
              "scale). PEFT holds one A, B pair per model, sized to the largest targeted layer and sliced per "
              "layer (vera/layer.py:280-281); on one layer that is exactly (r, d_in), (d_out, r). The model-wide "
              "sharing of the frozen pair in PEFT is checked by tests/test_peft_specs_1.py (tensor_sharing is "
              "impl-only); the init of A and B by init_distribution.",
    )
)
