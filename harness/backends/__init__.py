"""Backends: the implementation under verification, behind the protocol of harness.backends.protocol.

The generic properties talk to a backend, never to impl/ directly, so the same specs and properties verify
our `impl`, PEFT's own implementations (harness.backends.peft), lora-lite at any commit
(harness.backends.lora_lite) and a user's library (`--backend-module`, see examples/).
`BACKENDS` maps a name to its class; `register` adds one; `make(name, **options)` builds one.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

import impl
from impl import layers

from spec.schema import Spec
from ..models import Single, make_layer, single  # noqa: F401  (re-exported for backends)
from ..strategies import Case
from .protocol import Errors, import_module


class ImplBackend:
    """Our implementation: the public API of impl."""

    name = "impl"
    version = None  # the results JSON then records this package's version
    errors = Errors(config=(impl.ConfigError,), attach=(impl.AttachError,), checkpoint=(impl.CheckpointError,),
                    other=(impl.AdapterError,))

    def applies(self, spec: Spec) -> str | None:
        if spec.name in impl.VARIANTS:
            return None
        return f"variant '{spec.name}' is not implemented here (no impl variant; the PEFT backend verifies PEFT's)"

    def source_class(self, spec: Spec) -> type | None:
        """The class implementing the variant (its file is what an audit reviews), None when none is registered."""
        return impl.REGISTRY.get(spec.name) if spec.name in impl.VARIANTS else None

    # What impl lacks of the API beyond one adapter (harness.api); everything else it has, and what a variant
    # refuses (quantized, dropout) its spec declares.
    LACKS = {
        "scale": "impl has no runtime scale multiplier: alpha is a config field (a variant's runtime knobs are its "
                 "knobs, set_knobs)",
        "patterns": "impl has no per-layer rank or alpha: one config (one r, one alpha) per attach (impl/config.py)",
        "multi_adapter": "impl has one adapter per model: attach refuses a second, and there is no adapter name, "
                         "switching or disable context",
        "embedding": "impl has no Embedding adapter (impl/layers.py adapts Linear, Conv1D and bitsandbytes layers)",
        "conv2d": "impl has no Conv2d adapter (impl/layers.py adapts Linear, Conv1D and bitsandbytes layers)",
        "lora_bias": "impl has no adapter-output bias (no variant declares one)",
    }

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        return self.LACKS.get(capability)

    def spec_config(self, spec: Spec, case: Case, **over):
        """impl's validated config: impl's defaults, the case's fields, the overrides (impl's config checks)."""
        return impl.config(spec.name, **{"target_names": (r"^layer$",), **case.fields, **over})

    def attach(self, model: nn.Module, spec: Spec, case: Case, calibration=None, **over) -> nn.Module:
        return impl.attach(model, self.spec_config(spec, case, **over), calibration=calibration)

    def detach(self, model):
        impl.detach(model)

    def merge(self, model):
        impl.merge(model)

    def save(self, model, path):
        impl.save(model, path)

    def load(self, model, path):
        impl.load(model, path)

    def set_knob(self, model, name: str, value: float):
        impl.set_knobs(model, **{name: value})

    def knobs(self, model) -> dict[str, float]:
        return dict(impl.adapters(model)["layer"].knobs)

    def tensors(self, model) -> dict[str, torch.Tensor]:
        """Every adapter tensor of the single adapted layer, by spec name."""
        return impl.adapters(model)["layer"].tensors()

    def adapted_layers(self, model) -> dict[str, tuple[dict[str, torch.Tensor], nn.Module, dict[str, float]]]:
        """Every adapted layer of a whole model: name -> (its tensors by spec name, the layer, its knobs)."""
        return {n: (ad.tensors(), ad.layer, dict(ad.knobs)) for n, ad in impl.adapters(model).items()}

    def attach_model(self, model: nn.Module, spec: Spec, case: Case, roles: tuple[str, ...], names: tuple[str, ...],
                     calibration=None, **over) -> nn.Module:
        """Attach to a whole model, targeting the given architectural roles (`names`: the module names they are)."""
        return impl.attach(model, self.spec_config(spec, case, target_names=(), target_roles=roles, **over),
                           calibration=calibration)

    def attach_targets(self, model: nn.Module, spec: Spec, case: Case, selection: dict, calibration=None,
                       **over) -> nn.Module:
        """Attach to a whole model with an explicit target selection: any of target_roles, target_names,
        layers and exclude_names (config field names)."""
        return impl.attach(model, self.spec_config(spec, case, **{"target_names": (), **selection, **over}),
                           calibration=calibration)

    def config_fields(self, model) -> dict:
        """The attached adapter's config, field by field (the values a checkpoint must carry)."""
        return impl.adapters(model)["layer"].cfg.to_dict()

    def base_weight(self, model) -> torch.Tensor:
        """The adapted layer's current dense base weight (d_out, d_in)."""
        return layers.dense_weight(model.layer)

    def dequantized(self, layer) -> torch.Tensor:
        return layers.dense_weight(layer)

    def hooks_left(self, model) -> list[str]:
        left = []
        for n, m in model.named_modules():
            if m._forward_hooks or m._forward_pre_hooks or "adapter" in m._modules:
                left.append(n or "<root>")
        return left


BACKENDS: dict[str, type] = {"impl": ImplBackend}
LAZY = {"peft": ".peft", "lora-lite": ".lora_lite", "litgpt": ".litgpt", "adapters": ".adapters"}  # built-in backends imported on first use


def register(cls: type) -> type:
    """Add a backend class under its `name` (a class decorator for users' backend modules)."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise ValueError(f"backend class {cls!r} has no `name`")
    if BACKENDS.get(cls.name, cls) is not cls:
        raise ValueError(f"backend '{cls.name}' is already registered")
    BACKENDS[cls.name] = cls
    return cls


def load_backend_module(path_or_module: str) -> list[str]:
    """Import a user's backend module; return the names of the backends it registered."""
    before = set(BACKENDS)
    import_module(path_or_module)
    new = sorted(set(BACKENDS) - before)
    if not new:
        raise ValueError(f"backend module {path_or_module} registered no backend (decorate its class with "
                         "harness.backends.register)")
    return new


def make(name: str, **options):
    """Build the backend registered as `name`; `options` go to its constructor (e.g. lora-lite's ref)."""
    if name not in BACKENDS and name in LAZY:
        importlib.import_module(LAZY[name], __name__)  # registers itself
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; known: {sorted(set(BACKENDS) | set(LAZY))}")
    return BACKENDS[name](**options)
