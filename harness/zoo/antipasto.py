"""antipasto mutants: gain shape, gain init, runtime knob, suppress_only clamp, data path, frozen basis, checkpoint."""
import functools

import torch

from impl.registry import TensorDecl
from impl.variants._svd import top_r
from impl.variants.antipasto import AntiPaSTO

from . import Mutant, checkpoint_without


class LinearGain(AntiPaSTO):
    """S_eff = S (1 + z): negative for z < −1, a sign-flipped singular value."""

    def s_eff(self, ad, dt):
        g = torch.clamp(ad.g, max=0) if ad.cfg.suppress_only else ad.g
        return ad.S.to(dt) * (1 + ad.knobs["coeff"] * g.to(dt))


class ExpGain(AntiPaSTO):
    """S_eff = S exp(z): positive, but its derivative grows with its value (self-amplifying)."""

    def s_eff(self, ad, dt):
        g = torch.clamp(ad.g, max=0) if ad.cfg.suppress_only else ad.g
        return ad.S.to(dt) * torch.exp(ad.knobs["coeff"] * g.to(dt))


class GainNonZeroInit(AntiPaSTO):
    def tensors(self, d_in, d_out, cfg):
        return {**super().tensors(d_in, d_out, cfg), "g": TensorDecl((cfg.r,), "kaiming")}  # N(0, 0.02²)


class CoeffReadAtAttach(AntiPaSTO):
    """Reads coeff from the config (fixed at attach), so a change on the live model is ignored."""

    def s_eff(self, ad, dt):
        g = torch.clamp(ad.g, max=0) if ad.cfg.suppress_only else ad.g
        return ad.S.to(dt) * (1 + torch.nn.functional.elu(ad.cfg.coeff * g.to(dt)))


class SuppressNotClamped(AntiPaSTO):
    """suppress_only accepted but g never clamped: the 'attenuate only' layer can amplify."""

    def s_eff(self, ad, dt):
        return super().s_eff(ad, dt) if not ad.cfg.suppress_only else (
            ad.S.to(dt) * (1 + torch.nn.functional.elu(ad.knobs["coeff"] * ad.g.to(dt))))


class DataNotWired(AntiPaSTO):
    """The group init runs but ignores the calibration tokens (the plain top-r again)."""

    def choose(self, W, X, cfg):
        return top_r(W, cfg.r)


class BasisTrainable(AntiPaSTO):
    def tensors(self, d_in, d_out, cfg):
        t = super().tensors(d_in, d_out, cfg)
        return {**t, "U": TensorDecl(t["U"].shape, "empty", trainable=True)}


MUTANTS = [
    Mutant("antipasto.linear_gain", LinearGain, "spectrum", "gain 1 + z instead of 1 + ELU(z): negative below −1"),
    Mutant("antipasto.exp_gain", ExpGain, "spectrum", "gain exp(z): derivative unbounded (self-amplifying)"),
    Mutant("antipasto.g_nonzero", GainNonZeroInit, "identity_at_init", "g initialised non-zero (near_zero init)"),
    Mutant("antipasto.coeff_read_once", CoeffReadAtAttach, "knob_identity",
           "coeff read from the config fixed at attach: set_knobs on the live model is ignored"),
    Mutant("antipasto.suppress_unclamped", SuppressNotClamped, "spectrum",
           "suppress_only does not clamp g <= 0: the attenuate-only layer amplifies (the claim sets g > 0 itself; the "
           "generic perturbation keeps g < 0, where positive g would be dead under the clamp)"),
    Mutant("antipasto.data_not_wired", DataNotWired, "data_path",
           "group init ignores the calibration tokens (data silently unused)"),
    Mutant("antipasto.basis_trainable", BasisTrainable, "trainable_set", "the frozen basis U left trainable"),
    Mutant("antipasto.residual_not_saved", AntiPaSTO, "checkpoint_roundtrip",
           "the data-selected residual W_res missing from the checkpoint",
           patch=functools.partial(checkpoint_without, "::base_weight")),
]
