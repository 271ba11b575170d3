"""The backend protocol: what the harness needs from an adapter library to verify it, as `typing.Protocol`s.

A backend is a plain class (no base class to inherit) holding the members of `Backend` (required) and of the
capability protocols below for what its library can do. The generic properties call nothing else: every member
a property or the engine calls is declared here, and the harness is typed against these protocols (`nox -s lint`
fails on a call of an undeclared member). A backend module is checked against them before anything runs
(`check_backend`; `python -m tools.verify --backend-module` exits with BACKEND_INVALID and one line per problem).

Capabilities: `CAPABILITIES` names each and `METHODS` the members it needs; a backend lacks a capability when it
lacks one of those members (the check reports a capability whose members are partly there), or when its
`unsupported(spec, capability)` gives a reason. A property needing a capability the backend lacks is `na` with
that reason, never a crash. `FullBackend` is every required and capability member together: the type the
properties see (which of its capability members a property may call, its `needs=` says).

Optional members, each its own protocol (`Supports`, `PropertyNA`, `QuantizedNA`, `Deviations`, `BaseBias`,
`CheckpointSuffix`, `SourceClass`, `ResultsStem`): the harness asks `has(be, Supports)` before calling one.

What the harness passes: `spec` (spec.schema.Spec): read `spec.name` (the variant) and, to map names, the spec's
tensor names (spec/variants/<name>.py); `case` (harness.strategies.Case): `case.fields` holds the drawn config fields
in the spec's names (r, alpha, rslora, ...), beside `d_in`, `d_out`, `bias`, `dtype`, `seed`; `model`: for the
single-layer methods a module whose `model.layer` is the layer to adapt (nn.Linear, transformers' Conv1D, a
bitsandbytes layer; `attach_kind`: nn.Embedding / nn.Conv2d), for `WholeModel` / `Targets` a tiny transformers model.
`deviation` returns a spec.schema.Deviation (property, reason, backend name, source line).

Tensor layout: `tensors(model)` gives the adapter's live tensors under the spec's names and in the spec's layout.
A library holding one in another layout returns `Mapped.of(param, transform)`: a view sharing the parameter's
storage whose `grad` is the parameter's gradient in the spec's layout (see `Mapped` and `Transform`).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import (TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, TypeAlias, TypeGuard, TypeVar,
                    runtime_checkable)

import torch
from torch import nn

if TYPE_CHECKING:
    from spec.schema import Deviation, Spec

    from ..strategies import Case

CAPABILITIES: Mapping[str, str] = MappingProxyType({
    "detach": "detach(model) removes the adapter and restores the base model",
    "merge": "merge(model) folds the adapter into dense base weights",
    "conv1d": "adapting transformers' Conv1D (transposed-storage) layers",
    "quantized": "adapting bitsandbytes 4-bit and 8-bit layers",
    "knobs": "changing a runtime knob on the live model: set_knob(model, name, value)",
    "dropout": "the adapter-input dropout field of the spec",
    "data": "data-driven init from calibration batches",
    "label_mask": "the data-driven init skips calibration tokens whose `labels` are -100 (the Hugging Face ignore "
                  "index; PEFT's EVA use_label_mask), as it skips padding (attention_mask == 0)",
    "checkpoint": "save(model, path) / load(model, path)",
    "base_hash": "load refuses a model whose base weights differ from the saved ones",
    "config_checks": "config constraints enforced when the config is built (spec_config raises errors.config)",
    "model": "adapting a whole transformers model: attach_model, adapted_layers",
    "targets": "a whole model with an explicit selection (roles, names, layers, exclusions): attach_targets, "
               "adapted_layers",
    "config_record": "the attached adapter's config field by field: config_fields(model)",
    "unmerge": "a reversible merge: merge_adapter(model) / unmerge_adapter(model) (Linear and Conv1D layers)",
    "disable": "a context in which the adapter is off: disabled(model)",
    # The API beyond one adapter on one Linear (harness.api):
    "scale": "a runtime multiplier of the adapter's scale s (alpha/r, alpha/sqrt(r) with rsLoRA): "
             "set_scale(model, factor) (s = factor x the config's s), scale_by(model, factor) (s *= factor), "
             "unscale_by(model, factor) (s /= factor), reset_scale(model) (s = the config's s)",
    "patterns": "several layers of one model, each with its own r and alpha: "
                "attach_patterns(model, spec, case, names, ranks={name: r}, alphas={name: alpha}), adapted_layers",
    "multi_adapter": "several named adapters on one module (the first is ADAPTER_NAME): add_adapter(model, spec, "
                     "case, name, **over), adapter_tensors(model, name), set_active(model, [names]), "
                     "merge_adapters(model, [names]), unmerge_all(model), weighted_adapter(model, [names], "
                     "[weights], new_name), delete_adapter(model, name), disabled(model) (a context manager); "
                     "an unknown name raises one of `errors`",
    "embedding": "adapting a plain nn.Embedding: attach_kind(model, spec, case, **over) on a one-layer model, "
                 "kind_tensors(model) in the spec's Linear layout (W = the embedding matrix transposed, inputs "
                 "one-hot), merge_adapter / unmerge_adapter",
    "scaled_embedding": "adapting transformers' scaled word embeddings (an nn.Embedding subclass whose output is "
                        "multiplied by embed_scale; the adapter's output scaled alike): methods as for embedding",
    "conv2d": "adapting nn.Conv2d: attach_kind / kind_tensors as for embedding (W = the kernel flattened to "
              "(c_out, c_in*kh*kw), inputs the unfolded patches), merge_adapter / unmerge_adapter",
    "lora_bias": "a trainable bias on the adapter's output (PEFT's lora_bias=True): attach_kind(model, spec, case, "
                 "lora_bias=True), kind_bias(model), merge_adapter / unmerge_adapter",
})
ADAPTER_NAME = "default"  # the name of the adapter `attach` creates (multi_adapter)
# The methods a capability needs: a backend written before the capability existed (its `unsupported` does not
# know the name) lacks it by the missing methods, never crashes on it.
METHODS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "detach": ("detach",),
    "merge": ("merge",),
    "knobs": ("set_knob",),
    "checkpoint": ("save", "load"),
    "model": ("attach_model", "adapted_layers"),
    "targets": ("attach_targets", "adapted_layers"),
    "config_record": ("config_fields",),
    "unmerge": ("merge_adapter", "unmerge_adapter"),
    "disable": ("disabled",),
    "scale": ("set_scale", "scale_by", "unscale_by", "reset_scale"),
    "patterns": ("attach_patterns", "adapted_layers"),
    "multi_adapter": ("add_adapter", "adapter_tensors", "set_active", "merge_adapters", "unmerge_all",
                      "weighted_adapter", "delete_adapter", "disabled"),
    "embedding": ("attach_kind", "kind_tensors", "merge_adapter", "unmerge_adapter"),
    "scaled_embedding": ("attach_kind", "kind_tensors", "merge_adapter", "unmerge_adapter"),
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



# ----------------------------------------------------------------------------------------------- the contract

Model: TypeAlias = nn.Module  # a model the harness built (harness.models): `model.layer` is the adapted layer of a one-layer one
Calibration: TypeAlias = Sequence[Mapping[str, torch.Tensor]]  # batches {"x" or "input_ids", "attention_mask"}
AdaptedLayers: TypeAlias = Mapping[str, tuple[Mapping[str, torch.Tensor], nn.Module, Mapping[str, float]]]


@runtime_checkable
class Backend(Protocol):
    """The members every backend has (checked by `check_backend` before a run).

    `name` and `version` (None: unknown) are recorded in the results JSON as `backend` / `backend_version`.
    `errors` holds the exception types the library raises for a clear refusal, by kind: a property that expects a
    refusal (a bad config, a quantized layer a variant cannot adapt, a foreign checkpoint) catches exactly these;
    anything else the library raises is reported as a crash.
    """

    @property
    def name(self) -> str:
        """The backend's name (a non-empty str, unique among registered backends)."""
        ...

    @property
    def version(self) -> str | None:
        """The library's version (None: unknown)."""
        ...

    @property
    def errors(self) -> Errors:
        """The exception types of the library's clear refusals, by kind."""
        ...

    def applies(self, spec: Spec) -> str | None:
        """Why the library has no counterpart of the spec's variant (None: it has one)."""
        ...

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        """Why the library lacks one of `CAPABILITIES` for this spec (None: it has it, provided the backend has
        the capability's `METHODS`). Answer None for a capability you do not know."""
        ...

    def spec_config(self, spec: Spec, case: Case, **over: Any) -> Any:
        """The config the spec's formulas read (shapes, parameter count, oracle): an object with attribute access
        and a `fields` mapping holding every field the spec names. `Fields.of(defaults, case, over)` builds one
        from the library's defaults, the case's drawn fields and the overrides. With `config_checks`, an invalid
        config raises one of `errors.config` naming the field."""
        ...

    def attach(self, model: Model, spec: Spec, case: Case, calibration: Calibration | None = None,
               **over: Any) -> object:
        """Adapt `model.layer` of a one-layer model (harness.models.single) in place, with the case's fields and
        the overrides. The overrides the harness passes besides spec fields: `dropout` (the adapter-input dropout
        probability), `param_dtype` (the dtype of the trainable tensors: float64 in float64 cases, else the
        library's default) and `dtype` (the storage dtype of the frozen tensors the variant creates). Seeded by
        the caller (torch.manual_seed) just before."""
        ...

    def tensors(self, model: Model) -> Mapping[str, torch.Tensor]:
        """The adapter's live tensors by the spec's names, in the spec's layout. Writes into them must reach the
        adapter (a view is fine: `Mapped`), and their `grad` must be the adapter's gradient in the spec's layout."""
        ...

    def base_weight(self, model: Model) -> torch.Tensor:
        """The adapted layer's current dense base weight (d_out, d_in), the tensor itself where the library holds it
        dense (merge writes into it)."""
        ...

    def knobs(self, model: Model) -> Mapping[str, float]:
        """The runtime knob values in effect ({} when the variant has none)."""
        ...

    def dequantized(self, layer: nn.Module) -> torch.Tensor:
        """The dense (d_out, d_in) weight of a base layer of any layout (Linear, transformers' Conv1D, bitsandbytes
        4-bit and 8-bit), without writing it back."""
        ...

    def hooks_left(self, model: nn.Module) -> list[str]:
        """The names of the modules still carrying the library's hooks or adapter state ([] after detach/merge)."""
        ...


