"""PEFT on bitsandbytes layers through its releases: a path an old release's source takes that today's
environment cannot serve (bitsandbytes' MatmulLtState.memory_efficient_backward, CUDA-only dequantization) or that
PEFT itself refuses is n/a for that layer kind, naming the release and PEFT's file:line, decided from the release's
source before running it; a real PEFT bug on quantized layers still crashes.

The pure decision (harness.backends.peft_maps.bnb_na over BNB_PATHS) is tested on source excerpts of the releases
(no old PEFT installed); the backend and the property on the installed release (0.21.2, where no path applies).
"""
from __future__ import annotations

import pytest

from harness.backends.peft_maps import BNB_PATHS, BnbPath, bnb_na

# peft 0.13.2, peft/tuners/lora/bnb.py:271-274 (dispatch_bnb_8bit): the 8-bit path reads the removed attribute
LORA_BNB_0_13 = '''    if loaded_in_8bit and isinstance(target_base_layer, bnb.nn.Linear8bitLt):
        eightbit_kwargs = kwargs.copy()
        eightbit_kwargs.update(
            {
                "has_fp16_weights": target.state.has_fp16_weights,
                "memory_efficient_backward": target.state.memory_efficient_backward,
'''
# peft 0.21.2's dispatch_bnb_8bit: the attribute is gone
LORA_BNB_0_21 = "".join(line for line in LORA_BNB_0_13.splitlines(keepends=True) if "memory_eff" not in line)
# peft 0.13.2, peft/utils/integrations.py:77-88 (dequantize_bnb_weight): a CPU weight always goes to CUDA
DEQUANT_0_13 = '''def dequantize_bnb_weight(weight: torch.nn.Parameter, state=None):
    import bitsandbytes as bnb

    # BNB requires CUDA weights
    device = weight.device
    is_cpu = device.type == torch.device("cpu").type
    if is_cpu:
        weight = weight.to(torch.device("cuda"))
'''
# peft 0.15.2: only when CUDA is there
DEQUANT_0_15 = DEQUANT_0_13.replace('        weight = weight.to(torch.device("cuda"))',
                                    '        if torch.cuda.is_available():\n'
                                    '            weight = weight.to(torch.device("cuda"))')
# peft 0.9.0, peft/tuners/lora/bnb.py (class Linear4bit, abridged; the refusal is at line 238)
LINEAR4BIT_0_9 = '''    class Linear4bit(torch.nn.Module, LoraLayer):
        def __init__(self, base_layer, adapter_name, r=0, lora_alpha=1, lora_dropout=0.0,
                     init_lora_weights=True, use_rslora=False, use_dora=False, **kwargs) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if use_dora:
                raise ValueError(f"{self.__class__.__name__} does not support DoRA yet, please set it to False")
'''
# peft 0.13.2, peft/tuners/boft/layer.py:637: boft multiplies the packed 4-bit weight as if dense (a PEFT bug)
BOFT_0_13 = "            rotated_weight = torch.mm(boft_rotation, orig_weight)\n"

NO_ENV = {"MatmulLtState.memory_efficient_backward": False, "cuda": False}


def _source(pieces: dict[str, tuple[str, int, str]]):
    """bnb_na's `source`: where -> the release's code there (absent: the release lacks it)."""
    return lambda where: [pieces[where]] if where in pieces else []


def _na(layer, kwargs, pieces, release, has=NO_ENV):
    return bnb_na(BNB_PATHS, layer, kwargs, _source(pieces), has, release, "0.50.2")


def test_an_old_release_reading_memory_efficient_backward_is_na_on_8bit_naming_release_and_line():
    pieces = {"tuner": ("peft/tuners/lora/bnb.py", 268, LORA_BNB_0_13)}
    why = _na("bnb8", {"r": 8}, pieces, "0.13.2")
    assert why is not None and "peft 0.13.2" in why and "peft/tuners/lora/bnb.py:273" in why, why
    assert "memory_efficient_backward" in why and "no bitsandbytes release" in why
    assert _na("bnb4", {"r": 8}, pieces, "0.13.2") is None  # the 4-bit path reads no such attribute: checked


def test_the_current_release_is_checked_on_both_kinds():
    pieces = {"tuner": ("peft/tuners/lora/bnb.py", 268, LORA_BNB_0_21),
              "peft.utils.integrations:dequantize_bnb_weight": ("peft/utils/integrations.py", 116, DEQUANT_0_15)}
    for kwargs in ({"r": 8}, {"r": 8, "use_dora": True}):
        for layer in ("bnb4", "bnb8"):
            assert _na(layer, kwargs, pieces, "0.21.2") is None


def test_an_environment_that_has_what_the_path_needs_is_checked():
    """The decision reads the environment, not a version table: a bitsandbytes with the attribute (a pinned old
    one on a GPU machine) or a GPU makes the same release checked."""
    pieces = {"tuner": ("peft/tuners/lora/bnb.py", 268, LORA_BNB_0_13),
              "peft.utils.integrations:dequantize_bnb_weight": ("peft/utils/integrations.py", 77, DEQUANT_0_13)}
    full = {"MatmulLtState.memory_efficient_backward": True, "cuda": True}
    for layer in ("bnb4", "bnb8"):
        assert _na(layer, {"r": 8, "use_dora": True}, pieces, "0.13.2", has=full) is None


