"""Hostile and broken checkpoints (issue #27): every refusal is a CheckpointError (or a ConfigError for a config
built by hand) naming the problem, it comes fast, and the model stays bit-identical (same state dict, hooks and
requires_grad flags)."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors import safe_open

import impl
from impl.checkpoint import serialize
from harness.models import tiny
from tests.test_runtime import assert_untouched, lora_cfg, perturb, state

BAD_REGEX = r"^(.*?)*\d\d\d$"  # backtracks exponentially on a module name (`re` takes minutes)


def _flags(m):
    return {n: p.requires_grad for n, p in m.named_parameters()}


def _save(tmp_path, cfg=None, name="a.safetensors"):
    m = tiny("llama")
    impl.attach(m, cfg or lora_cfg("llama"))
    perturb(m)
    f = tmp_path / name
    impl.save(m, f)
    return f


def _edit(f, meta_fn=None, tensor_fn=None):
    """Rewrite a checkpoint with its metadata strings and/or tensors changed."""
    with safe_open(str(f), "pt") as h:
        meta, tensors = dict(h.metadata()), {k: h.get_tensor(k) for k in h.keys()}
    if meta_fn:
        meta_fn(meta)
    if tensor_fn:
        tensor_fn(tensors)
    f.write_bytes(serialize(tensors, meta))
    return f


def _config_edit(**fields):
    def fn(meta):
        cfg = json.loads(meta["config"])
        cfg.update(fields)
        meta["config"] = json.dumps(cfg)
    return fn


def _refused(f, match, **kw):
    """load refuses f with a CheckpointError matching `match` and leaves a fresh model bit-identical."""
    m = tiny("llama")
    before, flags = state(m), _flags(m)
    with pytest.raises(impl.CheckpointError, match=match):  # (a refusal's work is bounded by impl: the header
        impl.load(m, f, **kw)                                 # length cap, the regex engine's match budget)
    assert_untouched(m, before, flags)


# ----------------------------------------------------------------------------------------------- metadata types


@pytest.mark.parametrize("key, value, match, kw", [
    ("knobs", "[]", "'knobs' is list, expected dict", {}),
    ("knobs", '"x"', "'knobs' is str, expected dict", {}),
    ("base_hashes", "[]", "'base_hashes' is list", {"allow_base_mismatch": True}),
    ("base_hashes", '{"model.layers.0.self_attn.q_proj": 5}', "not a sha256", {"allow_base_mismatch": True}),
    ("targets", '{"a": 1}', "'targets' is dict", {}),
    ("targets", "[1, 2]", "not a list of layer names", {}),
    ("config", "[]", "'config' is list, expected dict", {}),
    ("config", '"lora"', "'config' is str, expected dict", {}),
    ("config", "[" * 100_000 + "]" * 100_000, "RecursionError", {}),
    ("config", '{"variant": "lora", "r": ' + "9" * 5000 + "}", "metadata corrupt", {}),
    ("knobs", "{" * 50_000 + "}" * 50_000, "metadata corrupt", {}),
])
def test_metadata_of_the_wrong_type_is_refused_before_the_model_is_touched(tmp_path, key, value, match, kw):
    f = _edit(_save(tmp_path), lambda m: m.update({key: value}))
    _refused(f, match, **kw)


@pytest.mark.parametrize("knobs, match", [
    ({"model.layers.0.self_attn.q_proj": {"coeff": 1.0}}, r"no runtime knob\(s\) \['coeff'\]"),
    ({"model.layers.0.self_attn.q_proj": []}, "expected an object"),
    ({"model.layers.9.mlp.nowhere": {}}, "does not target"),
])
def test_unknown_knobs_are_refused(tmp_path, knobs, match):
    f = _edit(_save(tmp_path), lambda m: m.update(knobs=json.dumps(knobs)))
    _refused(f, match)


@pytest.fixture(scope="module")
def antipasto_file(tmp_path_factory):
    cfg = impl.config("antipasto", r=4, target_roles=("q", "v"))
    return _save(tmp_path_factory.mktemp("ap"), cfg)


@pytest.mark.parametrize("value", ['"0.5"', "NaN", "Infinity", "1e39", "1" + "0" * 400, "true", "null"])
def test_knob_values_that_are_not_finite_numbers_are_refused(antipasto_file, tmp_path, value):
    f = tmp_path / "k.safetensors"
    f.write_bytes(antipasto_file.read_bytes())

    def bad(meta):
        knobs = json.loads(meta["knobs"])
        first = next(iter(knobs))
        meta["knobs"] = json.dumps(knobs).replace('"coeff": 1.0', '"coeff": ' + value, 1)
        assert first in meta["knobs"] and value in meta["knobs"]
    _edit(f, bad)
    _refused(f, "knob 'coeff': expected a finite")


def test_good_antipasto_knobs_still_load(antipasto_file):
    m = impl.load(tiny("llama"), antipasto_file)
    assert {ad.knobs["coeff"] for ad in impl.adapters(m).values()} == {1.0}


# ----------------------------------------------------------------------------------------------- config regexes


def test_pathological_regex_in_a_checkpoint_is_refused_fast_naming_the_field(tmp_path):
    f = _edit(_save(tmp_path), _config_edit(exclude_names=["lm_head", BAD_REGEX]))
    _refused(f, "field 'exclude_names'.*catastrophic backtracking")


@pytest.mark.parametrize("field, pattern, match", [
    ("exclude_names", "(unclosed", "field 'exclude_names': invalid regex"),
    ("target_names", "[z-a]", "field 'target_names': invalid regex"),
    ("target_names", "a" * 300, "field 'target_names': regex of 300 characters is longer than 256"),
])
def test_invalid_or_overlong_regex_is_a_config_error_naming_the_field(tmp_path, field, pattern, match):
    with pytest.raises(impl.ConfigError, match=match):
        impl.config("lora", target_roles=("q",), **{field: [pattern]})
    f = _edit(_save(tmp_path), _config_edit(**{field: [pattern]}))
    _refused(f, match)


@pytest.mark.parametrize("pattern", [BAD_REGEX, r"(.|.)*Z"])
def test_a_user_config_with_a_backtracking_regex_does_not_hang_attach(pattern):
    m = tiny("llama")
    before, flags = state(m), _flags(m)
    try:  # matching runs under impl.targeting's MATCH_BUDGET_S: it ends, in one outcome or the other
        impl.attach(m, impl.config("lora", r=4, target_roles=("q",), exclude_names=[pattern]))
    except impl.ConfigError as e:
        assert "field 'exclude_names'" in str(e)
        assert_untouched(m, before, flags)
    else:  # the engine saw through it (no 'Z' in any name): attached normally
        assert len(impl.adapters(m)) == 2


# ----------------------------------------------------------------------------------------------- not a file


def test_fifo_and_character_device_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    targets = [fifo] + ([p for p in ("/dev/zero", "/dev/urandom") if os.path.exists(p)][:1])
    for path in targets:
        result: list = []
        t = threading.Thread(target=lambda p=path: result.append(_catch(p)), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"load({path}) hangs"
        assert isinstance(result[0], impl.CheckpointError) and "not a regular file" in str(result[0])
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    _refused(folder, "not a regular file|cannot read")


def _catch(path):
    try:
        impl.load(tiny("llama"), path)
    except Exception as e:  # noqa: BLE001 - returned to the test thread
        return e
    return None


def test_what_is_read_is_capped_by_the_header_sizes(tmp_path):
    f = _save(tmp_path)
    good = f.read_bytes()
    f.write_bytes(good + b"\0" * (1 << 20))  # trailing bytes the header does not declare
    _refused(f, "header declares .* bytes, the file has")
    n = int.from_bytes(good[:8], "little")
    f.write_bytes((10**15).to_bytes(8, "little") + good[8:])  # a header length beyond the file
    _refused(f, "header length .* exceeds the file")
    f.write_bytes(good[: 8 + n + 10])  # cut inside the tensor data
    _refused(f, "truncated or corrupt")


# ----------------------------------------------------------------------------------------------- tensor values


def _poison(key_suffix, value):
    def fn(tensors):
        key = next(k for k in sorted(tensors) if k.endswith(key_suffix))
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return fn


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_an_adapter_tensor_is_refused_unless_allowed(tmp_path, value):
    f = _edit(_save(tmp_path), tensor_fn=_poison("::A", value))
    _refused(f, "tensor 'A' holds NaN or Inf; pass allow_nonfinite=True")
    m = impl.load(tiny("llama"), f, allow_nonfinite=True)  # the documented override
    assert impl.is_attached(m)


def test_nan_in_a_stored_residual_is_refused(tmp_path):
    f = _save(tmp_path, impl.config("pissa", r=4, target_roles=("q",)))
    _edit(f, tensor_fn=_poison("::base_weight", float("nan")))
    _refused(f, "tensor 'base_weight' holds NaN or Inf")


@pytest.mark.parametrize("suffix, dtype", [("::A", torch.float64), ("::B", torch.bfloat16),
                                           ("::base_weight", torch.float16)])
def test_tensor_of_another_dtype_than_the_config_declares_is_refused(tmp_path, suffix, dtype):
    cfg = impl.config("pissa", r=4, target_roles=("q",))
    f = _save(tmp_path, cfg)

    def cast(tensors):
        for k in tensors:
            if k.endswith(suffix):
                tensors[k] = tensors[k].to(dtype)
    _edit(f, tensor_fn=cast)
    _refused(f, f"tensor '{suffix[2:]}' is {dtype}, but the config declares torch.float32")


def test_a_clean_checkpoint_still_round_trips(tmp_path):
    f = _save(tmp_path, impl.config("pissa", r=4, target_roles=("q", "v")))
    m = impl.load(tiny("llama"), f)
    impl.save(m, tmp_path / "b.safetensors")
    assert (tmp_path / "b.safetensors").read_bytes() == f.read_bytes()
