"""The engine that turns the declarative records of spec/ into tests: strategies draw cases, properties check
them through a backend, the engine runs them under Hypothesis and writes results JSON, and the zoo proves
that each property catches the bug it names.

`PROPERTIES` is the full property library: the generic properties, then the differential ones.
"""
import logging

# A library's WARNING goes to Python's last-resort handler (stderr) wherever the process configured no logging, e.g.
# bitsandbytes' "kernels-community ... trust_remote_code" at import in a verify worker. A NullHandler on the root
# ends that; `python -m tools.verify --log-level LEVEL` shows records from LEVEL up through a handler of its own.
if not logging.getLogger().handlers:
    logging.getLogger().addHandler(logging.NullHandler())

from . import properties  # noqa: I001,F401  (registers the generic properties first: the table's order)
from . import whole_model  # noqa: F401  (then the model-level ones)
from . import differential  # noqa: F401  (then the differential ones)
from . import structure  # noqa: F401  (then the ones over a model's structure: rank limit, shared tensors)
from . import api  # noqa: F401  (then the API beyond one adapter: scale, patterns, several adapters, layer kinds)
from .probes import PROPERTIES, Falsified, Property

__all__ = ["PROPERTIES", "Property", "Falsified"]
