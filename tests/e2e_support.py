"""Shared machinery of the end-to-end tests on tiny transformers models (issue 21).

Everything variant-specific comes from the variant's spec: the roles it targets (`spec.roles`), whether it
needs calibration data (`spec.data`), its identity class and tolerance factor, its quantized support, its
dropout and its trainable tensors. No test names a variant.

The teacher task: the targets are the logits of a fixed copy of the base model whose targeted weights were
perturbed by Gaussian noise (TEACHER_SIGMA times each weight's own standard deviation, a fixed seed). The
student is the base model with the adapter attached; the loss is the KL divergence from the teacher's
next-token distribution over the non-padding tokens. A dead adapter (no gradient, not in the optimizer, not
in the forward) leaves the loss exactly where it started.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import impl
from impl import layers
from spec import SPECS, tolerance as tol
from tests.models import batch, calibration

R = 8  # rank of every e2e config: within every targeted layer of the tiny models (min width 32), even (hra)
ALPHA = 12.0  # alpha != r, so a scale bug shows
STEPS = 30
LR = 1e-2
TEACHER_SIGMA = 1.0
MIN_FALL = 0.10  # the loss after STEPS AdamW steps is at most (1 - MIN_FALL) times the loss before
FUSED_QKV = ("q", "k", "v")


def variants() -> list[str]:
    """Every registered built-in variant, in registration order. Each must have a spec (SPECS.get raises)."""
    return list(impl.VARIANTS)


def roles_for(spec, arch: str) -> tuple[str, ...]:
    """The spec's roles; GPT-2 fuses q, k and v into c_attn, which takes the role 'qkv'."""
    if arch != "gpt2":
        return spec.roles
    out: list[str] = []
    for role in spec.roles:
        role = "qkv" if role in FUSED_QKV else role
        if role not in out:
            out.append(role)
    return tuple(out)


def e2e_config(name: str, arch: str, **over):
    """The config every e2e test attaches: r = R, alpha = ALPHA, the spec's roles, the variant's defaults."""
    spec = SPECS.get(name)
    return impl.config(name, **{"r": R, "alpha": ALPHA, "target_roles": roles_for(spec, arch), **over})


def calibration_for(spec, device: str = "cpu") -> list[dict[str, torch.Tensor]] | None:
    """Anisotropic calibration batches with right padding and an attention mask, where the spec uses data."""
    if spec.data == "none":
        return None
    return [{k: v.to(device) for k, v in b.items()} for b in calibration()]


def attach(model: nn.Module, name: str, arch: str, **over) -> nn.Module:
    """Attach the variant by role, with calibration data where its spec uses data."""
    spec = SPECS.get(name)
    return impl.attach(model, e2e_config(name, arch, **over), calibration=calibration_for(spec))


def logits(model: nn.Module, b: dict) -> torch.Tensor:
    """The model's logits on b, without gradient, in whatever mode the model is in."""
    with torch.no_grad():
        return model(**b).logits


def probe_batch() -> dict[str, torch.Tensor]:
    """The batch every comparison runs on: 2 x 10 tokens, the second row right-padded by 3."""
    return batch(seed=7)


def train_batch() -> dict[str, torch.Tensor]:
    return batch(seed=0, b=2, t=12, pad=3)


def trainables(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict entry that is not an adapter tensor, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapter." not in k}


def teacher_model(student_base: nn.Module, targets: list[str], seed: int = 1234) -> nn.Module:
    """A fixed copy of the base model whose targeted weights carry Gaussian noise (TEACHER_SIGMA x their std)."""
    teacher = copy.deepcopy(student_base)
    g = torch.Generator().manual_seed(seed)
    modules = dict(teacher.named_modules())
    with torch.no_grad():
        for name in targets:
            m = modules[name]
            W = layers.dense_weight(m).float()
            noise = torch.randn(W.shape, generator=g) * W.std() * TEACHER_SIGMA
            layers.write_weight(m, W + noise.to(W.device))
    return teacher


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over the non-padding tokens, in fp32."""
    lp = F.log_softmax(student_logits.float(), -1)
    lq = F.log_softmax(teacher_logits.float(), -1)
    per_token = (lq.exp() * (lq - lp)).sum(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum()


def train(model: nn.Module, b: dict, target_logits: torch.Tensor, steps: int = STEPS, lr: float = LR) -> tuple[float, float]:
    """`steps` AdamW steps (weight_decay 0) on the teacher task; returns (loss before, loss after), measured
    without gradient. The model is left in the mode it was in."""
    was_training = model.training
    params = list(trainables(model).values())
    if not params:
        raise AssertionError("the adapted model has no trainable tensor")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def loss_now() -> float:
        with torch.no_grad():
            return float(kl_loss(model(**b).logits, target_logits, b["attention_mask"]))

    before = loss_now()
    model.train()
    for _ in range(steps):
        loss = kl_loss(model(**b).logits, target_logits, b["attention_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.train(was_training)
    return before, loss_now()


def perturb(model: nn.Module, name: str, seed: int = 3) -> None:
    """Move every trainable tensor of every adapter away from its init (the spec's `perturb` where it declares
    a domain, else N(0, 0.5²)), as the property library does (conventions section 8)."""
    spec = SPECS.get(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in impl.adapters(model).values():
            live = ad.tensors()
            for ts in spec.trainable:
                t = live[ts.name]
                new = ts.perturb(tuple(t.shape), g) if ts.perturb else torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.5
                t.copy_(new.to(t.dtype))


def check_identity(spec, y: torch.Tensor, y_base: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """The adapted logits at init against the base logits, in the spec's declared identity class.

    bitwise: torch.equal. tolerance: spec/tolerance.py's bound with the spec's factor. non_identity: the
    relative start-off size is positive and at most the spec's declared init_shrink. Returns the measured
    relative difference.
    """
    diff = tol.maxabs(y.double() - y_base.double())
    rel = diff / (tol.maxabs(y_base) + 1e-300)
    if spec.identity == "bitwise":
        assert torch.equal(y, y_base), f"{what}: declared bitwise identity at init, max |Δlogits| = {diff:.3g}"
    elif spec.identity == "tolerance":
        ok, err = tol.close(y, y_base, None, dtype, spec.identity_factor)
        assert ok, (f"{what}: identity at init off by {rel:.3g} relative (scaled error {err:.3g}), beyond "
                    f"{tol.ACCUMULATION[dtype] * spec.identity_factor:g} eps({dtype})")
    else:
        assert 0 < rel <= spec.init_shrink, f"{what}: declared start-off size {spec.init_shrink:g}, measured {rel:.3g}"
    return rel


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainables(model).items() if p.grad is not None}


def assert_close_grads(got: dict, ref: dict, factor: float, what: str) -> float:
    """Per tensor (never summed): the same set of gradients, each within the fp32 tolerance of the reference."""
    assert got.keys() == ref.keys(), f"{what}: gradients reached {sorted(got.keys() ^ ref.keys())} in only one run"
    worst = 0.0
    for n, g_ref in ref.items():
        assert torch.any(g_ref != 0), f"{what}: reference gradient of '{n}' is all zero (perturb first)"
        ok, err = tol.close(got[n], g_ref, None, torch.float32, factor)
        assert ok, f"{what}: gradient of '{n}' differs (scaled error {err:.3g})"
        worst = max(worst, err)
    return worst
