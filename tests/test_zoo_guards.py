"""The zoo guards the harness itself: for each tolerance and each dimension the strategies draw, a zoo mutant that
only that part catches. Weakening the part (a looser tolerance, a dimension no longer drawn) lets its mutant
escape; under the normal harness it is caught by the property that names its bug.

| harness part                                   | mutant                               | caught by        |
|------------------------------------------------|--------------------------------------|------------------|
| strategies._dims: non-square layers            | lora.rank_limit_max                  | rank_limit       |
| strategies.square_or_not: square layers        | pissa.detach_square_conv1d_dense     | detach_restores  |
| strategies._dims: out_features = 1            | lora.out1_fast_path_unscaled         | oracle           |
| cases: r >= 2 ("mid", "max" rank kinds)        | lora.alpha_scale                     | oracle           |
| cases: alpha != r                              | lora.scale_inverted                  | oracle           |
| cases: bias on                                 | ia3.bias_not_gated                   | oracle           |
| cases: dtype bfloat16 drawn                    | lora.bf16_adapter_skipped            | oracle           |
| tolerance.ACCUMULATION[float32]                | lora.fp32_through_fp16               | oracle           |
| tolerance.ACCUMULATION[float64]                | lora.fp64_through_fp32               | oracle           |
| tolerance.ACCUMULATION[bfloat16]               | lora.bf16_through_fp8                | oracle           |
| tolerance.BACKWARD (gradients)                 | lora.gradient_of_a_off               | oracle           |
| strategies.base_weight: degenerate kinds       | dora.norm_unfloored                  | degenerate_weights |
| strategies.calibration: padding values varied  | eva.padding_not_masked               | data_path        |
| probes.drawn_knob: knobs off their default     | antipasto.merge_coeff_from_config    | merge            |
| whole_model: every architecture, GPT-2's roles | lora.gpt2_projections_swapped        | model_targeting  |
| whole_model: exclusions by path                | lora.exclusions_on_leaf_names        | model_targeting  |
| whole_model: every bool field both ways        | antipasto_ablate.calibrate_through_adapters | model_data_init |

Each weakening patches the one name the properties look up (every harness module that imported it, or the
registered property's strategy), for the duration of one run.
"""
import contextlib
import dataclasses
import sys
from unittest import mock

import pytest
import torch
from hypothesis import strategies as st

from harness import PROPERTIES, probes, strategies
from harness import tolerance as tol
from harness import whole_model
from harness.zoo import all_mutants, detected, run_mutant

MUTANTS = {m.name: m for m in all_mutants()}


@contextlib.contextmanager
def _everywhere(name: str, new, home=strategies):
    """Replace `name` in every harness module that holds the same object as `home` does."""
    real = getattr(home, name)
    with contextlib.ExitStack() as stack:
        for mod in [m for n, m in sys.modules.items() if n.startswith("harness") and m is not None]:
            if getattr(mod, name, None) is real:
                stack.enter_context(mock.patch.object(mod, name, new))
        yield


def _mapped(transform):
    """Every drawn case passed through `transform` (a dimension no longer drawn)."""
    real = strategies.cases
    return _everywhere("cases", lambda *a, **k: real(*a, **k).map(transform))


def _fields(c, **kw):
    return c.with_(fields={**c.fields, **kw})


@contextlib.contextmanager
def _square_only():
    real = strategies._dims
    with mock.patch.object(strategies, "_dims", lambda min_width, square: real(min_width, True)):
        yield


@contextlib.contextmanager
def _no_out1():
    real = strategies._dims
    with mock.patch.object(strategies, "_dims", lambda min_width, square: real(min_width, square).filter(
            lambda d: d[1] != 1)):
        yield


@contextlib.contextmanager
def _no_square():
    def square_or_not(spec, dtypes=(torch.float32,), device="cpu"):
        return strategies.cases(spec, dtypes=dtypes, device=device)

    with _everywhere("square_or_not", square_or_not):
        yield


@contextlib.contextmanager
def _looser(dtype, factor):
    with mock.patch.dict(tol.ACCUMULATION, {dtype: tol.ACCUMULATION[dtype] * factor}):
        yield


@contextlib.contextmanager
def _one_arch(arch):
    """The whole-model properties on one architecture only."""
    with mock.patch.object(whole_model, "ARCHS", (arch,)):
        yield


