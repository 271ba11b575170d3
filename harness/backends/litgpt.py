"""litgpt (Lightning AI) as a backend: its `LoRALinear` and fused `LoRAQKVLinear`, as litgpt's own model code uses
them.

    python -m tools.verify --backend litgpt    (in an environment with `requirements` installed)

litgpt builds the LoRA layers into its own GPT (litgpt/lora.py: `LoRALinear` for every projection, `LoRAQKVLinear`
for the fused attention input with `enable_lora=(query, key, value)` and grouped queries), loads the pretrained
weights with `strict=False`, then calls `mark_only_lora_as_trainable`. Here the one-layer model's `layer` is replaced
by the same class holding the base weights, in the same order: build, load the base weights, trainable flags.
The whole layer takes one dtype (litgpt builds the model under the precision's dtype: `fabric.init_module()`), and
the float64 cases build it in float64. `merge` is `merge_lora_weights` (one way: a `merged` flag); a checkpoint is
the LoRA tensors that litgpt's `lora_filter` keeps, as `torch.save` writes them, with the layer's hyperparameters
(litgpt keeps them in a `hyperparameters.yaml` beside it), loaded with `load_state_dict(..., strict=False)`.

Variants: `lora` (LoRALinear) and `lora_qkv` (LoRAQKVLinear, spec/variants/lora_qkv.py). What litgpt lacks is
quoted from litgpt 0.5.13 (`LACKS`, file:line).
"""
from __future__ import annotations

from importlib.metadata import version as _version

import torch
from torch import nn

from impl import layers
from spec.schema import Deviation, Spec

from . import BACKENDS
from .library import import_library, release_number
from ..strategies import Case
from .protocol import Errors, Fields

# What litgpt 0.5.13 lacks, in its own words (litgpt/lora.py unless named).
LACKS = {
    "detach": "litgpt has no detach or unmerge: `merge` is one way (\"Merges the LoRA weights into the full-rank "
              "weights (W = W + delta_W).\", litgpt/lora.py:143) and nothing removes a LoRALinear",
    "conv1d": "litgpt's LoRA layers hold their own `self.linear = torch.nn.Linear(in_features, out_features, "
              "**kwargs)` (litgpt/lora.py:121): transformers' Conv1D is not a layer it adapts",
    "quantized": "litgpt's LoRA layers build a plain `torch.nn.Linear` (litgpt/lora.py:121); quantization is "
                 "Lightning's BitsandbytesPrecision plugin on CUDA (litgpt/utils.py), not a layer this backend wraps",
    "knobs": "litgpt's LoRA layers have no runtime knob",
    "data": "litgpt's LoRA has no data-driven init",
    "base_hash": "litgpt loads an adapter with `model.load_state_dict(state_dict, strict=strict)` "
                 "(litgpt/utils.py:393, load_checkpoint): nothing checks the base weights",
    "config_checks": "litgpt checks only `assert r >= 0` (litgpt/lora.py:77); r = 0 is its way to switch LoRA off "
                     "(\"if self.r == 0 or self.merged: return pretrained\", litgpt/lora.py:169-170)",
    "model": "litgpt adapts its own GPT (litgpt/lora.py: `GPT(BaseModel)`), not transformers models",
    "scale": "litgpt's scale is fixed at construction: `self.scaling = self.lora_alpha / self.r` (litgpt/lora.py:127)",
    "patterns": "litgpt has one `lora_r` and one `lora_alpha` per model (`lora_r: int = 0`, `lora_alpha: int = 1`, litgpt/lora.py:467-468)",
    "multi_adapter": "litgpt has one LoRA pair per layer (`self.lora_A`, `self.lora_B`, litgpt/lora.py:125-126)",
    "embedding": "litgpt has no LoRA embedding (litgpt/lora.py defines LoRALinear and LoRAQKVLinear only)",
    "conv2d": "litgpt has no LoRA Conv2d (litgpt/lora.py defines LoRALinear and LoRAQKVLinear only)",
    "lora_bias": "litgpt's LoRA has no adapter-output bias",
}
CLASSES = {"lora": "LoRALinear", "lora_qkv": "LoRAQKVLinear"}


