"""A small hook-based adapter library for LoRA-family variants.

Public API (a contract outside scripts call): `config`, `attach`, `detach`, `save`, `load`, `merge`,
`VARIANTS`; plus `set_knobs`, `adapters`, `register` and the error types.
"""
from .checkpoint import load, save
from .config import Config, config
from .errors import AdapterError, AttachError, CheckpointError, ConfigError, MergeError
from .registry import REGISTRY, TensorDecl, Variant, load_variant_module, register
from .runtime import adapters, attach, detach, is_attached, merge, set_knobs
from .variants import load_builtin_variants

load_builtin_variants()

__all__ = [
    "VARIANTS", "config", "attach", "detach", "save", "load", "merge", "set_knobs", "adapters", "is_attached",
    "register", "Variant", "TensorDecl", "Config", "load_variant_module",
    "AdapterError", "AttachError", "CheckpointError", "ConfigError", "MergeError",
]


def __getattr__(name: str):
    if name == "VARIANTS":  # always the current registry, users' own variants included
        return REGISTRY.names()
    raise AttributeError(f"module 'impl' has no attribute {name!r}")
