"""The backend protocol: what the harness needs from an adapter library to verify it.

A backend is a plain class (no base class to inherit) with these members; the generic properties call nothing
else, so any library that can provide them is verified by the same specs and properties as `impl`.

Required:
- `name` (str) and `version` (str or None): recorded in the results JSON as `backend` / `backend_version`.
- `errors`: an `Errors` record, the exception types the library raises for a clear refusal, by kind. A property
  that expects a refusal (a bad config, a quantized layer a variant cannot adapt, a foreign checkpoint) catches
  exactly these; anything else the library raises is reported as a crash.
- `applies(spec) -> str | None`: why the library has no counterpart of the spec's variant (None: it has one).
- `spec_config(spec, case, **over)`: the config the spec's formulas read (shapes, parameter count, oracle), an
  object with attribute access and a `fields` mapping holding every field the spec names (`Fields` builds one
  from the library's defaults, the case's drawn fields and the overrides).
- `attach(model, spec, case, calibration=None, **over)`: adapt `model.layer` of a one-layer model (see
  harness.models.single) in place, with the case's fields and the overrides: `dropout`, and `param_dtype`, the
  dtype of the trainable tensors (float64 in float64 cases, else the library's default, float32 in impl).
- `tensors(model) -> {spec name: tensor}`: the adapter's live tensors by the spec's names. Writes into them must
  reach the adapter (a view is fine), and their `grad` must be the adapter's gradient in the spec's layout.
- `base_weight(model)`: the adapted layer's current dense base weight (d_out, d_in).
- optional `base_bias(model)`: the base layer's bias Parameter (or None), for a library whose adapted layer does
  not expose it as `model.layer.bias` (harness.probes.base_bias falls back to that attribute).
- `knobs(model) -> {name: value}`: the runtime knob values in effect ({} when the variant has none).
- `dequantized(layer)`: the dense (d_out, d_in) weight of a base layer of any layout (Linear, Conv1D, bnb).
- `hooks_left(model) -> [module names]`: modules still carrying the library's hooks or adapter state.
- `unsupported(spec, capability) -> str | None`: why the library lacks one of `CAPABILITIES` for this spec
  (None: it has it). A property needing a missing capability is `na` with this reason, never a crash.

Needed by the capabilities the backend has (see CAPABILITIES): `detach(model)`, `merge(model)`,
`save(model, path)` / `load(model, path)`, `set_knob(model, name, value)`,
`attach_model(model, spec, case, roles, names, calibration=None, **over)` / `adapted_layers(model)`, and the
methods of the API beyond one adapter (harness.api), listed by capability in CAPABILITIES and METHODS: a
backend without a capability's methods lacks it, whatever its `unsupported` says.

Optional:
- `supports(spec, case) -> str | None`: why the library cannot take this drawn case (e.g. no rsLoRA, no float64
  trainables); the engine then draws another case instead of running it. When it rejects every case the
  property is `na` with the reason.
- `checkpoint_suffix` (default ".safetensors"): the file-name suffix `save` expects (a library may pick its
  reader by it: torch.load reads a ".safetensors" name as safetensors).
- `property_na(spec, prop) -> str | None`, `deviation(spec, prop) -> Deviation | None`: a property that cannot
  apply to the library's design, or a backend-wide declared design difference (with its source line).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

CAPABILITIES: Mapping[str, str] = MappingProxyType({
    "detach": "detach(model) removes the adapter and restores the base model",
    "merge": "merge(model) folds the adapter into dense base weights",
    "conv1d": "adapting transformers' Conv1D (transposed-storage) layers",
    "quantized": "adapting bitsandbytes 4-bit and 8-bit layers",
    "knobs": "changing a runtime knob on the live model: set_knob(model, name, value)",
    "dropout": "the adapter-input dropout field of the spec",
    "data": "data-driven init from calibration batches",
    "checkpoint": "save(model, path) / load(model, path)",
    "base_hash": "load refuses a model whose base weights differ from the saved ones",
    "config_checks": "config constraints enforced when the config is built (spec_config raises errors.config)",
    "model": "adapting a whole transformers model: attach_model, adapted_layers",
    # The API beyond one adapter on one Linear (harness.api):
    "scale": "a runtime multiplier of the adapter's scale s (alpha/r, alpha/sqrt(r) with rsLoRA): "
             "set_scale(model, factor) (s = factor x the config's s), scale_by(model, factor) (s *= factor), "
             "unscale_by(model, factor) (s /= factor), reset_scale(model) (s = the config's s)",
    "patterns": "several layers of one model, each with its own r and alpha: "
                "attach_patterns(model, spec, case, ranks={name: r}, alphas={name: alpha}), adapted_layers",
    "multi_adapter": "several named adapters on one module (the first is ADAPTER_NAME): add_adapter(model, spec, "
                     "case, name, **over), adapter_tensors(model, name), set_active(model, [names]), "
                     "merge_adapters(model, [names]), unmerge_all(model), weighted_adapter(model, [names], "
                     "[weights], new_name), delete_adapter(model, name), disabled(model) (a context manager); "
                     "an unknown name raises one of `errors`",
    "embedding": "adapting nn.Embedding (and transformers' scaled embeddings): attach_kind(model, spec, case, "
                 "**over) on a one-layer model, kind_tensors(model) in the spec's Linear layout "
                 "(W = the embedding matrix transposed, inputs one-hot)",
    "conv2d": "adapting nn.Conv2d: attach_kind / kind_tensors as for embedding (W = the kernel flattened to "
              "(c_out, c_in*kh*kw), inputs the unfolded patches), merge_adapter / unmerge_adapter",
    "lora_bias": "a trainable bias on the adapter's output (PEFT's lora_bias=True): attach_kind(model, spec, case, "
                 "lora_bias=True), kind_bias(model), merge_adapter / unmerge_adapter",
})
ADAPTER_NAME = "default"  # the name of the adapter `attach` creates (multi_adapter)
# The methods a capability needs: a backend written before the capability existed (its `unsupported` does not
# know the name) lacks it by the missing methods, never crashes on it.
METHODS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "scale": ("set_scale", "scale_by", "unscale_by", "reset_scale"),
    "patterns": ("attach_patterns", "adapted_layers"),
    "multi_adapter": ("add_adapter", "adapter_tensors", "set_active", "merge_adapters", "unmerge_all",
                      "weighted_adapter", "delete_adapter", "disabled"),
    "embedding": ("attach_kind", "kind_tensors", "merge_adapter", "unmerge_adapter"),
    "conv2d": ("attach_kind", "kind_tensors", "merge_adapter", "unmerge_adapter"),
    "lora_bias": ("attach_kind", "kind_tensors", "kind_bias", "merge_adapter", "unmerge_adapter"),
})


@dataclass(frozen=True)
class Errors:
    """The exception types a backend raises for a clear refusal, by kind; `other` holds refusals of no kind
    above (a common base class, a merge refusal)."""

    config: tuple[type[BaseException], ...]
    attach: tuple[type[BaseException], ...]
    checkpoint: tuple[type[BaseException], ...]
    other: tuple[type[BaseException], ...] = ()

    @property
    def any(self) -> tuple[type[BaseException], ...]:
        return self.config + self.attach + self.checkpoint + self.other


class Fields:
    """A config the spec's formulas read: attribute access and a `fields` mapping.

    `Fields.of(defaults, case, over)`: the library's defaults, then the case's drawn fields, then overrides.
    """

    __slots__ = ("fields",)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "fields", MappingProxyType(dict(values)))

    @classmethod
    def of(cls, defaults: Mapping[str, Any], case, over: Mapping[str, Any]) -> "Fields":
        return cls({**defaults, **case.fields, **over})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"config has no field '{name}' (fields: {sorted(self.fields)})") from None

    def __setattr__(self, name, value):
        raise AttributeError("Fields is immutable")

    def __repr__(self) -> str:
        return f"Fields({dict(self.fields)!r})"


TRANSFORMS = ("id", "T", "row", "col", "scalar1", "vector1", "diag")


class Mapped(torch.Tensor):
    """A library's tensor seen in the spec's layout: a view sharing the library's storage (writes go through).

    `grad` reads (and `grad = None` clears) the library parameter's gradient, transformed to the spec's layout;
    `requires_grad` is the parameter's; `source` is the parameter itself. Operations on it return plain tensors.
    Transforms: "id", "T" (transpose), "row" / "col" (the library holds (1, n) / (n, 1)), "scalar1" (the library
    holds (1,), the spec ()), "vector1" (the library holds (), the spec (1,)) and "diag" (the library holds a
    (n, n) matrix, the spec its diagonal).
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def of(src: torch.Tensor, transform: str) -> "Mapped":
        view = to_spec(src.detach(), transform).as_subclass(Mapped)
        view._src, view._transform = src, transform
        return view

    @property
    def grad(self):
        g = self._src.grad
        return None if g is None else to_spec(g, self._transform)

    @grad.setter
    def grad(self, value):
        self._src.grad = None if value is None else to_peft(value, self._transform, self._src.shape)

    @property
    def requires_grad(self) -> bool:
        return self._src.requires_grad

    @property
    def source(self) -> torch.Tensor:
        return self._src


