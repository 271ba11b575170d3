"""Backends: the implementation under verification, behind the protocol of harness.backends.protocol.

The generic properties talk to a backend, never to impl/ directly, so the same specs and properties verify
our `impl`, PEFT's own implementations (harness.backends.peft), lora-lite at any commit
(harness.backends.lora_lite) and a user's library (`--backend-module`, see examples/).
`BACKENDS` maps a name to its class; `register` adds one; `make(name, **options)` builds one.
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import torch
from torch import nn

import impl
from impl import layers

from spec.schema import Spec
from ..models import Single, make_layer, single  # noqa: F401  (re-exported for backends)
from ..strategies import Case
from .protocol import Errors, check_backend, import_module


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
        "scaled_embedding": "impl has no Embedding adapter (impl/layers.py adapts Linear, Conv1D and bitsandbytes "
                            "layers)",
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


BACKENDS: dict[str, type[Any]] = {"impl": ImplBackend}
LAZY = {"peft": ".peft", "lora-lite": ".lora_lite", "loralib": ".loralib", "loralib-merged": ".loralib",
        "torchtune": ".torchtune", "litgpt": ".litgpt", "adapters": ".adapters"}  # built-in backends imported on first use
SHIPPED = ("impl", *LAZY)  # names only this package's own backends may register
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")  # a backend's name names its results file: never a path


def check_name(name, what: str = "backend name") -> str:
    """`name` when it is a plain name (a letter, then letters, digits, '_', '-', '.'; at most 64), else ValueError."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:80] + "..."
        raise ValueError(f"{what} {shown} is not a plain name (a letter, then letters, digits, '_', '-' or '.'; "
                         "at most 64 characters)")
    return name


def register(cls: type[Any]) -> type[Any]:
    """Add a backend class under its `name` (a class decorator for users' backend modules). A name that is not a
    plain name, or the name of a shipped backend (impl, peft, lora-lite) from outside this package, is refused."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise ValueError(f"backend class {cls!r} has no `name`")
    check_name(cls.name)
    if cls.name in SHIPPED and not str(getattr(cls, "__module__", "")).startswith(__name__ + "."):
        raise ValueError(f"backend name '{cls.name}' is a shipped backend's ({', '.join(SHIPPED)}); a backend module "
                         "registers a name of its own")
    if BACKENDS.get(cls.name, cls) is not cls:
        raise ValueError(f"backend '{cls.name}' is already registered")
    BACKENDS[cls.name] = cls
    return cls


def load_backend_module(path_or_module: str) -> list[str]:
    """Import a user's backend module (once per process); return the names of the backends it registered."""
    before = dict(BACKENDS)
    mod = import_module(path_or_module)
    replaced = sorted(n for n in before if BACKENDS.get(n) is not before[n])
    if replaced:
        BACKENDS.update(before)
        raise ValueError(f"backend module {path_or_module} replaced the registered backend(s) {replaced}")
    for name in sorted(set(BACKENDS) - set(before)):  # what a module put into BACKENDS without register meets its checks
        if not str(getattr(BACKENDS[name], "__module__", "")).startswith(__name__ + "."):
            register(BACKENDS.pop(name))
    new = sorted(n for n, cls in BACKENDS.items() if cls.__module__ == mod.__name__)
    if not new:
        raise ValueError(f"backend module {path_or_module} registered no backend (decorate its class with "
                         "harness.backends.register)")
    return new


class ModuleLoadError(ValueError):
    """A backend module that cannot be imported (tools.verify: one line, exit 4 as pytest's usage error)."""


def check_backend_modules(modules: list[str], name: str | None = None, **options) -> list[str]:
    """Import the backend modules and check the backend they registered (or `name`) against the protocol
    (protocol.check_backend), before anything runs: one line per problem, [] when none. A module that cannot be
    imported (any exception, SystemExit and KeyboardInterrupt raised at import included) raises ModuleLoadError
    with one line."""
    loaded: list[str] = []
    for m in modules:
        try:
            loaded += load_backend_module(m)
        except BaseException as e:  # noqa: BLE001 - a module that cannot be imported is one line, not a traceback
            raise ModuleLoadError(f"--backend-module {m} cannot be loaded: {type(e).__name__}: {e}") from None
    names = [name] if name else loaded
    out = []
    for n in names:
        try:
            be = make(n, **options)
        except Exception as e:  # noqa: BLE001
            out.append(f"backend '{n}': cannot be built: {type(e).__name__}: {e}")
            continue
        out += [f"backend '{n}' ({inspect.getfile(type(be))}): {p}" for p in check_backend(be)]
    return out


def make(name: str, **options):
    """Build the backend registered as `name`; `options` go to its constructor (e.g. lora-lite's ref)."""
    if name not in BACKENDS and name in LAZY:
        importlib.import_module(LAZY[name], __name__)  # registers itself
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; known: {sorted(set(BACKENDS) | set(LAZY))}")
    return BACKENDS[name](**options)
