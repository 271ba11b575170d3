r"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

    V = W + s · B A,   n = ‖V‖_row (per output unit, detached: a constant in backward, paper §4.3),
    y' = (m / n) ⊙ (W x + s · B A x) + b,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

computed as a delta on the base output y = W x + b (PEFT's form, the one declared bitwise at init), in the
adapter dtype on y upcast, and cast back to y's dtype once:

    y' = y + (m/n − 1) ⊙ (y − b) + (m/n) ⊙ s · B A x                    (eval, or no dropout)
    y' = y + (m/n − 1) ⊙ W x_d + (m/n) ⊙ s · B A x_d,  x_d = drop(x)    (train mode with dropout)

m (d_out,) starts at the row norms of W and B at zero, so m/n is exactly 1 at init (m and n come from the
same function on the same bits) and both delta terms are exactly 0: the output is the base output bit for
bit, in every dtype. The bias passes through unscaled (it is taken off before the magnitude rescales the
rest). With dropout, the magnitude correction of the base term sees the dropped input, as in PEFT. The norm
has a floor (1e-12, or the dtype's smallest normal if larger) so that a zero row of W + s·BA gives a finite
output (PEFT divides by 0 there). The weight's values come from `ad.weight()`, a dequantized copy on
bitsandbytes layers, so DoRA works on quantized layers. Merge: W' = (m/n) ⊙ (W + s · B A), b unchanged.

References:
- paper: https://arxiv.org/abs/2402.09353 (eq. 5; section 4.3 for the detached norm)
- canonical code: https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/dora.py
  and https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/variants.py (DoraLinearVariant)
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import TensorDecl, Variant, register
from .lora import lora_scale

NORM_FLOOR = 1e-12


def norm_floor(dtype: torch.dtype) -> float:
    """The smallest norm DoRA divides by: 1e-12, or the dtype's smallest normal number if that is larger."""
    return max(NORM_FLOOR, torch.finfo(dtype).tiny)


def weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """n = ‖W + s · B A‖ over each output row (eq. 5's ‖V + ΔV‖_c), detached (§4.3) and floored, in A's dtype."""
    with torch.no_grad():
        V = W.to(A.dtype).contiguous() + s * (B.detach() @ A.detach())  # one memory layout: same bits on Conv1D
        return torch.linalg.vector_norm(V, dim=1).clamp_min(norm_floor(A.dtype))


def magnitude_ratio(m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """m / n: the per-row factor that sets each row's norm to m (eq. 5)."""
    return m / n


def dora_delta(k: torch.Tensor, base: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """(m/n − 1) ⊙ (W x) + (m/n) ⊙ s·B A x: what DoRA adds to the base output (PEFT's delta form)."""
    return (k - 1) * base + k * lora


def dora_add_delta(k: torch.Tensor, base: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   s: float) -> torch.Tensor:
    """dora_delta's value, (m/n − 1) ⊙ (W x) + (m/n) ⊙ s·B A x, with m/n folded into B's rows (a d_out × r product
    per forward) and the low-rank matmul accumulating into the magnitude term (one addmm): two passes over the
    output and one output buffer fewer. At init (m/n = 1, B = 0) it is exactly 0. In A's dtype."""
    h = x.to(A.dtype) @ A.t()
    c = (k - 1) * base
    out = torch.addmm(c.reshape(-1, c.shape[-1]), h.reshape(-1, h.shape[-1]), (k[:, None] * B).t(), alpha=s)
    return out.view(c.shape)


@register
class DoRA(Variant):
    name = "dora"
    fields = {"rslora": False}

    def tensors(self, d_in, d_out, cfg):
        return {
            "A": TensorDecl((cfg.r, d_in), "kaiming"),
            "B": TensorDecl((d_out, cfg.r), "zeros"),
            "m": TensorDecl((d_out,), "empty"),
        }

    def init(self, ad, W, cfg):
        # the same function on the same bits as the forward's n, so m / n is exactly 1 at init
        s = lora_scale(cfg.alpha, cfg.r, cfg.rslora)
        ad.m.copy_(self.norm(ad.weight().detach(), ad.A, ad.B, s))
        return None

    def norm(self, W, A, B, s):
        """n for this layer: one method, shared by init, forward and merge, so m / n is exactly 1 at init."""
        return weight_norm(W, A, B, s)

    def forward(self, ad, x, y):
        cfg = ad.cfg
        dt = ad.A.dtype
        s = lora_scale(cfg.alpha, cfg.r, cfg.rslora)
        W = ad.weight()
        k = magnitude_ratio(ad.m, self.norm(W, ad.A, ad.B, s))
        # y enters once, upcast: its two uses (itself and y − b) meet in the adapter dtype, so the gradient that
        # reaches the base layer is (m/n) dL/dy rounded once, not 1 + (m/n − 1) summed in y's dtype (which
        # loses the gradient's digits in bf16 when m/n is far from 1)
        yf = y.to(dt)
        if isinstance(ad.drop, nn.Identity) or not ad.training:
            xd = x
            b = ad.bias()
            base = yf - (0 if b is None else b.to(dt))
        else:
            xd = ad.drop(x)
            base = xd.to(dt) @ W.to(dt).t()
        return (yf + dora_add_delta(k, base, xd, ad.A, ad.B, s)).to(y.dtype)

    def delta(self, k, base, lora):
        """What DoRA adds to the upcast base output (dora_delta): the unfused reference form of what forward adds
        through dora_add_delta (kept for variants of DoRA that change one term)."""
        return dora_delta(k, base, lora)

    def merged(self, ad, W, b):
        s = lora_scale(ad.cfg.alpha, ad.cfg.r, ad.cfg.rslora)
        A, B = ad.A.float(), ad.B.float()
        k = magnitude_ratio(ad.m.float(), self.norm(W, A, B, s))
        return k[:, None] * (W + s * (B @ A)), b
