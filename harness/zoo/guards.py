"""Mutants that guard the harness itself (issue 34): each is visible to one part of the harness only, a tolerance
or a dimension the strategies draw, so that weakening that part (a looser tolerance, a dimension no longer drawn)
lets it escape. tests/test_zoo_guards.py weakens each part and shows its mutant escaping; the table there maps
every part to its mutant (these, and older mutants that one part alone catches).

- only on non-square layers: the rank limit checked against max(d_in, d_out) (min == max on a square layer);
- only on square layers: detach picks a Conv1D's layout by shape and writes a square weight back transposed;
- only at out_features = 1: a single-output fast path that drops the scale;
- only with alpha != r: the plain scale inverted (r / alpha);
- only in bfloat16: the adapter skipped where the input's dtype differs from the trainables';
- only within float32's tolerance: the float32 adapter path rounded through float16;
- only within float64's tolerance: the float64 adapter path computed in float32;
- only within bfloat16's tolerance: the bfloat16 adapter input rounded through float8;
- only in gradients: the gradient of A off by 1 % (the forward exact);
- only on a degenerate base weight (a zero row): DoRA's row norm not floored;
- only when the calibration data's padded positions change: the attention mask ignored.
"""
import contextlib
from unittest import mock

import torch

from impl import runtime
from impl.variants import dora
from impl.variants.dora import DoRA
from impl.variants.eva import EVA
from impl.variants.lora import LoRA, lora_add, lora_scale
from impl.variants.pissa import PiSSA

from . import Mutant


class RankLimitMax(LoRA):
    @classmethod
    def check_layer(cls, cfg, d_in, d_out, name):
        """r checked against max(d_in, d_out) instead of min: a square layer cannot tell the two apart."""
        if cfg.r > max(d_in, d_out):
            raise ValueError(f"r={cfg.r} exceeds max(d_in={d_in}, d_out={d_out}) of layer '{name}'")


@contextlib.contextmanager
def detach_square_conv1d_dense():
    """detach picks a rewritten Conv1D weight's layout by its shape: a square one is written back as its dense
    (d_out, d_in) view, i.e. transposed; a non-square one (whose shape tells the layouts apart) correctly."""
    real = runtime._undo

    def undo(model, ads, handles, requires_grad, restore_weights):
        ads = list(ads)
        for ad in ads:
            w = ad.original_weight
            if ad.kind == "conv1d" and w is not None and w.shape[0] == w.shape[1]:
                ad.original_weight = w.t().contiguous()
        real(model, ads, handles, requires_grad, restore_weights)

    with mock.patch.object(runtime, "_undo", undo):
        yield


@contextlib.contextmanager
def dora_norm_unfloored():
    """DoRA's row norm not floored: a zero row of W divides 0 by 0 at init."""
    with mock.patch.object(dora, "norm_floor", lambda dtype: 0.0):
        yield


class SingleOutputFastPath(LoRA):
    """A special path for single-output layers (a regression head) that forgets the scale: y + B A x."""

    def forward(self, ad, x, y):
        if y.shape[-1] == 1:
            return lora_add(y, ad.drop(x), ad.A, ad.B, 1.0)
        return super().forward(ad, x, y)


@contextlib.contextmanager
def padding_not_masked():
    """The calibration pass drops each batch's attention_mask: padded positions count as tokens."""
    real = runtime.capture_inputs

    def capture(model, targets, calibration):
        unmasked = [{k: v for k, v in b.items() if k != "attention_mask"} if isinstance(b, dict) else b
                    for b in calibration]
        return real(model, targets, unmasked)

    with mock.patch.object(runtime, "capture_inputs", capture):
        yield


class ScaleInverted(LoRA):
    """The plain scale r / alpha instead of alpha / r (rsLoRA's rule right): equal only where alpha = r."""

    def forward(self, ad, x, y):
        s = lora_scale(ad.cfg.alpha, ad.cfg.r, True) if ad.cfg.rslora else ad.cfg.r / ad.cfg.alpha
        return lora_add(y, ad.drop(x), ad.A, ad.B, s)


class SkippedOnDtypeMismatch(LoRA):
    """The adapter skipped where the input's dtype differs from the trainables' (a bfloat16 layer with float32
    trainables) instead of casting."""

    def forward(self, ad, x, y):
        if x.dtype != ad.A.dtype:
            return y
        return super().forward(ad, x, y)


class _Rounded(LoRA):
    """The adapter input rounded through `via` where the layer's dtype is `when`; everything else right."""

    when: torch.dtype
    via: torch.dtype

    def forward(self, ad, x, y):
        if x.dtype == self.when:
            x = x.to(self.via).to(x.dtype)
        return super().forward(ad, x, y)


class Float32ThroughFloat16(_Rounded):
    when, via = torch.float32, torch.float16


class Float64ThroughFloat32(_Rounded):
    when, via = torch.float64, torch.float32


class Bfloat16ThroughFloat8(_Rounded):
    when, via = torch.bfloat16, torch.float8_e5m2


class GradientOfAOff(LoRA):
    """A enters as A + 0.01 (A − A.detach()): the same value, exactly, but 1.01 times A's gradient."""

    def forward(self, ad, x, y):
        s = lora_scale(ad.cfg.alpha, ad.cfg.r, ad.cfg.rslora)
        return lora_add(y, ad.drop(x), ad.A + 0.01 * (ad.A - ad.A.detach()), ad.B, s)


MUTANTS = [
    Mutant("lora.rank_limit_max", RankLimitMax, "rank_limit",
           "r checked against max(d_in, d_out): accepted above min on non-square layers"),
    Mutant("pissa.detach_square_conv1d_dense", PiSSA, "detach_restores",
           "detach picks a Conv1D's layout by shape: a square rewritten weight is written back transposed",
           patch=detach_square_conv1d_dense),
    Mutant("lora.out1_fast_path_unscaled", SingleOutputFastPath, "oracle",
           "a special path for out_features = 1 that drops the scale alpha / r"),
    Mutant("lora.scale_inverted", ScaleInverted, "oracle", "the plain scale r / alpha instead of alpha / r"),
    Mutant("lora.bf16_adapter_skipped", SkippedOnDtypeMismatch, "oracle",
           "the adapter skipped when the input's dtype differs from the trainables' (bfloat16 layers)"),
    Mutant("lora.fp32_through_fp16", Float32ThroughFloat16, "oracle",
           "the float32 adapter input rounded through float16"),
    Mutant("lora.fp64_through_fp32", Float64ThroughFloat32, "oracle",
           "the float64 adapter input rounded through float32"),
    Mutant("lora.bf16_through_fp8", Bfloat16ThroughFloat8, "oracle",
           "the bfloat16 adapter input rounded through float8 (e5m2)"),
    Mutant("dora.norm_unfloored", DoRA, "degenerate_weights", "the row norm not floored: a zero row of W gives 0 / 0",
           patch=dora_norm_unfloored),
    Mutant("eva.padding_not_masked", EVA, "data_path",
           "the calibration pass ignores the attention mask: padded positions count as tokens",
           patch=padding_not_masked),
    Mutant("lora.gradient_of_a_off", GradientOfAOff, "oracle", "A's gradient 1.01 times the true one (forward exact)"),
]
