"""The engine that turns the declarative records of spec/ into tests: strategies draw cases, properties check
them through a backend, the engine runs them under Hypothesis and writes results JSON, and the zoo proves
that each property catches the bug it names.

`PROPERTIES` is the full property library: the generic properties, then the differential ones.
"""
from . import properties  # noqa: I001,F401  (registers the generic properties first: the table's order)
from . import whole_model  # noqa: F401  (then the model-level ones)
from . import differential  # noqa: F401  (then the differential ones)
from . import structure  # noqa: F401  (then the ones over a model's structure: rank limit, shared tensors)
from . import api  # noqa: F401  (then the API beyond one adapter: scale, patterns, several adapters, layer kinds)
from .probes import PROPERTIES, Falsified, Property

__all__ = ["PROPERTIES", "Property", "Falsified"]
