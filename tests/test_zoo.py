"""The harness proves its power: every zoo mutant is flagged by the property that names its bug."""
import pytest

from harness.zoo import all_mutants, detected, run_mutant

MUTANTS = all_mutants()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_flagged_by_its_property(mutant):
    res = run_mutant(mutant)
    assert detected(res), f"{mutant.name} ({mutant.bug}) not flagged by '{mutant.expects}': {res.status} {res.failure_kind} {res.detail}"
