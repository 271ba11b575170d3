"""Mutants of a model's adapter structure: the rank a layer accepts, frozen tensors shared or copied across
layers, and a checkpoint that stores more than the adapter."""
import contextlib
import dataclasses
from unittest import mock

from impl.variants.antipasto import AntiPaSTO
from impl.variants.lora import LoRA
from spec import SPECS

from . import Mutant


class RankAboveWidth(LoRA):
    @classmethod
    def check_layer(cls, cfg, d_in, d_out, name):
        """Accepts any r: B A has rank at most min(d_in, d_out), so the extra rank is dead weight."""


class BasisCachedByShape(AntiPaSTO):
    def tensors(self, d_in, d_out, cfg):
        decl = super().tensors(d_in, d_out, cfg)
        return {**decl, "U": dataclasses.replace(decl["U"], shared=True)}


def _shared_U():
    spec = SPECS.get("antipasto")
    return tuple(dataclasses.replace(t, shared=True) if t.name == "U" else t for t in spec.tensors)


@contextlib.contextmanager
def checkpoint_twice():
    """A runtime bug: save writes every tensor twice (a second copy under another key)."""
    from impl import checkpoint

    real = checkpoint.serialize

    def serialize(tensors, metadata):
        return real({**tensors, **{k + "_copy": v for k, v in tensors.items()}}, metadata)

    with mock.patch.object(checkpoint, "serialize", serialize):
        yield


MUTANTS = [
    Mutant("lora.rank_above_width", RankAboveWidth, "rank_limit",
           "r above min(d_in, d_out) accepted: parameters that can add no rank"),
    Mutant("antipasto.basis_cached_by_shape", BasisCachedByShape, "tensor_sharing",
           "the frozen singular basis U cached by shape: every layer of one shape reads the last layer's U"),
    Mutant("antipasto.shared_copied_per_layer", AntiPaSTO, "tensor_sharing",
           "a frozen tensor the method shares across layers is kept (and saved) per layer",
           spec_changes={"tensors": _shared_U()}),
    Mutant("lora.checkpoint_twice", LoRA, "tensor_sharing", "the checkpoint stores every tensor twice",
           patch=checkpoint_twice),
]
