"""Each property of harness.api flags a defect planted in PEFT (monkeypatched, as the bugs PEFT had) through the
engine, and passes on the unpatched release; the live-knob path of runtime_scale flags a planted impl defect."""
import contextlib
import dataclasses
import math
from unittest import mock

import pytest
import torch

peft = pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from peft.tuners import tuners_utils  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from peft.tuners.lora import model as lora_model  # noqa: E402

from harness import PROPERTIES  # noqa: E402
from harness.backends import ImplBackend  # noqa: E402
from harness.backends.peft import PeftBackend  # noqa: E402
from harness.engine import run_property  # noqa: E402
from spec import SPECS  # noqa: E402


def _spec(variant):
    """The spec; "lora-plain": LoRA with no rsLoRA field (alpha/r only), whose multi-adapter API PEFT gets right
    (with rsLoRA its add_weighted_adapter does not: test_peft_findings_are_reported_as_failures)."""
    if variant == "lora-plain":
        return dataclasses.replace(SPECS.get("lora"), fields=None)
    return SPECS.get(variant)


def _run(prop, variant, be=None):
    return run_property(PROPERTIES[prop], _spec(variant), be or PeftBackend(), "zoo")


def _flagged(prop, variant, patch, text, be=None):
    """The property passes on the unpatched code and fails (an assertion, with `text`) under the patch."""
    assert _run(prop, variant, be).status == "pass"
    with patch:
        res = _run(prop, variant, be)
    assert res.status == "fail" and res.failure_kind == "assertion", res
    assert text in res.detail, res.detail


def _set_scale_without_rslora(self, adapter, scale):
    """set_scale that always uses alpha/r (the rsLoRA rule forgotten)."""
    if adapter in self.scaling:
        self.scaling[adapter] = scale * self.lora_alpha[adapter] / self.r[adapter]


def test_runtime_scale_flags_set_scale_ignoring_rslora():
    _flagged("runtime_scale", "lora", mock.patch.object(lora_layer.LoraLayer, "set_scale", _set_scale_without_rslora),
             "set_scale(")


def test_runtime_scale_flags_a_knob_change_that_does_not_reach_the_layer():
    """impl's live-knob path, on the zoo mutant that reads coeff from the config fixed at attach."""
    from harness.zoo import installed
    from harness.zoo.antipasto import MUTANTS

    m = next(m for m in MUTANTS if m.name == "antipasto.coeff_read_once")
    prop = PROPERTIES["runtime_scale"]
    assert run_property(prop, SPECS.get("antipasto"), ImplBackend(), "zoo").status == "pass"
    with installed(m) as spec:
        res = run_property(prop, spec, ImplBackend(), "zoo")
    assert res.status == "fail" and res.failure_kind == "assertion" and "set_knob(" in res.detail, res


def test_rank_patterns_flags_an_ignored_rank_pattern():
    _flagged("rank_patterns", "lora", mock.patch.object(lora_model, "get_pattern_key", lambda keys, key: ""),
             "the layer's own rank was not applied")


def test_adapters_on_one_module_flags_a_merge_of_only_the_first_adapter():
    real = lora_layer.Linear.merge

    def merge_first(self, safe_merge=False, adapter_names=None):
        return real(self, safe_merge=safe_merge, adapter_names=None if adapter_names is None else adapter_names[:1])

    _flagged("adapters_on_one_module", "lora-plain", mock.patch.object(lora_layer.Linear, "merge", merge_first),
             "both merged")


@contextlib.contextmanager
def _disable_without_finally(self):
    """disable_adapter that restores the adapter only when the block ends normally."""
    was = self._adapters_disabled
    self.base_model.disable_adapter_layers()
    self._adapters_disabled = True
    yield
    self._adapters_disabled = was
    if not was:
        self.base_model.enable_adapter_layers()


def test_adapter_lifecycle_flags_disable_not_restored_on_exception():
    _flagged("adapter_lifecycle", "lora", mock.patch.object(PeftModel, "disable_adapter", _disable_without_finally),
             "left by an exception")


def test_adapter_lifecycle_flags_delete_leaving_the_weight_merged():
    _flagged("adapter_lifecycle", "lora",
             mock.patch.object(tuners_utils, "_check_adapters_not_merged", lambda model, names: None),
             "base weight not restored")


