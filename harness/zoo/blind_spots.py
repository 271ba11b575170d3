"""Mutants of the classes that used to pass verify: saturated trainables, knobs at non-default values, whole-model
behaviour (freezing, requires_grad restore, calibration order, knobs per layer, role mapping), layouts beyond the
forward, config round trip and random inits. Runtime bugs are patches active while the mutant runs."""
import contextlib
import json
import math
from unittest import mock

import torch

import impl
from impl import checkpoint, runtime, targeting
from impl.registry import TensorDecl
from impl.variants.antipasto import AntiPaSTO
from impl.variants.antipasto_ablate import AntiPaSTOAblate
from impl.variants.lora import LoRA
from impl.variants.pissa import PiSSA

from . import Mutant

# ----------------------------------------------------------------------------------------------- saturation


class GainExpOverflow(AntiPaSTO):
    """f(z) = where(z > 0, 1 + z, exp(z)): right in value, but exp(z) overflows for large z > 0 and the branch not
    taken turns the gradient into inf · 0 = NaN."""

    def s_eff(self, ad, dt):
        z = ad.knobs["coeff"] * ad.g.to(dt)
        return ad.S.to(dt) * torch.where(z > 0, 1 + z, torch.exp(z))


# ----------------------------------------------------------------------------------------------- knobs


class MergeCoeffFromConfig(AntiPaSTO):
    """merge folds S ⊙ f(cfg.coeff · g): the config's coeff, not the live one."""

    def merged(self, ad, W, b):
        U, _, R = self.factors(ad, torch.float64)
        s = ad.S.double() * (1 + torch.nn.functional.elu(ad.cfg.coeff * ad.g.double()))
        return W.double() + (U * s) @ R, b


# ----------------------------------------------------------------------------------------------- whole models


@contextlib.contextmanager
def freeze_adapted_only():
    """attach freezes the targeted modules' parameters only; every other base parameter keeps its flag."""
    real = runtime.attach

    def attach(model, cfg, calibration=None, **kw):
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        real(model, cfg, calibration, **kw)
        targets = tuple(runtime.state_of(model).targets)
        for n, p in model.named_parameters():
            if n in flags and not n.startswith(targets):
                p.requires_grad_(flags[n])
        return model

    with mock.patch.object(impl, "attach", attach):
        yield


@contextlib.contextmanager
def requires_grad_all_true():
    """detach restores every base parameter's requires_grad as True instead of as it was."""
    real = runtime._undo

    def undo(model, ads, handles, requires_grad, restore_weights):
        real(model, ads, handles, dict.fromkeys(requires_grad, True), restore_weights)

    with mock.patch.object(runtime, "_undo", undo):
        yield


class _Late(dict):
    """Calibration inputs captured only when first read: after every adapter and hook is in place."""

    def __init__(self, capture):
        super().__init__()
        self.capture = capture

    def items(self):
        if not self:
            self.update(self.capture())
        return super().items()


@contextlib.contextmanager
def calibrate_through_adapters():
    """attach captures the calibration inputs after installing the adapters, so a later layer is calibrated on
    the activations an earlier (not yet identity) adapter produced."""
    real = runtime.capture_inputs

    def capture(model, targets, calibration):
        return _Late(lambda: real(model, targets, calibration))

    with mock.patch.object(runtime, "capture_inputs", capture):
        yield


@contextlib.contextmanager
def knobs_on_first_layer():
    """set_knobs updates the first adapted layer only."""

    def set_knobs(model, **knobs):
        next(iter(runtime.adapters(model).values())).knobs.update({k: float(v) for k, v in knobs.items()})

    with mock.patch.object(impl, "set_knobs", set_knobs):
        yield


@contextlib.contextmanager
def up_mapped_to_gate():
    """The role table maps Llama's and Qwen's up_proj to the role 'gate'."""
    table = tuple((p, "gate" if p.startswith(r"(^|\.)up_proj") else r) for p, r in targeting._ROLE_PATTERNS)
    with mock.patch.object(targeting, "_ROLE_PATTERNS", table):
        yield


# ----------------------------------------------------------------------------------------------- layouts, config


