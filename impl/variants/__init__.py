"""One file per variant; each registers itself with `impl.registry.register` when imported."""
from __future__ import annotations

import importlib
import pkgutil


def load_builtin_variants() -> None:
    """Import every module in impl/variants so that each registers itself."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
