"""The zoo libraries (harness/zoo/libraries.py) guard the harness's semantics: a library that merges on eval(), one
holding its adapter in the model's bf16, one whose paths differ by rounding are verified correctly (0 fail), and
each planted defect is flagged by the property that names it: no check compares a library with itself, and none
fails a correct library by design."""
import re

import pytest
import torch

from harness import PROPERTIES
from harness import properties as P
from harness.engine import defaults_case, run_property
from harness.strategies import Case, leading_dims
from harness.zoo import libraries as L
from spec import SPECS

LORA = SPECS.get("lora")


def _run(be, prop):
    return run_property(PROPERTIES[prop], LORA, be, "ci")


def _flagged(res, words=""):
    return res.status == "fail" and res.failure_kind == "assertion" and words in res.detail


def test_the_merge_on_eval_library_passes_every_property():
    """loralib-style merge_weights: eval() folds the adapter into the layer's weight, and the natural backend's
    base_weight returns that weight. Every reference is the engine's own copy of the base, so nothing fails."""
    be = L.backend(merge_on_eval=True)
    results = {p: _run(be, p) for p in PROPERTIES}
    assert not {p: r.detail for p, r in results.items() if r.status == "fail"}
    assert {"oracle", "merge", "merge_oracle", "dropout", "dropout_live", "training_step"} <= \
        {p for p, r in results.items() if r.status == "pass"}


@pytest.mark.parametrize("declared", [{}, {"mode_switch_merges": True}])
def test_the_planted_scale_bug_in_the_fold_on_eval_is_flagged_by_merge_and_oracle(declared):
    """The fold on eval() drops alpha/rank. Read back after eval(), the base weight made merge, merge_oracle and
    oracle compare the library with itself; against the engine's copy each flags it, declared or not."""
    be = L.backend(L.MergeDropsScale, merge_on_eval=True, **declared)
    assert _flagged(_run(be, "merge"), "before any mode switch")
    assert _flagged(_run(be, "merge_oracle"), "merged weight differs from the oracle")
    assert _flagged(_run(be, "oracle"), "eval-mode output differs from the float64 oracle")


def test_a_false_mode_switch_declaration_is_flagged():
    be = L.backend(merge_on_eval=True, mode_switch_merges=False)
    assert _flagged(_run(be, "oracle"), "declares mode_switch_merges=False, but eval() changed ['layer.weight']")
    assert _run(L.backend(mode_switch_merges=False), "oracle").status == "pass"


def _bf16(seed=5):
    return Case(d_in=7, d_out=5, bias=True, dtype=torch.bfloat16, seed=seed, fields={"r": 3, "alpha": 5.0})


def test_a_bf16_trainables_library_moves_and_a_library_that_does_not_move_fails():
    """The adapter in the model's bf16: at lr 1e-3 AdamW's step is below bf16's spacing (a false failure by
    design); the step follows the dtype's spacing, so it moves. A tensor whose gradient is lost still fails."""
    be = L.backend(model_dtype=True, trainable_precision="model")
    assert _run(be, "training_step").status == "pass"
    P.training_step(LORA, be, _bf16())  # a bf16 case: passes
    assert all(t.dtype == torch.bfloat16 for t in _tensors_after_attach(be, _bf16()).values())
    with pytest.raises(AssertionError, match=r"'B' did not move .* spacings of torch.bfloat16"):
        P.training_step(LORA, L.backend(L.GradientLost, model_dtype=True), _bf16())
    # the old rule, lr 1e-3 whatever the dtype: a bf16 tensor of entries 0.75 (spacing 2^-8) cannot move
    for lr, moves in ((P.LR, False), (P.step_size(torch.full((4,), 0.75, dtype=torch.bfloat16)), True)):
        t = torch.nn.Parameter(torch.full((4,), 0.75, dtype=torch.bfloat16))
        t.grad = torch.ones_like(t)
        torch.optim.AdamW([t], lr=lr, weight_decay=0.0).step()
        assert bool((t != 0.75).all()) == moves, lr


def _tensors_after_attach(be, case):
    from harness.probes import setup

    return be.tensors(setup(LORA, be, case).model)


