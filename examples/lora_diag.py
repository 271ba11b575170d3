r"""A user's variant written from README.md and docs/writing_a_variant.md only: LoRA with a learned diagonal scale.

    y = W x + b + s · B diag(λ) A x,    s = alpha / r,   A kaiming-uniform, B = 0, λ = 1 (r trainable gains)

Run:  python -m tools.verify --variant-module examples/lora_diag.py --variants lora_diag
Three planted bugs are registered beside it, each as a variant of its own (the same spec, another name), to see
which property flags each:
    lora_diag_bug_scale  forward scales by alpha instead of alpha / r
    lora_diag_bug_merge  merged folds B A without the diagonal λ
    lora_diag_bug_init   A drawn from N(0, 1) instead of kaiming-uniform
Observed (`--variants lora_diag,lora_diag_bug_scale,lora_diag_bug_merge,lora_diag_bug_init`, profile verify):
lora_diag passes every applicable property; the scale bug fails oracle, dropout, merge_oracle, dense_equivalence
and model_oracle (merge passes: merged shares the wrong scale, so hooked and merged agree); the merge bug fails
merge, merge_oracle and model_merge_unload; the init bug fails init_distribution ("a value of size 3.4 lies outside
the declared bound"). tests/test_researcher.py checks the three flags.
"""
import dataclasses

import torch

from impl import TensorDecl, Variant, register
from spec import Reference, Spec, TensorSpec
from spec import register as register_spec


@register
class LoRADiag(Variant):
    name = "lora_diag"

    def tensors(self, d_in, d_out, cfg):
        return {"A": TensorDecl((cfg.r, d_in), "kaiming"), "B": TensorDecl((d_out, cfg.r), "zeros"),
                "lam": TensorDecl((cfg.r,), "ones")}

    def scale(self, cfg):
        return cfg.alpha / cfg.r

    def forward(self, ad, x, y):
        h = (ad.drop(x).to(ad.param_dtype) @ ad.A.t()) * ad.lam
        return y + (self.scale(ad.cfg) * (h @ ad.B.t())).to(y.dtype)

    def merged(self, ad, W, b):
        return W + self.scale(ad.cfg) * (ad.B.float() * ad.lam.float()) @ ad.A.float(), b


def oracle(W, b, T, x, cfg, knobs, xd=None):
    xd = x if xd is None else xd
    y = x @ W.T + (0 if b is None else b)
    return y + (cfg.alpha / cfg.r) * ((xd @ T["A"].T) * T["lam"]) @ T["B"].T


def dense(W, b, T, cfg, knobs):
    return W + (cfg.alpha / cfg.r) * T["B"] @ torch.diag(T["lam"]) @ T["A"]


SPEC = register_spec(Spec(
    name="lora_diag",
    title="LoRA with a learned diagonal scale between A and B",
    equation=r"y = W x + b + \frac{\alpha}{r} B\,\mathrm{diag}(\lambda)\,A x",
    tensors=(
        TensorSpec("A", "(r, d_in)", "kaiming-uniform(a=sqrt 5)", zero_grad_at_init="B = 0"),
        TensorSpec("B", "(d_out, r)", "zeros"),
        TensorSpec("lam", "(r,)", "ones", zero_grad_at_init="B = 0, so the delta it scales is 0"),
    ),
    param_count="r * (d_in + d_out) + r",
    oracle=oracle,
    dense=dense,
    init_oracle=lambda W, cfg, X: {"B": torch.zeros(W.shape[0], cfg.r, dtype=W.dtype),
                                   "lam": torch.ones(cfg.r, dtype=W.dtype)},
    references=(Reference("LoRA", "https://arxiv.org/abs/2106.09685"),),
))


# ----------------------------------------------------------------------------------------------- planted bugs


@register
class ScaleBug(LoRADiag):
    name = "lora_diag_bug_scale"

    def scale(self, cfg):
        return cfg.alpha


@register
class MergeBug(LoRADiag):
    name = "lora_diag_bug_merge"

    def merged(self, ad, W, b):
        return W + self.scale(ad.cfg) * ad.B.float() @ ad.A.float(), b


def _normal_init(t, _):
    t.normal_(0.0, 1.0)


@register
class InitBug(LoRADiag):
    name = "lora_diag_bug_init"

    def tensors(self, d_in, d_out, cfg):
        return {**super().tensors(d_in, d_out, cfg), "A": TensorDecl((cfg.r, d_in), _normal_init)}


for bug in (ScaleBug, MergeBug, InitBug):
    register_spec(dataclasses.replace(SPEC, name=bug.name))
