r"""Zoo libraries: variants of the example library (examples/tinylib.py), each verified through a natural backend
written as a newcomer would write it (`base_weight` returns the layer's weight, nothing declared beyond what the
library does). They guard the harness's semantics rather than impl: a correct library must pass, a planted defect
must be flagged by the property that names it.

    lora:  y = W x + b + (alpha / rank) · up · down · dropout(x)    down (rank, d_in) kaiming-uniform, up = 0

- `Adapted` (with `merge_on_eval=True`): loralib's `merge_weights=True`: `eval()` folds (alpha/rank) · up · down into
  the layer's weight, `train()` takes it out again; its eval output differs from the train output by rounding only.
- `MergeDropsScale`: the fold on eval() forgets alpha/rank (the train-mode forward keeps it). With the engine's own
  copy of the base, `merge`, `merge_oracle` and `oracle` flag it; read back from the library, they compared it with
  itself.
- a library holding its adapter in the model's dtype (`Cfg.dtype=None`): correct, passes `training_step` in bf16.
- `GradientLost`: `up`'s gradient is zeroed by a hook: it really does not move (`training_step` flags it).
- `DropoutIgnored`: the merge-on-eval library without dropout (`dropout_live` flags it through rounding noise).
- `Unsqueeze2D`: written for (batch, seq, d) inputs, it adds a seq axis to a 2-D input and broadcasts the output to
  (N, N, d_out) (`oracle` flags it, on 2-D inputs only).
- `DEAD_DEFAULTS`: a library whose default alpha is 0: with its defaults the adapter is dead (no gradient reaches
  `up`); only the defaults case shows it (`gradient_pattern`).

These are libraries, not impl mutants: `MUTANTS` is empty; tests/test_zoo_libraries.py runs them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.backends.protocol import Errors, Fields

MUTANTS: list = []


class LibError(Exception):
    """Anything the library refuses."""


@dataclass(frozen=True)
class Cfg:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dtype: str | None = "float32"  # the adapter tensors' dtype; None: the layer's own dtype
    merge_on_eval: bool = False  # loralib's merge_weights


class Adapted(nn.Linear):
    """A Linear carrying a LoRA adapter (the class of a wrapped layer; `wrap` swaps it in)."""

    lib_cfg: Cfg
    lib_merged: bool  # the adapter is folded into `weight` (merge-on-eval, in eval mode)

    def scale(self) -> float:
        return self.lib_cfg.alpha / self.lib_cfg.rank

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) · up · down: what eval() folds into the weight."""
        return self.scale() * (self.up @ self.down)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.lib_cfg.dropout, self.training).to(self.down.dtype)
        return self.scale() * (x @ self.down.t() @ self.up.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lib_merged:
            return y
        return y + self.adapter(x).to(y.dtype)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lib_cfg.merge_on_eval and mode == self.lib_merged:
            with torch.no_grad():
                d = self.delta_weight().to(self.weight.dtype)
                self.weight.add_(d if not mode else -d)
            self.lib_merged = not mode
        return self


class MergeDropsScale(Adapted):
    def delta_weight(self) -> torch.Tensor:
        return self.up @ self.down  # planted: alpha / rank dropped in the fold


class GradientLost(Adapted):
    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "lib_hooked", False):  # planted: a hook left over from debugging zeroes up's gradient
            self.up.register_hook(torch.zeros_like)
            self.lib_hooked = True
        return super().adapter(x)


class DropoutIgnored(Adapted):
    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale() * (x.to(self.down.dtype) @ self.down.t() @ self.up.t())  # planted: no dropout


class Unsqueeze2D(Adapted):
    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # planted: "add the sequence axis" on the wrong side: (N, d) -> (N, 1, d)
            x = x[:, None]
        return super().adapter(x)


def wrap(layer: nn.Linear, cfg: Cfg, cls: type[Adapted] = Adapted) -> None:
    """Adapt a Linear in place: freeze it, add `down` and `up`, make it a `cls`."""
    if type(layer) is not nn.Linear:
        raise LibError(f"wraps plain nn.Linear layers only, not {type(layer).__name__}")
    if cfg.rank < 1:
        raise LibError(f"rank must be >= 1, got {cfg.rank}")
    dtype = layer.weight.dtype if cfg.dtype is None else getattr(torch, cfg.dtype)
    host_training = layer.training
    layer.lib_flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    layer.requires_grad_(False)
    down = torch.empty(cfg.rank, layer.in_features, dtype=dtype, device=layer.weight.device)
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    layer.down = nn.Parameter(down)
    layer.up = nn.Parameter(torch.zeros(layer.out_features, cfg.rank, dtype=dtype, device=layer.weight.device))
    layer.lib_cfg, layer.lib_merged = cfg, False
    layer.__class__ = cls
    layer.train(host_training)  # a fresh adapter takes its host's mode (eval: merge-on-eval folds it at once)


