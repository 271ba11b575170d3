"""The whole-model properties' space is covered on every run: every example holds every architecture the harness
builds and, for model_targeting, every kind of selection (issue 34). Pure checks of the strategies, no model built."""
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from harness import whole_model as wm
from harness.models import ARCHS
from spec import SPECS


def _member(trials, role):
    return tuple(role in t["target_roles"] for t in trials)


def test_role_trials_tell_every_role_apart_and_from_no_role():
    for arch in ARCHS:
        roles = tuple(sorted(set(wm.MODULES[arch].values())))
        trials = wm.role_trials(roles)
        codes = {r: _member(trials, r) for r in roles}
        assert len(set(codes.values())) == len(roles), codes
        assert all(any(c) for c in codes.values()), "a role in no trial cannot be told from no role at all"


@settings(max_examples=10, database=None, deadline=None)
@given(st.data())
def test_every_example_holds_every_architecture_and_every_selection_kind(data):
    case, per_arch = data.draw(wm._selections(SPECS.get("lora"), "cpu"))
    assert tuple(a for a, _ in per_arch) == ARCHS
    for arch, trials in per_arch:
        roles = set(wm.MODULES[arch].values())
        with_roles = [t for t in trials if set(t) == {"target_roles"}]
        assert set().union(*(t["target_roles"] for t in with_roles)) == roles
        assert any(t.get("target_names") and t.get("layers") for t in trials)
        assert any(t.get("target_names") and t.get("target_roles") for t in trials)
        excl = [p for t in trials for p in t.get("exclude_names", ()) if p not in wm.DEFAULT_EXCLUDE]
        leaves = [p for p in excl if "\\." not in p]
        paths = [p for p in excl if "\\." in p]
        assert leaves and paths
        # each exclusion removes something the rest of its selection holds (never vacuous)
        for t in trials:
            for p in t.get("exclude_names", ()):
                if p in wm.DEFAULT_EXCLUDE:
                    continue
                rest = {**t, "exclude_names": tuple(q for q in t["exclude_names"] if q != p)}
                assert wm.expected_targets(arch, rest) - wm.expected_targets(arch, t), (arch, t, p)
        assert any(not wm.expected_targets(arch, t) for t in trials), "no selection that matches nothing"
        assert all(not re.search(p, leaf) for p in paths for leaf in (s.rpartition(".")[2] for s in wm.MODULES[arch]))


@settings(max_examples=10, database=None, deadline=None)
@given(st.data())
def test_model_cases_hold_every_architecture_and_both_values_of_every_bool_field(data):
    spec = SPECS.get("antipasto_ablate")
    drawn = data.draw(wm._model_cases(spec, "cpu"))
    assert tuple(a for _, a in drawn) == ARCHS
    bools = [k for k, v in drawn[0][0].fields.items() if isinstance(v, bool)]
    assert bools
    for k in bools:
        assert {c.fields[k] for c, _ in drawn} == {True, False}
