r"""A user's own variant, verified by the same engine from outside impl/: LoRA with a learned scalar gain.

    y = W x + b + s · γ · B A x,    s = alpha / r,   γ starts at 1, B at 0

Run:  python -m tools.verify --variant-module examples/scaled_lora.py --variants scaled_lora
One module holds both halves: the implementation (registered in impl) and its spec (registered in spec),
with a float64 oracle written from the equation above and sharing no code with the implementation.
"""
import torch

from impl import TensorDecl, Variant, register
from spec import Reference, Spec, TensorSpec
from spec import register as register_spec


@register
class ScaledLoRA(Variant):
    name = "scaled_lora"

    def tensors(self, d_in, d_out, cfg):
        return {"A": TensorDecl((cfg.r, d_in), "kaiming"), "B": TensorDecl((d_out, cfg.r), "zeros"),
                "gamma": TensorDecl((), "ones")}

    def forward(self, ad, x, y):
        s = ad.cfg.alpha / ad.cfg.r
        delta = (ad.drop(x).to(ad.A.dtype) @ ad.A.t() @ ad.B.t()) * (s * ad.gamma)
        return y + delta.to(y.dtype)

    def merged(self, ad, W, b):
        return W + (ad.cfg.alpha / ad.cfg.r) * ad.gamma.float() * (ad.B.float() @ ad.A.float()), b


def oracle(W, b, T, x, cfg, knobs, xd=None):
    xd = x if xd is None else xd
    y = x @ W.T + (0 if b is None else b)
    return y + (cfg.alpha / cfg.r) * T["gamma"] * (xd @ T["A"].T @ T["B"].T)


register_spec(Spec(
    name="scaled_lora",
    title="LoRA with a learned scalar gain",
    equation=r"y = W x + b + s\,\gamma\,B A x",
    tensors=(
        TensorSpec("A", "(r, d_in)", "kaiming-uniform", zero_grad_at_init="B = 0"),
        TensorSpec("B", "(d_out, r)", "zeros"),
        TensorSpec("gamma", "()", "ones", zero_grad_at_init="B = 0, so the delta it scales is 0"),
    ),
    param_count="r * (d_in + d_out) + 1",
    oracle=oracle,
    init_oracle=lambda W, cfg, X: {"B": torch.zeros(W.shape[0], cfg.r, dtype=W.dtype), "gamma": torch.ones((), dtype=W.dtype)},
    references=(Reference("LoRA paper", "https://arxiv.org/abs/2106.09685"),),
))