def test_a_declared_precision_is_checked_against_the_tensors():
    be = L.backend(model_dtype=True, trainable_precision="float32")
    with pytest.raises(AssertionError, match=r"declares trainable_precision='float32'.*'A' \(torch.bfloat16\)"):
        P.training_step(LORA, be, _bf16())
    with pytest.raises(ValueError, match="trainable_precision must be one of"):
        P.training_step(LORA, L.backend(trainable_precision="fp8"), _bf16())


def test_dropout_live_compares_within_rounding_and_still_flags_ignored_dropout():
    """The merge-on-eval library's eval output (folded weight) differs from the same adapter with dropout 0 (the
    unfolded sum) by rounding only: dropout_live passes; the same library ignoring dropout fails."""
    be = L.backend(merge_on_eval=True)
    from harness.probes import perturb, setup

    case = Case(d_in=9, d_out=7, bias=True, dtype=torch.float32, seed=3, fields={"r": 3, "alpha": 5.0}, batch=(2, 3))
    s = setup(LORA, be, case)
    perturb(LORA, be, s.model, case)
    with torch.no_grad():
        y_train = s.model(s.x)
        s.model.eval()
        y_eval = s.model(s.x)
    diff = float((y_eval.double() - y_train.double()).abs().max())
    assert 0 < diff < 1e-5  # different sums, equal within rounding: an exact comparison fails a correct library
    assert _run(be, "dropout_live").status == "pass"
    assert _flagged(_run(L.backend(L.DropoutIgnored, merge_on_eval=True), "dropout_live"), "dropout is not applied")


def test_a_library_returning_the_wrong_shape_on_2d_input_is_flagged():
    """Written for (batch, seq, d) inputs, the library broadcasts a 2-D input's output to (N, N, d_out); only 2-D
    draws show it (on 3-D inputs it is right)."""
    be = L.backend(L.Unsqueeze2D)
    res = _run(be, "oracle")
    assert _flagged(res, "output shape") and re.search(r"batch=\(\d+,\)", res.example), res.example
    P.oracle(LORA, be, Case(d_in=5, d_out=4, bias=True, dtype=torch.float32, seed=3, fields={"r": 2, "alpha": 3.0}))
    assert {len(leading_dims(s)) for s in range(6)} == {1, 2, 3}
    assert max(torch.Size(leading_dims(s)).numel() for s in range(300)) <= 6


def test_the_libraries_default_config_runs_as_one_case():
    """A library whose default alpha is 0 is dead by default (no gradient reaches 'up'); drawn cases never use
    alpha 0, the defaults case does. The correct library's defaults pass."""
    res = _run(L.backend(defaults=L.DEAD_DEFAULTS), "gradient_pattern")
    assert _flagged(res, "'B' has an all-zero gradient at init") and "fields={'r': 8}" in res.example
    assert _run(L.backend(), "gradient_pattern").status == "pass"
    drawn = Case(d_in=7, d_out=5, bias=True, dtype=torch.float32, seed=4, fields={"r": 3, "alpha": 5.0})
    P.gradient_pattern(LORA, L.backend(defaults=L.DEAD_DEFAULTS), drawn)  # any drawn alpha hides it
    c = defaults_case(LORA, L.backend())
    assert (c.d_in, c.d_out, c.fields) == (24, 16, {"r": 8})


def test_peft_oft_on_a_linear_layer_fails_on_4d_inputs():
    """A PEFT 0.21.2 bug the 4-D draws find: OFT's rotation treats every 4-D input as a Conv2d input
    (peft/tuners/oft/layer.py:265, `if len(orig_shape) == 4: x = self._unfold(x)`), so an OFT-adapted Linear fed
    (a, b, c, d_in) crashes; the same adapter on a 3-D input works."""
    pytest.importorskip("peft")
    from harness.backends import make
    from harness.probes import setup

    be, oft = make("peft"), SPECS.get("oft")
    case = Case(d_in=4, d_out=4, bias=False, dtype=torch.float32, seed=2, fields={"r": 2, "alpha": 2.0})
    assert setup(oft, be, case).model(torch.zeros(2, 3, 4)).shape == (2, 3, 4)
    with pytest.raises(RuntimeError, match="shape"):
        setup(oft, be, case.with_(batch=(2, 1, 3))).model(torch.zeros(2, 1, 3, 4))