def test_dora_dequantizing_on_cuda_is_na_only_for_dora_and_only_where_unguarded():
    old = {"peft.utils.integrations:dequantize_bnb_weight": ("peft/utils/integrations.py", 77, DEQUANT_0_13)}
    why = _na("bnb4", {"r": 8, "use_dora": True}, old, "0.14.0")
    assert why is not None and "peft 0.14.0" in why and "peft/utils/integrations.py:84" in why and "CUDA" in why, why
    assert _na("bnb4", {"r": 8}, old, "0.14.0") is None  # plain LoRA never dequantizes in the property
    new = {"peft.utils.integrations:dequantize_bnb_weight": ("peft/utils/integrations.py", 85, DEQUANT_0_15)}
    assert _na("bnb4", {"r": 8, "use_dora": True}, new, "0.15.2") is None


def test_peft_refusing_dora_on_4bit_is_na_whatever_the_environment():
    pieces = {"peft.tuners.lora.bnb:Linear4bit": ("peft/tuners/lora/bnb.py", 220, LINEAR4BIT_0_9)}
    full = {"MatmulLtState.memory_efficient_backward": True, "cuda": True}
    why = _na("bnb4", {"r": 8, "use_dora": True}, pieces, "0.9.0", has=full)
    assert why is not None and "peft 0.9.0 refuses DoRA" in why and "peft/tuners/lora/bnb.py:226" in why, why
    assert _na("bnb4", {"r": 8}, pieces, "0.9.0") is None


def test_a_real_peft_bug_on_packed_weights_matches_no_path():
    """boft multiplying the packed 4-bit weight as if it were dense is PEFT's bug: no path declares it."""
    pieces = {"tuner": ("peft/tuners/boft/layer.py", 637, BOFT_0_13)}
    for layer in ("bnb4", "bnb8"):
        assert _na(layer, {"r": 8}, pieces, "0.13.2") is None
    assert all(p.marker for p in BNB_PATHS)  # every path is a specific code marker, never a catch-all


# ---- the backend and the property on the installed release

peft = pytest.importorskip("peft")

from harness import PROPERTIES  # noqa: E402
from harness.backends import peft as peft_backend  # noqa: E402
from harness.backends.peft import PeftBackend  # noqa: E402
from harness.engine import quantized_matrix, run_property  # noqa: E402
from spec import SPECS  # noqa: E402


def test_no_path_applies_at_the_installed_release():
    be = PeftBackend()
    for name in ("lora", "dora", "ia3", "ia3_ff", "adalora", "vera", "loha", "lokr", "boft", "hra", "delora", "oft"):
        spec = SPECS.get(name)
        if be.applies(spec):
            continue
        assert be.property_na(spec, "quantized") is None, name
        assert be.quantized_na(spec, "bnb4") is None and be.quantized_na(spec, "bnb8") is None, name


def test_a_kind_the_release_cannot_run_is_left_out_and_said_both_kinds_make_it_na(monkeypatch):
    """A path on the installed release's own 8-bit dispatch (its source really has the marker, bitsandbytes
    0.50.2 really lacks the attribute): lora passes on 4-bit and the row says 8-bit was not checked; with the
    4-bit kind declared too, the property is n/a with both reasons."""
    eight = BnbPath(("bnb8",), "peft.tuners.lora.bnb:dispatch_bnb_8bit", r"Linear8bitLt",
                    "MatmulLtState.memory_efficient_backward", "peft {release} 8-bit test path ({site})")
    monkeypatch.setattr(peft_backend, "BNB_PATHS", (eight,))
    spec, be = SPECS.get("lora"), PeftBackend()
    res = run_property(PROPERTIES["quantized"], spec, be, "zoo")
    assert res.status == "pass", res
    assert f"bnb8 not checked: peft {peft_backend.VERSION} 8-bit test path (peft/tuners/lora/bnb.py:" in res.detail
    row = quantized_matrix([res.to_json()], {"lora": spec})["lora"]
    assert row["bnb4"] == "works" and row["bnb8"].startswith("not checked")
    four = BnbPath(("bnb4",), "peft.tuners.lora.bnb:dispatch_bnb_4bit", r"Linear4bit", "",
                   "peft {release} 4-bit test refusal ({site})")
    monkeypatch.setattr(peft_backend, "BNB_PATHS", (eight, four))
    res = run_property(PROPERTIES["quantized"], spec, be, "zoo")
    assert res.status == "na" and "bnb4: peft" in res.detail and "bnb8: peft" in res.detail, res


def test_dora_on_8bit_still_crashes_at_the_installed_release():
    """DoRA's 8-bit forward (peft/tuners/lora/bnb.py:251, 'NoneType' object has no attribute 'unsqueeze') is no
    environment path: it stays a crash."""
    res = run_property(PROPERTIES["quantized"], SPECS.get("dora"), PeftBackend(), "zoo")
    assert res.status == "fail" and res.failure_kind == "crash", res
    assert "unsqueeze" in res.detail