class Detach(Protocol):
    """Capability `detach`."""

    def detach(self, model: nn.Module) -> object:
        """Remove the adapter: the base model's outputs, state dict and requires_grad flags as before attach."""
        ...


class Merge(Protocol):
    """Capability `merge`."""

    def merge(self, model: nn.Module) -> object:
        """Fold the adapter into the dense base weights; no hook or adapter left; the base weights keep their
        dtype."""
        ...


class Checkpoint(Protocol):
    """Capability `checkpoint` (and `base_hash`: `load` refuses, with one of `errors.checkpoint`, a model whose
    targeted base weights differ from the saved ones)."""

    def save(self, model: nn.Module, path: Path) -> object:
        """Write the adapter of `model` to `path` (its suffix: `checkpoint_suffix`)."""
        ...

    def load(self, model: nn.Module, path: Path) -> object:
        """Adapt a freshly built base model from the file `save` wrote (no calibration data)."""
        ...


class Knobs(Protocol):
    """Capability `knobs`."""

    def set_knob(self, model: nn.Module, name: str, value: float) -> object:
        """Set a runtime knob on the live model (every adapted layer)."""
        ...


class WholeModel(Protocol):
    """Capability `model`: a whole transformers model (harness.models.tiny)."""

    def attach_model(self, model: nn.Module, spec: Spec, case: Case, roles: tuple[str, ...],
                     names: tuple[str, ...], calibration: Calibration | None = None, **over: Any) -> object:
        """Attach to a whole model, targeting the architectural `roles` ("q", "k", "v", "o", "gate", "up", "down",
        "qkv"); `names` are the module-name suffixes those roles are in this architecture."""
        ...

    def adapted_layers(self, model: nn.Module) -> AdaptedLayers:
        """Every adapted layer: module name -> (its tensors by spec name, the layer, its knobs)."""
        ...