@contextlib.contextmanager
def detach_transposes_conv1d():
    """detach writes a rewritten Conv1D weight back transposed (its dense view instead of its storage)."""
    real = runtime._undo

    def undo(model, ads, handles, requires_grad, restore_weights):
        ads = list(ads)
        for ad in ads:
            if ad.kind == "conv1d" and ad.original_weight is not None:
                w = ad.original_weight
                ad.original_weight = w.t().reshape(w.shape)
        real(model, ads, handles, requires_grad, restore_weights)

    with mock.patch.object(runtime, "_undo", undo):
        yield


@contextlib.contextmanager
def config_without_dtypes():
    """save leaves the config's dtype and param_dtype out: they reload as their defaults."""
    real = checkpoint.serialize

    def serialize(tensors, metadata):
        cfg = {k: v for k, v in json.loads(metadata["config"]).items() if k not in ("dtype", "param_dtype")}
        return real(tensors, {**metadata, "config": json.dumps(cfg, sort_keys=True)})

    with mock.patch.object(checkpoint, "serialize", serialize):
        yield


# ----------------------------------------------------------------------------------------------- random inits


class AUnitNormal(LoRA):
    """A ~ N(0, 1) where the spec declares kaiming-uniform (bound 1/sqrt(d_in))."""

    def tensors(self, d_in, d_out, cfg):
        return {**super().tensors(d_in, d_out, cfg), "A": TensorDecl((cfg.r, d_in), lambda t, g: t.normal_(generator=g))}


class CUnitNormal(AntiPaSTOAblate):
    """c ~ N(0, 1) where the spec declares N(0, 1/r)."""

    def tensors(self, d_in, d_out, cfg):
        return {**super().tensors(d_in, d_out, cfg), "c": TensorDecl((cfg.r, cfg.k), lambda t, g: t.normal_(generator=g))}


class AUniformWideBound(LoRA):
    """A ~ U(−b, b) with b = sqrt(6 / d_in) (kaiming-uniform with a = 0) where the spec declares a = sqrt 5."""

    def tensors(self, d_in, d_out, cfg):
        b = math.sqrt(6.0 / d_in)
        return {**super().tensors(d_in, d_out, cfg),
                "A": TensorDecl((cfg.r, d_in), lambda t, g: t.uniform_(-b, b, generator=g))}


MUTANTS = [
    Mutant("antipasto.gain_exp_overflow", GainExpOverflow, "saturated_trainables",
           "gain where(z > 0, 1 + z, exp(z)): NaN gradients once exp overflows"),
    Mutant("antipasto.merge_coeff_from_config", MergeCoeffFromConfig, "merge",
           "merge reads coeff from the config instead of the live knob"),
    Mutant("lora.freeze_adapted_only", LoRA, "model_freezing",
           "attach freezes only the adapted modules; other base parameters stay trainable", patch=freeze_adapted_only),
    Mutant("lora.requires_grad_all_true", LoRA, "model_freezing",
           "detach restores requires_grad as all True instead of as it was", patch=requires_grad_all_true),
    Mutant("antipasto_ablate.calibrate_through_adapters", AntiPaSTOAblate, "model_data_init",
           "calibration feeds a later layer the activations of an already-adapted earlier layer",
           patch=calibrate_through_adapters),
    Mutant("antipasto.knobs_on_first_layer", AntiPaSTO, "model_knobs",
           "set_knobs updates the first adapted layer only", patch=knobs_on_first_layer),
    Mutant("lora.up_mapped_to_gate", LoRA, "model_targeting",
           "the role table maps up_proj to 'gate' (Llama, Qwen)", patch=up_mapped_to_gate),
    Mutant("pissa.detach_transposes_conv1d", PiSSA, "detach_restores",
           "detach writes a rewritten Conv1D weight back transposed", patch=detach_transposes_conv1d),
    Mutant("lora.config_without_dtypes", LoRA, "config_roundtrip",
           "save drops dtype and param_dtype from the config: they reload as defaults", patch=config_without_dtypes),
    Mutant("lora.a_unit_normal", AUnitNormal, "init_distribution", "A ~ N(0, 1) instead of kaiming-uniform"),
    Mutant("lora.a_wide_uniform", AUniformWideBound, "init_distribution",
           "A kaiming-uniform with a = 0 (bound sqrt(6/d_in)) instead of a = sqrt 5"),
    Mutant("antipasto_ablate.c_unit_normal", CUnitNormal, "init_distribution", "c ~ N(0, 1) instead of N(0, 1/r)"),
]
