"""Shared machinery of the end-to-end tests on tiny transformers models (issue 21).

Everything variant-specific comes from the variant's spec: the roles it targets (`spec.roles`), whether it
needs calibration data (`spec.data`), its identity class and tolerance factor, its quantized support, its
dropout and its trainable tensors. No test names a variant.

The teacher task (docs/conventions.md §8): the targets are the logits of a fixed, randomly perturbed copy of
the adapted model: the same base, the same variant and config attached the same way (calibration included),
the student's initial tensors, then every trainable tensor moved by TEACHER_SIGMA x N(0, 1) from its init (or
to a value from the spec's `perturb`, for tensors that must stay in a domain). The target is therefore
reachable by every variant, whatever its capacity; a random perturbation of the dense weights is not: a gain
on r singular values per layer cannot follow it, and its loss falls by 1-5 % (measured), too close to zero to
tell a weak adapter from a dead one. The loss is the KL divergence from the teacher's next-token distribution
over the non-padding tokens. A dead adapter (no gradient, not in the optimizer, not in the forward) leaves
the loss where it started, or makes the task vacuous (teacher == student), which the tests reject.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import impl
from harness import tolerance as tol
from spec import SPECS
from harness.models import batch, calibration
from harness.probes import perturb_tensors

R = 8  # rank of every e2e config: within every targeted layer of the tiny models (min width 32), even (hra)
ALPHA = 12.0  # alpha != r, so a scale bug shows
STEPS = 30
LR = 1e-2
TEACHER_SIGMA = 0.3  # how far the teacher's trainable tensors sit from their init
MIN_FALL = 0.30  # the loss after STEPS AdamW steps is at most (1 - MIN_FALL) times the loss before (measured: 50-98 %)
FUSED_QKV = ("q", "k", "v")


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test (restored after). The tiny models' matmuls gain nothing
    from intra-op threads, and two xdist workers each spinning two threads on two cores made these tests 6x
    slower (measured: 88 s against 14 s for 8 tests); nox sets OMP_NUM_THREADS=1, a bare pytest run does not."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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


def calibration_for(spec) -> list[dict[str, torch.Tensor]] | None:
    """Anisotropic calibration batches (skewed token frequencies) with right padding and an attention mask,
    where the spec uses data."""
    return None if spec.data == "none" else calibration()


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


def present_trainables(spec, ad) -> tuple:
    """The spec's trainable tensors that exist on this adapter's layer and config (`when` honoured)."""
    return spec.present(ad.d_in, ad.d_out, ad.cfg, trainable=True)


def perturb_from_init(model: nn.Module, name: str, sigma: float, seed: int) -> None:
    """Move every trainable tensor of every adapter by sigma x N(0, 1) from where it is, or to a value from the
    spec's `perturb` for tensors whose values must stay in a domain."""
    g = torch.Generator().manual_seed(seed)
    for ad in impl.adapters(model).values():
        perturb_tensors(SPECS.get(name), ad.tensors(), ad.d_in, ad.d_out, ad.cfg, g, sigma, around_current=True)


def teacher_logits(student: nn.Module, build, name: str, arch: str, b: dict, seed: int = 1234) -> torch.Tensor:
    """The teacher's logits on b: `build()` gives the same base model as the student's; the variant is attached
    the same way, given the student's current (initial) trainable tensors, then perturbed (TEACHER_SIGMA)."""
    teacher = attach(build(), name, arch)
    start = {n: p.detach() for n, p in trainables(student).items()}
    got = trainables(teacher)
    assert got.keys() == start.keys(), "teacher and student adapters differ in their tensors"
    with torch.no_grad():
        for n, p in got.items():
            p.copy_(start[n])
    perturb_from_init(teacher, name, TEACHER_SIGMA, seed)
    return logits(teacher.train(student.training), b)


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
        if not loss.requires_grad:
            raise AssertionError("the loss does not depend on any trainable tensor (dead adapter)")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.train(was_training)
    return before, loss_now()


def perturb(model: nn.Module, name: str, seed: int = 3) -> None:
    """Move every trainable tensor of every adapter away from its init (the spec's `perturb` where it declares
    a domain, else N(0, 0.5²)), as the property library does (docs/conventions.md §8)."""
    g = torch.Generator().manual_seed(seed)
    for ad in impl.adapters(model).values():
        perturb_tensors(SPECS.get(name), ad.tensors(), ad.d_in, ad.d_out, ad.cfg, g)


def check_identity(spec, y: torch.Tensor, y_base: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """The adapted logits at init against the base logits, in the spec's declared identity class.

    bitwise: torch.equal. tolerance: harness/tolerance.py's bound with the spec's factor (no extra factor for
    depth: measured 2-4e-7 of max |logits| in fp32 and 4-7e-3 in bf16, 9-50x inside the bound). non_identity:
    the relative start-off of the logits is positive and at most the spec's per-layer init_shrink (measured
    0.4-1.6 % against a declared 5 % for antipasto_ablate). Returns the measured relative difference.
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