def test_layer_kinds_flags_a_scaled_embedding_whose_scale_is_ignored():
    _flagged("layer_kinds", "lora", mock.patch.object(tuners_utils.BaseTunerLayer, "_get_embed_scale",
                                                      lambda self: None), "scaled")


def test_layer_kinds_flags_a_conv2d_unmerge_that_does_nothing():
    _flagged("layer_kinds", "ia3", mock.patch("peft.tuners.ia3.layer.Conv2d.unmerge", lambda self: None),
             "unmerge does not restore")


def test_layer_kinds_flags_a_merge_that_forgets_the_adapter_bias():
    real = lora_layer.Linear.merge

    def merge_no_bias(self, safe_merge=False, adapter_names=None):
        real(self, safe_merge=safe_merge, adapter_names=adapter_names)
        for a in self.merged_adapters:
            if self.lora_bias.get(a):
                self.get_base_layer().bias.data -= self.lora_B[a].bias * self.scaling[a]

    _flagged("layer_kinds", "lora", mock.patch.object(lora_layer.Linear, "merge", merge_no_bias), "adapter-output bias")


def test_model_merge_unload_flags_a_layer_left_unmerged():
    real = lora_layer.Linear.merge
    calls = []

    def skip_first(self, *a, **k):
        calls.append(1)
        if len(calls) % 7 == 1:  # every seventh merge call: at least one layer of each model the property builds
            return None
        return real(self, *a, **k)

    _flagged("model_merge_unload", "lora", mock.patch.object(lora_layer.Linear, "merge", skip_first),
             "merged model's logits differ")


def test_peft_findings_are_reported_as_failures():
    """The three PEFT 0.21.2 defects the properties found: two DoRA adapters active at once in eval mode (the
    second adapter's DoRA rescale reuses an output that already holds the first adapter's), add_weighted_adapter
    on PiSSA rewriting the base weight, and add_weighted_adapter with rsLoRA scaling the result by sqrt(r)."""
    res = _run("adapters_on_one_module", "lora")
    assert res.status == "fail" and "'rslora': True" in res.detail and "add_weighted_adapter" in res.detail, res
    res = _run("adapters_on_one_module", "dora")
    assert res.status in ("fail", "deviation") and "both active" in res.detail, res
    res = _run("adapters_on_one_module", "pissa")
    assert res.status in ("fail", "deviation") and "add_weighted_adapter" in res.detail, res
    assert math.isfinite(res.worst_error)


def test_a_config_peft_refuses_on_conv2d_is_na_in_its_words():
    """peft 0.9.0 raised "Conv2d does not support DoRA yet": that release's refusal is n/a quoting it, not a crash
    counted against PEFT (planted here on the current release)."""
    real = lora_layer.Conv2d.__init__

    def refuse_dora(self, base_layer, adapter_name, config, *a, **k):
        if config.use_dora:
            raise ValueError(f"{self.__class__.__name__} does not support DoRA yet, please set it to False")
        real(self, base_layer, adapter_name, config, *a, **k)

    with mock.patch.object(lora_layer.Conv2d, "__init__", refuse_dora):
        res = _run("layer_kinds", "dora")
    assert res.status == "na" and "refuses dora on Conv2d: Conv2d does not support DoRA yet" in res.detail, res


def _embedding_a_drawn_nonzero(real):
    """PEFT's Embedding reset with lora_embedding_A drawn N(0, 1) as well as B: not the identity at init (the
    oracle, run on the perturbed tensors, cannot see it)."""

    def reset(self, adapter_name, init_lora_weights):
        real(self, adapter_name, init_lora_weights)
        if adapter_name in self.lora_embedding_A:
            torch.nn.init.normal_(self.lora_embedding_A[adapter_name])

    return reset


def test_layer_kinds_flags_an_embedding_adapter_that_is_not_the_identity_at_init():
    _flagged("layer_kinds", "lora", mock.patch.object(lora_layer.LoraLayer, "reset_lora_parameters",
                                                      _embedding_a_drawn_nonzero(lora_layer.LoraLayer.reset_lora_parameters)),
             "Embedding: not bitwise identical to the base at init")


class _PlainEmbeddingOnly(PeftBackend):
    """A library that adapts plain nn.Embedding only, and says so."""

    name = "peft-plain-embedding"

    def unsupported(self, spec, capability):
        if capability == "scaled_embedding":
            return "this library adapts plain nn.Embedding only"
        return super().unsupported(spec, capability)


