"""Every test starts from the same global torch state (grad mode, default dtype, deterministic flags, threads,
outside inference mode), whatever an earlier test in its process left behind (harness/torch_state.py)."""
from harness import torch_state


def pytest_configure(config):
    torch_state.register(config)
