"""Spec of FourierFT (Gao et al. 2024): ΔW is the real part of the inverse 2-D DFT of a sparse trainable spectrum."""
import math

import torch
from hypothesis import strategies as st

from ..schema import Constraint, Deviation, Reference, Spec, TensorSpec, register


def entries(d_out, d_in, n, seed):
    """The spectral entry matrix E (paper §3.1: n random (row, column) positions, fixed by a seed shared by every
    layer): the first n of a uniformly random permutation of the d_out·d_in positions in row-major order, drawn
    from torch.Generator().manual_seed(seed) (the concrete draw PEFT's checkpoints rely on)."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return flat // d_in, flat % d_in


def idft2_real(F):
    """Re(F⁻¹(F)) with F⁻¹(F)_{jk} = 1/(MN) Σ_{u,v} F_uv exp(2πi (uj/M + vk/N)), as explicit DFT matrices.

    The phase u·j is reduced mod n in integers before the exponential (exp(2πi uj/n) has period n in uj): a phase
    of 2π·uj/n computed as is grows to 2π(n−1)²/n, about 800 rad at n = 128, and its float64 rounding (≈ phase·eps)
    made this reference off by 4e-14 relative at n = 128 against torch.fft.ifft2 (1e-15 reduced): more than the
    float64 tolerance allows a whole GPT-2 model's gradients (tests/test_fourierft_oracle_precision.py)."""
    M, N = F.shape

    def omega(n):
        k = torch.arange(n, dtype=torch.int64)
        return torch.exp(2j * math.pi * (torch.outer(k, k) % n).to(torch.float64) / n)

    return (omega(M) @ F.to(torch.complex128) @ omega(N)).real / (M * N)


def delta_weight(T, cfg, d_out, d_in):
    """ΔW = α Re(IDFT2(F)), F zero except F[E] = c (paper eq. 2-3)."""
    rows, cols = entries(d_out, d_in, cfg.n_frequency, cfg.loc_seed)
    F = torch.zeros(d_out, d_in, dtype=torch.float64)
    F[rows, cols] = T["c"].double()
    return cfg.scaling * idft2_real(F)


def dense(W, b, T, cfg, knobs):
    return W + delta_weight(T, cfg, *W.shape)


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W x + b + ΔW x_d; float64, row convention."""
    xd = x if xd is None else xd
    y = x @ W.T + (0 if b is None else b)
    return y + xd @ delta_weight(T, cfg, *W.shape).T


def init_oracle(W, cfg, X):
    """c = 0 (ΔW = 0)."""
    return {"c": torch.zeros(cfg.n_frequency, dtype=W.dtype)}


def fields(draw, d_in, d_out):
    return {
        "n_frequency": draw(st.integers(1, d_in * d_out), label="n_frequency"),
        "scaling": draw(st.sampled_from([150.0, 1.0, 20.0]), label="scaling"),
        "loc_seed": draw(st.sampled_from([777, 0, 2024]), label="loc_seed"),
    }


# the float64 case on which PEFT's float32 spectrum is measured (a scaled error of 7.02e5: rounding at float32)
_F64_CASE = {"d_in": 2, "d_out": 1, "bias": False, "dtype": "float64", "seed": 0,
             "fields": {"r": 1, "alpha": 2.0, "n_frequency": 1, "scaling": 150.0, "loc_seed": 777}}

SPEC = register(
    Spec(
        name="fourierft",
        title="FourierFT: a sparse trainable spectrum, ΔW its inverse discrete Fourier transform",
        equation=r"y = W x + b + \alpha\,\mathrm{Re}\big(\mathcal{F}^{-1}(F)\big)\,\mathrm{drop}(x),\quad "
                 r"F_{E} = c,\ F_{\bar E} = 0,\ |E| = n",
        tensors=(TensorSpec("c", "(n_frequency,)", "zeros (ΔW = 0)"),),
        param_count="n_frequency",
        macs="d_in * d_out",  # x times the dense ΔW
        macs_per_forward="ew(d_out * d_in * (d_out + d_in))",  # the 2-D inverse DFT (an FFT in PEFT)
        oracle=oracle,
        dense=dense,
        init_oracle=init_oracle,
        identity="bitwise",
        dropout="rejected",
        fields=fields,
        max_rank=None,  # r is unused
        defaults={"n_frequency": 2, "scaling": 150.0, "loc_seed": 777},  # n ≤ d_in·d_out on the smallest drawn layer (2 × 1)
        constraints=(Constraint("1 <= n_frequency <= d_in * d_out", {"n_frequency": 0}),),
        references=(
            Reference("paper (§3.1, eq. 2-3)", "https://arxiv.org/abs/2405.03003"),
            Reference("PEFT 0.21.2 FourierFT layer",
                      "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/fourierft/layer.py"),
        ),
        deviations=tuple(
            Deviation(p, "PEFT builds the dense spectrum and its inverse FFT in float32 whatever the layer's dtype "
                      "(torch.zeros without a dtype, spectrum.float()), then casts ΔW back: a float64 layer gets a "
                      "float32-accurate update", backend="peft",
                      source="peft/tuners/fourierft/layer.py:98-101 (get_delta_weight)", **extra)
            for p, extra in (
                ("oracle", {"size": 7.02e5, "case": _F64_CASE}),
                ("dense_equivalence", {"size": 7.02e5, "case": _F64_CASE}),
                ("model_oracle", {"match": "differs from the per-layer oracle"}),
            )
        ) + (
            Deviation("dropout", "PEFT's FourierFT has no dropout: a dropout field is accepted (the mapping passes "
                      "none) and has no effect", backend="peft",
                      source="peft/tuners/fourierft/config.py (no dropout field)", match="accepted"),
        ),
        notes="The spectrum's entry positions are a function of (d_out, d_in, n_frequency, seed) only, shared by every "
              "layer of that shape. PEFT's default init_weights=False draws c from N(0, 1), which is not the identity "
              "at init; the mapping selects the zero init. The common fields r and alpha are unused (scaling is α).",
    )
)
