"""lora mutants: scale, rsLoRA, init, dropout, freezing, checkpoint, detach and merge bugs."""
import contextlib
import functools
from unittest import mock


import impl
from impl import runtime
from impl.registry import TensorDecl
from impl.variants.lora import LoRA, lora_delta

from . import Mutant, checkpoint_without


class AlphaScale(LoRA):
    def forward(self, ad, x, y):
        return y + lora_delta(ad.drop(x), ad.A, ad.B, ad.cfg.alpha).to(y.dtype)


class RsloraLost(LoRA):
    def forward(self, ad, x, y):
        return y + lora_delta(ad.drop(x), ad.A, ad.B, ad.cfg.alpha / ad.cfg.r).to(y.dtype)


class BNonZero(LoRA):
    def tensors(self, d_in, d_out, cfg):
        return {**super().tensors(d_in, d_out, cfg), "B": TensorDecl((d_out, cfg.r), "kaiming")}


class DropoutIgnored(LoRA):
    def forward(self, ad, x, y):
        s = ad.cfg.alpha / ad.cfg.r
        return y + lora_delta(x, ad.A, ad.B, s).to(y.dtype)


class MergeWrongScale(LoRA):
    def merged(self, ad, W, b):
        return W + ad.cfg.alpha * (ad.B.float() @ ad.A.float()), b


@contextlib.contextmanager
def base_left_trainable():
    real = runtime.attach

    def attach(model, cfg, calibration=None, **kw):
        real(model, cfg, calibration, **kw)
        for name in runtime.state_of(model).targets:
            model.get_submodule(name).weight.requires_grad_(True)
        return model

    with mock.patch.object(impl, "attach", attach):
        yield


@contextlib.contextmanager
def detach_leaves_hook():
    def remove(model, restore_weights):
        st = runtime.state_of(model)
        for n, p in model.named_parameters():
            p.requires_grad_(st.requires_grad.get(n, p.requires_grad))
        del model.__dict__[runtime.STATE_ATTR]  # forgets the hook handles and the adapters
        return st

    with mock.patch.object(runtime, "_remove", remove):
        yield


@contextlib.contextmanager
def adapter_always_training():
    """The old runtime: a new adapter stays in train mode whatever its host's mode (nn.Module's default)."""
    with mock.patch.object(runtime, "_mode_of", lambda layer: True):
        yield


MUTANTS = [
    Mutant("lora.alpha_scale", AlphaScale, "oracle", "scale alpha instead of alpha / r"),
    Mutant("lora.rslora_lost", RsloraLost, "oracle", "rsLoRA's alpha / sqrt(r) replaced by alpha / r"),
    Mutant("lora.b_nonzero", BNonZero, "identity_at_init", "B initialised non-zero: not the identity at init"),
    Mutant("lora.dropout_ignored", DropoutIgnored, "dropout", "cfg.dropout accepted but never applied"),
    Mutant("lora.base_trainable", LoRA, "trainable_set", "a base parameter left trainable after attach",
           patch=base_left_trainable),
    Mutant("lora.checkpoint_missing", LoRA, "checkpoint_roundtrip", "a tensor (B) missing from the checkpoint",
           patch=functools.partial(checkpoint_without, "::B")),
    Mutant("lora.detach_hook_left", LoRA, "detach_restores", "detach forgets the hook and adapter",
           patch=detach_leaves_hook),
    Mutant("lora.eval_dropout_active", LoRA, "eval_deterministic",
           "attach into a model in eval() leaves the adapter's dropout active", patch=adapter_always_training),
    Mutant("lora.merge_wrong_scale", MergeWrongScale, "merge", "merge folds alpha · BA instead of alpha/r · BA"),
]
