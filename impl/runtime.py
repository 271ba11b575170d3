"""attach / detach / merge / set_knobs: hooks on the targeted modules, no module replacement.

A hooked model keeps its class, its module names and its quantized layers. Each targeted module gets one
child `adapter` (an `Adapter` holding the variant's tensors) and one forward hook or pre-hook. Everything
attach changes is undone when it fails, so a failed attach leaves the model bit-identical.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from . import layers
from .config import Config
from .errors import AttachError, ConfigError, MergeError
from .registry import REGISTRY, TensorDecl, Variant
from .targeting import find_targets

STATE_ATTR = "_adapter_state"


class Adapter(nn.Module):
    """The adapter tensors of one targeted layer, plus what the variant's math needs to know about it.

    This is the `ad` every Variant method receives. Attributes: one per declared tensor (`ad.A`); `cfg` (the
    Config); `knobs` (runtime knob values by name, changed by set_knobs); `drop` (the dropout module for the
    adapter's input; nn.Identity when dropout is 0); `d_in`, `d_out`; `dtype` (storage dtype of frozen
    tensors), `param_dtype` (trainables); `name` (the target module's name); `kind` ("linear", "conv1d",
    "bnb4" or "bnb8"); `layer` (the base module); `variant`. Methods: `weight()`, `original()`, `bias()`,
    `tensors()`; property `rewritten`.
    """

    def __init__(self, variant: Variant, cfg: Config, layer: nn.Module, name: str):
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: no cycle in state_dict
        self.variant = variant
        self.cfg = cfg
        self.name = name
        self.kind = layers.kind(layer)
        self.d_in, self.d_out = layers.dims(layer)
        self.dtype = cfg.dtype or layers.weight_dtype(layer)
        self.param_dtype = cfg.param_dtype
        self.knobs = {k: float(getattr(cfg, k)) for k in variant.knobs}
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.original_weight: torch.Tensor | None = None  # kept when the variant rewrites the base
        self.cpu_layout = layers.hold_cpu_layout(layer)  # bitsandbytes' CPU repacking is off while attached

    def add(self, name: str, decl: TensorDecl, pool: dict | None = None) -> torch.Tensor:
        """Create the tensor `decl` declares as `self.<name>`. A shared declaration whose (name, shape, dtype,
        device) is already in `pool` (one dict per attach) reuses that tensor object instead."""
        dtype = self.param_dtype if decl.trainable else self.dtype
        device = self.layer.weight.device
        key = (name, tuple(decl.shape), dtype, device)
        if decl.shared and pool is not None and key in pool:
            self.register_buffer(name, pool[key], persistent=True)
            return pool[key]
        t = torch.empty(decl.shape, dtype=dtype, device=device)
        with torch.no_grad():
            if decl.init in ("zeros", "empty"):
                t.zero_()
            elif decl.init == "ones":
                t.fill_(1.0)
            elif decl.init == "kaiming":
                if t.dim() >= 2:
                    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
                else:
                    t.normal_(0.0, 0.02)
            elif callable(decl.init):
                decl.init(t, None)
            else:  # a number (TensorDecl validated the vocabulary)
                t.fill_(float(decl.init))
        if decl.trainable:
            self.register_parameter(name, nn.Parameter(t, requires_grad=True))
        else:
            self.register_buffer(name, t, persistent=True)
            if decl.shared and pool is not None:
                pool[key] = t
        return getattr(self, name)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor by name: trainable Parameters and persistent frozen buffers."""
        out = dict(self.named_parameters(recurse=False))
        out.update(self.named_buffers(recurse=False))
        return out

    def weight(self) -> torch.Tensor:
        """The base layer's current dense weight (d_out, d_in), dequantized for quantized layers."""
        return layers.dense_weight(self.layer)

    def original(self) -> torch.Tensor:
        """The dense base weight (d_out, d_in) as it was before this adapter rewrote it (the current one if it
        has not): a group init re-derives its basis from W itself, not from a rounded residual plus factors."""
        if self.original_weight is None:
            return self.weight()
        return self.original_weight.t() if self.kind == "conv1d" else self.original_weight

    def bias(self) -> torch.Tensor | None:
        return getattr(self.layer, "bias", None)

    @property
    def rewritten(self) -> bool:
        return self.original_weight is not None


@dataclass
class AttachState:
    cfg: Config
    variant: Variant
    targets: dict[str, nn.Module]
    base_hashes: dict[str, str]
    requires_grad: dict[str, bool]
    handles: list = field(default_factory=list)


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if len(kwargs) == 1:
        return next(iter(kwargs.values()))
    raise RuntimeError(f"adapted layer called without a single input tensor (kwargs: {sorted(kwargs)})")


def _output_hook(module, args, kwargs, y):
    ad = module.adapter
    return ad.variant.forward(ad, _input_of(args, kwargs), y)


def _input_hook(module, args, kwargs):
    ad = module.adapter
    if args:
        return (ad.variant.forward_input(ad, args[0]),) + tuple(args[1:]), kwargs
    (key,) = kwargs
    return args, {key: ad.variant.forward_input(ad, kwargs[key])}