class Targets(Protocol):
    """Capability `targets`."""

    def attach_targets(self, model: nn.Module, spec: Spec, case: Case, selection: Mapping[str, Any],
                       calibration: Calibration | None = None, **over: Any) -> object:
        """Attach to a whole model with an explicit selection: any of `target_roles`, `target_names` (regexes
        searched in the full module name), `layers` (block indices) and `exclude_names` (regexes searched in the
        full module name). A selection matching nothing raises one of `errors.attach`, leaving the model as it
        was."""
        ...

    def adapted_layers(self, model: nn.Module) -> AdaptedLayers:
        """As in `WholeModel`."""
        ...


class ConfigRecord(Protocol):
    """Capability `config_record`."""

    def config_fields(self, model: nn.Module) -> Mapping[str, Any]:
        """The attached adapter's config, field by field (what a checkpoint must carry)."""
        ...


class Scale(Protocol):
    """Capability `scale`: a runtime multiplier of the adapter's scale s (alpha/r; alpha/sqrt(r) with rsLoRA)."""

    def set_scale(self, model: nn.Module, factor: float) -> object:
        """s = factor x the config's s."""
        ...

    def scale_by(self, model: nn.Module, factor: float) -> object:
        """s *= factor."""
        ...

    def unscale_by(self, model: nn.Module, factor: float) -> object:
        """s /= factor."""
        ...

    def reset_scale(self, model: nn.Module) -> object:
        """s = the config's s."""
        ...


