"""Declarative specs (one per variant) and the generic property library generated from them."""
from __future__ import annotations

import importlib
import pkgutil

from .schema import SPECS, Claim, Constraint, Deviation, Reference, Spec, TensorSpec, register


def load_builtin_specs() -> None:
    from . import variants

    for info in sorted(pkgutil.iter_modules(variants.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{variants.__name__}.{info.name}")


load_builtin_specs()

__all__ = ["SPECS", "Spec", "TensorSpec", "Constraint", "Claim", "Reference", "Deviation", "register"]
