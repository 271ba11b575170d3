"""loralib (Microsoft's original LoRA, `pip install loralib`) as a backend, driven the way its README drives it.

    nox -s verify -- --backend loralib [--version 0.1.1]          (its own environment, tools/envs.py)
    nox -s verify -- --backend loralib-merged                     (the same through lora.MergedLinear)

A user replaces a layer by its loralib counterpart (`lora.Linear(in, out, r=, lora_alpha=, lora_dropout=,
fan_in_fan_out=)`, `lora.MergedLinear(..., enable_lora=[...])`, `lora.Embedding`), loads the pretrained weights
with `load_state_dict(strict=False)`, then calls `lora.mark_only_lora_as_trainable(model)`; so does `attach`.
transformers' transposed Conv1D (GPT-2) is the README's `fan_in_fan_out=True` case. The layer keeps loralib's
default `merge_weights=True`: `eval()` folds s*B@A into `weight` and `train()` subtracts it again
(`mode_switch_merges`), so `merge_adapter` / `unmerge_adapter` are `eval()` / `train()` on the layer, and `merge`
is what a user deploys: `eval()`, then the merged state dict loaded into the original layer.

The backend's `base_weight` is the weight as it was at attach while the layer is merged (its `weight` then holds
W + s*B@A), the live weight otherwise.

`loralib-merged` drives `lora.MergedLinear` with `enable_lora=[True]` (one group: the lora spec's B@A, computed
through MergedLinear's grouped conv1d and zero padding, `merge_AB`).
"""
from __future__ import annotations

import importlib
import importlib.metadata

import torch
from torch import nn

from impl import layers
from spec.schema import Deviation, Spec

from . import BACKENDS
from .library import import_library
from ..strategies import Case
from .protocol import Errors, Fields

DEFAULTS = {"r": 8, "alpha": 16.0, "rslora": False, "dropout": 0.0}  # the specs' field names; r, alpha drawn per case
# What loralib lacks, in its own words (file:line at 0.1.2; the README is the wheel's METADATA description).
LACKS = {
    "detach": "loralib has no function that removes its layers again: its README's steps are replace the layer, "
              "mark_only_lora_as_trainable, save lora_state_dict (README, METADATA:94-127)",
    "quantized": "\"We only support `nn.Linear`, `nn.Embedding`, and `nn.Conv2d` for now.\" (README, METADATA:94)",
    "knobs": "loralib's layers have no runtime knob (loralib/layers.py:90-151)",
    "data": "loralib has no data-driven init: A is kaiming-uniform, B zeros (loralib/layers.py:119-124)",
    "checkpoint": "\"When saving a checkpoint, generate a `state_dict` that only contains LoRA parameters.\" "
                  "(README, METADATA:115): lora_state_dict holds the tensors only (loralib/utils.py:33-36), not r, "
                  "lora_alpha or lora_dropout, so a fresh model cannot be rebuilt from it",
    "base_hash": "lora_state_dict holds no record of the base weights (loralib/utils.py:33-36)",
    "config_checks": "loralib checks no config value: r=0 silently builds no adapter (\"if r > 0:\", "
                     "loralib/layers.py:109)",
    "model": "loralib adapts the layers the user replaces by hand; it has no target selection over a model",
    "scale": "loralib's scaling is fixed at lora_alpha / r when the layer is built (loralib/layers.py:112)",
    "patterns": "loralib has no per-layer config: each replaced layer takes its own r, so this backend has no "
                "pattern API to drive",
    "multi_adapter": "loralib's layers hold one lora_A / lora_B pair (loralib/layers.py:110-111)",
    "conv2d": "lora.Conv2d factorises the kernel with rank r*kernel_size (lora_A (r*k, c_in*k), lora_B "
              "(c_out/groups*k, r*k), loralib/layers.py:253-258), which is not the spec's Linear layout of the "
              "flattened kernel",
    "lora_bias": "loralib has no adapter-output bias (lora_B is a bare (out, r) Parameter, loralib/layers.py:111)",
}