class Patterns(Protocol):
    """Capability `patterns`: several layers of one model, each with its own r and alpha."""

    def attach_patterns(self, model: nn.Module, spec: Spec, case: Case, names: list[str],
                        ranks: Mapping[str, int], alphas: Mapping[str, float], **over: Any) -> object:
        """Adapt the layers `names` of `model` (attributes of a container module); `ranks` / `alphas` give the
        layers whose r / alpha differ from the case's."""
        ...

    def adapted_layers(self, model: nn.Module) -> AdaptedLayers:
        """As in `WholeModel`."""
        ...


class Disable(Protocol):
    """Capability `disable`."""

    def disabled(self, model: nn.Module) -> AbstractContextManager[object]:
        """A context manager inside which the model computes the base output; the adapter is back on leaving it."""
        ...


class MultiAdapter(Disable, Protocol):
    """Capability `multi_adapter`: several named adapters on one module; the first is `ADAPTER_NAME`. An unknown
    name raises one of `errors`."""

    def add_adapter(self, model: nn.Module, spec: Spec, case: Case, name: str, **over: Any) -> object:
        """A second named adapter on the same layer, not made active."""
        ...

    def adapter_tensors(self, model: nn.Module, name: str) -> Mapping[str, torch.Tensor]:
        """The named adapter's tensors, as `tensors` gives the default one's."""
        ...

    def set_active(self, model: nn.Module, names: Sequence[str]) -> object:
        """Make exactly these adapters active (their deltas add)."""
        ...

    def merge_adapters(self, model: nn.Module, names: Sequence[str]) -> object:
        """Fold these adapters into the base weights (reversibly: `unmerge_all`)."""
        ...

    def unmerge_all(self, model: nn.Module) -> object:
        """Undo every merge of `merge_adapters`."""
        ...

    def weighted_adapter(self, model: nn.Module, names: Sequence[str], weights: Sequence[float],
                         new_name: str) -> object:
        """A new adapter `new_name` combining `names` with `weights`, made active."""
        ...

    def delete_adapter(self, model: nn.Module, name: str) -> object:
        """Remove the named adapter."""
        ...


class Unmerge(Protocol):
    """Capability `unmerge`: a reversible merge (Linear and transformers' Conv1D layers; also used by the layer
    kinds below)."""

    def merge_adapter(self, model: nn.Module) -> object:
        """Fold the active adapter into the base weights, keeping the adapter."""
        ...

    def unmerge_adapter(self, model: nn.Module) -> object:
        """Restore the base weights (and bias) that `merge_adapter` changed."""
        ...


class Kinds(Unmerge, Protocol):
    """Capabilities `embedding` (nn.Embedding; transformers' scaled embeddings) and `conv2d` (nn.Conv2d)."""

    def attach_kind(self, model: nn.Module, spec: Spec, case: Case, **over: Any) -> object:
        """Adapt `model.layer` of a one-layer model whose layer is an Embedding, a Conv2d or (with
        `lora_bias=True`) a Linear."""
        ...

    def kind_tensors(self, model: nn.Module) -> Mapping[str, torch.Tensor]:
        """The adapter's tensors in the spec's Linear layout: for an Embedding W is the embedding matrix
        transposed (inputs one-hot); for a Conv2d W is the kernel flattened to (c_out, c_in*kh*kw) (inputs the
        unfolded patches)."""
        ...


class LoraBias(Kinds, Protocol):
    """Capability `lora_bias`: a trainable bias on the adapter's output (`attach_kind(..., lora_bias=True)`)."""

    def kind_bias(self, model: nn.Module) -> torch.Tensor:
        """The adapter-output bias Parameter."""
        ...


class FullBackend(Backend, Detach, Merge, Checkpoint, Knobs, WholeModel, Targets, ConfigRecord, Scale, Patterns,
                  MultiAdapter, LoraBias, Protocol):
    """Every required and capability member: the type a property sees. Which capability members a property may
    call, its `needs=` says (a backend lacking one makes the property `na`); a member outside this protocol is a
    type error (`nox -s lint`)."""