def state_of(model: nn.Module) -> AttachState:
    st = model.__dict__.get(STATE_ATTR)
    if st is None:
        raise AttachError(f"no adapter is attached to this {type(model).__name__}")
    return st


def is_attached(model: nn.Module) -> bool:
    return STATE_ATTR in model.__dict__


def _check_attachable(model: nn.Module, cfg: Config, variant: Variant, calibration) -> dict[str, nn.Module]:
    if not isinstance(cfg, Config):
        raise ConfigError(f"attach needs a Config from impl.config(...), got {type(cfg).__name__}")
    if is_attached(model):
        raise AttachError(
            f"an adapter ('{state_of(model).cfg.variant}') is already attached to this model; detach it first"
        )
    targets = find_targets(model, cfg)
    for name, layer in targets.items():
        if "adapter" in layer._modules or hasattr(layer, "adapter"):
            raise AttachError(f"layer '{name}' already has an attribute 'adapter'")
        if layers.is_quantized(layer) and (not variant.quantized or variant.rewrites_base):
            # a variant that rewrites the base is refused here even without `quantized = False`, not by a
            # TypeError from layers.write_weight after its init ran (docs/conventions.md §5)
            raise AttachError(
                f"variant '{cfg.variant}' cannot adapt the quantized layer '{name}' ({type(layer).__name__}): "
                "it rewrites or needs the dense base weight; dequantizing, rewriting and re-quantizing would "
                "silently change the model"
            )
        d_in, d_out = layers.dims(layer)
        try:
            variant.check_layer(cfg, d_in, d_out, name)
        except (ValueError, ConfigError) as e:
            raise AttachError(str(e)) from None
    if variant.data == "required" and calibration is None:
        raise AttachError(
            f"variant '{cfg.variant}' needs calibration data: pass attach(model, cfg, calibration=batches)"
        )
    return targets


LABEL_IGNORE = -100  # a calibration token whose label is this is not a calibration token


def token_mask(batch: dict) -> torch.Tensor | None:
    """The (B, T) mask of a dict batch's calibration tokens: attention_mask != 0 and labels != LABEL_IGNORE, each
    where the batch has it (None when it has neither)."""
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    if labels is None:
        return mask
    keep = labels != LABEL_IGNORE
    return keep if mask is None else keep & mask.to(torch.bool)


def capture_inputs(model: nn.Module, targets: dict[str, nn.Module], calibration: Iterable) -> dict[str, torch.Tensor]:
    """Run the model over calibration batches and return each target's inputs as (N, d_in) fp32 on the CPU.

    A dict batch with an `attention_mask` drops the padding tokens (mask == 0) of every (B, T, d) input, and one
    with `labels` the tokens labelled LABEL_IGNORE (the Hugging Face ignore index, as PEFT's EVA use_label_mask).
    """
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    mask_now: list[torch.Tensor | None] = [None]

    def make_hook(name):
        def hook(module, args, kwargs):
            x = _input_of(args, kwargs).detach()
            mask = mask_now[0]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(torch.bool)]
            acts[name].append(x.reshape(-1, x.shape[-1]).float().cpu())

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in targets.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), layers.no_cpu_repack(model):
            for batch in calibration:
                if isinstance(batch, dict):
                    mask_now[0] = token_mask(batch)
                    model(**batch)
                elif isinstance(batch, (list, tuple)):
                    mask_now[0] = None
                    model(*batch)
                else:
                    mask_now[0] = None
                    model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for n, xs in acts.items():
        if not xs:
            raise AttachError(f"calibration data never reached layer '{n}'")
        out[n] = torch.cat(xs, 0)
    return out


def _undo(model: nn.Module, ads: Iterable[Adapter], handles: list, requires_grad: dict[str, bool],
          restore_weights: bool) -> None:
    """Remove hooks and adapters, give bitsandbytes back its CPU layout choice, restore the requires_grad flags
    and (restore_weights) every base weight a variant rewrote."""
    for h in handles:
        h.remove()
    for ad in ads:
        layer = ad.layer
        if restore_weights and ad.original_weight is not None:
            with torch.no_grad():
                layer.weight.data.copy_(ad.original_weight)
        layers.release_cpu_layout(layer, ad.cpu_layout)
        if layer._modules.get("adapter") is ad:
            del layer._modules["adapter"]
    for n, p in model.named_parameters():
        if n in requires_grad:
            p.requires_grad_(requires_grad[n])
    model.__dict__.pop(STATE_ATTR, None)


def _mode_of(layer: nn.Module) -> bool:
    """The training flag a new adapter takes: its host layer's. A model already in eval() (every from_pretrained
    model) gets an adapter in eval, so its dropout is off; model.train() / eval() later reach it as a submodule."""
    return layer.training


def _write_base(ad: Adapter, W: torch.Tensor) -> None:
    if ad.original_weight is None:
        ad.original_weight = ad.layer.weight.data.clone()
    with torch.no_grad():
        layers.write_weight(ad.layer, W)


