"""A restore property draws its layer layouts from the backend's capabilities (`harness.probes.layouts`): a backend
lacking `conv1d` is never handed a transformers Conv1D, and one that has it runs on both layouts. (vera's
`unmerge_restores` on adapters once crashed with "this backend adapts nn.Linear base layers, not Conv1D".)"""
from __future__ import annotations

import pytest
from hypothesis import settings
from transformers.pytorch_utils import Conv1D

from harness import PROPERTIES
from harness.backends.peft import PeftBackend
from harness.engine import _COMMON, run_property
from spec import SPECS

settings.register_profile("layouts", derandomize=True, max_examples=6, **_COMMON)


class Layouts(PeftBackend):
    """The PEFT backend recording the layer type of every attach; with `conv1d=False` it lacks Conv1D as adapters
    does, and refuses one the way that backend does."""

    def __init__(self, conv1d: bool):
        super().__init__()
        self.conv1d, self.seen = conv1d, set()

    def unsupported(self, spec, capability):
        if capability == "conv1d" and not self.conv1d:
            return "this backend adapts nn.Linear base layers only"
        return super().unsupported(spec, capability)

    def attach(self, model, spec, case, calibration=None, **over):
        conv = any(isinstance(m, Conv1D) for m in model.modules())
        self.seen.add("conv1d" if conv else "linear")
        if conv and not self.conv1d:
            raise TypeError("this backend adapts nn.Linear base layers, not Conv1D")
        return super().attach(model, spec, case, calibration, **over)


@pytest.mark.parametrize("conv1d, layouts", [(False, {"linear"}), (True, {"linear", "conv1d"})])
def test_unmerge_restores_runs_on_the_layouts_the_backend_has(conv1d, layouts):
    be = Layouts(conv1d)
    r = run_property(PROPERTIES["unmerge_restores"], SPECS.get("lora"), be, "layouts")
    assert r.status == "pass", (r.status, r.detail)
    assert be.seen == layouts
