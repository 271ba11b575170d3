"""Validated, immutable adapter configs: `impl.config(variant, **fields)`."""
from __future__ import annotations

import json
import math
from types import MappingProxyType
from typing import Any, Mapping

import regex
import torch

from .errors import ConfigError
from .registry import REGISTRY

ROLES = ("q", "k", "v", "o", "qkv", "gate", "up", "down")

COMMON: dict[str, Any] = {
    "r": 8,
    "alpha": 16.0,
    "dropout": 0.0,
    "dtype": None,  # storage dtype of frozen tensors a variant creates; None: the base weight's dtype
    "param_dtype": torch.float32,  # dtype of trainable adapter tensors
    "target_names": (),  # regexes searched in module names
    "target_roles": (),  # subset of ROLES
    "layers": None,  # tuple of layer indices, or None for all
    "exclude_names": (r"lm_head", r"embed"),
}

MAX_PATTERN_CHARS = 256  # a module-name regex longer than this is refused
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Config:
    """An immutable config. Common fields and the variant's own fields are attributes."""

    __slots__ = ("variant", "_values")

    def __init__(self, variant: str, values: Mapping[str, Any]):
        object.__setattr__(self, "variant", variant)
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"config of variant '{self.variant}' has no field '{name}'") from None

    def __setattr__(self, name, value):
        raise AttributeError("Config is immutable; use config.replace(**fields)")

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"Config({self.variant!r}, {inner})"

    @property
    def fields(self) -> Mapping[str, Any]:
        return self._values

    def replace(self, **fields) -> "Config":
        return config(self.variant, **{**self._values, **fields})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"variant": self.variant}
        for k, v in self._values.items():
            if isinstance(v, torch.dtype):
                v = str(v).removeprefix("torch.")
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        d = dict(d)
        try:
            variant = d.pop("variant")
        except KeyError:
            raise ConfigError("config dict has no 'variant'") from None
        return config(variant, **d)


def _as_dtype(name: str, v: Any, allow_none: bool) -> torch.dtype | None:
    if v is None and allow_none:
        return None
    if isinstance(v, str) and v in _DTYPES:
        return _DTYPES[v]
    if isinstance(v, torch.dtype) and v in _DTYPES.values():
        return v
    raise ConfigError(f"field '{name}': expected one of {sorted(_DTYPES)}, got {v!r}")


def _as_str_tuple(name: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = (v,)
    if not isinstance(v, (tuple, list)) or not all(isinstance(s, str) for s in v):
        raise ConfigError(f"field '{name}': expected a tuple of strings, got {v!r}")
    return tuple(v)


def _check_patterns(name: str, patterns: tuple[str, ...]) -> None:
    """Refuse a regex that is too long or does not compile; matching is time-bounded (impl.targeting)."""
    for p in patterns:
        if len(p) > MAX_PATTERN_CHARS:
            raise ConfigError(f"field '{name}': regex of {len(p)} characters is longer than {MAX_PATTERN_CHARS}")
        try:
            regex.compile(p)
        except (regex.error, RecursionError, OverflowError, ValueError) as e:
            raise ConfigError(f"field '{name}': invalid regex {p!r}: {e}") from None


def _coerce(name: str, default: Any, v: Any) -> Any:
    """Coerce a variant field to its default's type; bools and numbers are not interchangeable."""
    if default is None or v is None:
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"field '{name}': expected a bool, got {v!r}")
        return v
    if isinstance(default, (int, float)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"field '{name}': expected a finite number, got {v!r}")
        if isinstance(default, int) and not isinstance(v, int):
            raise ConfigError(f"field '{name}': expected an int, got {v!r}")
        return float(v) if isinstance(default, float) else v
    if isinstance(default, str):
        if not isinstance(v, str):
            raise ConfigError(f"field '{name}': expected a string, got {v!r}")
        return v
    if isinstance(default, tuple):
        return tuple(v)
    return v


def config(variant: str, **fields: Any) -> Config:
    """Build a validated, immutable config for `variant`. Unknown fields and bad values raise ConfigError."""
    cls = REGISTRY.get(variant)
    own = dict(cls.fields)
    clash = set(own) & set(COMMON)
    if clash:
        raise ConfigError(f"variant '{variant}' redeclares common fields {sorted(clash)}")
    unknown = sorted(set(fields) - set(COMMON) - set(own))
    if unknown:
        raise ConfigError(
            f"unknown field(s) {unknown} for variant '{variant}'; valid: {sorted(COMMON) + sorted(own)}"
        )
    v = {**COMMON, **own, **fields}

    r = v["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"field 'r': expected a positive int, got {r!r}")
    a = v["alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
        raise ConfigError(f"field 'alpha': expected a finite number >= 0, got {a!r}")
    v["alpha"] = float(a)
    p = v["dropout"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(f"field 'dropout': expected a number in [0, 1), got {p!r}")
    v["dropout"] = float(p)
    if p > 0 and not cls.dropout:
        raise ConfigError(
            f"field 'dropout': variant '{variant}' has no separate adapter input, so dropout={p} would drop "
            "part of the base layer; use dropout=0"
        )
    v["dtype"] = _as_dtype("dtype", v["dtype"], allow_none=True)
    v["param_dtype"] = _as_dtype("param_dtype", v["param_dtype"], allow_none=False)
    for name in ("target_names", "target_roles", "exclude_names"):
        v[name] = _as_str_tuple(name, v[name])
    for name in ("target_names", "exclude_names"):
        _check_patterns(name, v[name])
    bad_roles = [x for x in v["target_roles"] if x not in ROLES]
    if bad_roles:
        raise ConfigError(f"field 'target_roles': unknown role(s) {bad_roles}; valid: {list(ROLES)}")
    if v["layers"] is not None:
        layers = v["layers"]
        if isinstance(layers, int):
            layers = (layers,)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ConfigError(f"field 'layers': expected a tuple of non-negative ints, got {v['layers']!r}")
        v["layers"] = tuple(layers)
    for name, default in own.items():
        v[name] = _coerce(name, default, v[name])
    cfg = Config(variant, v)
    cls.validate(cfg)
    return cfg
