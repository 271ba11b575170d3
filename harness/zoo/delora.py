"""delora mutants: the weight norm a scalar, over the wrong axis, a Parameter, read from packed storage; λ = 0 by
default; B non-zero at init; dropout ignored."""
import torch

from impl.registry import TensorDecl
from impl.variants.delora import DeLoRA, delora_delta

from . import Mutant


class NormScalar(DeLoRA):
    """One Frobenius norm ‖W‖ for every input channel."""

    def tensors(self, d_in, d_out, cfg):
        return {**super().tensors(d_in, d_out, cfg), "wnorm": TensorDecl((), "empty", trainable=False)}

    def norms(self, W):
        return torch.linalg.vector_norm(W)


class NormWrongAxis(DeLoRA):
    """The norm of each output row (dim 1) instead of each input column (dim 0)."""

    def norms(self, W):
        return torch.linalg.vector_norm(W, dim=1)


class NormParameter(DeLoRA):
    """The frozen statistic registered as a trainable Parameter instead of a persistent buffer."""

    def tensors(self, d_in, d_out, cfg):
        return {**super().tensors(d_in, d_out, cfg), "wnorm": TensorDecl((d_in,), "empty", trainable=True)}


class LambdaZero(DeLoRA):
    """lambda0 = 0 by default: identity holds, but every gradient is 0 at step 0."""

    fields = {"lambda0": 0.0}


class BNonZero(DeLoRA):
    """B initialised kaiming instead of 0: not the identity at init for λ ≠ 0."""

    def tensors(self, d_in, d_out, cfg):
        return {**super().tensors(d_in, d_out, cfg), "B": TensorDecl((d_out, cfg.r), "kaiming")}


class PackedNorm(DeLoRA):
    """The norms of the layer's stored weight (int8 codes, packed 4-bit bytes), not of its dequantized values
    (PEFT's DeLoRA does this and fails at creation)."""

    def init(self, ad, W, cfg):
        ad.lam.fill_(cfg.lambda0)
        ad.wnorm.copy_(self._packed(ad))

    def _packed(self, ad):
        w = ad.layer.weight.data.float()
        n = torch.linalg.vector_norm(w, dim=0)
        return n.expand(ad.d_in) if n.numel() == 1 else n


class DropoutIgnored(DeLoRA):
    def forward(self, ad, x, y):
        return y + delora_delta(x, ad.A, ad.B, ad.lam, ad.wnorm, ad.cfg.r).to(y.dtype)


MUTANTS = [
    Mutant("delora.norm_scalar", NormScalar, "oracle", "the weight norm a scalar ‖W‖_F, not per input channel"),
    Mutant("delora.norm_wrong_axis", NormWrongAxis, "oracle", "the weight norm per output row (dim 1) instead of per input column",
           square=True),
    Mutant("delora.norm_parameter", NormParameter, "trainable_set",
           "the frozen weight norm registered as a trainable Parameter, not a persistent buffer"),
    Mutant("delora.lambda_zero_default", LambdaZero, "gradient_pattern",
           "lambda0 = 0 by default: a dead start, every gradient 0 at step 0"),
    Mutant("delora.b_nonzero", BNonZero, "identity_at_init", "B initialised non-zero: not the identity at init"),
    Mutant("delora.packed_norm", PackedNorm, "quantized",
           "on bitsandbytes layers the norm of the packed storage, not of the dequantized weight"),
    Mutant("delora.dropout_ignored", DropoutIgnored, "dropout", "cfg.dropout accepted but never applied"),
]
