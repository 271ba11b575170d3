"""PEFT as a backend: the same specs and generic properties run against PEFT's own implementations.

Everything goes through PEFT's public API: `get_peft_model` (attach), `unload` (detach), `merge_and_unload`
(merge), `save_pretrained` / `PeftModel.from_pretrained` (save / load), `merge_adapter` / `unmerge_adapter` and
`disable_adapter` (the extra API checks of harness.differential). The variant's PeftMap (harness.backends.peft_maps)
says how to build the same layer (config class, kwargs from the spec's config) and where each spec tensor lives in
PEFT (state-dict key suffix and a transform between PEFT's layout and the spec's).

Tensors PEFT stores in another layout (hra's (d_in, r) columns, ia3's (d_out, 1) gate, delora's (1,) lambda) are
exposed as `Mapped` views: they share PEFT's storage (writes go through) and read/clear the gradient of the PEFT
parameter, transformed. They are not the Parameter objects themselves, so `trainable_set`, which checks Parameter
identity, is not applicable to specs with such tensors (`property_na` says so).

The backend adapts to the installed release (feature detection, never a version table): a config class, a config
field or an API the release lacks makes the variant or the property 'na' with the reason.

Data-driven inits run PEFT's own passes: EVA's `initialize_lora_eva_weights` (bounded: PEFT cycles the data
forever when no batch has r tokens, so the backend stops it with `PeftHang`) and CorDA's `preprocess_corda`.
`attach_model` / `adapted_layers` drive whole models (tiny Llama / GPT-2, harness.differential.model_oracle). A
checkpoint is save_pretrained's folder packed into one deterministic safetensors file (PEFT's tensors as saved,
adapter_config.json in the metadata), so the generic checkpoint property can compare bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import impl
from impl import layers
from impl.config import COMMON
from impl.errors import AttachError, CheckpointError, ConfigError

from . import BACKENDS
from spec.schema import Deviation, Spec
from ..strategies import Case
from .library import release_number
from .peft_maps import BNB_PATHS, TRANSFORMS, bnb_na, peft_map
from .protocol import Errors, Fields, Mapped

ADAPTER = "default"
PACK_FILE = "peft-backend/file/"  # packed checkpoint metadata: a file of the save_pretrained folder
PACK_META = "peft-backend/meta/"  # packed checkpoint metadata: the saved safetensors file's own metadata
PACK_SPEC = "peft-backend/spec"  # packed checkpoint metadata: the spec the adapter follows
_STATE = "_peft_backend"  # model.__dict__ key holding the PeftModel (not a submodule: no state-dict cycle)

# Names that transformers 5 removed and that some PEFT releases import at module level without using them on our
# paths: peft 0.16.x-0.17.x `from transformers import HybridCache` (peft/peft_model.py:37), used only to build a
# Gemma2/3 prefix-tuning cache (peft_model.py:761). The shim is a placeholder that raises if PEFT ever builds one;
# it is installed only when `import peft` fails on exactly such a name, and SHIMS says which were installed.
TRANSFORMERS_REMOVED = ("HybridCache",)
SHIMS: list[str] = []


def _removed_name(error: BaseException) -> str | None:
    """The transformers name an ImportError says is missing, when it is one of TRANSFORMERS_REMOVED."""
    if isinstance(error, ImportError):
        for name in TRANSFORMERS_REMOVED:
            if f"cannot import name '{name}' from 'transformers'" in str(error):
                return name
    return None


def _install_shim(name: str) -> None:
    import sys

    import transformers

    def _removed(*args, **kwargs):
        raise NotImplementedError(f"transformers {transformers.__version__} has no {name}; the PEFT backend's "
                                  "import shim only lets this PEFT release import")

    setattr(transformers, name, type(name, (), {"__init__": _removed}))
    SHIMS.append(f"transformers.{name}")
    for mod in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        del sys.modules[mod]  # the half-imported release: import it again from the start


def _import_peft():
    """(peft module or None, version string, the import error or None), shimming TRANSFORMERS_REMOVED names."""
    for _ in range(len(TRANSFORMERS_REMOVED) + 1):
        try:
            import peft

            return peft, peft.__version__, None
        except Exception as e:  # noqa: BLE001 - any import failure of a release is reported in one line
            name = _removed_name(e)
            if name is None or f"transformers.{name}" in SHIMS:
                return None, "unimportable", e
            _install_shim(name)
    return None, "unimportable", ImportError("peft still does not import after the transformers shims")


# the backend must be importable to report a clear error for a release that does not import
_peft, VERSION, IMPORT_ERROR = _import_peft()


# ----------------------------------------------------------------------------------------------- helpers


def base_layer(layer: nn.Module) -> nn.Module:
    """The original layer under a PEFT tuner layer (the layer itself when not wrapped)."""
    get = getattr(layer, "get_base_layer", None)
    return get() if callable(get) else layer


def _is_tuner(m: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(m, BaseTunerLayer)


def _drop_adapter_name(key: str) -> str:
    return ".".join(p for p in key.split(".") if p != ADAPTER)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _config_fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls).parameters)


def _subconfigs(kwargs: dict) -> dict:
    """Sub-configs given as dicts (`eva_config={"rho": 1.0}`) built as the release's own config class (EvaConfig)
    when it has one: peft 0.14.0-0.20.0 keep a dict as it is and then read `eva_config.rho`
    (tuners/lora/eva.py:330 in 0.20.0); 0.21 converts it itself (tuners/lora/config.py:1030)."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if isinstance(value, dict) and key.endswith("_config"):
            cls = getattr(_peft, "".join(p.capitalize() for p in key.split("_")[:-1]) + "Config", None)
            if cls is not None and dataclasses.is_dataclass(cls):
                out[key] = cls(**value)
    return out