def to_spec(t: torch.Tensor, transform: str) -> torch.Tensor:
    """Library layout -> spec layout, as a view."""
    if transform == "id":
        return t
    if transform == "T":
        return t.t()
    if transform in ("row", "col", "vector1"):
        return t.reshape(-1)
    if transform == "scalar1":
        return t.reshape(())
    if transform == "diag":  # the library holds a (n, n) matrix whose diagonal is the spec's (n,) vector
        return t.diagonal()
    raise ValueError(f"unknown transform {transform!r}; known: {TRANSFORMS}")


def to_peft(t: torch.Tensor, transform: str, shape) -> torch.Tensor:
    """Spec layout -> library layout (the inverse of to_spec)."""
    if transform == "diag":
        return torch.diag_embed(t)
    return t.t() if transform == "T" else t.reshape(shape)


def lacks(be, spec, *capabilities: str) -> str | None:
    """Why the backend cannot do one of `capabilities` for the spec (None when it can do all of them)."""
    for cap in capabilities:
        if cap not in CAPABILITIES:
            raise ValueError(f"unknown capability {cap!r}; known: {sorted(CAPABILITIES)}")
        missing = [m for m in METHODS.get(cap, ()) if not callable(getattr(be, m, None))]
        reason = f"the backend has no {', '.join(missing)}" if missing else be.unsupported(spec, cap)
        if reason:
            return f"{be.name} lacks {cap} ({CAPABILITIES[cap]}): {reason}"
    return None


def rejects(be, spec, drawn) -> str | None:
    """The backend's reason to refuse a drawn case (a Case, or a tuple whose first item is one)."""
    supports = getattr(be, "supports", None)
    if supports is None:
        return None
    return supports(spec, drawn[0] if isinstance(drawn, tuple) else drawn)


def import_module(path_or_module: str):
    """Import a user's module from a file path (`examples/x.py`) or a dotted module name."""
    p = Path(path_or_module)
    if p.suffix == ".py":
        if not p.is_file():
            raise FileNotFoundError(f"no module file {path_or_module}")
        name = f"_user_module_{p.stem}"
        mod_spec = importlib.util.spec_from_file_location(name, p)
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = mod
        mod_spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(path_or_module)
