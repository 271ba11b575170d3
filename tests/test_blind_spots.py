"""The helpers behind the blind-spot properties: the pass/fail rule and the printed scaled error agree, the
random-init statistics accept correct inits and reject wrong scales, and the expected target sets of the tiny
models are what the architectures hold."""
import torch

from harness import tolerance as tol
from harness.properties import moments_agree
from harness.whole_model import expected_targets


def test_close_fails_exactly_when_the_scaled_error_exceeds_one():
    g = torch.Generator().manual_seed(0)
    for i in range(200):
        y_ref = torch.randn(4, 5, generator=g, dtype=torch.float64)
        y_base = y_ref + torch.randn(4, 5, generator=g, dtype=torch.float64) * 10.0 ** -(i % 8)
        y = y_ref + torch.randn(4, 5, generator=g, dtype=torch.float64) * 10.0 ** -(i % 17)
        ok, err = tol.close(y, y_ref, y_base, torch.float32)
        assert ok == (err <= 1.0), (i, ok, err)


def test_moments_accept_correct_inits_and_reject_wrong_scales():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        u = torch.empty(4096, dtype=torch.float64).uniform_(-0.2, 0.2, generator=g)
        n = torch.randn(4096, generator=g, dtype=torch.float64) * 0.5
        assert moments_agree(u, "uniform", 0.2) == ""
        assert moments_agree(n, "normal", 0.5) == ""
        assert "standard deviation" in moments_agree(n * 1.3, "normal", 0.5)
        assert "outside the declared bound" in moments_agree(u, "uniform", 0.15)
        assert "standard deviation" in moments_agree(u * 0.7, "uniform", 0.2)


def test_expected_targets_follow_the_architecture_tables():
    sel = {"target_roles": ("up", "qkv"), "layers": (1,), "exclude_names": ("lm_head",)}
    assert expected_targets("gpt2", sel) == {"transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"}
    sel = {"target_roles": ("q", "down"), "target_names": ("mlp",)}
    assert expected_targets("llama", sel) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert expected_targets("qwen", {"target_roles": ("v",), "exclude_names": (r"\.0\.",)}) == {
        "model.layers.1.self_attn.v_proj"}