# Optional members: the harness asks `has(be, P)` before using one.
@runtime_checkable
class Supports(Protocol):
    def supports(self, spec: Spec, case: Case) -> str | None:
        """Why the library cannot take this drawn case (e.g. no rsLoRA, no float64 trainables); the engine then
        draws another case instead. When it rejects every case the property is `na` with the reason."""
        ...


@runtime_checkable
class PropertyNA(Protocol):
    def property_na(self, spec: Spec, prop: str) -> str | None:
        """Why a property cannot apply to the library's design for this spec (None: it applies)."""
        ...


@runtime_checkable
class QuantizedNA(Protocol):
    def quantized_na(self, spec: Spec, layer: str) -> str | None:
        """Why the library cannot run this spec on the `layer` kind ("bnb4" / "bnb8") of bitsandbytes layer in
        this environment, decided before running it (None: it can; the `quantized` property checks that kind)."""
        ...


@runtime_checkable
class Deviations(Protocol):
    def deviation(self, spec: Spec, prop: str) -> Deviation | None:
        """A backend-wide declared design difference for (spec, property), with its source line."""
        ...


@runtime_checkable
class ReleaseDeviations(Protocol):
    def deviation_shipped(self, spec: Spec, dev: Deviation) -> bool:
        """Whether the installed release of the library has the behaviour a spec's declared deviation describes
        (False: the release predates it, so the property runs undeclared there)."""
        ...


@runtime_checkable
class BaseBias(Protocol):
    def base_bias(self, model: Model) -> torch.Tensor | None:
        """The base layer's bias Parameter (None: no bias), for a library whose adapted layer does not expose it
        as `model.layer.bias`."""
        ...


@runtime_checkable
class CheckpointSuffix(Protocol):
    @property
    def checkpoint_suffix(self) -> str:
        """The file-name suffix `save` expects (default ".safetensors"; a library may pick its reader by it)."""
        ...


@runtime_checkable
class SourceClass(Protocol):
    def source_class(self, spec: Spec) -> type | None:
        """The class implementing the variant (its file is what an audit reviews)."""
        ...


@runtime_checkable
class ResultsStem(Protocol):
    @property
    def results_stem(self) -> str:
        """The results JSON's file stem (default: `name`)."""
        ...


@runtime_checkable
class LibraryDefaults(Protocol):
    def defaults_case(self, spec: Spec, device: str = "cpu") -> Case | None:
        """The case a user who changes nothing gets: the library's own default config (r, alpha, the adapter
        dtype, the variant's own fields). Every property drawing plain cases runs it first. Absent: the engine
        builds one from `spec_config`'s defaults (harness.engine.defaults_case)."""
        ...


class ModeSwitchMerges(Protocol):
    @property
    def mode_switch_merges(self) -> bool:
        """True when the library folds the adapter into the base weight on `eval()` and unfolds it on `train()`
        (loralib's `merge_weights=True`); False when a mode switch never changes a weight. Absent: not declared
        (the harness stays honest without it: every reference is computed from its own copy of the base). The
        `oracle` property checks the eval-mode output and the train-mode output after an eval()/train() round
        trip in every case; where the backend declares False it also requires the state dict to be unchanged."""
        ...


class TrainablePrecision(Protocol):
    @property
    def trainable_precision(self) -> str:
        """How the library holds trainable tensors, one of PRECISIONS: "float32" whatever the model's dtype
        (PEFT's autocast_adapter_dtype, impl's param_dtype default); "model": in the model's dtype (bf16 adapters
        on a bf16 model); "autocast": float32 tensors, forward and backward under torch.autocast in the model's
        dtype (as Trainer and Lightning run mixed precision). Absent: the harness reads each tensor's dtype.
        `training_step` judges movement against each tensor's own dtype spacing, checks a declared precision
        against the tensors, and runs an "autocast" library under autocast."""
        ...


OPTIONAL: Mapping[str, type] = MappingProxyType({
    "supports": Supports, "property_na": PropertyNA, "quantized_na": QuantizedNA, "deviation": Deviations,
    "base_bias": BaseBias,
    "checkpoint_suffix": CheckpointSuffix, "source_class": SourceClass, "results_stem": ResultsStem,
    "defaults_case": LibraryDefaults, "mode_switch_merges": ModeSwitchMerges, "trainable_precision": TrainablePrecision})
# The protocol declaring each capability's methods (the signatures check_backend compares).
PROTOCOL_OF: Mapping[str, type] = MappingProxyType({
    "detach": Detach, "merge": Merge, "knobs": Knobs, "checkpoint": Checkpoint, "model": WholeModel,
    "targets": Targets, "config_record": ConfigRecord, "unmerge": Unmerge, "disable": Disable, "scale": Scale,
    "patterns": Patterns, "multi_adapter": MultiAdapter, "embedding": Kinds, "scaled_embedding": Kinds, "conv2d": Kinds,
    "lora_bias": LoraBias})


