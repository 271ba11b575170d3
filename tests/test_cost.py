"""The cost report (`python -m tools.cost`): schema, counts against the specs, the FlopCounter cross-check,
the statistics, the memory child, and that a wrong or missing formula stops the run."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import impl
import spec as spec_pkg
from harness.backends.peft_maps import peft_map
from tools import cost

TINY = ["--d-in", "32", "--d-out", "48", "--batch", "2", "--seq", "8", "--r", "8", "--reps", "3", "--warmup", "1",
        "--boot", "200", "--threads", "1", "--init-reps", "1", "--calib-tokens", "256", "--no-memory"]


def tiny_options(**over) -> cost.Options:
    base = {"variants": ("lora",), "d_in": 32, "d_out": 48, "batch": 2, "seq": 8, "r": 8, "threads": 1, "reps": 3, "warmup": 1, "boot": 200,
                "memory": False, "init": False, "init_reps": 1, "calib_tokens": 256}
    return cost.Options(**{**base, **over})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One run of the command on tiny shapes over every registered variant."""
    out = tmp_path_factory.mktemp("cost")
    rc = cost.main(TINY + ["--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "cost_cpu.json").read_text())


def test_every_variant_has_a_row_and_the_files_exist(report):
    out, res = report
    assert [r["variant"] for r in res["rows"]] == list(impl.VARIANTS)
    md = (out / "cost_cpu.md").read_text()
    for v in impl.VARIANTS:
        assert f"| {v} |" in md
    assert (out / "cost_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_schema(report):
    _, res = report
    assert res["schema"] == cost.SCHEMA
    assert res["options"]["d_in"] == 32 and res["options"]["d_out"] == 48
    assert res["environment"]["torch_threads"] == 1
    for r in res["rows"]:
        assert set(r) >= {"variant", "config", "data", "side", "params", "macs", "time", "memory", "init", "peft"}
        assert set(r["params"]) >= {"trainable", "frozen_buffer_elements", "base_tensors_rewritten"}
        assert set(r["macs"]) >= {"per_token", "per_forward", "matmul_per_token", "matmul_per_forward", "checked",
                                  "unchecked_terms"}
        for setting in cost.SETTINGS:
            for mode in cost.MODES:
                c = r["time"][setting][mode]
                assert c["ours_ms"] > 0 and c["base_ms"] > 0
                ci = c["ours_over_base"]
                assert ci["lo"] <= ci["ratio"] <= ci["hi"] or math.isclose(ci["lo"], ci["hi"])
                assert ("ours_over_peft" in c) == (r["peft"] is not None)
        assert r["memory"] is None  # --no-memory
        assert r["init"]["ms"] > 0 and r["init"]["targets"] == 14  # 7 projections x 2 layers
        assert (r["init"]["calibration_tokens"] > 0) == (r["data"] != "none")
    ids = {(g["goal"], g["variant"]) for g in res["goals"]}
    for r in res["rows"]:
        assert ("gpu_vs_base", r["variant"]) in ids
        if r["peft"] is not None:
            assert (("hra_well_below_peft" if r["variant"] == "hra" else "fwdbwd_vs_peft"), r["variant"]) in ids
    raw = res["raw_times_ms"]
    assert all(len(v) == 3 for v in raw.values())


def test_parameter_counts_match_the_specs_and_a_real_attach(report):
    """The row's counts equal the spec's formulas and what an independent attach in this test counts."""
    _, res = report
    for r in res["rows"]:
        v = r["variant"]
        sp = spec_pkg.SPECS.get(v)
        cfg = impl.config(v, **{k: val for k, val in r["config"].items() if k != "variant"})
        assert r["params"]["trainable"] == sp.count(32, 48, cfg)
        frozen = sum(math.prod(sp.shape_of(t, 32, 48, cfg)) for t in sp.present(32, 48, cfg, trainable=False))
        assert r["params"]["frozen_buffer_elements"] == frozen
        assert r["params"]["base_tensors_rewritten"] == int(sp.rewrites_base)
        if sp.data == "none":  # data-driven variants need calibration; the tool's own check covers them
            host = cost.Host(nn.Linear(32, 48))
            impl.attach(host, cfg)
            assert sum(p.numel() for p in host.parameters() if p.requires_grad) == r["params"]["trainable"]


def test_mac_formulas_and_flopcounter_check(report):
    """Analytic MACs are the spec's formulas; the measured matmul MACs equal their matmul terms."""
    _, res = report
    for r in res["rows"]:
        v = r["variant"]
        sp = spec_pkg.SPECS.get(v)
        cfg = impl.config(v, **{k: val for k, val in r["config"].items() if k != "variant"})
        m = r["macs"]
        assert m["per_token"] == cost.eval_formula(sp, "macs", 32, 48, cfg)
        assert m["per_forward"] == cost.eval_formula(sp, "macs_per_forward", 32, 48, cfg)
        assert m["checked"]["per_token_matmul"] == cost.eval_formula(sp, "macs", 32, 48, cfg, matmul_only=True)
        assert m["checked"]["per_forward_matmul"] == cost.eval_formula(sp, "macs_per_forward", 32, 48, cfg,
                                                                       matmul_only=True)
        assert m["matmul_per_token"] <= m["per_token"]


def test_flopcounter_convention_independently():
    """FlopCounterMode reports 2*m*n*k per matmul: lora's added count over a plain Linear, measured here by hand,
    is r*(d_in + d_out) per token, what the tool's split reports."""
    torch.manual_seed(0)
    d_in, d_out, r, n = 20, 12, 3, 10
    host = cost.Host(nn.Linear(d_in, d_out))
    impl.attach(host, impl.config("lora", r=r, target_names=(r"^lin$",)))
    x = torch.randn(1, n, d_in)
    with FlopCounterMode(display=False) as fc:
        host(x)
    assert fc.get_total_flops() == 2 * n * (d_in * d_out + r * (d_in + d_out))
    plain = nn.Linear(d_in, d_out)
    assert cost.measured_added_macs(host.lin, plain, d_in, torch.float32, "cpu") == (r * (d_in + d_out), 0)


def _patched(monkeypatch, name: str, **changes):
    sp = spec_pkg.SPECS.get(name)
    monkeypatch.setitem(spec_pkg.SPECS._specs, name, dataclasses.replace(sp, **changes))


def test_wrong_param_formula_is_an_error(monkeypatch):
    _patched(monkeypatch, "lora", param_count="r * d_in")
    with pytest.raises(cost.CostError, match="trainable parameters"):
        cost.run(tiny_options(), progress=lambda s: None)


def test_undeclared_frozen_buffer_is_an_error(monkeypatch):
    sp = spec_pkg.SPECS.get("lora")
    _patched(monkeypatch, "lora", tensors=sp.tensors + (spec_pkg.TensorSpec("N", "(d_in,)", "norms", trainable=False),))
    with pytest.raises(cost.CostError, match="frozen buffers"):
        cost.run(tiny_options(), progress=lambda s: None)


def test_wrong_mac_formula_is_an_error(monkeypatch):
    _patched(monkeypatch, "lora", macs="r * d_in + ew(d_out)")
    with pytest.raises(cost.CostError, match="FlopCounterMode measures"):
        cost.run(tiny_options(), progress=lambda s: None)
    _patched(monkeypatch, "lora", macs="r * (d_in + d_out)", macs_per_forward="r * d_in")
    with pytest.raises(cost.CostError, match="per forward"):
        cost.run(tiny_options(), progress=lambda s: None)


def test_missing_mac_formula_is_an_error_not_zero(monkeypatch, capsys):
    _patched(monkeypatch, "lora", macs="")
    with pytest.raises(cost.CostError, match="declares no `macs`"):
        cost.run(tiny_options(), progress=lambda s: None)
    assert cost.main(TINY + ["--variants", "lora", "--no-init"]) == 2
    assert "declares no `macs`" in capsys.readouterr().err


def test_formula_markers():
    sp = spec_pkg.SPECS.get("lora")
    cfg = impl.config("lora", r=4)
    s = dataclasses.replace(sp, macs="r * d_in + ew(d_out * 2) + solve(r ** 3)")
    assert cost.eval_formula(s, "macs", 10, 7, cfg) == 40 + 14 + 64
    assert cost.eval_formula(s, "macs", 10, 7, cfg, matmul_only=True) == 40
    assert cost.marked_terms(s.macs) == ["ew(d_out * 2)", "solve(r ** 3)"]
    with pytest.raises(cost.CostError, match="not a whole number"):
        cost.eval_formula(dataclasses.replace(sp, macs="d_in / 3"), "macs", 10, 7, cfg)
    with pytest.raises(cost.CostError, match="does not evaluate"):
        cost.eval_formula(dataclasses.replace(sp, macs="nope * 2"), "macs", 10, 7, cfg)


def test_ratio_interval_and_verdicts():
    g = torch.Generator().manual_seed(0)
    b = (1.0 + 0.05 * torch.rand(200, generator=g)).tolist()
    a = [2 * v * (1 + 0.02 * float(e)) for v, e in zip(b, torch.randn(200, generator=g))]
    ci = cost.ratio_ci(a, b, boot=500, seed=1)
    assert ci["lo"] <= 2.0 <= ci["hi"] and ci["hi"] - ci["lo"] < 0.1
    assert cost.verdict(ci, 2.2) == "met" and cost.verdict(ci, 1.5) == "not met" and cost.verdict(ci, 2.0) == "undecided"
    with pytest.raises(cost.CostError, match="unpaired"):
        cost.ratio_ci([1.0, 2.0], [1.0], boot=10, seed=0)


def test_memory_child_measures_the_step():
    """One child for lora on a 512x512 layer, input 8x128: the frozen base's inner step holds at least its
    output and the input's gradient (two activations), its first-layer step one; ours holds more (its delta).
    The kernel's RSS counters are batched per CPU, hence the 0.5 MiB slack."""
    opts = tiny_options(d_in=512, d_out=512, batch=8, seq=128, jobs=1)
    mem = cost.memory_in_children(opts, progress=lambda s: None)["lora"]
    act, slack = 8 * 128 * 512 * 4, 2**19  # one (8, 128, 512) fp32 tensor
    assert mem["base"]["inner"] >= 2 * act - slack
    assert act - slack <= mem["base"]["first"] <= mem["base"]["inner"] - act + slack
    assert mem["lora/ours"]["inner"] >= mem["base"]["inner"] + act // 2
    assert mem["lora/peft"]["inner"] >= mem["base"]["inner"] + act // 2


def test_bad_options_are_clear_errors(capsys):
    assert cost.main(TINY + ["--variants", "nope"]) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(cost.CostError, match="d_in must be a positive integer"):
        tiny_options(d_in=0).validate()
    if not torch.cuda.is_available():
        with pytest.raises(cost.CostError, match="no CUDA device"):
            tiny_options(device="cuda").validate()


def test_peft_timed_only_for_the_same_variant(report):
    """PEFT is timed where the spec maps the same variant; not where it has no PeftMap or only an init-sharing
    counterpart (PeftMap.compare), and the row says why."""
    _, res = report
    for r in res["rows"]:
        pm = peft_map(spec_pkg.SPECS.get(r["variant"]))
        same = pm is not None and getattr(pm, "compare", None) is None
        assert (r["peft"] is not None) == same
        if same:
            assert r["peft"]["same_function_error"] < 1e-4  # the timed PEFT layer computes our map
            assert r["peft"]["trainable"] > 0
        else:
            assert r["peft_not_timed"]