@contextlib.contextmanager
def _path_exclusions_dropped():
    """The targeting selections without their exclusions by path (patterns that span a dot)."""
    real = whole_model._arch_selections

    @st.composite
    def arch_selections(draw, arch):
        return [{**t, "exclude_names": tuple(p for p in t["exclude_names"] if "\\." not in p)}
                if "exclude_names" in t else t for t in draw(real(arch))]

    with mock.patch.object(whole_model, "_arch_selections", arch_selections):
        yield


@contextlib.contextmanager
def _bools_left_as_drawn():
    def model_cases(spec, device):
        return st.tuples(*(st.tuples(strategies.cases(spec, dtypes=(torch.float32,), device=device), st.just(a))
                           for a in whole_model.ARCHS))

    props = {n: dataclasses.replace(PROPERTIES[n], strategy=model_cases)
             for n in ("model_freezing", "model_knobs", "model_data_init")}
    with mock.patch.dict(PROPERTIES, props):
        yield


GUARDS = {
    "non-square layers": ("lora.rank_limit_max", _square_only),
    "square layers": ("pissa.detach_square_conv1d_dense", _no_square),
    "out_features = 1": ("lora.out1_fast_path_unscaled", _no_out1),
    "r >= 2": ("lora.alpha_scale", lambda: _mapped(lambda c: _fields(c, r=1))),
    "alpha != r": ("lora.scale_inverted", lambda: _mapped(lambda c: _fields(c, alpha=float(c.fields["r"])))),
    "bias on": ("ia3.bias_not_gated", lambda: _mapped(lambda c: c.with_(bias=False))),
    "bfloat16 drawn": ("lora.bf16_adapter_skipped",
                       lambda: _mapped(lambda c: c.with_(dtype=torch.float32) if c.dtype == torch.bfloat16 else c)),
    "float32 tolerance": ("lora.fp32_through_fp16", lambda: _looser(torch.float32, 1e3)),
    "float64 tolerance": ("lora.fp64_through_fp32", lambda: _looser(torch.float64, 1e10)),
    "bfloat16 tolerance": ("lora.bf16_through_fp8", lambda: _looser(torch.bfloat16, 10.0)),
    "gradient tolerance": ("lora.gradient_of_a_off", lambda: mock.patch.object(tol, "BACKWARD", tol.BACKWARD * 1e13)),
    "degenerate base weights": ("dora.norm_unfloored", lambda: _everywhere(
        "base_weight", lambda case, kind="random", _real=strategies.base_weight: _real(case))),
    "knobs at drawn values": ("antipasto.merge_coeff_from_config", lambda: _everywhere(
        "drawn_knob", lambda default, identity, g: default, home=probes)),
    "calibration padding varied": ("eva.padding_not_masked", lambda: _everywhere(
        "calibration", lambda case, W, r, variant=0, pad_value=1e3, tokens=12, _real=strategies.calibration:
        _real(case, W, r, variant, 1e3, tokens))),
    "every architecture": ("lora.gpt2_projections_swapped", lambda: _one_arch("llama")),
    "exclusions by path": ("lora.exclusions_on_leaf_names", _path_exclusions_dropped),
    "bool fields both ways": ("antipasto_ablate.calibrate_through_adapters", _bools_left_as_drawn),
}


@pytest.mark.parametrize("part", GUARDS)
def test_weakening_the_part_lets_its_mutant_escape(part):
    name, weaken = GUARDS[part]
    m = MUTANTS[name]
    res = run_mutant(m)
    assert detected(res), f"{name} not flagged by '{m.expects}' under the normal harness: {res.status} {res.detail}"
    # the library-defaults case (harness.engine.defaults_case: r=8, alpha=16, bias, a non-square layer) is a guard
    # of its own that several of these mutants also meet: the part is judged with it off
    with weaken(), mock.patch("harness.engine.defaults_case", lambda *a, **k: None):
        res = run_mutant(m)
    assert res.status == "pass", f"{name} still flagged with '{part}' weakened: the part is not what catches it " \
                                 f"({res.status} {res.detail[:200]})"


def test_every_guard_mutant_guards_a_part():
    from harness.zoo import guards, targeting

    mapped = {name for name, _ in GUARDS.values()}
    assert {m.name for m in guards.MUTANTS + targeting.MUTANTS} <= mapped
    assert mapped <= set(MUTANTS)
