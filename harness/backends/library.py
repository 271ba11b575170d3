"""The outside library a shipped backend drives, imported or refused in one line that says how to get it."""
from __future__ import annotations

import importlib
from types import ModuleType


def import_library(module: str, backend: str) -> ModuleType:
    """`module` imported; else RuntimeError in one line naming the import error and the nox command that builds
    the backend's environment (tools/envs.py, from the backend's declared `requirements`)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"{module} does not import here ({type(e).__name__}: {e}); `nox -s verify -- --backend "
                           f"{backend}` builds its environment") from None


def release_number(version: str) -> tuple[int, ...]:
    """'0.15.2' -> (0, 15, 2): a library release's number, compared field by field (parts that are not plain
    numbers, as in '0.5.0rc1', are left out)."""
    return tuple(int(p) for p in version.split(".") if p.isdigit())