P = TypeVar("P")


def has(be: object, proto: type[P]) -> TypeGuard[P]:
    """Whether the backend has every member of an optional protocol (as the instance answers attribute lookups:
    a member its class defines but the instance hides counts as missing)."""
    return all(hasattr(be, m) for m in _members(proto))


def checkpoint_suffix(be: object) -> str:
    """The file-name suffix the backend's `save` expects."""
    return be.checkpoint_suffix if has(be, CheckpointSuffix) else ".safetensors"



# ----------------------------------------------------------------------------------------------- the check

BACKEND_INVALID = 6  # tools.verify's exit status when --backend-module's backend fails check_backend (pytest uses 0-5)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _members(proto: type) -> dict[str, Any]:
    """The members a protocol declares (its own and inherited): name -> function, or None for a data member."""
    out: dict[str, Any] = {}
    for cls in reversed(proto.__mro__):
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        out.update({n: None for n in getattr(cls, "__annotations__", {})})
        out.update({n: None if isinstance(f, property) else f for n, f in vars(cls).items()
                    if not n.startswith("_") and (callable(f) or isinstance(f, property))})
    return out


def signature_problem(got: Callable, want: Callable) -> str | None:
    """Why a backend's bound method cannot take every call the harness makes through the protocol's `want`
    (None: it can): it must accept as many positional arguments as `want` has, require no more than `want`
    requires, require no keyword-only argument, and take `**over` where `want` does."""
    try:
        g = inspect.signature(got)
    except (TypeError, ValueError):
        return None  # a builtin or C function: nothing to compare
    w = list(inspect.signature(want).parameters.values())[1:]  # without self
    w_pos = [p for p in w if p.kind in _POSITIONAL]
    w_req = [p for p in w_pos if p.default is inspect.Parameter.empty]
    gp = list(g.parameters.values())
    g_pos = [p for p in gp if p.kind in _POSITIONAL]
    g_req = [p for p in g_pos if p.default is inspect.Parameter.empty]
    kinds = {p.kind for p in gp}
    wanted = "(" + ", ".join(str(p) for p in w) + ")"
    if len(g_pos) < len(w_pos) and inspect.Parameter.VAR_POSITIONAL not in kinds:
        return f"takes {len(g_pos)} positional arguments {g}, the harness passes up to {len(w_pos)} {wanted}"
    if len(g_req) > len(w_req):
        return f"requires {len(g_req)} arguments {g}, the harness may pass only {len(w_req)} {wanted}"
    kw_req = [p.name for p in gp if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
    if kw_req:
        return f"requires keyword-only {kw_req} {g}, which the harness never passes {wanted}"
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in w) and inspect.Parameter.VAR_KEYWORD not in kinds:
        return f"takes no **over {g}: the harness passes overrides by keyword {wanted}"
    return None


def _errors_problems(errors: object) -> list[str]:
    if not isinstance(errors, Errors):
        return [f"errors is {type(errors).__name__}, not harness.backends.protocol.Errors"]
    out = []
    for kind in ("config", "attach", "checkpoint", "other"):
        types = getattr(errors, kind)
        if not isinstance(types, tuple):
            out.append(f"errors.{kind} is a {type(types).__name__}, not a tuple of exception types")
            continue
        out += [f"errors.{kind} holds {t!r}, not an exception type" for t in types
                if not (isinstance(t, type) and issubclass(t, BaseException))]
    return out