def test_a_library_with_plain_embedding_only_says_so_and_is_judged_on_plain_embeddings():
    from harness.backends.protocol import lacks

    be = _PlainEmbeddingOnly()
    assert lacks(be, _spec("lora"), "embedding") is None
    assert "plain nn.Embedding only" in lacks(be, _spec("lora"), "scaled_embedding")
    # the scaled-embedding bug is outside what it claims: layer_kinds passes; the full backend is flagged
    with mock.patch.object(tuners_utils.BaseTunerLayer, "_get_embed_scale", lambda self: None):
        assert _run("layer_kinds", "lora", be).status == "pass"
        assert _run("layer_kinds", "lora").status == "fail"


def _checks(res):
    return {c["name"]: c["status"] for c in res.checks or ()}


def test_one_failing_check_no_longer_hides_another_adapters_on_one_module():
    """DoRA's 'both active' fails on PEFT 0.21.2 and used to hide every later check: its two-adapter merge and
    add_weighted_adapter now have their own verdicts. On LoRA (rsLoRA rule), a two-adapter merge that merges only
    the first adapter (the bug PEFT 0.21.0 fixed) and add_weighted_adapter's sqrt(r) with rsLoRA are both reported,
    under different scaling rules. The property's own verdict and detail stay those of its first failing check."""
    real = lora_layer.Linear.merge

    def merge_first(self, safe_merge=False, adapter_names=None):
        return real(self, safe_merge=safe_merge, adapter_names=None if adapter_names is None else adapter_names[:1])

    dora = _run("adapters_on_one_module", "dora")
    assert dora.status in ("fail", "deviation") and "both active" in dora.detail, dora
    assert _checks(dora)["both_active"] in ("fail", "deviation") and _checks(dora)["first_alone"] == "pass", dora
    assert "weighted_one" in _checks(dora), dora  # reached despite the earlier failure
    clean = _run("adapters_on_one_module", "lora")
    assert _checks(clean)["weighted_one"] == "fail" and _checks(clean)["both_merged"] == "pass", clean.checks
    with mock.patch.object(lora_layer.Linear, "merge", merge_first):
        res = _run("adapters_on_one_module", "lora")
    assert res.status == "fail", res
    checks = {c["name"]: c for c in res.checks}
    assert checks["both_merged"]["status"] == "fail" and "both merged" in checks["both_merged"]["detail"], res
    assert checks["weighted_one"]["status"] == "fail" and "'rslora': True" in checks["weighted_one"]["detail"], res
    assert checks["first_alone"]["status"] == "pass" and checks["other_alone"]["status"] == "pass"
    assert "checks" in res.to_json() and "checks" not in _run("identity_at_init", "lora").to_json()


def test_adapter_lifecycle_reports_the_disable_and_the_delete_bug_together():
    """Before: either the disable-on-exception bug or the delete bug, never both."""
    with mock.patch.object(PeftModel, "disable_adapter", _disable_without_finally), \
            mock.patch.object(tuners_utils, "_check_adapters_not_merged", lambda model, names: None):
        res = _run("adapter_lifecycle", "lora")
    assert res.status == "fail" and "left by an exception" in res.detail, res
    assert _checks(res)["disable_exception"] == "fail" and _checks(res)["delete_merged"] == "fail", res.checks
    assert _checks(res)["nested_disable"] == "pass" and _checks(res)["unknown_name"] == "pass", res.checks
    assert set(_checks(_run("adapter_lifecycle", "lora")).values()) == {"pass"}


def test_measured_worst_error_serialises_as_a_plain_number():
    import copy
    import pickle

    from harness.checks import Measured, Outcome

    m = Measured(0.5, [Outcome("a")])
    assert type(copy.deepcopy(m)) is float and pickle.loads(pickle.dumps(m)) == 0.5
    res = _run("adapter_lifecycle", "lora")
    assert type(res.worst_error) is float and res.to_json()["checks"][0]["name"] == "nested_disable"


def test_rank_patterns_flags_a_pattern_key_matched_as_a_bare_suffix():
    """A rank/alpha pattern key matched as a bare suffix of the module name ('p1' taking 'xp1' too), the bug class
    of a key that is also the end of another module's name."""
    def suffix_match(keys, key):
        return next((k for k in keys if key.endswith(k)), key)

    _flagged("rank_patterns", "lora", mock.patch.object(lora_model, "get_pattern_key", suffix_match), "'xp1'")