def _literal_allows(cls, field: str, value: str) -> bool:
    """False when the config field's annotation lists string literals and `value` is not one of them (peft 0.9.0's
    `init_lora_weights: bool | Literal["gaussian", "loftq"]` has no "pissa"); True when it lists none."""
    if not dataclasses.is_dataclass(cls):
        return True
    f = next((f for f in dataclasses.fields(cls) if f.name == field), None)
    text = str(f.type) if f is not None else ""
    if "Literal" not in text:
        return True
    return f'"{value}"' in text or f"'{value}'" in text


def _module_has(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by their unwrapped names (PEFT's '.base_layer' taken out), cloned."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()}


def _restore_untouched(model: nn.Module, exact: dict, rounded: dict) -> None:
    """After an init done in float32 on a float64 model: put back the exact float64 value of every tensor the
    init left unchanged (biases, untargeted layers), keeping what it rewrote (PiSSA's residual) as computed."""
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            k = k.replace(".base_layer", "")
            if k in exact and torch.equal(v.detach().to(rounded[k].dtype), rounded[k]):
                v.data.copy_(exact[k])


class PeftHang(RuntimeError):
    """PEFT did not return (a loop without an exit); not a clear error of PEFT's own."""


EVA_MAX_PASSES = 50  # passes over the calibration batches after which PEFT's EVA loop is declared stuck


def _bounded_forward(limit: int):
    """EVA's forward_fn, counting calls: PEFT cycles the data until every component converged and never stops
    when no batch has enough tokens (tuners/lora/eva.py:411-447), so the harness stops it instead of hanging."""
    calls = [0]

    def forward(model, inputs):
        calls[0] += 1
        if calls[0] > limit:
            raise PeftHang(f"PEFT's initialize_lora_eva_weights made {limit} forward passes without finishing: it "
                           "cycles the data forever when the components never converge, e.g. every batch has "
                           "fewer tokens than r (peft/tuners/lora/eva.py:407-456)")
        if "x" in inputs:  # a one-layer batch: input_ids is only the placeholder PEFT's mask helper reads
            inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
        return model(**inputs)

    return forward


def _eva_batches(calibration) -> list:
    """The calibration batches as PEFT's own LM input preparation takes them (prepare_model_inputs_fn_language_
    modeling, which applies attention_mask and, with use_label_mask, labels == -100 itself): a one-layer batch
    (`x`) gets a placeholder `input_ids`, which that helper reads even when an attention mask is given
    (eva.py:251, a dict.get default evaluated eagerly)."""
    return [{**b, "input_ids": torch.zeros(b["x"].shape[:2], dtype=torch.long)}
            if isinstance(b, dict) and "x" in b and "input_ids" not in b else b for b in calibration]


def _pack(folder: Path, spec_name: str) -> bytes:
    """save_pretrained's folder as one deterministic safetensors file: PEFT's saved tensors as they are, and
    every other file (adapter_config.json) and the saved file's own metadata in the metadata."""
    from safetensors import safe_open

    from impl.checkpoint import serialize

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"save_pretrained wrote no adapter_model.safetensors (files: {sorted(p.name for p in folder.iterdir())})")
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {f"{PACK_META}{k}": v for k, v in (f.metadata() or {}).items()}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p != weights:
            meta[f"{PACK_FILE}{p.name}"] = p.read_text()
    meta[PACK_SPEC] = spec_name
    return serialize(tensors, meta)


def _unpack(path: Path, folder: Path) -> str:
    """Rebuild the save_pretrained folder from a packed file; return the spec name it was saved under."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is a checkpoint error
        raise CheckpointError(f"cannot read PEFT checkpoint {path}: {e}") from e
    if not any(k.startswith(PACK_FILE) for k in meta):
        raise CheckpointError(f"{path} is not a packed PEFT checkpoint (no adapter_config.json inside)")
    for k, v in meta.items():
        if k.startswith(PACK_FILE):
            name = k[len(PACK_FILE):]
            if "/" in name or name.startswith("."):
                raise CheckpointError(f"bad file name {name!r} in checkpoint")
            (folder / name).write_text(v)
    save_file(tensors, str(folder / "adapter_model.safetensors"),
              metadata={k[len(PACK_META):]: v for k, v in meta.items() if k.startswith(PACK_META)})
    return meta.get(PACK_SPEC, "")


def release_map(spec: Spec):
    """The spec's PeftMap as the installed release names it: the first of the mapping and its `older` ones
    (harness.backends.peft_maps.PeftMap.older) that the release can build (its config class exported, with every
    field of `requires`); the mapping itself when none is (the n/a reason is then `release_na`, naming the
    release)."""
    pm = peft_map(spec)
    if pm is None or _peft is None or (not pm.older and not pm.requires):
        return pm
    return next((m for m in (pm, *pm.older) if _release_builds(m)), pm)


def _release_builds(pm) -> bool:
    cls = getattr(_peft, pm.config, None)
    return cls is not None and set(pm.requires) <= _config_fields(cls)


def release_na(pm) -> str | None:
    """Why the installed release cannot build the mapping (release_map's choice), naming the release; None when it
    can. A class the release lacks under this mapping's name and every older one; or the same class, but for the
    method the mapping's `earlier` describes."""
    cls = getattr(_peft, pm.config, None)
    if cls is None:
        names = [m.config for m in pm.older if m.config != pm.config]
        return f"peft {VERSION} has no {pm.config}" + (f" (nor {' or '.join(names)}, its older name)" if names else "")
    missing = sorted(set(pm.requires) - _config_fields(cls))
    if missing:
        return f"peft {VERSION}'s {pm.config} (no {', '.join(missing)}) is {pm.earlier or 'another method'}"
    return None


def _peft_file(path: str) -> str:
    """A file of the installed PEFT as the audit cites it: peft/<path inside the package>."""
    root = Path(_peft.__file__).resolve().parent
    return "peft/" + Path(path).resolve().relative_to(root).as_posix()


def _bnb_source(where: str, pm) -> list[tuple[str, int, str]]:
    """The installed release's code a BnbPath probes (harness.backends.peft_maps.bnb_na's `source`): every module
    of the mapping's tuner package ("tuner"), or one function or class ("module:Qualname"); none it lacks."""
    if where == "tuner":
        package = Path(inspect.getfile(getattr(_peft, pm.config))).parent
        return [(_peft_file(f), 1, f.read_text()) for f in sorted(package.glob("*.py"))]
    module, _, name = where.partition(":")
    try:
        obj = getattr(importlib.import_module(module), name)
        lines, first = inspect.getsourcelines(obj)
    except (ImportError, AttributeError, OSError, TypeError):
        return []
    return [(_peft_file(inspect.getsourcefile(obj)), first, "".join(lines))]


def _bnb_environment() -> tuple[dict[str, bool], str]:
    """What the BnbPath needs are checked against (their `lacks` keys), and bitsandbytes' version."""
    import bitsandbytes as bnb

    return ({"MatmulLtState.memory_efficient_backward": hasattr(bnb.MatmulLtState(), "memory_efficient_backward"),
             "cuda": torch.cuda.is_available()}, bnb.__version__)


def _mapped(layer: nn.Module, spec: Spec) -> dict[str, torch.Tensor]:
    """The spec's tensors of one PEFT tuner layer, through the spec's PeftMap."""
    live = {}
    for key, t in layer.state_dict(keep_vars=True).items():
        if key.startswith("base_layer."):
            continue
        short = _drop_adapter_name(key)
        live[short] = t
        if short.endswith(".weight"):
            live.setdefault(short[: -len(".weight")], t)
    out = {}
    conditional = {t.name for t in spec.tensors if t.when}  # tensors the spec declares only for some configs
    for name, (key, transform) in release_map(spec).tensors.items():
        t = live.get(key)
        if t is None and name in conditional:
            continue  # absent in this config (which ones must exist is checked against the spec's `when`)
        if t is None:
            raise KeyError(f"PeftMap of '{spec.name}': no PEFT tensor '{key}' for '{name}'; PEFT has {sorted(live)}")
        out[name] = t if transform == "id" else Mapped.of(t, transform)
    return out


def _refusal(fn):
    """PEFT's ValueError for a bad request (an unknown adapter name, a merged adapter deleted) as a clear refusal."""

    def call(*a, **k):
        try:
            return fn(*a, **k)
        except ValueError as e:
            raise impl.AdapterError(f"PEFT refused: {e}") from e

    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


# ----------------------------------------------------------------------------------------------- backend


class PeftBackend:
    """PEFT's own implementation of a spec'd variant, driven through PEFT's public API."""

    name = "peft"
    version = VERSION
    errors = Errors(config=(ConfigError,), attach=(AttachError,), checkpoint=(CheckpointError,),
                    other=(impl.AdapterError,))

    # Backend-wide design differences (they hold for every variant), with PEFT's source line.
    DEVIATIONS = (
        Deviation(
            "detach_restores",
            "PEFT freezes every base parameter in get_peft_model and `unload()` gives back the base modules "
            "without restoring their requires_grad flags",
            backend="peft",
            source="peft/tuners/tuners_utils.py:_mark_only_adapters_as_trainable; unload() at tuners_utils.py:780",
            match="requires_grad flags changed",
        ),
        Deviation(
            "model_freezing",
            "PEFT freezes every base parameter of the whole model in get_peft_model and `unload()` gives the model "
            "back without restoring their requires_grad flags (the detach_restores difference, on a whole model)",
            backend="peft",
            source="peft/tuners/tuners_utils.py:_mark_only_adapters_as_trainable; unload() at tuners_utils.py:780",
            match="detach did not restore requires_grad exactly",
        ),
    )

    def __init__(self) -> None:
        if isinstance(IMPORT_ERROR, ImportError) and getattr(IMPORT_ERROR, "name", None) == "peft":
            raise RuntimeError("peft is not installed in this environment (a backend may leave it out: `without`)")
        if IMPORT_ERROR is not None:
            import transformers

            raise RuntimeError(
                f"the installed peft does not import with transformers {transformers.__version__}: "
                f"{type(IMPORT_ERROR).__name__}: {str(IMPORT_ERROR).splitlines()[0] if str(IMPORT_ERROR) else ''}"
            )

    # ---- applicability

    def applies(self, spec: Spec, init_only: bool = False) -> str | None:
        """None when PEFT can build the spec's layer (init_only: also a counterpart sharing only the init)."""
        pm = release_map(spec)
        if pm is None:
            return f"PEFT has no counterpart of '{spec.name}' (harness/backends/peft_maps.py maps none)"
        if pm.compare is not None and not init_only:
            return f"PEFT's {pm.config} shares only the init with '{spec.name}' (other tensors): see reference_init"
        na = release_na(pm)
        if na is not None:
            return na
        cls = getattr(_peft, pm.config)
        try:
            kwargs = pm.kwargs(self._config(spec, {}))  # the spec's config at its defaults
        except Exception as e:  # noqa: BLE001 - a spec whose variant impl lacks still gets a clear reason
            return f"cannot derive PEFT kwargs for '{spec.name}': {type(e).__name__}: {e}"
        missing = sorted(set(kwargs) - _config_fields(cls))
        if missing:
            return f"peft {VERSION}'s {pm.config} lacks {missing}"
        for field, value in kwargs.items():
            if isinstance(value, str) and not _literal_allows(cls, field, value):
                return f"peft {VERSION} has no {field}={value!r} ({pm.config}.{field} does not list it)"
        init = kwargs.get("init_lora_weights")
        for needed, fn in (("eva", "initialize_lora_eva_weights"), ("corda", "preprocess_corda")):
            if init == needed and getattr(_peft, fn, None) is None and not _module_has("peft.tuners.lora.corda", fn):
                return f"peft {VERSION} has no {fn}"
        for key, (_, transform) in pm.tensors.items():
            if transform not in TRANSFORMS:
                return f"PeftMap of '{spec.name}': tensor '{key}' has unknown transform {transform!r}"
        return None

    def supports(self, spec: Spec, case: Case) -> str | None:
        """PEFT's OFT rotation reads every 4-D input as a Conv2d input (a PEFT bug, pinned by
        tests/test_zoo_libraries.py::test_peft_oft_on_a_linear_layer_fails_on_4d_inputs): a Linear's 4-D inputs
        are not drawn for it, so the other checks still run; the finding stands in the closing notes."""
        batch = getattr(case, "batch", None)  # (a whole-model property's drawn cases carry no input shape)
        if spec.name in ("oft", "oft_neumann") and batch is not None and len(batch) == 3:
            return ("PEFT bug: OFT on a Linear crashes on a 4-D input (a, b, c, d_in): peft/tuners/oft/layer.py:265 "
                    "`if len(orig_shape) == 4: x = self._unfold(x)` takes it for a Conv2d input")
        return None

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        if capability in API_CAPABILITIES:
            return self._api_unsupported(spec, capability)
        if capability == "base_hash":
            return "PEFT's checkpoints carry no base-weight hash: loading onto other weights is allowed"
        if capability == "config_checks":
            return "config constraints are impl's config-time checks"
        if capability == "knobs":
            return "PEFT's layers have no runtime knobs"
        pm = release_map(spec)
        if capability == "label_mask" and pm is not None and pm.compare is not None:
            return ("PEFT's counterpart shares only the init, compared by reference_init (CorDA's preprocess_corda "
                    "takes a run_model callback and reads no mask: the backend feeds it the calibration tokens only)")
        if capability == "dropout" and pm is not None and not pm.input_dropout:
            return f"PEFT's {pm.config} has no adapter-input dropout field (its rank/module dropouts are other things)"
        if capability == "model" and pm is not None and pm.compare is None and release_na(pm) is None:
            cfg = self._config(spec, {})  # a refusal of two layers of one shape as well is no shape rule
            refused = _adapt_refusal(pm, cfg, a=nn.Linear(4, 4), b=nn.Linear(4, 2)) \
                if _adapt_refusal(pm, cfg, a=nn.Linear(4, 4), b=nn.Linear(4, 4)) is None else None
            if refused:
                return (f"peft {VERSION} refuses {spec.name} on target layers of different shapes, which every "
                        f"whole-model check adapts: {refused}")
        return None

    def property_na(self, spec: Spec, prop: str) -> str | None:
        """Properties that cannot apply to PEFT's design for this spec."""
        pm = release_map(spec)
        if prop == "trainable_set" and pm is not None:
            mapped = [n for n, (_, tf) in pm.tensors.items() if tf != "id"]
            if mapped:
                return (f"PEFT stores {mapped} in another layout; the spec's view of them is not PEFT's Parameter, "
                        "so Parameter identity cannot be checked")
        if prop == "checkpoint_roundtrip" and not hasattr(_peft.PeftModel, "from_pretrained"):
            return f"peft {VERSION} has no PeftModel.from_pretrained"
        if prop == "quantized" and pm is not None and release_na(pm) is None:
            why = [self.quantized_na(spec, lay) for lay in ("bnb4", "bnb8")]
            if all(why):  # (one layer kind alone: the property checks the other and says which it left out)
                return "; ".join(f"{lay}: {w}" for lay, w in zip(("bnb4", "bnb8"), why))
        return None

    def quantized_na(self, spec: Spec, layer: str) -> str | None:
        """Why the installed release cannot run this spec on the `layer` kind ("bnb4" / "bnb8") of bitsandbytes
        layer here: a path of harness.backends.peft_maps.BNB_PATHS the release's source takes and the environment
        cannot serve (or PEFT's own refusal), naming the release and PEFT's file:line; None when it can run it."""
        pm = release_map(spec)
        if pm is None or pm.compare is not None:
            return None
        kwargs = pm.kwargs(self._config(spec, {}))
        has, bnb = _bnb_environment()
        return bnb_na(BNB_PATHS, layer, kwargs, lambda where: _bnb_source(where, pm), has, VERSION, bnb)

    def deviation(self, spec: Spec, prop: str) -> Deviation | None:
        return next((d for d in self.DEVIATIONS if d.property == prop), None)

    def deviation_shipped(self, spec: Spec, dev: Deviation) -> bool:
        """False when the installed release predates the behaviour the spec's deviation declares (the mapping's
        deviations_since)."""
        pm = release_map(spec)
        since = pm.deviations_since.get(dev.property) if pm is not None else None
        return since is None or release_number(VERSION) >= release_number(since)

    # ---- config and attach

    def spec_config(self, spec: Spec, case: Case, **over):
        """The spec's config (PEFT's kwargs are derived from it): impl's validated config of the case, or for a
        spec impl does not implement, the common defaults, the spec's `defaults`, the case's fields, `over`."""
        return self._config(spec, {**case.fields, **over})

    def _config(self, spec: Spec, values: dict):
        if spec.name in impl.VARIANTS:
            return impl.config(spec.name, target_names=(r"^layer$",), **values)
        common = {k: COMMON[k] for k in ("r", "alpha", "dropout")}
        return Fields({**common, **spec.defaults, **values})

    def peft_config(self, spec: Spec, case: Case, targets=("layer",), layer: nn.Module | None = None, **over):
        """The PEFT config object for the case: PeftMap kwargs from the spec's config, targets, fan_in_fan_out."""
        pm = release_map(spec)
        cls = getattr(_peft, pm.config)
        kwargs = _subconfigs(dict(pm.kwargs(self.spec_config(spec, case, **over))))
        kwargs["target_modules"] = list(targets)
        fields = _config_fields(cls)
        if "feedforward_modules" in fields:  # IA3 asks for it explicitly, also when empty (output side)
            kwargs["feedforward_modules"] = list(targets) if pm.feedforward else []
        if layer is not None and layers.kind(layer) == "conv1d" and "fan_in_fan_out" in fields:
            kwargs["fan_in_fan_out"] = True  # as PEFT's docs ask for GPT-2's Conv1D
        return cls(**kwargs)

    def attach(self, model: nn.Module, spec: Spec, case: Case, calibration=None, **over) -> nn.Module:
        """get_peft_model on the single-layer model (in place); data-driven inits run PEFT's own calibration."""
        return self._attach(model, spec, case, calibration, {"layer": model.layer}, ("layer",), over)

    def attach_model(self, model: nn.Module, spec: Spec, case: Case, roles: tuple[str, ...], names: tuple[str, ...],
                     calibration=None, **over) -> nn.Module:
        """get_peft_model on a whole model, targeting the modules `names` (PEFT's suffix match)."""
        targets = {n: m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in names)}
        return self._attach(model, spec, case, calibration, targets, tuple(names), over)

    def _attach(self, model, spec: Spec, case: Case, calibration, targets: dict, target_names: tuple, over: dict):
        if _STATE in model.__dict__:
            raise AttachError("a PEFT adapter is already attached to this model")
        if not targets:
            raise AttachError(f"no module of the model matches {list(target_names)}")
        first = next(iter(targets.values()))
        cfg = self.peft_config(spec, case, targets=target_names, layer=first, **over)
        k = layers.kind(first)
        flags = {}
        if k == "bnb4":
            flags["is_loaded_in_4bit"] = True  # selects PEFT's dedicated bnb wrappers, as for a quantized HF model
        elif k == "bnb8":
            flags["is_loaded_in_8bit"] = True
        for f, v in flags.items():
            setattr(model, f, v)
        # PEFT refuses a float64 base for inits that rewrite it (PiSSA: "Please initialize PiSSA under float32");
        # its documented recipe is to initialise in float32 and cast afterwards.
        fp32_init = spec.rewrites_base and layers.weight_dtype(first) == torch.float64
        kw = {"autocast_adapter_dtype": True} if _accepts(_peft.get_peft_model, "autocast_adapter_dtype") else {}
        exact = _state(model) if fp32_init else {}
        try:
            if fp32_init:
                model.float()
                rounded = _state(model)
            if getattr(cfg, "init_lora_weights", None) == "corda":
                self._corda(model, cfg, calibration)
            pm = _peft.get_peft_model(model, cfg, **kw)
            if fp32_init:
                model.double()
                _restore_untouched(model, exact, rounded)
            if spec.data != "none" and calibration is not None:
                self._calibrate(pm, spec, calibration)
        except PeftHang:
            raise
        except Exception as e:
            if fp32_init:
                model.double()
                _restore_untouched(model, exact, exact)
            self._strip(model, flags)
            raise AttachError(f"PEFT could not adapt layer '{next(iter(targets))}' ({type(first).__name__}): "
                              f"{type(e).__name__}: {e}") from e
        model.__dict__[_STATE] = {"peft_model": pm, "flags": tuple(flags), "spec": spec}
        return model

    def adapted_layers(self, model) -> dict[str, tuple[dict[str, torch.Tensor], nn.Module, dict[str, float]]]:
        """Every PEFT tuner layer of a whole model: name -> (its tensors by spec name, the base layer, knobs {})."""
        spec = model.__dict__[_STATE]["spec"]
        return {n: (_mapped(m, spec), base_layer(m), {}) for n, m in model.named_modules() if _is_tuner(m)}

    def _corda(self, model, cfg, calibration) -> None:
        """PEFT's CorDA preprocessing: covariance hooks over the calibration batches, before get_peft_model. Its
        hook squeezes dim 0 and transposes, so every call gets one (tokens, d) sample: the non-padding tokens of
        each sequence, one call per sequence."""
        fn = getattr(_peft, "preprocess_corda", None) or getattr(importlib.import_module("peft.tuners.lora.corda"),
                                                                 "preprocess_corda", None)
        if fn is None:
            raise AttachError(f"peft {VERSION} has no preprocess_corda")
        if calibration is None:
            raise AttachError("PEFT's CorDA needs calibration data")
        seqs = [b["x"][i][b["attention_mask"][i].bool()] for b in calibration for i in range(b["x"].shape[0])]

        def run_model():
            dtype = next(model.parameters()).dtype
            for x in seqs:
                model(x[None].to(dtype))

        with contextlib.redirect_stdout(io.StringIO()):
            fn(model, cfg, run_model=run_model)

    def _calibrate(self, pm, spec: Spec, calibration) -> None:
        """PEFT's own data-driven init over the calibration batches (EVA); padding masked by PEFT's LM helpers."""
        kwargs = pm.peft_config[ADAPTER].__dict__
        if kwargs.get("init_lora_weights") == "corda":
            return  # done before get_peft_model (_corda)
        if kwargs.get("init_lora_weights") == "eva":
            fn = getattr(_peft, "initialize_lora_eva_weights", None)
            if fn is None:
                raise AttachError(f"peft {VERSION} has no initialize_lora_eva_weights")
            kw = {"show_progress_bar": False} if _accepts(fn, "show_progress_bar") else {}
            # PEFT's own mask handling runs (its default prepare_model_inputs_fn): a release that never applies a
            # mask is seen, never masked for it here
            batches = _eva_batches(calibration)
            if _accepts(fn, "forward_fn"):
                kw["forward_fn"] = _bounded_forward(EVA_MAX_PASSES * max(1, len(batches)))
            # bitsandbytes repacks a CPU 4-bit layer in place on its first eval-mode no-grad forward (an
            # environment quirk, not PEFT's): keep the storage format during the data pass, as impl does
            with layers.no_cpu_repack(pm), contextlib.redirect_stdout(io.StringIO()):  # PEFT prints its skips
                fn(pm, batches, **kw)
        else:
            raise AttachError(f"no PEFT calibration recipe for init {kwargs.get('init_lora_weights')!r}")

    def _strip(self, model: nn.Module, flags) -> None:
        for f in flags:
            model.__dict__.pop(f, None)

    def peft_model(self, model: nn.Module):
        try:
            return model.__dict__[_STATE]["peft_model"]
        except KeyError:
            raise AttachError("no PEFT adapter is attached to this model") from None

    def _done(self, model: nn.Module) -> None:
        st = model.__dict__.pop(_STATE)
        self._strip(model, st["flags"])

    def detach(self, model):
        """PEFT's unload(): remove the tuner layers without merging."""
        self.peft_model(model).unload()
        self._done(model)

    def merge(self, model):
        """PEFT's merge_and_unload()."""
        self.peft_model(model).merge_and_unload()
        self._done(model)

    # ---- checkpoints

    def save(self, model, path):
        """save_pretrained into a temporary folder, packed into one deterministic file at `path`."""
        from impl.atomic import atomic_write_bytes

        spec = model.__dict__[_STATE]["spec"]
        with tempfile.TemporaryDirectory() as d:
            self.peft_model(model).save_pretrained(d)
            data = _pack(Path(d), spec.name if spec is not None else "")
        atomic_write_bytes(path, data)

    def load(self, model, path):
        """PeftModel.from_pretrained on a fresh single-layer model from a packed save_pretrained folder."""
        from spec import SPECS

        with tempfile.TemporaryDirectory() as d:
            name = _unpack(Path(path), Path(d))
            pm = _peft.PeftModel.from_pretrained(model, d, is_trainable=True)
        spec = SPECS.get(name) if name in SPECS.names() else None
        model.__dict__[_STATE] = {"peft_model": pm, "flags": (), "spec": spec}

    # ---- knobs

    def set_knob(self, model, name: str, value: float):
        raise ConfigError(f"PEFT's layers have no runtime knob '{name}'")

    def knobs(self, model) -> dict[str, float]:
        return {}

    # ---- tensors

    def _layer(self, model) -> nn.Module:
        layer = model.layer
        if not _is_tuner(layer):
            raise AttachError(f"layer is a {type(layer).__name__}, not a PEFT tuner layer")
        return layer

    def tensors(self, model) -> dict[str, torch.Tensor]:
        """Spec name -> live PEFT tensor (Parameter or buffer itself for 'id', a Mapped view otherwise)."""
        spec = model.__dict__[_STATE]["spec"]
        if spec is None:
            raise AttachError("this model was loaded from a checkpoint of a variant without a registered spec")
        return _mapped(self._layer(model), spec)

    def base_weight(self, model) -> torch.Tensor:
        """The current dense base weight (d_out, d_in) under the tuner layer (W_res for pissa)."""
        return layers.dense_weight(base_layer(model.layer))

    def base_bias(self, model):
        """The base layer's bias under the tuner layer (peft 0.9 has no BaseTunerLayer.bias: tuners_utils.py
        gained it in 0.10.0)."""
        return getattr(base_layer(model.layer), "bias", None)

    def write_base_weight(self, model, W: torch.Tensor) -> None:
        with torch.no_grad():
            layers.write_weight(base_layer(model.layer), W)

    def dequantized(self, layer) -> torch.Tensor:
        """The dense weight of a (possibly PEFT-wrapped) bitsandbytes layer, read without writing it back."""
        return layers.dense_weight(base_layer(layer))

    def hooks_left(self, model) -> list[str]:
        left = []
        for n, m in model.named_modules():
            if m._forward_hooks or m._forward_pre_hooks or _is_tuner(m):
                left.append(n or "<root>")
        return left

    # ---- PEFT's extra API (used by harness.differential)

    def merge_adapter(self, model) -> None:
        self.peft_model(model).merge_adapter()

    def unmerge_adapter(self, model) -> None:
        self.peft_model(model).unmerge_adapter()

    def disabled(self, model):
        """Context manager: the adapter switched off (PEFT's disable_adapter)."""
        return self.peft_model(model).disable_adapter()

    # ---- the API beyond one adapter (harness.api): PEFT's public scale, pattern, multi-adapter and layer-kind API

    def _api_unsupported(self, spec: Spec, capability: str) -> str | None:
        """What PEFT lacks of the API beyond one adapter for this spec, decided from its PeftMap."""
        pm = release_map(spec)
        if pm is None or pm.compare is not None:
            return f"PEFT has no counterpart of '{spec.name}' with the spec's tensors"
        if capability in ("scale", "patterns", "multi_adapter", "lora_bias") and not _lora_like(pm):
            return f"PEFT's {pm.config} layers have no {capability} API (LoraConfig's LoraLayer has)"
        if capability == "lora_bias":
            cls = getattr(_peft, pm.config)
            if "lora_bias" not in _config_fields(cls):
                return f"peft {VERSION}'s {pm.config} has no lora_bias"
            try:  # the config's own checks: PEFT refuses lora_bias with some variants (DoRA, PiSSA's init)
                cls(**pm.kwargs(self._config(spec, {})), target_modules=["layer"], lora_bias=True)
            except ValueError as e:
                return f"PEFT's {pm.config} refuses lora_bias=True here: {e}"
        if capability in ("patterns", "multi_adapter", "embedding", "scaled_embedding", "conv2d", "lora_bias") \
                and spec.data != "none":
            return "the backend runs PEFT's data-driven init for one adapter on one Linear only"
        if capability in ("embedding", "scaled_embedding"):  # one Embedding layer: plain, or scaled by embed_scale
            if not _lora_like(pm):
                return f"PEFT's {pm.config} has no Embedding layer"
            other = sorted(k for k, _ in pm.tensors.values() if k not in _EMBEDDING_KEYS)
            if other:
                return (f"PEFT's Embedding keeps {other} in another meaning than the spec's Linear layout (DoRA on "
                        "Embedding normalises each embedding row: a magnitude per token, not per output feature)")
        if capability == "conv2d":
            if pm.config not in ("LoraConfig", "IA3Config"):
                return f"PEFT's {pm.config} has no Conv2d layer"
            if pm.feedforward:
                return ("PEFT's feed-forward IA3 on Conv2d gates the c_in input channels, not the c_in*kh*kw patch "
                        "entries: no Linear-layout counterpart of the spec's g")
            refused = _adapt_refusal(pm, self._config(spec, {}), layer=nn.Conv2d(2, 2, 1))
            if refused:
                return f"peft {VERSION} refuses {spec.name} on Conv2d: {refused}"
        if spec.rewrites_base and capability in ("embedding", "scaled_embedding", "conv2d"):
            return "PEFT's base-rewriting inits (PiSSA) on Embedding/Conv2d are outside this check"
        return None

    def _tuners(self, model) -> list[nn.Module]:
        return [m for m in self.peft_model(model).modules() if _is_tuner(m)]

    def set_scale(self, model, factor: float) -> None:
        """LoraLayer.set_scale on every tuner layer's active adapters: s = factor x the config's s."""
        for m in self._tuners(model):
            for a in m.active_adapters:
                m.set_scale(a, factor)

    def scale_by(self, model, factor: float) -> None:
        """LoraLayer.scale_layer: s *= factor on every tuner layer."""
        for m in self._tuners(model):
            m.scale_layer(factor)

    def unscale_by(self, model, factor: float) -> None:
        """LoraLayer.unscale_layer(factor): s /= factor on every tuner layer."""
        for m in self._tuners(model):
            m.unscale_layer(factor)

    def reset_scale(self, model) -> None:
        """LoraLayer.unscale_layer(None): s = the config's s on every tuner layer."""
        for m in self._tuners(model):
            m.unscale_layer(None)

    def _attach_config(self, model: nn.Module, spec: Spec, cfg) -> nn.Module:
        """get_peft_model with a ready PEFT config (data-free inits only)."""
        if _STATE in model.__dict__:
            raise AttachError("a PEFT adapter is already attached to this model")
        kw = {"autocast_adapter_dtype": True} if _accepts(_peft.get_peft_model, "autocast_adapter_dtype") else {}
        try:
            pm = _peft.get_peft_model(model, cfg, **kw)
        except Exception as e:
            raise AttachError(f"PEFT could not adapt {cfg.target_modules}: {type(e).__name__}: {e}") from e
        model.__dict__[_STATE] = {"peft_model": pm, "flags": (), "spec": spec}
        return model

    def attach_patterns(self, model: nn.Module, spec: Spec, case: Case, names, ranks: dict, alphas: dict,
                        **over) -> nn.Module:
        """get_peft_model on the named layers of a model, the config's r and alpha except where LoraConfig's
        rank_pattern / alpha_pattern name a layer (a name matches as PEFT's `(.*\.)?name$`)."""
        cfg = self.peft_config(spec, case, targets=tuple(names), **over)
        cfg.rank_pattern, cfg.alpha_pattern = dict(ranks), dict(alphas)
        return self._attach_config(model, spec, cfg)

    @_refusal
    def add_adapter(self, model, spec: Spec, case: Case, name: str, **over) -> None:
        """PeftModel.add_adapter: a second named adapter on the same layer (not made active)."""
        self.peft_model(model).add_adapter(name, self.peft_config(spec, case, layer=base_layer(model.layer), **over))

    def adapter_tensors(self, model, name: str) -> dict[str, torch.Tensor]:
        """The spec's tensors of the named adapter of the single layer (a Linear, an Embedding whose factors PEFT
        names otherwise, or a Conv2d whose kernel-shaped factors the caller reshapes)."""
        spec = model.__dict__[_STATE]["spec"]
        live = _named_tensors(self._layer(model), name)
        for key, alias in _EMBEDDING_KEYS.items():
            if key not in live and alias in live:
                live[key] = live[alias]
        out = {}
        for sname, (key, transform) in release_map(spec).tensors.items():
            if key not in live:
                what = f"adapter '{name}' on the layer has no '{key}'" if live else f"no adapter '{name}' on the layer"
                raise impl.AdapterError(f"{what} (the spec's {sname}; PEFT tensors of '{name}': {sorted(live)})")
            out[sname] = _in_spec_layout(live[key], transform)
        return out

    @_refusal
    def set_active(self, model, names) -> None:
        """PeftModel.set_adapter for one name; the tuner's set_adapter for several (all active at once)."""
        pm = self.peft_model(model)
        if len(names) == 1:
            pm.set_adapter(names[0])
        else:
            pm.base_model.set_adapter(list(names))

    @_refusal
    def merge_adapters(self, model, names) -> None:
        self.peft_model(model).base_model.merge_adapter(adapter_names=list(names))

    @_refusal
    def unmerge_all(self, model) -> None:
        self.peft_model(model).unmerge_adapter()

    @_refusal
    def weighted_adapter(self, model, names, weights, new_name: str) -> None:
        """LoraModel.add_weighted_adapter (one adapter: PEFT combines linearly), then make it active."""
        pm = self.peft_model(model)
        pm.add_weighted_adapter(list(names), list(weights), new_name)
        pm.set_adapter(new_name)

    @_refusal
    def delete_adapter(self, model, name: str) -> None:
        self.peft_model(model).delete_adapter(name)

    def attach_kind(self, model: nn.Module, spec: Spec, case: Case, lora_bias: bool = False, **over) -> nn.Module:
        """get_peft_model on a one-layer model whose layer is an Embedding, a Conv2d or a Linear (lora_bias)."""
        cfg = self.peft_config(spec, case, **over)
        if lora_bias:
            try:
                cfg = dataclasses.replace(cfg, lora_bias=True)  # through the config's own checks
            except ValueError as e:
                raise AttachError(f"PEFT refuses lora_bias=True: {e}") from e
        return self._attach_config(model, spec, cfg)

    def kind_tensors(self, model) -> dict[str, torch.Tensor]:
        """The spec's tensors of an Embedding / Conv2d / lora_bias tuner layer (storage shared)."""
        return self.adapter_tensors(model, ADAPTER)

    def kind_bias(self, model) -> torch.Tensor:
        """The adapter-output bias of lora_bias=True (lora_B's bias)."""
        return _named_tensors(self._layer(model), ADAPTER)["lora_B.bias"]


# ----------------------------------------------------------------------------------------------- helpers of the API
# beyond one adapter (the methods above)

API_CAPABILITIES = ("scale", "patterns", "multi_adapter", "embedding", "scaled_embedding", "conv2d", "lora_bias")
# PEFT's Embedding layer keeps LoRA's factors as bare Parameters under other names (tuners/lora/layer.py, Embedding)
_EMBEDDING_KEYS = {"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"}


def _named_tensors(layer: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """One tuner layer's tensors of adapter `adapter`, keyed by their state-dict name without the adapter name
    (a `<key>.weight` also under `<key>`)."""
    live = {}
    for key, t in layer.state_dict(keep_vars=True).items():
        parts = key.split(".")
        if key.startswith("base_layer.") or adapter not in parts:
            continue
        short = ".".join(p for p in parts if p != adapter)
        live[short] = t
        if short.endswith(".weight"):
            live.setdefault(short[: -len(".weight")], t)
    return live


def _in_spec_layout(t: torch.Tensor, transform: str) -> torch.Tensor:
    """A PEFT tensor through the PeftMap's transform, sharing its storage (a conv kernel keeps its 4-D shape:
    the caller reshapes it to the spec's Linear-layout shape, a view)."""
    if transform == "id":
        return t if isinstance(t, nn.Parameter) else t.detach()
    return Mapped.of(t, transform)


def _lora_like(pm) -> bool:
    return pm is not None and pm.config == "LoraConfig" and pm.compare is None


def _adapt_refusal(pm, config, **layers: nn.Module) -> str | None:
    """PEFT's own refusal (its ValueError) of this config on a model of these layers, every one targeted, found by
    adapting them; None when PEFT takes them. E.g. peft 0.9.0's "Conv2d does not support DoRA yet"
    (tuners/lora/layer.py:656) on a 1x1 convolution, peft 0.11.1's "VeRA only supports a single dimension size"
    (tuners/vera/model.py) on two Linear layers of different shapes."""
    model = nn.Sequential()
    for name, layer in layers.items():
        model.add_module(name, layer)
    cfg = getattr(_peft, pm.config)(**_subconfigs(dict(pm.kwargs(config))), target_modules=list(layers))
    try:
        with warnings.catch_warnings():  # (a probe: PEFT's notes on the tiny layers are not the run's)
            warnings.simplefilter("ignore")
            _peft.get_peft_model(model, cfg)
    except ValueError as e:
        return str(e)
    return None


BACKENDS["peft"] = PeftBackend
