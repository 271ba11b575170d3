"""A backend module for tests/test_hostile_engine.py: impl's backend, misbehaving in `attach` on the variants the
HOSTILE environment variable names, e.g. HOSTILE="dora=exit,ia3=leak"; with "version=object" its version is an
object JSON cannot hold.

exit: os._exit(3)  segv: SIGSEGV to itself  sysexit: raise SystemExit(7)  kbint: raise KeyboardInterrupt
leak: torch.set_grad_enabled(False) and float64 as the default dtype, never undone (the attach then proceeds).
"""
from __future__ import annotations

import os
import signal

import torch

from harness.backends import ImplBackend, register

ACTIONS = dict(item.split("=", 1) for item in os.environ.get("HOSTILE", "").split(",") if item)


class Version:
    """A backend version that is not a string (json.dumps cannot encode it)."""

    def __str__(self) -> str:
        return "hostile-version-object"


@register
class HostileBackend(ImplBackend):
    name = "hostile"
    version = Version() if ACTIONS.get("version") == "object" else "hostile-1"

    def attach(self, model, spec, case, calibration=None, **over):
        act = ACTIONS.get(spec.name)
        if act == "exit":
            os._exit(3)
        if act == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if act == "sysexit":
            raise SystemExit(7)
        if act == "kbint":
            raise KeyboardInterrupt
        if act == "leak":
            torch.set_grad_enabled(False)
            torch.set_default_dtype(torch.float64)
        return super().attach(model, spec, case, calibration, **over)
