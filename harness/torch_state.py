"""The global torch state every pytest item starts from, whatever the item before it left behind.

A backend or a test that calls `torch.set_grad_enabled(False)`, `torch.set_default_dtype(torch.float64)` or
`torch.use_deterministic_algorithms(True)` and never undoes it would otherwise change every later item in the same
process: lora and dora then crash in items that have nothing to do with it. `CleanTorchState` is a pytest plugin
(registered by harness.plugin for the verify items and by tests/conftest.py for the suite) that captures the state
when it is registered and puts it back around each item, inside `torch.inference_mode(False)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class TorchState:
    """The process-wide (thread-local for grad mode) torch settings an item can leave changed."""

    grad: bool
    dtype: torch.dtype
    deterministic: bool
    warn_only: bool
    threads: int
    anomaly: bool
    anomaly_nan: bool
    matmul_precision: str
    device: str

    @classmethod
    def capture(cls) -> TorchState:
        return cls(torch.is_grad_enabled(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads(),
                   torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled(),
                   torch.get_float32_matmul_precision(), str(torch.get_default_device()))

    def restore(self) -> None:
        torch.set_grad_enabled(self.grad)
        torch.set_default_dtype(self.dtype)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.autograd.set_detect_anomaly(self.anomaly, self.anomaly_nan)
        torch.set_float32_matmul_precision(self.matmul_precision)
        if str(torch.get_default_device()) != self.device:
            torch.set_default_device(None if self.device == "cpu" else self.device)


class CleanTorchState:
    """pytest plugin: each item runs from the state captured at registration, outside any inference mode."""

    def __init__(self) -> None:
        self.state = TorchState.capture()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        with torch.inference_mode(False):
            self.state.restore()
            try:
                return (yield)
            finally:
                self.state.restore()


def register(config) -> None:
    """Register CleanTorchState once on this pytest run."""
    if not config.pluginmanager.has_plugin("clean-torch-state"):
        config.pluginmanager.register(CleanTorchState(), "clean-torch-state")
