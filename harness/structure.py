"""Properties of the adapter's structure across a model: the rank a layer accepts and the frozen tensors that
layers share. Both are contracts of impl's runtime (PEFT has its own), read through the backend protocol, on small models
built here.
"""
from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from torch import nn

from .backends.protocol import FullBackend
from .models import make_layer
from .probes import Falsified, _dt, cfg_of, grad_flags, perturb_tensors, prop, require, setup, snapshot, untouched
from .strategies import base_weight, calibration, inputs

LAYERS = ("a", "b", "c")  # a and b: the case's shape; c: one more output (another shape)


def _impl_only(spec, be: FullBackend) -> str | None:
    return None if be.name == "impl" else f"a contract of impl's runtime, not of the {be.name} backend"


def _first_config(spec, be: FullBackend, case, ranks) -> int | None:
    """The first rank in `ranks` whose config the variant accepts (a variant may also need an even r, or a
    multiple of a block size)."""
    for r in ranks:
        if r < 1:
            continue
        try:
            cfg_of(spec, be, case, r=r)
        except be.errors.config:
            continue
        return r
    return None


@prop("rank_limit", _dt(torch.float32), max_examples=6,
      applies=lambda spec, be: _impl_only(spec, be) or (None if spec.max_rank is not None
                                                         else "the spec declares no rank limit"))
def rank_limit(spec, be: FullBackend, case):
    """attach accepts r up to the spec's declared rank limit (`max_rank`, by default min(d_in, d_out)) and
    refuses a larger r with an error naming r and the layer, leaving the model untouched."""
    limit = spec.rank_limit(case.d_in, case.d_out)
    r_ok = _first_config(spec, be, case, range(limit, limit - 8, -1))
    if r_ok is not None:
        try:
            setup(spec, be, case, r=r_ok)
        except be.errors.attach as e:
            raise Falsified(f"r={r_ok} is within the declared limit {spec.max_rank} = {limit}, but attach refused: {e}")
    r_bad = _first_config(spec, be, case, range(limit + 1, limit + 9))
    if r_bad is None:
        return None
    s = setup(spec, be, case, attach=False)
    state, flags = snapshot(s.model), grad_flags(s.model)
    try:
        be.attach(s.model, spec, case, s.cal, r=r_bad)
    except be.errors.attach as e:
        require(str(r_bad) in str(e) and "layer" in str(e), f"the refusal of r={r_bad} names neither r nor the layer: {e}")
        untouched(be, s.model, state, flags, f"after refusing r={r_bad}")
        return None
    raise Falsified(f"r={r_bad} above the declared limit {spec.max_rank} = {limit} was accepted")


class Layers(nn.Module):
    """Layers a, b (d_in -> d_out) and c (d_in -> d_out + 1) on the same input; outputs concatenated."""

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x, attention_mask=None):
        return torch.cat([getattr(self, n)(x) for n in LAYERS], -1)


def _layers(case) -> Layers:
    W, b = base_weight(case)
    W2, b2 = base_weight(case.with_(d_out=case.d_out + 1, seed=case.seed + 1))
    return Layers({"a": make_layer(W, b, case.dtype), "b": make_layer(W * 0.5, b, case.dtype),
                   "c": make_layer(W2, b2, case.dtype)})


def _attach(spec, be: FullBackend, case, model):
    cal = calibration(case, base_weight(case)[0], case.fields["r"]) if spec.data != "none" else None
    torch.manual_seed(case.seed)
    return be.attach(model, spec, case, cal, target_names=(r"^(a|b|c)$",))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _stored_bytes(path: Path) -> int:
    """The bytes of tensor data a safetensors file holds (from its header)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


@prop("tensor_sharing", _dt(torch.float32), max_examples=6, applies=_impl_only)
def tensor_sharing(spec, be: FullBackend, case):
    """On a model with two layers of one shape and one of another: exactly the tensors the spec declares
    shared are one tensor across the same-shaped layers (and another one on the other shape); every other
    adapter tensor is the layer's own. The checkpoint stores each distinct tensor once (its tensor bytes equal
    the distinct adapter tensors' plus the rewritten base weights'), and loading it into a fresh model restores
    the sharing and the outputs bit-exactly."""
    model = _attach(spec, be, case, _layers(case))
    ads = {n: tensors for n, (tensors, _, _) in be.adapted_layers(model).items()}
    cfg = cfg_of(spec, be, case)
    for name, tensors in ads.items():  # move every trainable away from its init, layer by layer
        perturb_tensors(spec, tensors, case.d_in, case.d_out, cfg, case.gen(3 + len(name)))
    for ts in spec.present(case.d_in, case.d_out, cfg):
        a, b, c = (_storage(ads[n][ts.name]) for n in LAYERS)
        if ts.shared:
            require(a == b, f"'{ts.name}' is declared shared, but two layers of the same shape hold their own copies")
            same_shape = ads["c"][ts.name].shape == ads["a"][ts.name].shape
            require(same_shape == (a == c), f"shared '{ts.name}': a layer of another shape holding an equally shaped "
                                            f"'{ts.name}' {'does not share it' if same_shape else 'shares it'}")
        else:
            require(a != b, f"'{ts.name}' is one tensor across layers, but the spec declares it per layer")
    distinct = {_storage(t): t.numel() * t.element_size() for tensors in ads.values() for t in tensors.values()}
    expected = sum(distinct.values()) + (sum(getattr(model, n).weight.numel() * getattr(model, n).weight.element_size()
                                             for n in LAYERS) if spec.rewrites_base else 0)
    x = inputs(case).to(case.dtype)
    with torch.no_grad():
        y = model(x)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "a.safetensors")
        be.save(model, path)
        stored = _stored_bytes(path)
        require(stored == expected, f"the checkpoint holds {stored} bytes of tensors, the distinct adapter tensors "
                                    f"and rewritten weights {expected}")
        fresh = _layers(case)
        be.load(fresh, path)
    with torch.no_grad():
        y2 = fresh(x)
    require(torch.equal(y, y2), "the loaded model's output differs from the saved one's")
    back = {n: tensors for n, (tensors, _, _) in be.adapted_layers(fresh).items()}
    for ts in spec.present(case.d_in, case.d_out, cfg):
        if ts.shared:
            require(_storage(back["a"][ts.name]) == _storage(back["b"][ts.name]),
                    f"after load, shared '{ts.name}' is no longer one tensor")
    return None
