"""pissa mutants: the residual not saved, the scale off by alpha / r, dropout ignored."""
from impl import layers
from impl.variants.lora import lora_delta, lora_scale
from impl.variants.pissa import PiSSA, principal_factors

from . import Mutant


class ResidualNotSaved(PiSSA):
    """Writes W_res into the layer itself instead of returning it: the runtime neither keeps the original
    weight nor saves the residual, so a loaded checkpoint runs on the original W."""

    def init(self, ad, W, cfg):
        layers.write_weight(ad.layer, super().init(ad, W, cfg))
        return None


class ScaleNotDivided(PiSSA):
    """S_r is not divided by s = alpha / r: identity still holds, A and B are √s too large."""

    def factors(self, W, r, s):
        return principal_factors(W, r, 1.0)


class DropoutIgnored(PiSSA):
    def forward(self, ad, x, y):
        s = lora_scale(ad.cfg.alpha, ad.cfg.r, ad.cfg.rslora)
        return y + lora_delta(x, ad.A, ad.B, s).to(y.dtype)


MUTANTS = [
    Mutant("pissa.residual_not_saved", ResidualNotSaved, "checkpoint_roundtrip",
           "W_res written behind the runtime's back: not saved, so load runs the adapter on the original W"),
    Mutant("pissa.scale_not_divided", ScaleNotDivided, "init_formula",
           "S_r not divided by alpha / r: A and B off by sqrt(alpha / r) though the identity holds"),
    Mutant("pissa.dropout_ignored", DropoutIgnored, "dropout", "cfg.dropout accepted but never applied"),
]
