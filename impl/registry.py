"""The variant protocol and the registry a variant file registers itself in.

A variant is a class with declarative attributes and a few pure tensor functions. The runtime
(`impl.runtime`) owns hooks, freezing, dtypes, layouts, quantized weights and checkpoints, so a variant
file only states its math. A user's own variant registers the same way from any importable module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .errors import ConfigError

Init = str | float | Callable[[torch.Tensor, torch.Generator | None], None]
INITS = ("zeros", "ones", "kaiming", "empty")


@dataclass(frozen=True)
class TensorDecl:
    """One adapter tensor: its shape, how it starts, whether it trains, and whether layers share it.

    init, one of:
      "zeros", "ones";
      "kaiming": kaiming-uniform with a=sqrt(5), as nn.Linear initialises its weight (for a 1-D tensor:
        normal with std 0.02); the draw comes from torch's global generator, seeded by the caller;
      "empty": zeros, to be filled by the variant's `init` or `group_init`;
      a number (e.g. 0.1): every entry set to that constant;
      a callable `fn(tensor, None)` filling the tensor in place.
    Trainable tensors are nn.Parameters in the config's `param_dtype`; frozen ones are persistent buffers in
    the config's `dtype` (default: the base weight's dtype).
    shared (frozen tensors only): every adapted layer of one attach whose declaration has the same name,
    shape and dtype holds the same tensor object (one random projection for the whole model, as VeRA does);
    it is initialised once, by the first layer, and a checkpoint stores it once.
    """

    shape: tuple[int, ...]
    init: Init = "zeros"
    trainable: bool = True
    shared: bool = False

    def __post_init__(self):
        if not isinstance(self.shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in self.shape):
            raise ConfigError(f"TensorDecl shape must be a tuple of non-negative ints, got {self.shape!r}")
        numeric = isinstance(self.init, (int, float)) and not isinstance(self.init, bool)
        if not (self.init in INITS or numeric or callable(self.init)):
            raise ConfigError(f"TensorDecl init {self.init!r} is not one of {INITS}, a number or a callable")
        if self.shared and self.trainable:
            raise ConfigError("TensorDecl: only frozen tensors (trainable=False) can be shared across layers")


class Variant:
    """Base class of every variant. Subclasses set the class attributes and implement the math.

    Every method receives `ad`, the layer's `impl.runtime.Adapter`: `ad.<name>` is each tensor `tensors()`
    declared; `ad.cfg` the Config (`ad.cfg.r`, `ad.cfg.alpha`, the variant's own `fields`); `ad.knobs` the
    runtime knob values by name; `ad.drop` the dropout module to apply to the adapter's input (an identity
    when dropout is 0); `ad.d_in`, `ad.d_out`; `ad.dtype` (frozen tensors), `ad.param_dtype` (trainables);
    `ad.weight()` the dense base weight (d_out, d_in), `ad.original()` the one before a rewrite, `ad.bias()`;
    `ad.name` the target's module name. `forward` and `forward_input` run inside the layer's hook on every
    call; `init`, `group_init` and `merged` run under torch.no_grad().
    """

    name: ClassVar[str]
    fields: ClassVar[dict[str, Any]] = {}  # the variant's own config fields and their defaults
    knobs: ClassVar[tuple[str, ...]] = ()  # runtime knobs (config fields changeable on the live model)
    side: ClassVar[str] = "output"  # "output": forward(ad, x, y); "input": forward_input(ad, x)
    dropout: ClassVar[bool] = True  # honours dropout on its adapter input; False: dropout > 0 rejected
    quantized: ClassVar[bool] = True  # works on bitsandbytes layers; False: attach raises
    rewrites_base: ClassVar[bool] = False  # init writes a residual into the base weight
    data: ClassVar[str] = "none"  # "none" | "optional" | "required" calibration data

    @classmethod
    def validate(cls, cfg) -> None:
        """Raise ConfigError for field values this variant cannot use (checked at config time)."""

    @classmethod
    def check_layer(cls, cfg, d_in: int, d_out: int, name: str) -> None:
        """Raise for a layer this config cannot adapt (default: r larger than the layer's width)."""
        if cfg.r > min(d_in, d_out):
            raise ValueError(f"r={cfg.r} exceeds min(d_in={d_in}, d_out={d_out}) of layer '{name}'")

    def tensors(self, d_in: int, d_out: int, cfg) -> dict[str, TensorDecl]:
        """The adapter tensors of one layer by name; each becomes the attribute `ad.<name>`."""
        raise NotImplementedError

    def init(self, ad, W: torch.Tensor, cfg) -> torch.Tensor | None:
        """Deterministic init from the dense fp32 base weight W (d_out, d_in). Return a new base weight
        (fp32, d_out x d_in) if the variant rewrites it, else None."""
        return None

    def group_init(self, adapters: dict, acts: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
        """Data-driven init. acts[name] is the (N, d_in) fp32 input of each target over the non-padding
        calibration tokens. Return {name: new fp32 base weight} for the layers it rewrites."""
        return {}

    def forward(self, ad, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """side "output": the adapted output from the layer's input x (..., d_in) and its base output y
        (..., d_out), in y's dtype."""
        raise NotImplementedError

    def forward_input(self, ad, x: torch.Tensor) -> torch.Tensor:
        """side "input": the input the base layer sees instead of x (..., d_in), in x's dtype."""
        raise NotImplementedError

    def merged(self, ad, W: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense (W', b') in fp32 such that F.linear(x, W', b') equals the adapted layer (eval mode)."""
        raise NotImplementedError


class Registry:
    """Name -> variant class. One instance (`REGISTRY`) serves impl and users' own variants."""

    def __init__(self) -> None:
        self._variants: dict[str, type[Variant]] = {}

    def register(self, cls: type[Variant]) -> type[Variant]:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"variant class {cls.__qualname__} has no name")
        if name in self._variants and self._variants[name] is not cls:
            raise ConfigError(f"variant '{name}' is already registered by {self._variants[name].__module__}")
        if cls.side not in ("output", "input"):
            raise ConfigError(f"variant '{name}': side must be 'output' or 'input', not {cls.side!r}")
        if cls.data not in ("none", "optional", "required"):
            raise ConfigError(f"variant '{name}': data must be none/optional/required, not {cls.data!r}")
        self._variants[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        self._variants.pop(name, None)

    def get(self, name: str) -> type[Variant]:
        try:
            return self._variants[name]
        except KeyError:
            raise ConfigError(
                f"unknown variant '{name}'; registered: {', '.join(sorted(self._variants)) or 'none'}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._variants)


REGISTRY = Registry()
register = REGISTRY.register


def load_variant_module(module: str) -> None:
    """Import a user's variant module (dotted name or path to a .py file) so it registers itself.

    Any error while importing it (a SyntaxError, a failing import, an exception in a class body or a
    register call) becomes one ConfigError naming the module's file and line.
    """
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(module)
    if path.suffix == ".py" and not path.is_file():
        raise ConfigError(f"variant module file not found: {path}")
    try:
        if path.suffix == ".py":
            mod_name = f"user_variant_{path.stem}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                del sys.modules[mod_name]
                raise
        else:
            importlib.import_module(module)
    except SyntaxError as e:
        raise ConfigError(f"variant module {module}: {e.filename}:{e.lineno}: SyntaxError: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - any import-time error is the user module's, reported as one line
        raise ConfigError(f"variant module {module}: {_where(e, path)}{type(e).__name__}: {e}") from None


def _where(exc: BaseException, path) -> str:
    """"file:line: " of the innermost traceback frame in the user's module (or the innermost frame at all)."""
    import traceback
    from pathlib import Path

    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if Path(f.filename).resolve() == Path(path).resolve()] or frames[-1:]
    return f"{own[-1].filename}:{own[-1].lineno}: " if own else ""
