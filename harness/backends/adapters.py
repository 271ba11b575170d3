"""adapters (AdapterHub) as a backend: LoRA, (IA)³, DoRA and VeRA through its model-level API.

    python -m tools.verify --backend adapters    (in an environment with `requirements` installed)

adapters adapts transformers models, not loose layers: a user calls `adapters.init(model)`,
`model.add_adapter(name, config=LoRAConfig(...) | IA3Config() | DoRAConfig() | VeraConfig())`,
`model.train_adapter(name)` (activates it and freezes everything else), `merge_adapter`, `reset_adapter`,
`delete_adapter`, `save_adapter` / `load_adapter`. Here the one-layer model's base layer becomes the query
projection of a one-block Llama (hidden size d_in, one head of size d_out, so `q_proj` is (d_out, d_in)) built
around the same weights; every config targets that projection alone (`attn_matrices=["q"]`, no MLP LoRA), the
model-level calls above do the work, and `model.layer` is the adapted `q_proj` run inside adapters'
`ForwardContext` of that model (VeRA's shared A, B live there), the way the model's own forward runs it.

Variants: lora, ia3, dora, vera (the specs' names). What adapters lacks is quoted from adapters 1.3.0 (`LACKS`).
"""
from __future__ import annotations

import base64
import contextlib
import importlib
import json
import tempfile
from importlib.metadata import version as _version
from pathlib import Path

import torch
from torch import nn

from impl import layers
from spec.schema import Deviation, Spec

from . import BACKENDS
from .library import import_library
from ..strategies import Case
from .protocol import Errors, Fields, Mapped

NAME = "default"
CONFIGS = {"lora": "LoRAConfig", "ia3": "IA3Config", "dora": "DoRAConfig", "vera": "VeraConfig"}
# spec tensor -> (attribute of adapters' module in layer.loras[NAME], transform to the spec's layout)
TENSORS = {
    "lora": {"A": ("lora_A", "id"), "B": ("lora_B", "id")},
    "dora": {"A": ("lora_A", "id"), "B": ("lora_B", "id"), "m": ("m.weight", "col")},
    "ia3": {"g": ("lora_B", "col")},
    "vera": {"d": ("vera_D", "diag"), "b": ("vera_B", "diag")},
}
LACKS = {
    "conv1d": "adapters' LoRA replaces a layer by `LoRALinear` built from `module.in_features, module.out_features` "
              "(adapters/methods/lora.py:829-839) with `fan_in_fan_out` set per architecture: this backend's one-block "
              "Llama has no Conv1D",
    "quantized": "adapters' 8-bit dequantizer calls `bnb.functional.double_quant` (adapters/methods/utils.py), absent "
                 "from bitsandbytes 0.50, and bitsandbytes is left out of this environment",
    "knobs": "adapters' LoRA modules have no runtime knob",
    "data": "adapters' LoRA has no data-driven init",
    "base_hash": "adapters' `load_adapter` loads the adapter weights into the model without checking its base weights",
    "model": "this backend adapts the one-layer models only (through a one-block Llama)",
    "scale": "adapters' scale is fixed at construction: `self.scaling = self.lora_alpha / self.r` "
             "(adapters/methods/lora.py:100)",
    "patterns": "adapters' LoRAConfig has one `r` and one `alpha` for every adapted matrix "
                "(adapters/configuration/adapter_config.py:533-534)",
    "multi_adapter": "not driven by this backend (one adapter per model)",
    "embedding": "adapters' LoRA adapts Linear layers (adapters/methods/lora.py: LoRALinear, LoRAMergedLinear)",
    "conv2d": "adapters' LoRA adapts Linear layers (adapters/methods/lora.py: LoRALinear, LoRAMergedLinear)",
    "lora_bias": "adapters' LoRA has no adapter-output bias",
    "config_checks": "adapters' configs are dataclasses: r, alpha and dropout are checked only when a module is built",
}
# adapters' IA3 multiplies its gate by the config's alpha (`self.scaling = self.lora_alpha`, adapters/methods/lora.py:264;
# `return weights * (added * scaling)`, :293): IA3Config(alpha=a) starts at a times the base output. The spec's ia3
# has no alpha, so the backend passes IA3Config's default alpha = 1; audits/ecosystem/repro/adapters_ia3_alpha.py
# shows the non-identity start.
IA3_ALPHA = "adapters/methods/lora.py:264"
_HF = "_adapters_hf"  # model.__dict__ key: the transformers model the adapter lives in (not a submodule)


class InContext(nn.Module):
    """The adapted q_proj, run inside adapters' ForwardContext of its model (as the model's forward runs it)."""

    def __init__(self, layer: nn.Module, hf: nn.Module, context_cls):
        super().__init__()
        self.inner = layer
        self.__dict__["hf"] = hf
        self.__dict__["context_cls"] = context_cls

    def forward(self, x):
        with self.context_cls(self.hf, x):
            return self.inner(x)