def check_backend(be: object) -> list[str]:
    """Every way the backend breaks the contract, one line each ([] when it keeps it): a missing required member,
    a method whose signature cannot take the harness's calls, `errors` holding non-exception types, a capability
    whose methods are partly there (the backend would lack it silently), an optional member of the wrong form."""
    out: list[str] = []
    for member, fn in _members(Backend).items():
        if not hasattr(be, member):
            kind = "attribute" if fn is None else "method"
            out.append(f"missing required {kind} '{member}'" + (f": {_doc(fn)}" if fn else ""))
        elif fn is not None:
            got = getattr(be, member)
            if not callable(got):
                out.append(f"'{member}' is not callable")
            elif (why := signature_problem(got, fn)) is not None:
                out.append(f"{member}: {why}")
    name, version = getattr(be, "name", "x"), getattr(be, "version", None)
    if not isinstance(name, str) or not name:
        out.append(f"name is {name!r}, not a non-empty str")
    if version is not None and not isinstance(version, str):
        out.append(f"version is {version!r}, not a str or None")
    if hasattr(be, "errors"):
        out += _errors_problems(be.errors)
    have = {m for ms in METHODS.values() for m in ms if callable(getattr(be, m, None))}
    complete = {c for c, ms in METHODS.items() if set(ms) <= have}
    partial: dict[tuple[str, ...], list[str]] = {}  # capabilities partly there, by the members they have
    for cap, ms in METHODS.items():
        present = [m for m in ms if m in have]
        explained = {m for m in present if any(m in METHODS[c] for c in complete if c != cap)}
        if present and cap not in complete and set(present) - explained:
            partial.setdefault(tuple(present), []).append(cap)
    for has, caps in partial.items():
        missing = [m for m in METHODS[caps[0]] if m not in have]
        also = f" (and {', '.join(caps[1:])}, which share them)" if caps[1:] else ""
        out.append(f"capability '{caps[0]}'{also} is partly there: has {', '.join(has)}, lacks "
                   f"{', '.join(missing)} (without all of them the backend lacks '{caps[0]}')")
    checked = set(_members(Backend))
    for cap, proto in PROTOCOL_OF.items():
        for member, fn in _members(proto).items():
            if member in checked or fn is None or not callable(getattr(be, member, None)):
                continue
            checked.add(member)
            if (why := signature_problem(getattr(be, member), fn)) is not None:
                out.append(f"{member} ({cap}): {why}")
    for member, proto in OPTIONAL.items():
        if not hasattr(be, member):
            continue
        fn = _members(proto)[member]
        value = getattr(be, member)
        if fn is None:  # a declared attribute: its type is the property's return annotation (str or bool)
            want = {"str": str, "bool": bool}[getattr(proto, member).fget.__annotations__["return"]]
            if not isinstance(value, want):
                out.append(f"{member} is {value!r}, not a {want.__name__}")
        elif not callable(value):
            out.append(f"'{member}' is not callable")
        elif (why := signature_problem(value, fn)) is not None:
            out.append(f"{member} (optional): {why}")
    return out


def _doc(fn: Callable) -> str:
    """The first sentence of fn's docstring."""
    return " ".join((fn.__doc__ or "").split()).split(". ")[0].rstrip(".")


@dataclass(frozen=True)
class Transform:
    """How a library holds a tensor the spec names, as a pair of functions a backend may pass to `Mapped.of`.

    `to_spec(t)`: the library's tensor in the spec's layout, as a view of t (writes through the view must reach
    the library's storage, and `tensors(model)` hands out such views). `to_library(g, shape)`: a tensor in the
    spec's layout (a gradient) back in the library's layout and `shape` (the inverse of to_spec where to_spec is
    one to one; for "diag", the diagonal matrix, zeros off the diagonal).
    """

    name: str
    to_spec: Callable[[torch.Tensor], torch.Tensor]
    to_library: Callable[[torch.Tensor, torch.Size], torch.Tensor]


def _reshape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.reshape(shape)


TRANSFORMS: Mapping[str, Transform] = MappingProxyType({t.name: t for t in (
    Transform("id", lambda t: t, lambda g, shape: g),
    Transform("T", lambda t: t.t(), lambda g, shape: g.t()),
    Transform("row", lambda t: t.reshape(-1), _reshape),  # the library holds (1, n), the spec (n,)
    Transform("col", lambda t: t.reshape(-1), _reshape),  # the library holds (n, 1), the spec (n,)
    Transform("scalar1", lambda t: t.reshape(()), _reshape),  # the library holds (1,), the spec ()
    Transform("vector1", lambda t: t.reshape(-1), _reshape),  # the library holds (), the spec (1,)
    # the library holds a full (n, n) matrix whose diagonal is the spec's (n,) vector (off-diagonal entries are
    # the library's own: the spec's view and its gradient see only the diagonal)
    Transform("diag", lambda t: t.diagonal(), lambda g, shape: torch.diag_embed(g)),
)})


def transform_of(transform: str | Transform) -> Transform:
    """The Transform of a name in TRANSFORMS (or the Transform itself)."""
    if isinstance(transform, Transform):
        return transform
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; known: {sorted(TRANSFORMS)}, or pass a Transform")
    return TRANSFORMS[transform]


