"""The Hypothesis phases the verify profiles run: every phase but explain. Explain only writes notes on the printed
falsifying example (which parts could vary), which a row never stores; it replayed each drawn argument 100+ times
after the shrink and ran every shrink step under a line tracer, most of a failing property's time. A failing
property is still shrunk to its minimal example."""
from __future__ import annotations

import sys
from dataclasses import replace

import pytest
from hypothesis import Phase, settings

from harness import PROPERTIES
from harness.backends import ImplBackend
from harness.engine import run_property
from spec import SPECS

PROFILES = ("verify", "ci", "history", "dev")


@pytest.mark.parametrize("profile", PROFILES)
def test_the_profiles_shrink_but_do_not_explain(profile):
    phases = settings.get_profile(profile).phases
    assert Phase.shrink in phases and Phase.generate in phases and Phase.explicit in phases
    assert Phase.explain not in phases


def test_a_failing_property_is_shrunk_without_the_explain_replays_or_a_line_tracer():
    """A check that passes only the defaults case (d_in 24), so every drawn case fails: the row keeps the shrunk
    minimal example, and no check call runs under a tracer the test did not start with (explain's line tracer).
    With Phase.explain added back to the profile, the same run makes 115 calls, 112 of them traced (measured)."""
    tracer = sys.gettrace()
    calls, traced = [], []
    oracle = PROPERTIES["oracle"]

    def check(spec, be, case):
        calls.append(case)
        traced.append(sys.gettrace() is not tracer)
        assert case.d_in == 24, f"d_in {case.d_in}"
        return 0.0

    res = run_property(replace(oracle, check=check), SPECS.get("lora"), ImplBackend(), "ci")
    assert res.status == "fail" and res.detail.startswith("d_in 2\n")
    assert res.example.startswith("Case(d_in=2, d_out=1,")  # shrunk: the smallest case
    assert not any(traced)
    # explain replays the minimal case's argument, varied, until 100 of the replays fail the same way
    assert len(calls) < 100
