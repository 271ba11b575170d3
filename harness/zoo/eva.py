"""eva mutants: load needing calibration data, the data path not wired, dropout ignored, the label mask ignored."""
import contextlib
from unittest import mock

import torch

from impl import runtime
from impl.variants.eva import EVA, sign_normalise
from impl.variants.lora import lora_delta, lora_scale

from . import Mutant


class DataIgnored(EVA):
    """A from the top-r right singular vectors of W: never looks at the calibration activations."""

    def group_init(self, adapters, acts, cfg):
        for ad in adapters.values():
            _, _, Vh = torch.linalg.svd(ad.weight().detach().double(), full_matrices=True)
            ad.A.copy_(sign_normalise(Vh[: cfg.r]).to(ad.A.dtype))
        return {}


class DropoutIgnored(EVA):
    """cfg.dropout accepted but the adapter path sees the clean input."""

    def forward(self, ad, x, y):
        s = lora_scale(ad.cfg.alpha, ad.cfg.r, ad.cfg.rslora)
        return y + lora_delta(x, ad.A, ad.B, s).to(y.dtype)


@contextlib.contextmanager
def load_reruns_group_init():
    """load attaches afresh (init and group init, which need calibration data) and then copies the saved
    tensors in, as lora-lite's first load did: a data-driven checkpoint cannot be loaded without data."""
    real = runtime.attach

    def attach(model, cfg, calibration=None, *, _restore=None):
        if _restore is None:
            return real(model, cfg, calibration)
        real(model, cfg, calibration)
        with torch.no_grad():
            for name, ad in runtime.adapters(model).items():
                for tname, t in ad.tensors().items():
                    t.copy_(_restore[name][tname])
        return model

    with mock.patch.object(runtime, "attach", attach):
        yield


@contextlib.contextmanager
def label_mask_ignored():
    """The calibration pass reads the attention mask only: tokens labelled -100 count as calibration tokens (PEFT
    0.14.0-0.16.0's `hasattr(model_input, "labels")` on a dict, tuners/lora/eva.py:252, never true)."""
    real = runtime.capture_inputs

    def capture(model, targets, calibration):
        return real(model, targets, [{k: v for k, v in b.items() if k != "labels"} for b in calibration])

    with mock.patch.object(runtime, "capture_inputs", capture):
        yield


MUTANTS = [
    Mutant("eva.load_needs_calibration", EVA, "checkpoint_roundtrip",
           "load re-runs the data-driven group init, so it needs calibration data", patch=load_reruns_group_init),
    Mutant("eva.data_path_unwired", DataIgnored, "data_path",
           "init independent of the calibration data (A from W's singular vectors)"),
    Mutant("eva.dropout_ignored", DropoutIgnored, "dropout", "cfg.dropout accepted but never applied on eva's path"),
    Mutant("eva.label_mask_ignored", EVA, "label_mask",
           "the calibration pass applies the attention mask only: tokens labelled -100 shape the init",
           patch=label_mask_ignored),
]