class Mapped(torch.Tensor):
    """A library's tensor seen in the spec's layout: a view sharing the library's storage (writes go through).

    `grad` reads (and `grad = None` clears) the library parameter's gradient, transformed to the spec's layout;
    `requires_grad` is the parameter's; `source` is the parameter itself. Operations on it return plain tensors.
    `transform`: a name in TRANSFORMS ("id", "T" (transpose), "row" / "col" (the library holds (1, n) / (n, 1)),
    "scalar1" (the library holds (1,), the spec ()), "vector1" (the library holds (), the spec (1,)), "diag" (the
    library holds a full (n, n) matrix whose diagonal is the spec's (n,) vector)), or a `Transform`: a backend's
    own pair of functions.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    _src: torch.Tensor
    _transform: Transform

    @staticmethod
    def of(src: torch.Tensor, transform: str | Transform) -> "Mapped":
        tf = transform_of(transform)
        view = tf.to_spec(src.detach()).as_subclass(Mapped)
        view._src, view._transform = src, tf
        return view

    @property
    def grad(self):
        g = self._src.grad
        return None if g is None else self._transform.to_spec(g)

    @grad.setter
    def grad(self, value):
        self._src.grad = None if value is None else self._transform.to_library(value, self._src.shape)

    @property
    def requires_grad(self) -> bool:
        return self._src.requires_grad

    @property
    def source(self) -> torch.Tensor:
        return self._src


def to_spec(t: torch.Tensor, transform: str | Transform) -> torch.Tensor:
    """Library layout -> spec layout, as a view."""
    return transform_of(transform).to_spec(t)


def to_peft(t: torch.Tensor, transform: str | Transform, shape) -> torch.Tensor:
    """Spec layout -> library layout (the inverse of to_spec)."""
    return transform_of(transform).to_library(t, shape)


def lacks(be: Backend, spec: Spec, *capabilities: str) -> str | None:
    """Why the backend cannot do one of `capabilities` for the spec (None when it can do all of them): its own
    reason (`unsupported`), else the capability's methods it lacks."""
    for cap in capabilities:
        if cap not in CAPABILITIES:
            raise ValueError(f"unknown capability {cap!r}; known: {sorted(CAPABILITIES)}")
        missing = [m for m in METHODS.get(cap, ()) if not callable(getattr(be, m, None))]
        reason = be.unsupported(spec, cap) or (f"the backend has no {', '.join(missing)}" if missing else None)
        if reason:
            return f"{be.name} lacks {cap} ({CAPABILITIES[cap]}): {reason}"
    return None


def rejects(be: Backend, spec: Spec, drawn: Any) -> str | None:
    """The backend's reason to refuse a drawn case (a Case, or a tuple whose first item is one)."""
    if not has(be, Supports):
        return None
    return be.supports(spec, drawn[0] if isinstance(drawn, tuple) else drawn)


def import_module(path_or_module: str):
    """Import a user's module from a file path (`examples/x.py`) or a dotted module name."""
    p = Path(path_or_module)
    if p.suffix == ".py":
        if not p.is_file():
            raise FileNotFoundError(f"no module file {path_or_module}")
        name = f"_user_module_{p.stem}"
        done = sys.modules.get(name)
        if done is not None and Path(getattr(done, "__file__", "")).resolve() == p.resolve():
            return done  # imported once per process (tools.verify checks it before pytest runs it)
        mod_spec = importlib.util.spec_from_file_location(name, p)
        if mod_spec is None or mod_spec.loader is None:
            raise ImportError(f"cannot import {path_or_module}")
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = mod
        mod_spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(path_or_module)


# ----------------------------------------------------------------------------------------------- declarations
# Optional members a backend may declare about its library's behaviour. Absent means "not declared": the harness
# then reads what it needs from the tensors themselves, and stays honest without them (every reference is
# computed from the engine's own copy of the base weight and bias, taken from the plain layer before attach).

PRECISIONS = ("float32", "model", "autocast")


def mode_switch_merges(be: Backend) -> bool | None:
    """The backend's declared ModeSwitchMerges (None: not declared), checked to be a bool."""
    value = be.mode_switch_merges if has(be, ModeSwitchMerges) else None
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{be.name}.mode_switch_merges must be a bool (or absent), not {value!r}")
    return value


def trainable_precision(be: Backend) -> str | None:
    """The backend's declared TrainablePrecision (None: not declared), checked to be one of PRECISIONS."""
    value = be.trainable_precision if has(be, TrainablePrecision) else None
    if value is not None and value not in PRECISIONS:
        raise ValueError(f"{be.name}.trainable_precision must be one of {PRECISIONS} (or absent), not {value!r}")
    return value
