r"""A worked backend: verify a library that knows nothing of lora-verify (examples/tinylib.py) against the specs.

    PYTHONPATH=.:examples python -m tools.verify --backend-module examples/tinylib_backend.py --variants lora,ia3

A backend is a plain class registered with `harness.backends.register`; the protocols of
harness/backends/protocol.py (`Backend`, and one per capability) say what it must provide, and `nox -s lint`
type-checks this class against the ones it keeps (the end of this file). This one is the whole translation layer between the specs' names and tinylib's:

- which variants it has (`applies`), the cases it cannot take (`supports`: tinylib has no rsLoRA) and the
  capabilities it lacks (`unsupported`: merge, Conv1D, quantized layers, ... -> those properties are n/a);
- the spec's config (`spec_config`: tinylib's defaults, then the drawn fields) and tinylib's own config built
  from it (`attach`: rank, alpha, dropout, the trainables' dtype);
- the spec's tensor names -> tinylib's (`NAMES`), its refusals (`errors`), save/load/detach.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import tinylib
from harness.backends import register
from harness.backends.protocol import Backend, Checkpoint, Detach, Errors, Fields, Supports
from harness.strategies import Case
from spec.schema import Spec

NAMES = {"lora": {"A": "down", "B": "up"}, "ia3": {"g": "gate"}}  # spec tensor -> tinylib attribute
DEFAULTS = {"r": 8, "alpha": 16.0, "rslora": False, "dropout": 0.0}  # tinylib's defaults, in the specs' field names
LACKS = {
    "merge": "tinylib has no merge",
    "conv1d": "tinylib wraps nn.Linear layers only",
    "quantized": "tinylib wraps nn.Linear layers only",
    "knobs": "tinylib's adapters have no runtime knob",
    "data": "tinylib has no data-driven init",
    "base_hash": "tinylib's checkpoints do not record the base weights",
    "config_checks": "tinylib checks its config when it wraps a layer, not when the config is built",
    "model": "this backend adapts the one-layer models only",
}


@register
class TinylibBackend:
    name = "tinylib"
    version = tinylib.__version__
    errors = Errors(config=(tinylib.TinyError,), attach=(tinylib.TinyError,), checkpoint=(tinylib.TinyError,))

    def applies(self, spec: Spec) -> str | None:
        return None if spec.name in NAMES else f"tinylib has no '{spec.name}'"

    def supports(self, spec: Spec, case: Case) -> str | None:
        return "tinylib has no rsLoRA" if case.fields.get("rslora") else None

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        return LACKS.get(capability)

    def spec_config(self, spec: Spec, case: Case, **over: Any) -> Fields:
        return Fields.of(DEFAULTS, case, {k: v for k, v in over.items() if k != "param_dtype"})

    def attach(self, model: nn.Module, spec: Spec, case: Case, calibration: Any = None, **over: Any) -> nn.Module:
        cfg = self.spec_config(spec, case, **over)
        dtype = str(over.get("param_dtype", torch.float32)).removeprefix("torch.")
        tinylib.wrap(model.layer, tinylib.Cfg(spec.name, rank=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, dtype=dtype))
        return model

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        theirs = tinylib.tensors(model.layer)
        return {ours: theirs[name] for ours, name in NAMES[model.layer.tl_cfg.kind].items()}

    def knobs(self, model: nn.Module) -> dict[str, float]:
        return {}

    def base_weight(self, model: nn.Module) -> torch.Tensor:
        return model.layer.weight

    def dequantized(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight

    def hooks_left(self, model: nn.Module) -> list[str]:
        return [n or "<root>" for n, m in model.named_modules() if m._forward_hooks or hasattr(m, "tl_cfg")]

    def detach(self, model: nn.Module) -> None:
        tinylib.unwrap(model.layer)

    def save(self, model: nn.Module, path: Path) -> None:
        tinylib.save(model.layer, path)

    def load(self, model: nn.Module, path: Path) -> None:
        tinylib.load(model.layer, path)


if TYPE_CHECKING:  # checked by `nox -s lint` (mypy): the class keeps each protocol it claims
    _be = TinylibBackend()
    _b: Backend = _be
    _d: Detach = _be
    _c: Checkpoint = _be
    _s: Supports = _be
