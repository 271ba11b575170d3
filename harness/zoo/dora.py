"""dora mutants: the bias scaled, the norm not detached, the norm over the wrong axis, dropout ignored."""
import torch

from impl.variants.dora import DoRA, magnitude_ratio, norm_floor
from impl.variants.lora import lora_delta, lora_scale

from . import Mutant


class BiasScaled(DoRA):
    """y already holds the bias and is rescaled whole: (m/n) ⊙ (W x + b) + (m/n) s B A x."""

    def forward(self, ad, x, y):
        s = lora_scale(ad.cfg.alpha, ad.cfg.r, ad.cfg.rslora)
        k = magnitude_ratio(ad.m, self.norm(ad.weight(), ad.A, ad.B, s))
        yf = y.to(ad.A.dtype)
        return (yf + self.delta(k, yf, lora_delta(ad.drop(x), ad.A, ad.B, s))).to(y.dtype)


class NormNotDetached(DoRA):
    """‖W + s B A‖ differentiated through, against the paper's §4.3 and PEFT: same forward, other grads."""

    def norm(self, W, A, B, s):
        V = W.to(A.dtype).contiguous() + s * (B @ A)
        return torch.linalg.vector_norm(V, dim=1).clamp_min(norm_floor(A.dtype))


class NormWrongAxis(DoRA):
    """The norm taken over the input dim (per column) instead of per output row."""

    def norm(self, W, A, B, s):
        with torch.no_grad():
            V = W.to(A.dtype).contiguous() + s * (B @ A)
            return torch.linalg.vector_norm(V, dim=0).clamp_min(norm_floor(A.dtype))


class DropoutIgnored(DoRA):
    def forward(self, ad, x, y):
        s = lora_scale(ad.cfg.alpha, ad.cfg.r, ad.cfg.rslora)
        k = magnitude_ratio(ad.m, self.norm(ad.weight(), ad.A, ad.B, s))
        yf = y.to(ad.A.dtype)
        b = ad.bias()
        base = yf - (0 if b is None else b.to(yf.dtype))
        return (yf + self.delta(k, base, lora_delta(x, ad.A, ad.B, s))).to(y.dtype)


MUTANTS = [
    Mutant("dora.bias_scaled", BiasScaled, "bias_invariance", "the bias rescaled by m/n with the rest"),
    Mutant("dora.norm_not_detached", NormNotDetached, "oracle",
           "gradients flow through ‖W + sBA‖, which the paper (§4.3) and PEFT treat as a constant"),
    Mutant("dora.norm_wrong_axis", NormWrongAxis, "oracle", "the norm taken per input column instead of per output row",
           square=True),
    Mutant("dora.dropout_ignored", DropoutIgnored, "dropout", "cfg.dropout accepted but never applied"),
]
