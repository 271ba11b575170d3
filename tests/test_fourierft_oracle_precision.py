"""The FourierFT spec's float64 reference is accurate to a few eps at the widths of the tiny models: its explicit
DFT matrices reduce the phase u·j mod n before the exponential. Computed as is, the phase reaches 2π(n−1)²/n
(about 800 rad at n = 128) and its rounding made the reference off by 4e-14 relative, which the whole-model
oracle's float64 gradient tolerance (2·64·eps of the gradient) read as PEFT 0.12.0-0.15.2's error (the history's
`fourierft / model_oracle` row: max diff 2.74e-14 on a gradient of 0.255, now 5.6e-17)."""
import pytest
import torch

from harness import tolerance as tol
from spec.variants.fourierft import idft2_real

# (d_out, d_in) of the tiny GPT-2 / Llama layers (hidden 32: c_attn 96 x 32, c_fc 128 x 32, c_proj 32 x 128,
# down 32 x 64) and a small one
SHAPES = [(96, 32), (128, 32), (32, 128), (32, 64), (5, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_idft_is_accurate_to_a_few_eps(shape):
    g = torch.Generator().manual_seed(0)
    F = torch.zeros(shape, dtype=torch.float64)
    idx = torch.randperm(F.numel(), generator=g)[:7]
    F.view(-1)[idx] = torch.randn(7, generator=g, dtype=torch.float64)
    ref = torch.fft.ifft2(F.to(torch.complex128)).real  # float64 FFT: error ~ eps·log n
    err = tol.maxabs(idft2_real(F) - ref) / tol.maxabs(ref)
    eps = tol.eps(torch.float64)
    assert err <= 16 * eps, f"{shape}: relative error {err:.3g} = {err / eps:.0f} eps"