def attach(model: nn.Module, cfg: Config, calibration: Iterable | None = None, *, _restore=None) -> nn.Module:
    """Attach the adapter described by cfg to model in place and return model.

    Freezes every base parameter, records the base hashes, runs the variant's init (and group init on
    `calibration` for data-driven variants). `_restore` (used by load) maps target -> saved tensors and
    skips every init. On any error the model is left bit-identical.
    """
    variant = REGISTRY.get(cfg.variant)() if isinstance(cfg, Config) else None
    targets = _check_attachable(model, cfg, variant, calibration if _restore is None else ())
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    hashes = {n: layers.weight_hash(m) for n, m in targets.items()}
    # every layer is calibrated on the inputs it receives in the unadapted model: captured before any adapter
    # exists, so no later layer sees activations an earlier (not yet identity) adapter produced
    calibrate = _restore is None and calibration is not None and variant.data != "none"
    acts = capture_inputs(model, targets, calibration) if calibrate else {}
    ads: dict[str, Adapter] = {}
    handles: list = []
    pool: dict = {}  # shared frozen tensors of this attach
    try:
        for name, layer in targets.items():
            ad = Adapter(variant, cfg, layer, name)
            layer.add_module("adapter", ad)
            ad.train(_mode_of(layer))
            ads[name] = ad
            for tname, decl in variant.tensors(ad.d_in, ad.d_out, cfg).items():
                ad.add(tname, decl, pool)
            if _restore is None:
                with torch.no_grad():
                    W_new = variant.init(ad, ad.weight().detach().float().clone(), cfg)
                if W_new is not None:
                    _write_base(ad, W_new)
            else:
                saved = _restore[name]
                with torch.no_grad():
                    for tname, t in ad.tensors().items():
                        t.copy_(saved[tname])
                if "base_weight" in saved:
                    _write_base(ad, saved["base_weight"].float())
            if variant.side == "output":
                handles.append(layer.register_forward_hook(_output_hook, with_kwargs=True))
            else:
                handles.append(layer.register_forward_pre_hook(_input_hook, with_kwargs=True))
        if calibrate:
            for name, X in acts.items():
                if X.shape[0] < cfg.r:
                    raise AttachError(f"layer '{name}' saw {X.shape[0]} calibration tokens, fewer than r={cfg.r}")
            with torch.no_grad():
                for name, W_new in variant.group_init(ads, acts, cfg).items():
                    _write_base(ads[name], W_new)
        for p in model.parameters():
            p.requires_grad_(False)
        for ad in ads.values():
            for p in ad.parameters(recurse=False):
                p.requires_grad_(True)
        model.__dict__[STATE_ATTR] = AttachState(cfg, variant, dict(targets), hashes, requires_grad, handles)
    except BaseException:
        _undo(model, ads.values(), handles, requires_grad, restore_weights=True)
        raise
    return model


def _remove(model: nn.Module, restore_weights: bool) -> AttachState:
    st = state_of(model)
    _undo(model, [layer.adapter for layer in st.targets.values()], st.handles, st.requires_grad, restore_weights)
    return st


def detach(model: nn.Module) -> nn.Module:
    """Remove every hook and adapter tensor, restore rewritten base weights bit-exactly and the
    requires_grad flags attach changed."""
    _remove(model, restore_weights=True)
    return model


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """The attached adapters by target name."""
    return {n: m.adapter for n, m in state_of(model).targets.items()}


def set_knobs(model: nn.Module, **knobs: float) -> None:
    """Change runtime knobs (e.g. coeff) on the live model; read on every forward."""
    st = state_of(model)
    bad = sorted(set(knobs) - set(st.variant.knobs))
    if bad:
        raise ConfigError(f"variant '{st.cfg.variant}' has no runtime knob(s) {bad}; knobs: {list(st.variant.knobs)}")
    for k, v in knobs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"knob '{k}': expected a finite number, got {v!r}")
    for ad in adapters(model).values():
        ad.knobs.update({k: float(v) for k, v in knobs.items()})


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the dense base weights and remove it, every hook and adapter tensor
    (docs/conventions.md §7)."""
    st = state_of(model)
    for name, layer in st.targets.items():
        if layers.is_quantized(layer):
            raise MergeError(f"cannot merge into the quantized layer '{name}' ({type(layer).__name__})")
    merged = {}
    with torch.no_grad():
        for name, layer in st.targets.items():
            ad = layer.adapter
            b = ad.bias()
            W2, b2 = st.variant.merged(ad, ad.weight().detach().float(), None if b is None else b.detach().float())
            merged[name] = (W2, b2)
    _remove(model, restore_weights=False)
    with torch.no_grad():
        for name, layer in st.targets.items():
            W2, b2 = merged[name]
            layers.write_weight(layer, W2)
            if b2 is not None:
                if layer.bias is None:
                    layer.bias = nn.Parameter(b2.to(layer.weight.dtype), requires_grad=False)
                else:
                    layer.bias.data.copy_(b2.to(layer.bias.dtype))
    return model