def _layout(spec: Spec, case: Case) -> dict:
    """lora_qkv's layout fields for the case (the spec's default layout where the case drew none)."""
    if spec.name != "lora_qkv" or "head_size" in case.fields:
        return {}
    from spec.variants.lora_qkv import default_layout

    return default_layout(case.d_out)


class LitgptBackend:
    """litgpt 0.5.13's LoRA layers, driven the way litgpt's model code and recipes drive them."""

    name = "litgpt"
    requirements: tuple[str, ...] = ("litgpt==0.5.13", "lightning==2.6.6")
    # litgpt 0.4.x pins `lightning==2.4.0.dev20240728` in its wheel's METADATA (0.5.13 asks `lightning>=2.6.1`)
    release_requirements: dict[str, tuple[str, ...]] = {"<0.5": ("lightning==2.4.0.dev20240728",)}
    without: tuple[str, ...] = ()
    errors = Errors(config=(AssertionError, ValueError, TypeError), attach=(AssertionError, ValueError, TypeError),
                    checkpoint=(RuntimeError, KeyError, ValueError))
    checkpoint_suffix = ".pth"  # litgpt's lit_model.pth.lora: torch.save

    def __init__(self, module: str = "litgpt.lora"):
        # `module`: where LoRALinear & co. come from (a planted-bug copy in the tests)
        self.lora = import_library(module, self.name)
        try:
            self.version = _version("litgpt")
        except Exception:  # noqa: BLE001 - a copy outside an installed distribution
            self.version = None

    # ---- applicability

    def applies(self, spec: Spec) -> str | None:
        if spec.name in CLASSES:
            return None
        return f"litgpt has no '{spec.name}' (litgpt/lora.py adapts with LoRALinear and LoRAQKVLinear only)"

    def supports(self, spec: Spec, case: Case) -> str | None:
        if case.fields.get("rslora"):
            return "litgpt has no rsLoRA: `self.scaling = self.lora_alpha / self.r` (litgpt/lora.py:127)"
        if spec.name == "lora_qkv" and len(case.batch) != 2:  # its grouped conv1d reads (B, T, C) only
            return ("litgpt's fused layer takes 3-D input only: \"x: input tensor of shape (batch_size, "
                    "context_length, embedding_size)\" (litgpt/lora.py:388, LoRAQKVLinear.forward)")
        parts = [case.fields.get(k, True) for k in ("enable_q", "enable_k", "enable_v")]
        if spec.name == "lora_qkv" and not all(parts) and self._interleaved():
            return ("litgpt before 0.5 interleaves the fused rows per query group, \"Q, K, and V weights are "
                    "interleaved, so that weights for grouped queries are adjacent to their associated key and value "
                    "weights\" (litgpt/lora.py:301, LoRAQKVLinear.zero_pad; the rows of the enabled parts: lora_ind, "
                    ":265-286, litgpt 0.4.13), where the spec's layout is 0.5's [q | k | v]: with a part disabled "
                    "the update lands on other rows")
        return None

    def _interleaved(self) -> bool:
        """litgpt < 0.5: the fused q/k/v rows are interleaved per query group (0.5 stacks them [q | k | v])."""
        number = release_number(self.version or "")
        return len(number) >= 2 and number[:2] < (0, 5)

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        return LACKS.get(capability)

    def deviation(self, spec: Spec, prop: str) -> Deviation | None:
        """litgpt's LoRA tensors take the model's dtype: a bf16 model is built and trained in bf16 ('bf16-true',
        its default for a model that is not trained in mixed precision), where a bf16 tensor of size ~0.5 does not
        move under one AdamW step at lr 1e-3 (docs/conventions.md §1)."""
        if prop != "training_step":
            return None
        return Deviation("training_step", "litgpt builds the whole model, LoRA tensors included, in the precision's "
                         "dtype (`with fabric.init_module(...): model = GPT(config)`; `dtype = {..., \"bf16-true\": "
                         "torch.bfloat16, ...}[precision]`): in bf16 a LoRA tensor of size ~0.5 does not move under "
                         "one AdamW step at lr 1e-3", backend=self.name,
                         source="litgpt/finetune/lora.py:148 and :210 (litgpt 0.5.13)", match="did not move")

    # ---- config and attach

    def spec_config(self, spec: Spec, case: Case, **over):
        over = {k: v for k, v in over.items() if k != "param_dtype"}
        return Fields.of({"dropout": 0.0, "rslora": False, **_layout(spec, case)}, case, over)

    def build(self, spec: Spec, cfg, d_in: int, d_out: int, bias: bool) -> nn.Module:
        """The litgpt layer for the config, as litgpt's GPT builds it (litgpt/lora.py, CausalSelfAttention)."""
        kw = dict(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias=bias)
        if spec.name == "lora":
            return self.lora.LoRALinear(d_in, d_out, **kw)
        return self.lora.LoRAQKVLinear(d_in, d_out, head_size=cfg.head_size, n_head=cfg.n_head,
                                       n_query_groups=cfg.n_query_groups,
                                       enable_lora=(cfg.enable_q, cfg.enable_k, cfg.enable_v), **kw)

    def _attach(self, model: nn.Module, spec: Spec, cfg, dtype) -> nn.Module:
        base = model.layer
        if type(base) is not nn.Linear:
            raise TypeError(f"litgpt adapts its own torch.nn.Linear layers, not {type(base).__name__}")
        layer = self.build(spec, cfg, base.in_features, base.out_features, base.bias is not None)
        layer.to(dtype or base.weight.dtype)  # litgpt builds the model in its dtype (fabric.init_module)...
        layer.linear.load_state_dict(base.state_dict())  # ...then loads the pretrained weights (strict=False)
        layer.train(model.training)  # as a user's model.eval() after building it reaches every layer
        model.layer = layer
        self.lora.mark_only_lora_as_trainable(model)
        model.__dict__["_litgpt_cfg"] = (spec.name, dict(cfg.fields))
        return model

    def attach(self, model: nn.Module, spec: Spec, case: Case, calibration=None, **over) -> nn.Module:
        return self._attach(model, spec, self.spec_config(spec, case, **over), over.get("param_dtype"))

    def merge(self, model) -> None:
        self.lora.merge_lora_weights(model)

    def save(self, model, path) -> None:
        """litgpt's adapter checkpoint: the tensors `lora_filter` keeps (finetune/lora.py, save_lora_checkpoint),
        with the hyperparameters litgpt writes beside it."""
        name, fields = model.__dict__["_litgpt_cfg"]
        sd = {k: v for k, v in model.state_dict().items() if self.lora.lora_filter(k, v)}
        torch.save({"model": sd, "hyperparameters": {"variant": name, **fields}}, str(path))

    def load(self, model, path) -> None:
        from spec import SPECS

        ckpt = torch.load(str(path), weights_only=True)
        hp = dict(ckpt["hyperparameters"])
        spec = SPECS.get(hp.pop("variant"))
        sd = ckpt["model"]
        self._attach(model, spec, Fields(hp), next(iter(sd.values())).dtype)
        model.load_state_dict(sd, strict=False)

    # ---- tensors

    def _layer(self, model) -> nn.Module:
        layer = model.layer
        if not isinstance(layer, self.lora.LoRALinear):
            raise RuntimeError(f"model.layer is {type(layer).__name__}, not a litgpt LoRA layer")
        return layer

    def tensors(self, model) -> dict[str, torch.Tensor]:
        layer = self._layer(model)
        return {"A": layer.lora_A, "B": layer.lora_B}

    def knobs(self, model) -> dict[str, float]:
        return {}

    def base_weight(self, model) -> torch.Tensor:
        layer = model.layer
        return layers.dense_weight(getattr(layer, "linear", layer))

    def base_bias(self, model):
        layer = model.layer
        return getattr(layer, "linear", layer).bias

    def dequantized(self, layer) -> torch.Tensor:
        return layers.dense_weight(layer)

    def hooks_left(self, model) -> list[str]:
        """Modules whose LoRA still acts: litgpt's merge leaves the LoRA layer in place with `merged = True`, whose
        forward is then the plain linear one (litgpt/lora.py:169-170)."""
        return [n or "<root>" for n, m in model.named_modules()
                if isinstance(m, self.lora.LoRALayer) and m.r > 0 and not m.merged]


BACKENDS["litgpt"] = LitgptBackend
