"""The runtime's contract (foundation issue) on tiny Llama, Qwen and GPT-2 models with the lora variant:
identity, gradient pattern, freezing, detach, checkpoints, merge, targeting and every bad input."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import impl
from impl import layers
from harness.models import ARCHS, batch, tiny
from tests import e2e_support as e2e

ROLES = {"llama": ("q", "v", "down"), "qwen": ("q", "v", "down"), "gpt2": ("qkv", "down")}


def logits(model, b=None):
    with torch.no_grad():
        return model(**(b or batch())).logits


def lora_cfg(arch, **kw):
    return impl.config("lora", r=4, alpha=6.0, target_roles=ROLES[arch], **kw)


def perturb(model, seed=1):
    e2e.perturb(model, next(iter(impl.adapters(model).values())).cfg.variant, seed)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before_state, before_flags):
    after = model.state_dict()
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], v) for k, v in before_state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_flags
    assert not impl.is_attached(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_freeze_count_and_grad_pattern(arch, dtype):
    model = tiny(arch, dtype=dtype)
    y0 = logits(model)
    impl.attach(model, lora_cfg(arch))
    assert type(model).__name__.endswith("ForCausalLM") or type(model).__name__ == "GPT2LMHeadModel"
    assert torch.equal(logits(model), y0), "lora is not bitwise identical at init"
    ads = impl.adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.adapter.{x}" for t in ads for x in ("A", "B")}
    expected = sum(4 * (a.d_in + a.d_out) for a in ads.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    model.train()
    model(**batch()).logits.float().pow(2).mean().backward()
    for name, ad in ads.items():
        assert torch.all(ad.A.grad == 0), f"{name}: A must have zero gradient at init (B = 0)"
        assert torch.any(ad.B.grad != 0), f"{name}: B has no gradient at init"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    perturb(model)
    for ad in ads.values():
        ad.A.grad = ad.B.grad = None
    model(**batch()).logits.float().pow(2).mean().backward()
    for name, ad in ads.items():
        assert torch.any(ad.A.grad != 0) and torch.any(ad.B.grad != 0), f"{name}: dead tensor after perturbing"


@pytest.mark.parametrize("arch", ARCHS)
def test_detach_restores_bitwise(arch):
    model = tiny(arch)
    before, flags = state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    y0 = logits(model)
    impl.attach(model, lora_cfg(arch))
    perturb(model)
    assert not torch.equal(logits(model), y0)
    impl.detach(model)
    assert torch.equal(logits(model), y0)
    assert_untouched(model, before, flags)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip_into_fresh_models(arch, tmp_path):
    model = tiny(arch)
    impl.attach(model, lora_cfg(arch))
    perturb(model)
    y1 = logits(model)
    f1, f2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    impl.save(model, f1)
    m2 = impl.load(tiny(arch), f1)
    assert torch.equal(logits(m2), y1)
    impl.save(m2, f2)
    assert f1.read_bytes() == f2.read_bytes()
    assert torch.equal(logits(impl.load(tiny(arch), f2)), y1)
    other = tiny(arch, seed=5)
    before, flags = state(other), {n: p.requires_grad for n, p in other.named_parameters()}
    with pytest.raises(impl.CheckpointError, match="differs from the one this adapter was trained on"):
        impl.load(other, f1)
    assert_untouched(other, before, flags)
    impl.load(other, f1, allow_base_mismatch=True)  # the explicit override
    assert impl.is_attached(other)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_hooked(arch):
    model = tiny(arch)
    impl.attach(model, lora_cfg(arch))
    perturb(model)
    y = logits(model)
    dtypes = {k: v.dtype for k, v in model.state_dict().items() if "adapter" not in k}
    impl.merge(model)
    assert not impl.is_attached(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes
    assert (logits(model) - y).abs().max() <= 1e-5 * y.abs().max()


def test_dropout_equals_hand_computation():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    model = nn.Sequential(lin)
    impl.attach(model, impl.config("lora", r=3, alpha=5.0, dropout=0.4, target_names=[r"^0$"]))
    perturb(model)
    ad = impl.adapters(model)["0"]
    x = torch.randn(4, 7)
    model.train()
    torch.manual_seed(123)
    y = model(x)
    torch.manual_seed(123)
    xd = torch.nn.functional.dropout(x, 0.4, training=True)
    base = torch.nn.functional.linear(x, lin.weight, lin.bias)
    hand = base + (5.0 / 3) * xd @ ad.A.T @ ad.B.T
    assert torch.allclose(y, hand, atol=1e-6)
    model.eval()
    assert torch.equal(model(x), model(x))
    assert torch.allclose(model(x), base + (5.0 / 3) * x @ ad.A.T @ ad.B.T, atol=1e-6)


# --------------------------------------------------------------------------------------------- targeting


def test_roles_target_the_right_modules():
    m = tiny("llama")
    impl.attach(m, impl.config("lora", target_roles=("q", "down"), layers=(1,)))
    assert sorted(impl.adapters(m)) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    g = tiny("gpt2")
    impl.attach(g, impl.config("lora", r=4, target_roles=("qkv", "o")))
    assert sorted(impl.adapters(g)) == [f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj")]
    ad = impl.adapters(g)["transformer.h.0.attn.c_attn"]
    assert (ad.d_in, ad.d_out) == (64, 192) and ad.kind == "conv1d"


def test_conv1d_transpose_handled_in_one_place():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv, lin = Conv1D(6, 4), nn.Linear(4, 6)
    lin.weight.data = conv.weight.data.t().clone()
    lin.bias.data = conv.bias.data.clone()
    a, b = nn.Sequential(conv), nn.Sequential(lin)
    for m in (a, b):
        torch.manual_seed(1)
        impl.attach(m, impl.config("lora", r=2, target_names=[r"^0$"]))
        perturb(m)
    x = torch.randn(3, 4)
    assert torch.allclose(a(x), b(x), atol=1e-6)
    assert torch.equal(layers.dense_weight(conv), lin.weight)


@pytest.mark.parametrize("roles", [("q",), ("k", "v")])
def test_fused_qkv_is_never_split(roles):
    g = tiny("gpt2")
    before, flags = state(g), {n: p.requires_grad for n, p in g.named_parameters()}
    with pytest.raises(impl.AttachError, match="c_attn"):
        impl.attach(g, impl.config("lora", target_roles=roles))
    assert_untouched(g, before, flags)


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, field",
    [({"r": 0}, "'r'"), ({"r": 2.5}, "'r'"), ({"alpha": -1.0}, "'alpha'"), ({"dropout": 1.0}, "'dropout'"),
     ({"dropout": -0.1}, "'dropout'"), ({"rank": 4}, "rank"), ({"target_roles": ("attn",)}, "target_roles"),
     ({"dtype": "int8"}, "'dtype'"), ({"rslora": 1}, "'rslora'"), ({"layers": (-1,)}, "'layers'")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(impl.ConfigError, match=field):
        impl.config("lora", **kwargs)


def test_unknown_variant_lists_registered():
    with pytest.raises(impl.ConfigError, match="unknown variant 'nope'.*lora"):
        impl.config("nope")


def test_config_is_immutable_and_roundtrips():
    cfg = impl.config("lora", r=4, target_roles=["q"], dtype="bfloat16")
    with pytest.raises(AttributeError):
        cfg.r = 5
    assert impl.Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.replace(r=2).r == 2 and cfg.r == 4


@pytest.mark.parametrize(
    "cfg_kwargs, error, match",
    [
        ({"target_names": ["nothing_matches"]}, impl.AttachError, "no module matches.*q_proj"),
        ({"target_roles": ("q",), "r": 65}, impl.AttachError, "r=65 exceeds.*q_proj"),
        ({}, impl.AttachError, "selects nothing"),
    ],
)
def test_bad_attach_is_clear_and_leaves_model_untouched(cfg_kwargs, error, match):
    m = tiny("llama")
    before, flags = state(m), {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(error, match=match):
        impl.attach(m, impl.config("lora", **cfg_kwargs))
    assert_untouched(m, before, flags)


def test_attach_twice_is_an_error():
    m = tiny("llama")
    impl.attach(m, lora_cfg("llama"))
    with pytest.raises(impl.AttachError, match="already attached"):
        impl.attach(m, lora_cfg("llama"))
    with pytest.raises(impl.AttachError, match="no adapter"):
        impl.detach(tiny("llama"))


def test_merge_refused_on_quantized_layer():
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(8, 6, has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(torch.randn(6, 8), requires_grad=False, has_fp16_weights=False)
    m = nn.Sequential(q.to("cpu"))
    impl.attach(m, impl.config("lora", r=2, target_names=[r"^0$"]))
    with pytest.raises(impl.MergeError, match="quantized layer '0'"):
        impl.merge(m)
    assert impl.is_attached(m)


def test_a_rewriting_variant_is_refused_on_a_quantized_layer_without_declaring_it(tmp_path):
    """A user variant with rewrites_base = True that keeps the default quantized = True: attach refuses the
    bitsandbytes layer with the clear error naming it, before any init, and leaves the model untouched
    (it used to crash in layers.write_weight with a TypeError after the init ran)."""
    import bitsandbytes as bnb

    mod = tmp_path / "residual_variant.py"
    mod.write_text(
        "import torch\n"
        "from impl import register, Variant, TensorDecl\n"
        "@register\n"
        "class Residual(Variant):\n"
        "    name = 'test_residual'\n"
        "    rewrites_base = True\n"
        "    def tensors(self, d_in, d_out, cfg):\n"
        "        return {'A': TensorDecl((cfg.r, d_in), 'empty'), 'B': TensorDecl((d_out, cfg.r), 'empty')}\n"
        "    def init(self, ad, W, cfg):\n"
        "        ad.A.copy_(W[:cfg.r]); ad.B.copy_(torch.eye(ad.d_out)[:, :cfg.r])\n"
        "        return W - ad.B @ ad.A\n"
        "    def forward(self, ad, x, y):\n"
        "        return y + (x.to(ad.param_dtype) @ ad.A.t() @ ad.B.t()).to(y.dtype)\n"
    )
    impl.load_variant_module(str(mod))
    try:
        q = bnb.nn.Linear8bitLt(8, 6, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(torch.randn(6, 8), requires_grad=False, has_fp16_weights=False)
        m = nn.Sequential(q.to("cpu"))
        before, flags = state(m), {n: p.requires_grad for n, p in m.named_parameters()}
        with pytest.raises(impl.AttachError, match="cannot adapt the quantized layer '0'"):
            impl.attach(m, impl.config("test_residual", r=2, target_names=[r"^0$"]))
        assert_untouched(m, before, flags)
        plain = nn.Sequential(nn.Linear(8, 6))  # on a dense layer it attaches and rewrites
        y0 = plain(torch.ones(1, 8))
        impl.attach(plain, impl.config("test_residual", r=2, target_names=[r"^0$"]))
        assert impl.adapters(plain)["0"].rewritten
        assert torch.allclose(plain(torch.ones(1, 8)), y0, atol=1e-5)
    finally:
        impl.REGISTRY.unregister("test_residual")


def _saved(tmp_path, arch="llama"):
    m = tiny(arch)
    impl.attach(m, lora_cfg(arch))
    perturb(m)
    f = tmp_path / "a.safetensors"
    impl.save(m, f)
    return f


def _rewrite(f, mutate_meta=None, drop=None):
    """Rewrite a checkpoint with changed metadata or a dropped tensor (a foreign or damaged file)."""
    from safetensors import safe_open

    from impl.checkpoint import serialize

    with safe_open(str(f), "pt") as h:
        meta, tensors = dict(h.metadata()), {k: h.get_tensor(k) for k in h.keys()}
    if mutate_meta:
        mutate_meta(meta)
    if drop:
        tensors = {k: v for k, v in tensors.items() if not k.endswith(drop)}
    f.write_bytes(serialize(tensors, meta))


def _bad_config_variant(meta):
    cfg = json.loads(meta["config"])
    cfg["variant"] = meta["variant"] = "no_such_variant"
    meta["config"] = json.dumps(cfg)


def _bad_shape(meta):
    cfg = json.loads(meta["config"])
    cfg["r"] = 3
    meta["config"] = json.dumps(cfg)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), "truncated or corrupt"),
        (lambda f: f.write_bytes(b"\x00" * 64), "truncated or corrupt"),
        (lambda f: _rewrite(f, lambda m: m.update(format="other/9")), "format"),
        (lambda f: _rewrite(f, lambda m: m.clear() or m.update(format="x")), "format"),
        (lambda f: _rewrite(f, drop="::B"), "missing tensors \\['B'\\]"),
        (lambda f: _rewrite(f, _bad_config_variant), "unknown variant 'no_such_variant'"),
        (lambda f: _rewrite(f, _bad_shape), "shape"),
        (lambda f: f.unlink(), "cannot read"),
    ],
    ids=["truncated", "garbage", "other-version", "foreign", "missing-tensor", "other-variant", "other-shape", "missing-file"],
)
def test_bad_checkpoint_is_clear_and_leaves_model_untouched(tmp_path, damage, match):
    f = _saved(tmp_path)
    damage(f)
    m = tiny("llama")
    before, flags = state(m), {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(impl.CheckpointError, match=match):
        impl.load(m, f)
    assert_untouched(m, before, flags)


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    f = _saved(tmp_path, "llama")
    g = tiny("gpt2")
    before, flags = state(g), {n: p.requires_grad for n, p in g.named_parameters()}
    with pytest.raises(impl.CheckpointError):
        impl.load(g, f)
    assert_untouched(g, before, flags)


def test_save_is_atomic(tmp_path, monkeypatch):
    f = _saved(tmp_path)
    good = f.read_bytes()
    m = tiny("llama")
    impl.attach(m, lora_cfg("llama"))
    import impl.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "fsync", boom)
    with pytest.raises(OSError):
        impl.save(m, f)
    assert f.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [f.name]


def test_knobs_validated():
    m = tiny("llama")
    impl.attach(m, lora_cfg("llama"))
    with pytest.raises(impl.ConfigError, match="no runtime knob"):
        impl.set_knobs(m, coeff=0.0)


def test_user_variant_registers_from_outside(tmp_path):
    mod = tmp_path / "my_variant.py"
    mod.write_text(
        "from impl import register, Variant, TensorDecl\n"
        "@register\n"
        "class Shift(Variant):\n"
        "    name = 'test_shift'\n"
        "    fields = {'scale': 1.0}\n"
        "    def tensors(self, d_in, d_out, cfg):\n"
        "        return {'t': TensorDecl((d_out,), 'zeros')}\n"
        "    def forward(self, ad, x, y):\n"
        "        return y + ad.cfg.scale * ad.t.to(y.dtype)\n"
    )
    impl.load_variant_module(str(mod))
    try:
        assert "test_shift" in impl.VARIANTS
        cfg = impl.config("test_shift", r=1, scale=2.0, target_names=[r"^0$"])
        m = nn.Sequential(nn.Linear(3, 2))
        x = torch.randn(1, 3)
        y0 = m(x)
        impl.attach(m, cfg)
        assert torch.equal(m(x), y0)
    finally:
        impl.REGISTRY.unregister("test_shift")