class LoralibBackend:
    """loralib's lora.Linear (and, through attach_kind, lora.Embedding) as its README uses them."""

    name = "loralib"
    requirements = ("loralib==0.1.2",)
    mode_switch_merges = True  # merge_weights=True: eval() merges, train() unmerges (README, METADATA:160)
    layer_class = "Linear"
    checkpoint_suffix = ".pt"
    errors = Errors(config=(AssertionError, TypeError, ValueError), attach=(AssertionError, RuntimeError, TypeError),
                    checkpoint=(RuntimeError, KeyError))

    def __init__(self):
        self.lora = import_library("loralib", self.name)
        self.version = importlib.metadata.version("loralib")

    # ---- applicability

    def applies(self, spec: Spec) -> str | None:
        if spec.name == "lora":
            return None
        return ("loralib has LoRA only: \"We only support `nn.Linear`, `nn.Embedding`, and `nn.Conv2d` for now.\" "
                "(README, METADATA:94), each with lora_A / lora_B")

    def source_class(self, spec: Spec) -> type | None:
        """The loralib class this backend drives for the spec (its file is what a failure points into)."""
        return getattr(self.lora, self.layer_class) if spec.name == "lora" else None

    def sites(self, spec: Spec) -> dict:
        """Where a failing property's computation lives in loralib: by property, "*" for the rest."""
        cls = self.source_class(spec)
        merge = cls.train  # merge_weights=True: eval() (= train(False)) merges, train() unmerges
        return {"*": cls.forward, "merge": merge, "merge_oracle": merge, "unmerge_restores": merge,
                "init_formula": cls.reset_parameters, "init_distribution": cls.reset_parameters,
                "trainable_set": self.lora.mark_only_lora_as_trainable, "training_step": cls.__init__,
                "layer_kinds": self.lora.Embedding.forward, "dropout_live": merge}

    def supports(self, spec: Spec, case: Case) -> str | None:
        if case.fields.get("rslora"):
            return "loralib has no rsLoRA: self.scaling = self.lora_alpha / self.r (loralib/layers.py:112)"
        return None

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        return LACKS.get(capability)

    def deviation(self, spec: Spec, prop: str) -> Deviation | None:
        """loralib's documented mode switch: eval() merges s*B@A into weight, so an eval-mode output is the merged
        layer's, equal to the unmerged one up to rounding only."""
        if prop != "dropout_live":
            return None
        return Deviation("dropout_live", "\"Calling `model.eval()` will trigger the merging of LoRA parameters with "
                         "the corresponding pretrained ones\": eval mode computes (W + s B A) x, which differs from "
                         "W x + s B A x by rounding", backend=self.name,
                         source="loralib README (METADATA:160); loralib/layers.py:137-141",
                         match="eval mode with dropout differs from dropout 0")

    # ---- config and attach

    def spec_config(self, spec: Spec, case: Case, **over):
        return Fields.of(DEFAULTS, case, {k: v for k, v in over.items() if k != "param_dtype"})

    def _build(self, d_in: int, d_out: int, cfg, fan_in_fan_out: bool, bias: bool, dtype, device):
        kw = dict(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, fan_in_fan_out=fan_in_fan_out,
                  bias=bias, dtype=dtype, device=device)
        if self.layer_class == "MergedLinear":
            return self.lora.MergedLinear(d_in, d_out, enable_lora=[True], **kw)
        return self.lora.Linear(d_in, d_out, **kw)

    def attach(self, model: nn.Module, spec: Spec, case: Case, calibration=None, **over) -> nn.Module:
        """Replace model.layer by its loralib counterpart, load the base weights with strict=False, mark only
        lora_ as trainable (the README's steps 2, 3 and 5). The adapter takes the base's dtype (weight.new_zeros)."""
        base = model.layer
        cfg = self.spec_config(spec, case, **over)
        if type(base) is nn.Linear:
            fan_in_fan_out, (d_out, d_in) = False, base.weight.shape
        elif type(base).__name__ == "Conv1D":  # transformers' transposed storage: (d_in, d_out)
            fan_in_fan_out, (d_in, d_out) = True, base.weight.shape
        else:
            raise TypeError(f"loralib replaces nn.Linear (or a fan_in_fan_out layer), not {type(base).__name__}")
        new = self._build(d_in, d_out, cfg, fan_in_fan_out, base.bias is not None, base.weight.dtype,
                          base.weight.device)
        missing, unexpected = new.load_state_dict(base.state_dict(), strict=False)
        if unexpected or set(missing) - {"lora_A", "lora_B"}:
            raise RuntimeError(f"loralib layer did not take the base weights: missing {missing}, unexpected {unexpected}")
        new.train(model.training)
        model.__dict__["_loralib"] = {"original": base, "base": self._dense(new).detach().clone()}
        model.layer = new
        self.lora.mark_only_lora_as_trainable(model)
        return model

    def attach_kind(self, model: nn.Module, spec: Spec, case: Case, lora_bias: bool = False, **over) -> nn.Module:
        """An nn.Embedding replaced by lora.Embedding (transformers' scaled embedding by a subclass that keeps
        its embed_scale on the output, as a user replacing it must write)."""
        if lora_bias:
            raise TypeError(LACKS["lora_bias"])
        base = model.layer
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"loralib's attach_kind takes an nn.Embedding, not {type(base).__name__}")
        cfg = self.spec_config(spec, case, **over)
        cls = self.lora.Embedding if not hasattr(base, "embed_scale") else _scaled_embedding(self.lora)
        new = cls(base.num_embeddings, base.embedding_dim, r=cfg.r, lora_alpha=cfg.alpha,
                  padding_idx=base.padding_idx, dtype=base.weight.dtype, device=base.weight.device)
        if hasattr(base, "embed_scale"):
            new.embed_scale = base.embed_scale
        new.load_state_dict(base.state_dict(), strict=False)
        new.train(model.training)
        model.__dict__["_loralib"] = {"original": base, "base": base.weight.detach().t().clone()}
        model.layer = new
        self.lora.mark_only_lora_as_trainable(model)
        return model

    # ---- merge

    def merge_adapter(self, model) -> None:
        """loralib's merge: eval() folds s*B@A into weight (merge_weights=True)."""
        model.layer.eval()

    def unmerge_adapter(self, model) -> None:
        """loralib's unmerge: train() subtracts s*B@A from weight again."""
        model.layer.train()

    def merge(self, model) -> None:
        """What a user deploys: eval() merges, and the merged state dict goes into the original layer
        (strict=False drops lora_A / lora_B)."""
        layer = model.layer
        layer.eval()
        original = model.__dict__["_loralib"]["original"]
        original.load_state_dict(layer.state_dict(), strict=False)
        original.train(model.training)
        model.layer = original
        model.__dict__.pop("_loralib")

    # ---- tensors

    def tensors(self, model) -> dict[str, torch.Tensor]:
        layer = model.layer
        return {"A": layer.lora_A, "B": layer.lora_B}

    def kind_tensors(self, model) -> dict[str, torch.Tensor]:
        """lora.Embedding's lora_A (r, num_embeddings) and lora_B (embedding_dim, r): the spec's A (r, d_in) and
        B (d_out, r) with W = the embedding matrix transposed."""
        return self.tensors(model)

    def knobs(self, model) -> dict[str, float]:
        return {}

    def _dense(self, layer) -> torch.Tensor:
        if isinstance(layer, nn.Embedding):
            return layer.weight.t()
        if getattr(layer, "fan_in_fan_out", False):
            return layer.weight.t()
        return layers.dense_weight(layer)

    def base_weight(self, model) -> torch.Tensor:
        """The dense base weight (d_out, d_in): the copy taken at attach while the layer is merged (its weight
        then holds W + s*B@A), else the live weight."""
        layer = model.layer
        if isinstance(layer, self.lora.LoRALayer) and layer.merged:
            return model.__dict__["_loralib"]["base"]
        return self._dense(layer)

    def base_bias(self, model):
        return model.layer.bias

    def dequantized(self, layer) -> torch.Tensor:
        return self._dense(layer)

    def hooks_left(self, model) -> list[str]:
        return [n or "<root>" for n, m in model.named_modules()
                if isinstance(m, self.lora.LoRALayer) or m._forward_hooks or m._forward_pre_hooks]


def _scaled_embedding(lora):
    class ScaledEmbedding(lora.Embedding):
        """lora.Embedding with transformers' embed_scale on its output (BartScaledWordEmbedding's forward)."""

        def forward(self, x):
            return super().forward(x) * self.embed_scale

    return ScaledEmbedding


class LoralibMergedBackend(LoralibBackend):
    """loralib's lora.MergedLinear with one enabled group (enable_lora=[True]): the lora spec through
    MergedLinear's grouped path."""

    name = "loralib-merged"
    requirements = ("loralib==0.1.2",)
    mode_switch_merges = True
    layer_class = "MergedLinear"

    def attach_kind(self, model, spec, case, lora_bias=False, **over):
        raise TypeError("loralib-merged drives MergedLinear only (the loralib backend drives lora.Embedding)")

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        if capability in ("embedding", "scaled_embedding"):
            return "this backend drives lora.MergedLinear; lora.Embedding is verified by the loralib backend"
        return super().unsupported(spec, capability)


BACKENDS["loralib"] = LoralibBackend
BACKENDS["loralib-merged"] = LoralibMergedBackend