def unwrap(layer: Adapted) -> None:
    """The plain Linear again (unfolded first)."""
    layer.train(True)
    del layer.down, layer.up
    for n, p in layer.named_parameters():
        p.requires_grad_(layer.lib_flags[n])
    del layer.lib_cfg, layer.lib_merged, layer.lib_flags
    layer.__dict__.pop("lib_hooked", None)
    layer.__class__ = nn.Linear


def merge(layer: Adapted) -> None:
    """Fold the adapter into the weight for good (eval() folds a merge-on-eval library) and unwrap."""
    with torch.no_grad():
        if layer.lib_cfg.merge_on_eval:
            layer.eval()
        else:
            layer.weight.add_(layer.delta_weight().to(layer.weight.dtype))
    del layer.down, layer.up, layer.lib_cfg, layer.lib_merged, layer.lib_flags
    layer.__dict__.pop("lib_hooked", None)
    layer.__class__ = nn.Linear


# ----------------------------------------------------------------------------------------------- the backend

NAMES = {"A": "down", "B": "up"}
DEFAULTS = {"r": Cfg.rank, "alpha": Cfg.alpha, "rslora": False, "dropout": Cfg.dropout}
DEAD_DEFAULTS = {**DEFAULTS, "alpha": 0.0}  # a library whose Cfg.alpha defaults to 0
LACKS = {
    "conv1d": "wraps nn.Linear layers only",
    "quantized": "wraps nn.Linear layers only",
    "knobs": "no runtime knob",
    "data": "no data-driven init",
    "checkpoint": "no checkpoints",
    "base_hash": "no checkpoints",
    "config_checks": "checks its config when it wraps a layer",
    "model": "adapts the one-layer models only",
}


class LibBackend:
    """The natural backend of the zoo library: `base_weight` is the layer's weight, whatever mode it is in."""

    name = "zoo-lib"
    version = "0.1"
    errors = Errors(config=(LibError,), attach=(LibError,), checkpoint=(LibError,))
    layer_class: type[Adapted] = Adapted
    merge_on_eval = False
    model_dtype = False  # the adapter in the layer's dtype (Cfg.dtype=None)
    defaults = DEFAULTS

    def applies(self, spec) -> str | None:
        return None if spec.name == "lora" else f"the zoo library has no '{spec.name}'"

    def supports(self, spec, case) -> str | None:
        return "no rsLoRA" if case.fields.get("rslora") else None

    def unsupported(self, spec, capability: str) -> str | None:
        return LACKS.get(capability)

    def spec_config(self, spec, case, **over):
        return Fields.of(self.defaults, case, {k: v for k, v in over.items() if k != "param_dtype"})

    def attach(self, model, spec, case, calibration=None, **over):
        cfg = self.spec_config(spec, case, **over)
        dtype = over.get("param_dtype")
        name = str(dtype).removeprefix("torch.") if dtype is not None else None if self.model_dtype else "float32"
        wrap(model.layer, Cfg(rank=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, dtype=name,
                              merge_on_eval=self.merge_on_eval), self.layer_class)
        return model

    def tensors(self, model) -> dict[str, torch.Tensor]:
        return {ours: getattr(model.layer, theirs) for ours, theirs in NAMES.items()}

    def knobs(self, model) -> dict[str, float]:
        return {}

    def base_weight(self, model) -> torch.Tensor:
        return model.layer.weight

    def dequantized(self, layer) -> torch.Tensor:
        return layer.weight

    def hooks_left(self, model) -> list[str]:
        return [n or "<root>" for n, m in model.named_modules() if isinstance(m, Adapted) or m._forward_hooks]

    def detach(self, model) -> None:
        unwrap(model.layer)

    def merge(self, model) -> None:
        merge(model.layer)


def backend(layer_class: type[Adapted] = Adapted, merge_on_eval: bool = False, model_dtype: bool = False,
            defaults=DEFAULTS, **declared) -> LibBackend:
    """A backend for one variant of the library; `declared`: optional protocol members (mode_switch_merges,
    trainable_precision)."""
    attrs = dict(layer_class=layer_class, merge_on_eval=merge_on_eval, model_dtype=model_dtype, defaults=defaults,
                 **declared)
    return type(f"{layer_class.__name__}Backend", (LibBackend,), attrs)()
