"""torchtune's PEFT modules (`torchtune.modules.peft`) as a backend, in the order of its own LoRA recipe.

    nox -s verify -- --backend torchtune [--version 0.5.0]        (its own environment, tools/envs.py)

torchtune's recipe (`recipes/lora_finetune_single_device.py`, `_setup_model`) builds the model with its adapter
layers under the model's dtype, marks the adapter parameters trainable (`set_trainable_params(model,
get_adapter_params(model))`), loads the base weights with `strict=False`, calls `initialize_dora_magnitude()` on
every DoRA layer, then loads the adapter weights (none for a fresh run). `attach` does the same on the one-layer
model: a `LoRALinear` / `DoRALinear(in_dim, out_dim, rank, alpha, dropout, use_bias)` built under the base's dtype
replaces the Linear. `merge` is torchtune's: `get_merged_lora_ckpt(state_dict, rank, alpha)`, loaded into a plain
Linear (the base model's format). `disabled` is `disable_adapter(model)`.

The recipe's `training.set_default_dtype` is four lines around `torch.set_default_dtype`; `torchtune.training` does
not import beside the torchao release PEFT accepts (docs: outside_libraries), so `_default_dtype` here does the same.
The adapter takes the model's dtype, as in the recipe.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata

import torch
from torch import nn

from spec.schema import Deviation, Spec

from . import BACKENDS
from .library import import_library
from ..strategies import Case
from .protocol import Errors, Fields

DEFAULTS = {"r": 8, "alpha": 16.0, "rslora": False, "dropout": 0.0}
TENSORS = {"lora": {"A": "lora_a.weight", "B": "lora_b.weight"},
           "dora": {"A": "lora_a.weight", "B": "lora_b.weight", "m": "magnitude"}}
CLASSES = {"lora": "LoRALinear", "dora": "DoRALinear"}
# What torchtune lacks, in its own words (file:line in torchtune 0.6.1).
LACKS = {
    "detach": "torchtune has no function that removes its adapter layers; the adapter is disabled "
              "(disable_adapter, torchtune/modules/peft/_utils.py:211) or merged (get_merged_lora_ckpt, _utils.py:159)",
    "conv1d": "LoRALinear holds its own nn.Linear weight: \"linear = nn.Linear(in_features=in_dim, "
              "out_features=out_dim, bias=self.use_bias)\" (torchtune/modules/peft/lora.py:68); there is no "
              "fan_in_fan_out or transposed layout",
    "quantized": "\"quantize_base (bool): Whether to quantize base linear weight or not.\" "
                 "(torchtune/modules/peft/lora.py:33): torchao's NF4 (to_nf4, lora.py:72), not bitsandbytes layers",
    "knobs": "torchtune's LoRALinear has no runtime knob (torchtune/modules/peft/lora.py:44-126)",
    "data": "torchtune's LoRA init is kaiming-uniform A, zero B (\"Initialize LoRA A weight to Kaiming uniform.\", "
            "torchtune/modules/peft/lora.py:303)",
    "checkpoint": "torchtune saves adapters through its checkpointers (torchtune.training.checkpointing), which "
                  "read rank and alpha from the recipe's config; torchtune.modules.peft has get_adapter_state_dict "
                  "(tensors only, torchtune/modules/peft/_utils.py:112)",
    "base_hash": "get_adapter_state_dict holds the adapter tensors only (torchtune/modules/peft/_utils.py:112)",
    "config_checks": "LoRALinear checks only its quantization arguments (\"``quantize_base`` is False, but "
                     "received the following quantization arguments\", torchtune/modules/peft/lora.py:63-66)",
    "model": "this backend adapts one-layer models: torchtune builds adapted models from its own model builders "
             "(torchtune.models.*.lora_*), not by targeting a transformers model",
    "scale": "LoRALinear's scale is alpha / rank from the constructor (torchtune/modules/peft/lora.py:125)",
    "patterns": "get_merged_lora_ckpt takes one rank and alpha for the whole model (\"rank (int): The rank of LoRA "
                "matrices.\", torchtune/modules/peft/_utils.py:174)",
    "multi_adapter": "LoRALinear holds one lora_a / lora_b pair (torchtune/modules/peft/lora.py:82-83)",
    "embedding": "torchtune.modules.peft has LoRALinear, DoRALinear and QATLoRALinear only (its __init__.py:18-19)",
    "conv2d": "torchtune.modules.peft has LoRALinear, DoRALinear and QATLoRALinear only (its __init__.py:18-19)",
    "lora_bias": "torchtune's lora_b is nn.Linear(..., bias=False) (torchtune/modules/peft/lora.py:83)",
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """torchtune.training.set_default_dtype: build the model's parameters in `dtype`."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class TorchtuneBackend:
    """torchtune.modules.peft's LoRALinear and DoRALinear, set up as its LoRA recipe sets them up."""

    name = "torchtune"
    requirements = ("torchtune==0.6.1", "torchao==0.16.0", "datasets==5.2.0", "omegaconf==2.4.0",
                    "sentencepiece==0.2.3", "tiktoken==0.14.0")
    no_deps = ("torchtune", "torchao")  # torchtune requires torchdata==0.11.0, which would replace the pinned torch
    errors = Errors(config=(ValueError, ZeroDivisionError), attach=(RuntimeError, ValueError),
                    checkpoint=(RuntimeError, KeyError))

    def __init__(self):
        self.peft = import_library("torchtune.modules.peft", self.name)
        self.version = importlib.metadata.version("torchtune")

    def applies(self, spec: Spec) -> str | None:
        if spec.name in CLASSES:
            return None
        return ("torchtune.modules.peft has LoRALinear, DoRALinear and QATLoRALinear only "
                "(torchtune/modules/peft/__init__.py:18-19)")

    def source_class(self, spec: Spec) -> type | None:
        """The torchtune class this backend drives for the spec (its file is what a failure points into)."""
        return getattr(self.peft, CLASSES[spec.name]) if spec.name in CLASSES else None

    def sites(self, spec: Spec) -> dict:
        """Where a failing property's computation lives in torchtune: by property, "*" for the rest."""
        cls = self.source_class(spec)
        merge = self.peft.get_merged_lora_ckpt
        out = {"*": cls.forward, "merge": merge, "merge_oracle": merge, "init_formula": cls.initialize_parameters,
               "init_distribution": cls.initialize_parameters, "training_step": cls.__init__,
               "trainable_set": self.peft.set_trainable_params, "disable_restores": self.peft.disable_adapter}
        if hasattr(cls, "initialize_dora_magnitude"):
            out.update(init_formula=cls.initialize_dora_magnitude, identity_at_init=cls.initialize_dora_magnitude)
        return out

    def supports(self, spec: Spec, case: Case) -> str | None:
        if case.fields.get("rslora"):
            return "torchtune has no rsLoRA: \"(self.alpha / self.rank) * self.lora_b(lora_out)\" (lora.py:125)"
        return None

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        return LACKS.get(capability)

    def deviation(self, spec: Spec, prop: str) -> Deviation | None:
        """torchtune's DoRA drops the input of the LoRA branch only; the magnitude correction rides on the undropped
        base output. Read from its source: no torchtune docstring or doc page says so (undocumented)."""
        if spec.name != "dora" or prop != "dropout":
            return None
        return Deviation(
            "dropout", "undocumented: torchtune's DoRALinear applies dropout to the LoRA branch's input only, and "
            "its magnitude term multiplies the undropped base output: `base_out = F.linear(x, self.weight, "
            "self.bias)` (:168), `x = self.dropout(x)` (:172), `dora_out = (mag_norm_scale - 1) * base_out + "
            "mag_norm_scale * lora_out * self.scaling` (:187-189), so y = m/n (W x + b) + m/n s B A x_d, where the "
            "spec (PEFT's treatment) has W x + b + (m/n - 1) W x_d + m/n s B A x_d. The two agree in expectation "
            "over the mask (E[x_d] = x), not per mask; the DoRA paper fixes no dropout placement. The bias term is "
            "the separate bias_invariance finding",
            backend=self.name, source="torchtune/modules/peft/dora.py:168,172,187-191 (0.5.0 and 0.6.1)",
            match="train-mode output is not the hand computation with the shared dropout mask")

    def spec_config(self, spec: Spec, case: Case, **over):
        return Fields.of(DEFAULTS, case, {k: v for k, v in over.items() if k != "param_dtype"})

    def attach(self, model: nn.Module, spec: Spec, case: Case, calibration=None, **over) -> nn.Module:
        """The recipe's order: build under the model dtype, set trainable params, load the base weights
        (strict=False), initialize_dora_magnitude, load the adapter (none: a fresh run)."""
        base = model.layer
        if type(base) is not nn.Linear:
            raise TypeError(f"torchtune's {CLASSES[spec.name]} replaces an nn.Linear, not {type(base).__name__}")
        cfg = self.spec_config(spec, case, **over)
        d_out, d_in = base.weight.shape
        cls = getattr(self.peft, CLASSES[spec.name])
        with _default_dtype(base.weight.dtype), torch.device(base.weight.device):
            new = cls(d_in, d_out, rank=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_bias=base.bias is not None)
        holder = nn.Module()
        holder.layer = new
        self.peft.set_trainable_params(holder, self.peft.get_adapter_params(holder))
        missing, unexpected = new.load_state_dict(base.state_dict(), strict=False)
        if unexpected:
            raise RuntimeError(f"torchtune layer did not take the base weights: unexpected {unexpected}")
        for m in new.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()
        new.train(model.training)
        model.__dict__["_torchtune"] = {"original": base, "rank": cfg.r, "alpha": cfg.alpha}
        model.layer = new
        return model

    def merge(self, model) -> None:
        """get_merged_lora_ckpt on the model's state dict (module names as keys, as the recipe passes it: the
        function finds the adapted modules by the key prefixes), loaded into the original (plain Linear) layer."""
        state = self.peft.get_merged_lora_ckpt({k: v.detach().clone() for k, v in model.state_dict().items()},
                                               rank=model.__dict__["_torchtune"]["rank"],
                                               alpha=model.__dict__["_torchtune"]["alpha"])
        original = model.__dict__.pop("_torchtune")["original"]
        # strict: the merged checkpoint is in the base model's format
        original.load_state_dict({k.removeprefix("layer."): v for k, v in state.items()})
        original.train(model.training)
        model.layer = original

    @contextlib.contextmanager
    def disabled(self, model):
        with self.peft.disable_adapter(model):
            yield

    def tensors(self, model) -> dict[str, torch.Tensor]:
        layer = model.layer
        params = dict(layer.named_parameters())
        kind = "dora" if hasattr(layer, "magnitude") else "lora"
        return {ours: params[theirs] for ours, theirs in TENSORS[kind].items()}

    def knobs(self, model) -> dict[str, float]:
        return {}

    def base_weight(self, model) -> torch.Tensor:
        return model.layer.weight

    def base_bias(self, model):
        return model.layer.bias

    def dequantized(self, layer) -> torch.Tensor:
        return layer.weight

    def hooks_left(self, model) -> list[str]:
        return [n or "<root>" for n, m in model.named_modules()
                if callable(getattr(m, "adapter_params", None)) or m._forward_hooks or m._forward_pre_hooks]


BACKENDS["torchtune"] = TorchtuneBackend
