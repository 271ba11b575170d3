r"""tinylib: a researcher's own adapter library in one file, verified through examples/tinylib_backend.py.

It stands for the usual case: adapters written as forward hooks on a Linear layer, with the library's own names
(`down`, `up`, `gate`), its own config and its own errors, and no knowledge of lora-verify.

    lora:  y = W x + b + (alpha / rank) · up · down · dropout(x)    down (rank, d_in) random, up (d_out, rank) = 0
    ia3:   y = gate ⊙ (W x + b)                                       gate (d_out,) = 1; no dropout

    cfg = tinylib.Cfg("lora", rank=4, alpha=8.0)
    tinylib.wrap(model.q_proj, cfg)   # freezes the layer's weights, adds the hook and the tensors
    tinylib.save(model.q_proj, "a.safetensors"); tinylib.load(fresh.q_proj, "a.safetensors")
    tinylib.unwrap(model.q_proj)      # the plain layer again

It has no merge, no rsLoRA and no quantized layers: the backend declares those, and verify reports them `na`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__version__ = "0.1"
KINDS = {"lora": ("down", "up"), "ia3": ("gate",)}


class TinyError(Exception):
    """Anything tinylib refuses: a bad config, a layer it cannot wrap, a bad checkpoint."""


@dataclass(frozen=True)
class Cfg:
    kind: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dtype: str = "float32"  # the adapter tensors' dtype


def lora_scale(cfg: Cfg) -> float:
    """The LoRA scale alpha / rank."""
    return cfg.alpha / cfg.rank


def _check(cfg: Cfg) -> None:
    if cfg.kind not in KINDS:
        raise TinyError(f"unknown kind {cfg.kind!r}; known: {sorted(KINDS)}")
    if cfg.kind == "ia3" and cfg.dropout:
        raise TinyError(f"ia3 has no separate adapter input: dropout={cfg.dropout} is not allowed")


def _hook(layer: nn.Linear, args, y: torch.Tensor) -> torch.Tensor:
    cfg: Cfg = layer.tl_cfg
    if cfg.kind == "ia3":
        return (y.to(layer.gate.dtype) * layer.gate).to(y.dtype)
    x = F.dropout(args[0], cfg.dropout, layer.training).to(layer.down.dtype)
    return y + (lora_scale(cfg) * (x @ layer.down.t() @ layer.up.t())).to(y.dtype)


def wrap(layer: nn.Linear, cfg: Cfg) -> None:
    """Adapt a Linear layer in place: freeze its parameters, add the adapter tensors and the hook."""
    _check(cfg)
    if not isinstance(layer, nn.Linear):
        raise TinyError(f"tinylib wraps nn.Linear layers only, not {type(layer).__name__}")
    if hasattr(layer, "tl_cfg"):
        raise TinyError("this layer is already wrapped")
    dtype, dev = getattr(torch, cfg.dtype), layer.weight.device
    layer.tl_flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    layer.requires_grad_(False)
    if cfg.kind == "lora":
        down = torch.empty(cfg.rank, layer.in_features, dtype=dtype, device=dev)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        layer.down = nn.Parameter(down)
        layer.up = nn.Parameter(torch.zeros(layer.out_features, cfg.rank, dtype=dtype, device=dev))
    else:
        layer.gate = nn.Parameter(torch.ones(layer.out_features, dtype=dtype, device=dev))
    layer.tl_cfg = cfg
    layer.tl_handle = layer.register_forward_hook(_hook)


def unwrap(layer: nn.Linear) -> None:
    """Remove the hook and the adapter tensors; restore the layer's requires_grad flags."""
    layer.tl_handle.remove()
    for name in KINDS[layer.tl_cfg.kind]:
        delattr(layer, name)
    for n, p in layer.named_parameters():
        p.requires_grad_(layer.tl_flags[n])
    del layer.tl_cfg, layer.tl_handle, layer.tl_flags


def tensors(layer: nn.Linear) -> dict[str, torch.Tensor]:
    return {name: getattr(layer, name) for name in KINDS[layer.tl_cfg.kind]}


def save(layer: nn.Linear, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors(layer).items()}, str(path),
              metadata={"tinylib": json.dumps(asdict(layer.tl_cfg))})


def load(layer: nn.Linear, path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            cfg = Cfg(**json.loads(f.metadata()["tinylib"]))
            saved = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is tinylib's refusal
        raise TinyError(f"cannot read tinylib checkpoint {path}: {e}") from e
    wrap(layer, cfg)
    with torch.no_grad():
        for name, t in tensors(layer).items():
            t.copy_(saved[name])
