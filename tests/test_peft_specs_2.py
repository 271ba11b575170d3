"""The specs PEFT alone implements (OFT, BOFT, FourierFT, MiSS, Bone) have teeth: a defect planted in PEFT's own
layer (monkeypatched) makes verify flag the property that covers it, and the unpatched release passes it."""
from unittest import mock

import pytest
import torch

peft = pytest.importorskip("peft")

from peft.tuners.boft.layer import BOFTLayer  # noqa: E402
from peft.tuners.fourierft.layer import FourierFTLayer  # noqa: E402
from peft.tuners.miss.layer import MissLinear  # noqa: E402
from peft.tuners.oft.layer import OFTRotationModule  # noqa: E402

from spec import SPECS  # noqa: E402
from harness import PROPERTIES  # noqa: E402
from harness.backends import ImplBackend  # noqa: E402
from harness.backends.peft import PeftBackend  # noqa: E402
from harness.engine import run_property  # noqa: E402

_OFT_CAYLEY = OFTRotationModule._cayley_batch
_FOURIER_DELTA = FourierFTLayer.get_delta_weight


def _oft_first_order(self, Q, block_size, use_cayley_neumann=True, num_neumann_terms=5):
    """OFT with R = I + 2S (the Cayley series cut after its first term): not orthogonal."""
    return _OFT_CAYLEY(self, Q, block_size, True, 2)


def _oft_transposed(self, Q, *args, **kwargs):
    """OFT applying Rᵀ (the inverse rotation) instead of R: still orthogonal, the other rotation."""
    return _OFT_CAYLEY(self, Q, *args, **kwargs).transpose(-1, -2)


def _boft_not_orthogonal(self, data):
    """BOFT's blocks I + S instead of the Cayley transform of S: not orthogonal."""
    S = 0.5 * (data - data.transpose(1, 2))
    return torch.eye(data.shape[-1], dtype=data.dtype) + S


def _fourier_unscaled(self, adapter):
    """FourierFT without its scaling α."""
    return _FOURIER_DELTA(self, adapter) / self.fourierft_scaling[adapter]


def _bone_without_affine(self, adapter, W, reverse=False):
    """Bone's block update W_ij B_i without the affine term + B_i."""
    B = self.miss_block[adapter].to(W.dtype)
    r = B.shape[-1]
    blocks = W.reshape(W.shape[0] // r, r, W.shape[1] // r, r).permute(0, 2, 1, 3)  # (i, j, r, r)
    return (blocks @ B[:, None]).permute(0, 2, 1, 3).reshape(W.shape)


def _miss_unshared(self, x, *args, **kwargs):
    """MiSS with the shard applied to the first r inputs only (no sharing across the input groups)."""
    result = self.base_layer(x, *args, **kwargs)
    D = self.miss_block["default"]
    return result + x[..., : D.shape[0]].to(D.dtype) @ D


DEFECTS = {
    "oft-not-orthogonal": ("oft", OFTRotationModule, "_cayley_batch", _oft_first_order, "spectrum", "RᵀR"),
    "oft-transposed": ("oft", OFTRotationModule, "_cayley_batch", _oft_transposed, "oracle", "oracle"),
    "boft-not-orthogonal": ("boft", BOFTLayer, "cayley_batch", _boft_not_orthogonal, "spectrum", "W'W'ᵀ"),
    "fourierft-unscaled": ("fourierft", FourierFTLayer, "get_delta_weight", _fourier_unscaled, "oracle", "outside 0.5x-2x"),
    "miss-unshared": ("miss", MissLinear, "forward", _miss_unshared, "oracle", "oracle"),
    "bone-no-affine-term": ("bone", MissLinear, "get_delta_weight", _bone_without_affine, "oracle", "oracle"),
}


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_planted_peft_defect_is_flagged(name):
    variant, cls, attr, defect, prop, text = DEFECTS[name]
    spec, be = SPECS.get(variant), PeftBackend()
    clean = run_property(PROPERTIES[prop], spec, be, "zoo")
    assert clean.status in ("pass", "deviation"), clean
    with mock.patch.object(cls, attr, defect):
        res = run_property(PROPERTIES[prop], spec, be, "zoo")
    assert res.status == "fail" and res.failure_kind == "assertion", res
    assert text in res.detail, res.detail


@pytest.mark.parametrize("variant", ["oft", "boft", "fourierft", "miss", "bone"])
def test_a_spec_without_an_impl_variant_is_not_applicable_on_impl(variant):
    res = run_property(PROPERTIES["oracle"], SPECS.get(variant), ImplBackend(), "zoo")
    assert res.status == "na" and "not implemented here" in res.detail, res


def _neumann_direction_fixed(self, Q, block_size, use_cayley_neumann=True, num_neumann_terms=5):
    """PEFT's Cayley–Neumann R transposed, so that both of PEFT's modes apply the same rotation."""
    R = _OFT_CAYLEY(self, Q, block_size, use_cayley_neumann, num_neumann_terms)
    return R.transpose(-1, -2) if use_cayley_neumann else R


def test_pefts_cayley_neumann_oft_applies_the_inverse_rotation_of_its_exact_oft():
    """The PEFT bug the 'oft_neumann' spec flags (peft 0.21.2, tuners/oft/layer.py:129-150): the Neumann path
    builds ≈ (I + S)(I − S)⁻¹, the exact path (I − S)(I + S)⁻¹, both applied as x R: the same weights rotate the
    other way when use_cayley_neumann is switched. The oracle fails on the release and passes once the Neumann R
    is transposed, so the failure is that and nothing else."""
    spec, be = SPECS.get("oft_neumann"), PeftBackend()
    res = run_property(PROPERTIES["oracle"], spec, be, "zoo")
    if res.status == "pass":
        pytest.skip(f"peft {peft.__version__} applies the same rotation in both modes (fixed upstream)")
    assert res.status == "fail" and "oracle" in res.detail, res
    with mock.patch.object(OFTRotationModule, "_cayley_batch", _neumann_direction_fixed):
        assert run_property(PROPERTIES["oracle"], spec, be, "zoo").status == "pass"