class AdaptersBackend:
    """adapters 1.3.0 (AdapterHub) driven through its model-level API on a transformers Llama."""

    name = "adapters"
    requirements: tuple[str, ...] = ("adapters==1.3.0", "transformers==4.57.6")
    # adapters 1.2.x requires `transformers~=4.51.3` in its wheel's METADATA (1.3.0: `~=4.57.6`)
    release_requirements: dict[str, tuple[str, ...]] = {"<1.3": ("transformers==4.51.3",)}
    without: tuple[str, ...] = ("peft", "bitsandbytes")
    errors = Errors(config=(ValueError, TypeError, AssertionError), attach=(ValueError, TypeError, AssertionError),
                    checkpoint=(ValueError, KeyError, OSError))

    def __init__(self):
        self.ad = import_library("adapters", self.name)
        self.context = import_library("adapters.context", self.name).ForwardContext
        self.version = _version("adapters")

    def applies(self, spec: Spec) -> str | None:
        if spec.name in CONFIGS and hasattr(self.ad, CONFIGS[spec.name]):
            return None
        if spec.name in CONFIGS:  # DoRAConfig is new in adapters 1.3 (1.2.x exports none)
            return f"adapters {self.version} has no {CONFIGS[spec.name]} (`adapters.{CONFIGS[spec.name]}` is not exported)"
        return f"adapters has no '{spec.name}' here (its LoRA family: LoRAConfig, IA3Config, DoRAConfig, VeraConfig)"

    def supports(self, spec: Spec, case: Case) -> str | None:
        if case.fields.get("rslora"):
            return "adapters has no rsLoRA: `self.scaling = self.lora_alpha / self.r` (adapters/methods/lora.py:100)"
        return None

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        return LACKS.get(capability)

    def source_class(self, spec: Spec) -> type | None:
        """adapters' module class computing the variant (adapters/methods/lora.py)."""
        m = importlib.import_module("adapters.methods.lora")
        return {"lora": m.LoRA, "dora": m.LoRA, "ia3": m.IA3, "vera": m.Vera}.get(spec.name)

    def sites(self, spec: Spec) -> dict:
        """Where a failing property's computation lives in adapters: by property, "*" for the rest."""
        m = importlib.import_module("adapters.methods.lora")
        cls = self.source_class(spec)
        merge = m.LoRALinear.merge_adapter
        saved = importlib.import_module("adapters.loading").AdapterLoader.filter_func  # which weights save_adapter keeps
        return {"*": cls.forward, "identity_at_init": cls.forward, "merge": merge, "merge_oracle": merge,
                "unmerge_restores": m.LoRALinear.reset_adapter, "checkpoint_roundtrip": saved}

    def deviation(self, spec: Spec, prop: str) -> Deviation | None:
        """adapters' `train_adapter` freezes the whole model (`self.freeze_model(True)`) and `delete_adapter` does
        not give the flags back: a design of its training API, like lora-lite's."""
        if prop != "detach_restores":
            return None
        return Deviation("detach_restores", "adapters' train_adapter freezes every parameter of the model "
                         "(\"Sets the model into mode for training the given adapters.\" ... `self.freeze_model(True)`) "
                         "and delete_adapter does not restore the requires_grad flags", backend=self.name,
                         source="adapters/model_mixin.py:584-586 (adapters 1.3.0)", match="requires_grad flags changed")

    def spec_config(self, spec: Spec, case: Case, **over):
        over = {k: v for k, v in over.items() if k != "param_dtype"}
        return Fields.of({"dropout": 0.0, "rslora": False, **dict(spec.defaults)}, case, over)

    def library_config(self, spec: Spec, cfg, dtype):
        kw = dict(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, attn_matrices=["q"], selfattn_lora=True,
                  intermediate_lora=False, output_lora=False)
        if spec.name == "ia3":  # the spec's r and alpha are unused: IA3Config's own (r = 1, alpha = 1); alpha
            kw.update(r=1, alpha=1)  # would multiply the gate (`self.scaling = self.lora_alpha`), see IA3_ALPHA
        if spec.name == "vera":
            kw.update(vera_d=float(cfg.d_initial))
        if dtype is not None:
            kw["dtype"] = str(dtype).removeprefix("torch.")
        return getattr(self.ad, CONFIGS[spec.name])(**kw)

    def _hf_model(self, base: nn.Module):
        from transformers import LlamaConfig, LlamaModel

        d_out, d_in = base.weight.shape
        conf = LlamaConfig(hidden_size=d_in, num_attention_heads=1, num_key_value_heads=1, head_dim=d_out,
                           intermediate_size=2, num_hidden_layers=1, vocab_size=4,
                           attention_bias=base.bias is not None)
        hf = LlamaModel(conf).to(base.weight.dtype)
        q = hf.layers[0].self_attn.q_proj
        with torch.no_grad():
            q.weight.copy_(base.weight)
            if base.bias is not None:
                q.bias.copy_(base.bias)
        return hf

    def attach(self, model: nn.Module, spec: Spec, case: Case, calibration=None, **over) -> nn.Module:
        base = model.layer
        if type(base) is not nn.Linear:
            raise TypeError(f"this backend adapts nn.Linear base layers, not {type(base).__name__}")
        cfg = self.spec_config(spec, case, **over)
        hf = self._hf_model(base)
        self.ad.init(hf)
        hf.add_adapter(NAME, config=self.library_config(spec, cfg, over.get("param_dtype")))
        hf.train_adapter(NAME)
        for p in model.parameters():  # the one-layer model's own weights are the base: frozen like the model's
            p.requires_grad_(False)
        model.layer = InContext(hf.layers[0].self_attn.q_proj, hf, self.context)
        model.__dict__[_HF] = hf
        return model

    def _hf(self, model):
        hf = model.__dict__.get(_HF)
        if hf is None:
            raise RuntimeError("no adapters model attached to this one-layer model")
        return hf

    def merge(self, model) -> None:
        hf = self._hf(model)
        hf.merge_adapter(NAME)

    # ---- checkpoint: adapters' own save_adapter / load_adapter

    checkpoint_suffix = ".json"  # the folder save_adapter writes, its files in one JSON (name -> base64 bytes)

    def save(self, model, path) -> None:
        """`model.save_adapter(folder, name, use_safetensors=True)` as a user saves an adapter (adapter_config.json
        and the weights), the folder's files kept in the one file `path`."""
        with tempfile.TemporaryDirectory() as d:
            self._hf(model).save_adapter(d, NAME, use_safetensors=True)
            files = {f.name: base64.b64encode(f.read_bytes()).decode() for f in sorted(Path(d).iterdir())}
        Path(path).write_text(json.dumps({"save_adapter": files}, sort_keys=True))

    def load(self, model, path) -> None:
        """A fresh base model: `adapters.init`, `model.load_adapter(folder, load_as=name, set_active=True,
        use_safetensors=True)` as a user loads a saved adapter for inference; no training call."""
        base = model.layer
        if type(base) is not nn.Linear:
            raise TypeError(f"this backend adapts nn.Linear base layers, not {type(base).__name__}")
        files = json.loads(Path(path).read_text())["save_adapter"]
        hf = self._hf_model(base)
        self.ad.init(hf)
        with tempfile.TemporaryDirectory() as d:
            for name, data in files.items():
                if Path(name).name != name:
                    raise ValueError(f"checkpoint {path}: {name!r} is not a file name")
                Path(d, name).write_bytes(base64.b64decode(data))
            hf.load_adapter(d, load_as=NAME, set_active=True, use_safetensors=True)
        model.layer = InContext(hf.layers[0].self_attn.q_proj, hf, self.context)
        model.__dict__[_HF] = hf

    def merge_adapter(self, model) -> None:
        self._hf(model).merge_adapter(NAME)

    def unmerge_adapter(self, model) -> None:
        self._hf(model).reset_adapter()

    def detach(self, model) -> None:
        hf = self._hf(model)
        hf.delete_adapter(NAME)
        q = hf.layers[0].self_attn.q_proj
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=q.weight.dtype)
        lin.weight, lin.bias = q.weight, q.bias
        model.layer = lin
        del model.__dict__[_HF]

    @contextlib.contextmanager
    def disabled(self, model):
        hf = self._hf(model)
        hf.set_active_adapters(None)
        try:
            yield
        finally:
            hf.set_active_adapters(NAME)

    # ---- tensors

    def _module(self, model):
        return model.layer.inner.loras[NAME]

    def tensors(self, model) -> dict[str, torch.Tensor]:
        variant = type(self._hf(model).adapters_config.match(NAME, config_type=self.ad.LoRAConfig)).__name__
        name = {v: k for k, v in CONFIGS.items()}[variant]
        mod = self._module(model)
        out = {}
        for ours, (attr, transform) in TENSORS[name].items():
            t = mod
            for part in attr.split("."):
                t = getattr(t, part)
            out[ours] = t if transform == "id" else Mapped.of(t, transform)
        if name == "vera":
            shared = self._hf(model).base_model.shared_parameters[NAME]
            out["A"], out["B"] = shared["lora_A"], shared["lora_B"]
        return out

    def knobs(self, model) -> dict[str, float]:
        return {}

    def base_weight(self, model) -> torch.Tensor:
        layer = model.layer
        return layers.dense_weight(getattr(layer, "inner", layer))

    def base_bias(self, model):
        layer = model.layer
        return getattr(layer, "inner", layer).bias

    def dequantized(self, layer) -> torch.Tensor:
        return layers.dense_weight(layer)

    def hooks_left(self, model) -> list[str]:
        hf = model.__dict__.get(_HF)
        if hf is None:
            return [n or "<root>" for n, m in model.named_modules() if hasattr(m, "loras")]
        q = hf.layers[0].self_attn.q_proj
        return [] if q.merged or not len(q.loras) else ["layer"]


BACKENDS["adapters"] = AdaptersBackend
