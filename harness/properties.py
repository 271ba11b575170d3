"""The property library: each property is one generic function over a spec, a backend and a drawn case.

No property has per-variant code: everything variant-specific comes from the spec (oracle, init formula,
tensors, claims, declarations). A check raises `Falsified` (an AssertionError) naming what broke, and
returns the worst scaled error it measured (docs/conventions.md §3) or None.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from . import tolerance as tol
from .checks import Checks
from .backends.protocol import FullBackend, QuantizedNA, checkpoint_suffix, has, lacks, mode_switch_merges, trainable_precision
from .models import single
from .probes import (Falsified, Noted, Probe, Setup, _dt, base_bias, base_out, cfg_of, draws_case, gradient_scales,
                     grad_flags, layouts, loss_weights, oracle_output, owner, perturb, prop, require,
                     set_drawn_knobs, setup, snapshot, untouched)
from .strategies import Case, base_weight, calibration, calibration_tokens, cases, inputs, square_or_not


# ----------------------------------------------------------------------------------------------- identity


@prop("identity_at_init", _dt(torch.float32, torch.bfloat16, torch.float64), frame="init")
def identity_at_init(spec, be: FullBackend, case):
    """The adapted output at init equals the base output in the spec's identity class (bitwise, within a
    dtype-derived tolerance, or off by at most the declared start size, per token relative to ‖W x‖)."""
    s = setup(spec, be, case)
    with torch.no_grad():
        y = s.model(s.x)
    require(y.shape == s.y0.shape, f"output shape {tuple(y.shape)} for an input of shape {tuple(s.x.shape)}; the base "
                                   f"layer's is {tuple(s.y0.shape)}")
    diff = tol.maxabs(y.double() - s.y0.double())
    if spec.identity == "bitwise":
        require(torch.equal(y, s.y0), f"not bitwise identical at init: max |y - y_base| = {diff:.3g}", diff)
        return 0.0
    rel = diff / (tol.maxabs(s.y0) + 1e-300)
    if spec.identity == "tolerance":
        ok, err = tol.close(y, s.y0, None, case.dtype, spec.identity_factor)
        require(ok, f"identity off by {rel:.3g} relative, beyond {tol.ACCUMULATION[case.dtype] * spec.identity_factor:g} eps({case.dtype})",
                rel)
        return err
    # a declared start size is a property of the layer's linear map, not of its bias (a bias that partly cancels
    # W x would inflate a max|y| ratio without bound): per token ‖y − y_base‖₂ against the bias-free ‖W x‖₂,
    # with the identity class's rounding allowance on top
    lin = s.y0.double() - (0 if s.b is None else s.b.to(case.dtype).double().to(s.y0.device))
    scale = float(lin.norm(dim=-1).max()) + 1e-300
    rel = float((y.double() - s.y0.double()).norm(dim=-1).max()) / scale
    slack = tol.bound(s.y0, None, case.dtype, spec.identity_factor) * case.d_out**0.5 / scale
    # a start within the dtype's rounding allowance (a paper-scale 1e-5 in bf16) may round back to the base:
    # there only its upper bound is judged, and the note says in which dtypes its presence was
    judged = spec.init_shrink > slack
    name = str(case.dtype).removeprefix("torch.")
    require((0 < rel or not judged) and rel <= spec.init_shrink + slack,
            f"declared start size {spec.init_shrink:g} (per token, relative to ‖W x‖), measured {rel:.3g} in {name}"
            + ("" if judged else f" (its rounding allowance {slack:.3g}: only the upper bound judged)"), rel)
    return Noted(rel, f"start off the base judged in {name}" if judged else
                 f"start off the base not judged in {name} (below its rounding allowance; upper bound only)")


@prop("knob_identity", _dt(torch.float32, torch.float64), needs=("knobs",), frame="forward",
      applies=lambda spec, be: None if spec.knobs else "the spec declares no runtime knob")
def knob_identity(spec, be: FullBackend, case):
    """With a knob set to its identity value on the live model after attach, the output equals the layer
    with every trainable at its identity (init) value, for any values of the trainables (the base output, for
    a declared non-identity start)."""
    worst = 0.0
    for knob, value in spec.knobs.items():
        s = setup(spec, be, case)
        init = {n: t.detach().clone() for n, t in be.tensors(s.model).items()}
        default = be.knobs(s.model)[knob]
        with torch.no_grad():
            y_init = s.model(s.x)
        perturb(spec, be, s.model, case)
        be.set_knob(s.model, knob, value)
        with torch.no_grad():
            y_knob = s.model(s.x)
        be.set_knob(s.model, knob, default)
        with torch.no_grad():
            for n, t in be.tensors(s.model).items():
                t.copy_(init[n])
            y_back = s.model(s.x)
        require(torch.equal(y_back, y_init), f"{knob}: restoring the init tensors does not restore the init output")
        if spec.identity == "non_identity":
            # a declared non-identity start is not the identity-valued layer: compare with the base output,
            # within the identity tolerance of the spec's (rewritten) base
            ok, err = tol.close(y_knob, s.y0, None, case.dtype, spec.identity_factor)
        else:
            ok, err = tol.close(y_knob, y_init, s.y0, case.dtype)
        require(ok, f"{knob}={value} set after attach: output is not the identity-valued layer's (scaled error {err:.3g})")
        worst = max(worst, err)
    return worst


# ----------------------------------------------------------------------------------------------- oracle


@prop("oracle", _dt(torch.float64, torch.float32, torch.bfloat16), frame="forward")
def oracle(spec, be: FullBackend, case):
    """On random non-init adapter tensors, the output and the gradients of every trainable tensor and of the
    input equal the spec's float64 oracle (written from the paper, sharing no code with the implementation).
    Gradients are compared at the scale of the terms they sum (see gradient_scales). The drawn layers are never
    square (strategies._dims), so each tensor's shape says which side of W it acts on: a tensor shaped for the
    other side (an orthogonal method rotating W's output side, R W for W R) is named before the oracle runs."""
    s = setup(spec, be, case)
    _sides(spec, be, s, case)
    perturb(spec, be, s.model, case)
    x = s.x.detach().clone().requires_grad_(True)
    y = s.model(x)
    c = loss_weights(y, case).to(case.dtype).double()  # the weights the implementation's backward sees
    (y.double() * c.to(y.device)).sum().backward()
    x64 = s.x.detach().double().cpu().requires_grad_(True)
    y_ref, T = oracle_output(spec, be, s, case, x64, grad=True)
    require(tuple(y.shape) == tuple(y_ref.shape),
            f"output shape {tuple(y.shape)} for an input of shape {tuple(x.shape)}; the oracle's is {tuple(y_ref.shape)}")
    ok, worst = tol.close(y.cpu(), y_ref, base_out(s, x64), case.dtype, spec.identity_factor)
    require(ok, f"output differs from the float64 oracle (scaled error {worst:.3g})", worst)
    scales = gradient_scales(y_ref, {**T, "input": x64}, c)
    (y_ref * c).sum().backward()
    live = be.tensors(s.model)
    grads = {n: (live[n].grad, T[n].grad) for n in T if T[n].requires_grad}
    grads["input"] = (x.grad, x64.grad)
    limit = tol.gradient_limit(case.dtype, spec.identity_factor)
    for n, (g, g_ref) in grads.items():
        require(g is not None, f"no gradient reached '{n}'")
        diff = tol.maxabs(g.cpu().double() - g_ref)
        ok, err = tol.within(diff, limit * scales[n])
        require(ok,
                f"gradient of '{n}' differs from the oracle's (max diff {diff:.3g}, gradient {tol.maxabs(g_ref):.3g}, "
                f"term scale {scales[n]:.3g})", err)
        worst = max(worst, err)
    return max(worst, _across_modes(spec, be, s, case, y_ref.detach(), base_out(s, x64).detach()))


def _sides(spec, be: FullBackend, s: Setup, case: Case) -> None:
    """Each adapter tensor has the spec's shape for this (d_in, d_out): on a layer with d_in != d_out, a tensor
    sized for the other side of W, e.g. a rotation of the output where the spec rotates the input, differs here."""
    cfg = cfg_of(spec, be, case)
    live = be.tensors(s.model)
    for ts in spec.present(case.d_in, case.d_out, cfg):
        shape = spec.shape_of(ts, case.d_in, case.d_out, cfg)
        if ts.name in live and tuple(live[ts.name].shape) != shape:
            raise Falsified(f"'{ts.name}' has shape {tuple(live[ts.name].shape)} on a layer with d_in={case.d_in}, "
                            f"d_out={case.d_out}; the spec's {ts.shape} = {shape}: it acts on another side or axis "
                            "of W than the oracle's")


def _across_modes(spec, be: FullBackend, s: Setup, case: Case, y_ref, y_base) -> float:
    """The eval-mode output (what inference runs), and the train-mode output after an eval()/train() round trip,
    equal the oracle too: a library that folds the adapter into the base weight on eval() is checked on its folded
    weight and on its unfolding, against the engine's copy of the base (never the weight read back). Where the
    backend declares `mode_switch_merges=False`, the switches must leave the state dict unchanged."""
    declared, before, worst = mode_switch_merges(be), snapshot(s.model), 0.0
    for mode, what in (("eval", "eval-mode output"), ("train", "train-mode output after eval() and train()")):
        getattr(s.model, mode)()
        if declared is False:
            after = snapshot(s.model)
            changed = sorted(k for k in before if k not in after or not torch.equal(after[k], before[k]))
            require(not changed, f"the backend declares mode_switch_merges=False, but {mode}() changed {changed}")
        with torch.no_grad():
            y = s.model(s.x)
        require(tuple(y.shape) == tuple(y_ref.shape), f"{what}: shape {tuple(y.shape)}, the oracle's {tuple(y_ref.shape)}")
        ok, err = tol.close(y.cpu(), y_ref, y_base, case.dtype, spec.identity_factor)
        folds = " (the backend declares that eval() folds the adapter into the base weight)" if declared else ""
        require(ok, f"{what} differs from the float64 oracle{folds} (scaled error {err:.3g})", err)
        worst = max(worst, err)
    return worst


@prop("init_formula", _dt(torch.float32), gap=lambda spec: spec.unchecked_init(), frame="init",
      applies=lambda spec, be: None if spec.init_oracle else
      (f"UNCHECKED: the spec has no init_oracle, so nothing checks {spec.unchecked_init()}"
       if spec.unchecked_init() else "the init has no deterministic part"))
def init_formula(spec, be: FullBackend, case):
    """The init equals the spec's float64 init formula wherever it is deterministic (up to sign where the
    spec says so)."""
    s = setup(spec, be, case)
    X = calibration_tokens(s.cal) if s.cal is not None else None
    expected = spec.init_oracle(s.W, cfg_of(spec, be, case), X)
    actual = {n: t.detach().double().cpu() for n, t in be.tensors(s.model).items()}
    actual["base_weight"] = be.base_weight(s.model).detach().double().cpu()
    # an SVD's rounding grows with the layer's width
    return compare_init(spec, expected, actual, s.W, case.dtype, 4 * spec.identity_factor * max(s.W.shape),
                        "", "the spec's formula")


def compare_init(spec, expected: dict, actual: dict, W: torch.Tensor, dtype, factor: float, where: str = "",
                 what: str = "the reference init") -> float:
    """Compare init tensors (by name; "base_weight" the rewritten base) with expected ones, up to sign where the
    spec declares it, within `factor` times the dtype's tolerance; the worst scaled error."""
    worst = 0.0
    for name, e in expected.items():
        require(name in actual, f"{where}init names '{name}', which the implementation lacks")
        a = actual[name]
        require(a.shape == e.shape, f"{where}'{name}' has shape {tuple(a.shape)}, {what} {tuple(e.shape)}")
        if name in spec.sign_free:
            dim = spec.sign_free[name]
            dots = (a * e).sum(dim=1 - dim if a.dim() == 2 else 0, keepdim=True)
            e = e * torch.where(dots < 0, -1.0, 1.0).to(e.dtype)
        # a rewritten base is checked at the scale of what the init moved out of W (a residual that is 0
        # when r reaches the rank of W carries W's rounding, not its own)
        ref = W if name == "base_weight" else None
        ok, err = tol.close(a, e, ref, dtype, factor)
        require(ok, f"{where}init of '{name}' differs from {what} (max diff {tol.maxabs(a - e):.3g}, scale "
                    f"{tol.maxabs(e):.3g}, scaled error {err:.3g})", err)
        worst = max(worst, err)
    return worst


# ----------------------------------------------------------------------------------------------- config


@prop("config_constraints", _dt(torch.float32), max_examples=1, needs=("config_checks",))
def config_constraints(spec, be: FullBackend, case):
    """Every config constraint the spec declares is enforced at config time with an error naming the field."""
    for c in spec.constraints:
        try:
            cfg_of(spec, be, case, **c.bad)
        except be.errors.config as e:
            require(any(k in str(e) for k in c.bad), f"'{c.text}': the error does not name {sorted(c.bad)}: {e}")
            continue
        raise Falsified(f"constraint '{c.text}' not enforced: config accepted {dict(c.bad)}")
    try:
        cfg_of(spec, be, case, no_such_field=1)
    except be.errors.config as e:
        require("no_such_field" in str(e), f"unknown field error does not name it: {e}")
    else:
        raise Falsified("an unknown config field was accepted")
    return None


# ----------------------------------------------------------------------------------------------- gradients


def _grads(be: FullBackend, s: Setup, case: Case) -> dict[str, torch.Tensor | None]:
    for t in be.tensors(s.model).values():
        t.grad = None
    y = s.model(s.x)
    (y.double() * loss_weights(y, case).to(y.device)).sum().backward()
    return {n: t.grad for n, t in be.tensors(s.model).items() if t.requires_grad}


@prop("gradient_pattern", draws_case(lambda spec, device: cases(spec, device=device, defaults_only=True)),
      frame="forward")
def gradient_pattern(spec, be: FullBackend, case):
    """With the default config: exactly the tensors the spec declares have zero gradient at init, every other
    trainable has a non-zero one, and all are non-zero once every tensor is perturbed; then every element (every
    block, row, shard) of every trainable gets a non-zero gradient wherever the spec's float64 oracle gives it one:
    a slice that never enters the forward (a block size or block count that leaves part of a trainable out) has
    none. Each of the three is its own check verdict."""
    s = setup(spec, be, case)
    ck = Checks()
    live = spec.present(case.d_in, case.d_out, cfg_of(spec, be, case), trainable=True)
    with ck("at_init"):
        g0 = _grads(be, s, case)
        for ts in live:
            g = g0.get(ts.name)
            zero = g is None or not torch.any(g != 0)
            if ts.zero_grad_at_init:
                require(zero, f"'{ts.name}' has a non-zero gradient at init, but the spec declares zero ({ts.zero_grad_at_init})")
            else:
                require(not zero, f"'{ts.name}' has an all-zero gradient at init (dead start)")
    perturb(spec, be, s.model, case)
    g1 = _grads(be, s, case)
    with ck("after_perturbing"):
        for ts in live:
            g = g1.get(ts.name)
            require(g is not None and bool(torch.any(g != 0)), f"'{ts.name}' has an all-zero gradient after perturbing")
            require(bool(torch.isfinite(g).all()), f"'{ts.name}' has a non-finite gradient")
    with ck("every_element"):
        _every_element_live(spec, be, s, case, g1, live)
    return ck.done(0.0)  # exact checks: 0.0 when they held, carrying each check's verdict (the history's rows)


def _every_element_live(spec, be: FullBackend, s: Setup, case: Case, grads: dict, live) -> None:
    """Each element of each trainable whose gradient under the spec's float64 oracle (same tensors, input and loss
    weights as `grads`) is non-zero, above 1e-6 of its tensor's largest, has a non-zero gradient in `grads`.
    Elements the oracle itself leaves at zero (BOFT's block diagonals: only the skew part acts) are not judged."""
    _sides(spec, be, s, case)  # the oracle needs the spec's shapes
    x64 = s.x.detach().double().cpu()
    y_ref, T = oracle_output(spec, be, s, case, x64, grad=True)
    (y_ref * loss_weights(y_ref, case)).sum().backward()
    for ts in live:
        g, g_ref = grads.get(ts.name), T[ts.name].grad
        if g is None or g_ref is None or tuple(g.shape) != tuple(g_ref.shape):
            continue  # a missing gradient is the previous check's finding
        feeds = g_ref.abs() > 1e-6 * tol.maxabs(g_ref)
        dead = feeds & (g.detach().cpu() == 0)
        k = int(dead.sum())
        if k:
            first = tuple(int(i) for i in dead.nonzero()[0])
            raise Falsified(f"'{ts.name}': {k} of its {int(feeds.sum())} elements that enter the forward get no "
                            f"gradient (the first at index {first}; the oracle's gradient there is "
                            f"{float(g_ref[first]):.3g}): a slice of the trainable never reaches the output")


LR, STEP_ULPS = 1e-3, 4.0  # training_step's learning rate, and the fewest spacings of a tensor's dtype it moves by


def step_size(p: torch.Tensor) -> float:
    """The AdamW learning rate training_step gives a trainable tensor: max(LR, STEP_ULPS · eps(dtype) · max|p|).

    AdamW's first step moves each entry by about lr (m̂/√v̂ = ±1); an entry moves only when that is at least half
    its dtype's spacing there, eps(dtype) · 2^floor(log2|v|) <= eps(dtype) · |v|. A bfloat16 entry of 0.5 has a
    spacing of 2^-9 ≈ 2e-3 > 1e-3: at LR a correct bf16 adapter cannot move (docs/conventions.md §1). float32
    tensors of size below ~2000 keep LR."""
    return max(LR, STEP_ULPS * tol.eps(p.dtype) * tol.maxabs(p))


@prop("training_step", _dt(torch.float32, torch.bfloat16), frame="forward")
def training_step(spec, be: FullBackend, case):
    """From the perturbed state, one AdamW step (weight_decay 0) changes every trainable tensor and leaves every
    base parameter unchanged and without gradient. Each tensor's learning rate follows its own dtype (step_size:
    1e-3, or 4 spacings of the dtype at the tensor's largest entry where that is coarser), so a library holding its
    adapter in the model's bf16 moves as it does in training; a declared `trainable_precision` is checked against
    the tensors, and "autocast" runs the step under torch.autocast in the model's dtype."""
    s = setup(spec, be, case)
    perturb(spec, be, s.model, case)
    live = be.tensors(s.model)
    before = {n: t.detach().clone() for n, t in live.items()}
    adapter_storage = {t.untyped_storage().data_ptr() for t in live.values()}  # by storage, not by key name:
    base_before = {k: v.detach().clone() for k, v in s.model.state_dict(keep_vars=True).items()  # a backend's keys
                   if v.untyped_storage().data_ptr() not in adapter_storage}  # need not end in the spec's names
    params = [p for p in s.model.parameters() if p.requires_grad]
    present = spec.present(case.d_in, case.d_out, cfg_of(spec, be, case))
    declared = trainable_precision(be)
    if declared in ("float32", "autocast", "model"):
        want = case.dtype if declared == "model" else torch.float32
        wrong = [f"'{ts.name}' ({live[ts.name].dtype})" for ts in present if ts.trainable and live[ts.name].dtype != want]
        require(not wrong, f"the backend declares trainable_precision={declared!r} ({want}), but {', '.join(wrong)}")
    lrs = {id(p): step_size(p) for p in params}  # each tensor's own dtype sets the smallest step it can take
    opt = torch.optim.AdamW([{"params": [p], "lr": lrs[id(p)]} for p in params], lr=LR, weight_decay=0.0)
    low = case.dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(torch.device(case.device).type, dtype=case.dtype, enabled=declared == "autocast" and low):
        y = s.model(s.x)
    (y.double() * loss_weights(y, case).to(y.device)).sum().backward()
    opt.step()
    for ts in present:
        if ts.trainable:
            t = owner(live[ts.name])
            lr = lrs.get(id(t), LR)
            require(not torch.equal(live[ts.name].detach(), before[ts.name]),
                    f"'{ts.name}' did not move after one AdamW step at lr {lr:.3g} ({t.dtype}: the step is at least "
                    f"{STEP_ULPS:g} spacings of {t.dtype} at its largest entry {tol.maxabs(before[ts.name]):.3g})")
        else:
            require(torch.equal(live[ts.name].detach(), before[ts.name]), f"frozen '{ts.name}' changed in training")
    after = snapshot(s.model)
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}  # a library's own state left trainable
    for k, v in base_before.items():
        require(k in after and torch.equal(after[k], v), f"base tensor '{k}' changed in training" + (
            " (not one of the spec's tensors, yet left trainable: requires_grad=True)" if k in trainable else ""))
    leaks = [n for n, p in s.model.named_parameters() if not p.requires_grad and p.grad is not None]
    require(not leaks, f"frozen parameters received gradients: {leaks}")
    return None


@prop("trainable_set", _dt(torch.float32), max_examples=8)
def trainable_set(spec, be: FullBackend, case):
    """Base parameters are frozen; the trainable tensors are exactly the spec's, with the spec's shapes, and
    their count equals the spec's formula; frozen adapter tensors are persistent buffers, not Parameters. Every
    problem found is reported in one message, the number of problems first and the parameter count's first."""
    s = setup(spec, be, case)
    y = s.model(s.x)  # a forward and backward first: a base parameter a forward unfroze is caught too
    y.float().sum().backward()
    live = be.tensors(s.model)
    problems: list[str] = []
    mine = {id(owner(t)) for t in live.values()}
    cfg = cfg_of(spec, be, case)
    present = spec.present(case.d_in, case.d_out, cfg)
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    n, expected = sum(p.numel() for p in trainable), spec.count(case.d_in, case.d_out, cfg)
    if n != expected:
        problems.append(f"{n} trainable parameters, the spec's formula {spec.param_count} gives {expected}")
    leaks = [name for name, p in s.model.named_parameters() if p.grad is not None and id(p) not in mine]
    if leaks:
        problems.append(f"base parameters received gradients: {leaks}")
    if set(live) != {t.name for t in present}:
        problems.append(f"adapter tensors {sorted(live)} != spec's {sorted(t.name for t in present)}")
    param_ids = {id(p) for p in s.model.parameters()}
    state_ids = {id(v) for v in s.model.state_dict(keep_vars=True).values()}
    for ts in (ts for ts in present if ts.name in live):
        shape = spec.shape_of(ts, case.d_in, case.d_out, cfg)
        if tuple(live[ts.name].shape) != shape:
            problems.append(f"'{ts.name}' has shape {tuple(live[ts.name].shape)}, spec says {ts.shape} = {shape}")
        t = owner(live[ts.name])  # the library's own Parameter or buffer (a view in the spec's layout sees through)
        if ts.trainable and not (isinstance(t, torch.nn.Parameter) and t.requires_grad):
            problems.append(f"'{ts.name}' should be a trainable Parameter")
        if not ts.trainable and (id(t) in param_ids or t.requires_grad):
            problems.append(f"frozen '{ts.name}' is a Parameter, not a buffer")
        if not ts.trainable and id(t) not in state_ids:
            problems.append(f"frozen '{ts.name}' is not in the state dict (not persistent)")
    adapter_ids = {id(owner(live[t.name])) for t in present if t.trainable and t.name in live}
    if not all(id(p) in adapter_ids for p in trainable):
        problems.append("a base parameter is left trainable")
    require(not problems, f"{len(problems)} problem{'s' if len(problems) > 1 else ''}: " + "; ".join(problems))
    return None


# ----------------------------------------------------------------------------------------------- bias, claims


@prop("bias_invariance", lambda spec, device: cases(spec, device=device, bias=True), frame="forward",
      applies=lambda spec, be: None if spec.bias == "passthrough" else f"declared: {spec.bias_note or 'the bias is scaled'}")
def bias_invariance(spec, be: FullBackend, case):
    """After perturbing, the output with bias equals the output without bias plus the bias."""
    s = setup(spec, be, case)
    perturb(spec, be, s.model, case)
    with torch.no_grad():
        y_b = s.model(s.x)
        bias = base_bias(be, s.model)
        b = bias.detach().clone()
        bias.zero_()
        y_0 = s.model(s.x)
        bias.copy_(b)
    err = tol.maxabs((y_b - y_0).double() - b.double())
    limit = tol.ACCUMULATION[case.dtype] * tol.eps(case.dtype) * (tol.maxabs(y_b) + tol.maxabs(b))
    ok, ratio = tol.within(err, limit)
    require(ok, f"(y with bias) - (y without) differs from the bias by {err:.3g} (bias scale {tol.maxabs(b):.3g}, "
                f"scaled error {ratio:.3g})", ratio)
    return ratio


def _check_claim(claim, obj, dtype) -> float:
    eps = tol.ACCUMULATION[dtype] * tol.eps(dtype)
    if claim.kind == "nonnegative":
        low = float(obj.min())
        require(low >= 0, f"{claim.text}: minimum {low:.3g} < 0")
        return max(0.0, -low)
    if claim.kind == "unit_interval":
        lo, hi = float(obj.min()), float(obj.max())
        require(lo >= -eps and hi <= 1 + eps, f"{claim.text}: values span [{lo:.6g}, {hi:.6g}]")
        return max(0.0, -lo, hi - 1)
    if claim.kind == "bounded":
        hi = float(obj.max())
        require(hi <= claim.bound * (1 + eps) + eps, f"{claim.text}: maximum {hi:.6g} exceeds {claim.bound:g}")
        return hi
    if claim.kind == "orthogonal_det1":
        R = obj.double()
        n = R.shape[-1]
        eye = torch.eye(n, dtype=R.dtype)
        orth = tol.maxabs(R.transpose(-1, -2) @ R - eye)
        det = R.det()
        require(orth <= eps * n, f"{claim.text}: |RᵀR − I| = {orth:.3g}")
        require(tol.maxabs(det - 1) <= eps * n, f"{claim.text}: det R ranges in [{float(det.min()):.6g}, {float(det.max()):.6g}]")
        return orth
    if claim.kind == "norm_preserving":
        x, rx = obj
        err = tol.maxabs(x.norm(dim=-1) - rx.norm(dim=-1)) / (tol.maxabs(x.norm(dim=-1)) + 1e-300)
        require(err <= eps * x.shape[-1], f"{claim.text}: norms differ by {err:.3g} relative")
        return err
    if claim.kind == "gram_preserving":
        W, Wr = (t.double() for t in obj)
        G, Gr = W @ W.T, Wr @ Wr.T
        err = tol.maxabs(Gr - G) / (tol.maxabs(G) + 1e-300)
        require(err <= eps * W.shape[-1], f"{claim.text}: W'W'ᵀ differs from WWᵀ by {err:.3g} relative")
        return err
    raise ValueError(claim.kind)


@prop("spectrum", _dt(torch.float64, torch.float32),
      applies=lambda spec, be: None if spec.claims else "the spec makes no spectral claim")
def spectrum(spec, be: FullBackend, case):
    """Each spectral claim of the spec (non-negative gains, bounded derivatives, eigenvalues in [0, 1],
    orthogonal rotations with det +1, norm preservation, kept neuron Gram matrices) holds on the implementation, from saturated inputs."""
    worst = 0.0
    for claim in spec.claims:
        s = setup(spec, be, case)
        perturb(spec, be, s.model, case, scale=claim.saturate)
        worst = max(worst, _check_claim(claim, claim.of(Probe(spec, be, s, case)), case.dtype))
    return worst


# ----------------------------------------------------------------------------------------------- dropout


@prop("dropout", _dt(torch.float32), needs=("dropout",), frame="forward")
def dropout(spec, be: FullBackend, case):
    """Dropout is honoured (train output equals the hand computation with the same mask under a shared seed;
    eval is deterministic and drops nothing) or rejected at config time, as the spec declares."""
    p = 0.3
    if spec.dropout == "rejected":
        try:
            be.attach(setup(spec, be, case, attach=False).model, spec, case, None, dropout=p)
        except be.errors.config + be.errors.attach as e:
            require("dropout" in str(e), f"dropout rejection does not name the field: {e}")
            return None
        raise Falsified(f"dropout={p} accepted, but the spec declares it rejected")
    s = setup(spec, be, case, dropout=p)
    perturb(spec, be, s.model, case)
    s.model.train()
    torch.manual_seed(case.seed)
    with torch.no_grad():
        y = s.model(s.x)
    torch.manual_seed(case.seed)
    mask = F.dropout(torch.ones_like(s.x), p=p, training=True)
    x64 = s.x.double().cpu()
    y_ref, _ = oracle_output(spec, be, s, case, x64, xd=(s.x * mask).double().cpu(), dropout=p)
    ok, err = tol.close(y.cpu(), y_ref, base_out(s, x64), case.dtype, spec.identity_factor)
    require(ok, f"train-mode output is not the hand computation with the shared dropout mask (scaled error {err:.3g})")
    s.model.eval()
    with torch.no_grad():
        e1, e2 = s.model(s.x), s.model(s.x)
    require(torch.equal(e1, e2), "eval mode is not deterministic")
    y_eval, _ = oracle_output(spec, be, s, case, x64, dropout=p)
    ok, err2 = tol.close(e1.cpu(), y_eval, base_out(s, x64), case.dtype, spec.identity_factor)
    require(ok, f"eval-mode output differs from the no-dropout oracle (scaled error {err2:.3g})")
    return max(err, err2)


@prop("dropout_live", _dt(torch.float32), max_examples=8, needs=("dropout",),
      applies=lambda spec, be: None if spec.dropout == "honoured" else "the spec declares dropout rejected")
def dropout_live(spec, be: FullBackend, case):
    """With dropout 0.5 and perturbed trainables, train-mode outputs under two random states differ from each other
    and from the eval-mode output, and eval mode equals the same adapter built with dropout 0 (a check independent of
    the hand-computed mask)."""
    s = setup(spec, be, case, dropout=0.5)
    perturb(spec, be, s.model, case)
    s0 = setup(spec, be, case)
    with torch.no_grad():
        for n, t in be.tensors(s0.model).items():
            t.copy_(be.tensors(s.model)[n])
        s.model.eval()
        y_eval, y_plain = s.model(s.x), s0.model(s.x)
        s.model.train()
        torch.manual_seed(case.seed)
        y1 = s.model(s.x)
        torch.manual_seed(case.seed + 1)
        y2 = s.model(s.x)
    # rounding may move any of these outputs (a library that folds the adapter on eval() computes another sum):
    # equal and different mean within and beyond the dtype's tolerance, never bitwise
    def same(a, b):
        return tol.close(a, b, s.y0, case.dtype, spec.identity_factor)

    require(not same(y1, y2)[0], "train-mode outputs under two random states agree within rounding: dropout is "
                                 "not applied")
    require(not same(y1, y_eval)[0], "train-mode output equals the eval-mode output within rounding: dropout is "
                                     "not applied")
    ok, err = same(y_eval, y_plain)
    require(ok, f"eval mode with dropout differs from dropout 0 by {tol.maxabs(y_eval.double() - y_plain.double()):.3g} "
                f"(scaled error {err:.3g})", err)
    return err


@prop("eval_deterministic", _dt(torch.float32), max_examples=4, needs=("dropout",), frame="forward",
      applies=lambda spec, be: None if spec.dropout == "honoured" else "the spec declares dropout rejected")
def eval_deterministic(spec, be: FullBackend, case):
    """attach with dropout 0.5 into a model already in eval() (as every from_pretrained model is), and load of its
    checkpoint into a fresh model in eval(): two forwards give identical outputs (the adapter's dropout follows the
    host's mode), and the loaded model's equal the attached one's."""
    s = setup(spec, be, case, attach=False)
    s.model.eval()
    torch.manual_seed(case.seed)
    be.attach(s.model, spec, case, s.cal, dropout=0.5)
    perturb(spec, be, s.model, case)
    with torch.no_grad():
        y1, y2 = s.model(s.x), s.model(s.x)
    require(torch.equal(y1, y2), f"attach into a model in eval(): two forwards differ by "
                                 f"{tol.maxabs(y1.double() - y2.double()):.3g} (the adapter's dropout is active)")
    if lacks(be, spec, "checkpoint"):
        return 0.0
    with tempfile.TemporaryDirectory() as d:
        f = Path(d, "adapter" + checkpoint_suffix(be))
        be.save(s.model, f)
        m2 = _fresh(s, case)
        m2.eval()
        be.load(m2, f)
        with torch.no_grad():
            z1, z2 = m2(s.x), m2(s.x)
    require(torch.equal(z1, z2), f"load into a model in eval(): two forwards differ by "
                                 f"{tol.maxabs(z1.double() - z2.double()):.3g} (the adapter's dropout is active)")
    ok, err = tol.close(z1, y1, s.y0, case.dtype, spec.identity_factor)  # a library may merge on load: rounding
    require(ok, f"load into a model in eval(): output differs from the attached model's by "
                f"{tol.maxabs(z1.double() - y1.double()):.3g} (scaled error {err:.3g})", err)
    return err


# ----------------------------------------------------------------------------------------------- lifecycle


@prop("detach_restores", lambda spec, device: square_or_not(spec, (torch.float32, torch.bfloat16), device),
      needs=("detach",))
def detach_restores(spec, be: FullBackend, case):
    """On each layout (Linear, Conv1D): attach, perturb, set every knob to a drawn non-default value, forward,
    detach: the base output, state dict and requires_grad flags are bit-exactly what they were, and no hook or
    adapter is left."""
    for lay in layouts(spec, be):
        s = setup(spec, be, case, layout=lay, attach=False)
        state, flags = snapshot(s.model), grad_flags(s.model)
        torch.manual_seed(case.seed)
        be.attach(s.model, spec, case, s.cal)
        perturb(spec, be, s.model, case)
        set_drawn_knobs(spec, be, s.model, case)
        s.model(s.x)
        be.detach(s.model)
        with torch.no_grad():
            y = s.model(s.x)
        require(torch.equal(y, s.y0), f"{lay}: output after detach differs from the base by "
                                      f"{tol.maxabs(y.double() - s.y0.double()):.3g}")
        untouched(be, s.model, state, flags, f"{lay}: after detach")
    return 0.0


@prop("merge", _dt(torch.float32, torch.bfloat16), needs=("merge",), frame="merged")
def merge(spec, be: FullBackend, case):
    """After perturbing and setting every knob to a drawn non-default value, merge folds the adapter into dense
    weights: the output equals the hooked output (in eval mode, and as attach left the model, before any mode
    switch), every base weight keeps its dtype, and no hook is left."""
    s = setup(spec, be, case)
    perturb(spec, be, s.model, case)
    set_drawn_knobs(spec, be, s.model, case)
    with torch.no_grad():  # before any mode switch: a library that merges on eval() has folded the adapter after it
        y_t = s.model(s.x)
    s.model.eval()
    dtypes = {k: v.dtype for k, v in s.model.layer.state_dict().items() if "adapter" not in k}
    with torch.no_grad():
        y_h = s.model(s.x)
    be.merge(s.model)
    with torch.no_grad():
        y_m = s.model(s.x)
    require(not be.hooks_left(s.model), f"hooks or adapters left after merge: {be.hooks_left(s.model)}")
    for k, v in s.model.layer.state_dict().items():
        require(k not in dtypes or v.dtype == dtypes[k], f"merge changed the dtype of '{k}' to {v.dtype}")
    ok, err = tol.close(y_m, y_h, s.y0, case.dtype, spec.identity_factor)
    require(ok, f"merged output differs from the hooked output (scaled error {err:.3g})")
    ok, err_t = tol.close(y_m, y_t, s.y0, case.dtype, spec.identity_factor)
    require(ok, f"merged output differs from the hooked output before any mode switch (scaled error {err_t:.3g})",
            err_t)
    return max(err, err_t)


@prop("merge_oracle", _dt(torch.float32), needs=("merge",), frame="merged")
def merge_oracle(spec, be: FullBackend, case):
    """After perturbing and setting every knob to a drawn non-default value, the merged dense weight and bias equal
    the spec's float64 oracle's dense map (its outputs on the unit inputs, less its output at 0): a check of merge
    independent of the hooked forward."""
    s = setup(spec, be, case)
    perturb(spec, be, s.model, case)
    set_drawn_knobs(spec, be, s.model, case)
    s.model.eval()
    x64 = torch.cat([torch.eye(case.d_in, dtype=torch.float64), torch.zeros(1, case.d_in, dtype=torch.float64)])
    y_ref, _ = oracle_output(spec, be, s, case, x64)
    M, b = (y_ref[:-1] - y_ref[-1:]).T, y_ref[-1]
    be.merge(s.model)
    W_m = be.base_weight(s.model).detach().double().cpu()
    layer_b = base_bias(be, s.model)
    b_m = torch.zeros_like(b) if layer_b is None else layer_b.detach().double().cpu()
    ok, err = tol.close(W_m, M, s.W, case.dtype, spec.identity_factor)
    require(ok, f"merged weight differs from the oracle's dense map (scaled error {err:.3g})", err)
    ok, err_b = tol.close(b_m, b, torch.zeros_like(b) if s.b is None else s.b, case.dtype, spec.identity_factor * case.d_in)
    require(ok, f"merged bias differs from the oracle's output at 0 (scaled error {err_b:.3g})", err_b)
    return max(err, err_b)


def _file_diff(f1: Path, f2: Path) -> str:
    """Which metadata entries or tensors differ between two checkpoint files (named when they are safetensors
    files; a backend's checkpoint may be any format, then only the sizes are compared)."""
    from safetensors import SafetensorError, safe_open

    out = []
    try:
        a, b = safe_open(str(f1), "pt"), safe_open(str(f2), "pt")
    except (SafetensorError, OSError):
        return f"the files differ ({f1.stat().st_size} and {f2.stat().st_size} bytes; not safetensors files)"
    with a, b:
        ma, mb = a.metadata() or {}, b.metadata() or {}
        out += [f"metadata '{k}'" for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
        ka, kb = set(a.keys()), set(b.keys())
        out += [f"tensor '{k}' only in one file" for k in sorted(ka ^ kb)]
        out += [f"tensor '{k}'" for k in sorted(ka & kb) if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
    return ", ".join(out) or "byte layout"


def _fresh(s: Setup, case: Case, W=None, layout: str = "linear"):
    return single(s.W if W is None else W, s.b, case.dtype, layout, case.device)


@prop("checkpoint_roundtrip", lambda spec, device: square_or_not(spec, (torch.float32, torch.bfloat16), device),
      needs=("checkpoint",))
def checkpoint_roundtrip(spec, be: FullBackend, case):
    """On each layout (Linear, Conv1D), with every knob at a drawn non-default value: save -> load -> save -> load
    into freshly built models, with no calibration data on load, reproduces the outputs and knobs bit-exactly and
    the second file equals the first; a model with other base weights is refused and left untouched."""
    for lay in layouts(spec, be):
        _roundtrip(spec, be, case, lay)
    return 0.0


def _roundtrip(spec, be: FullBackend, case: Case, lay: str) -> None:
    s = setup(spec, be, case, layout=lay)
    perturb(spec, be, s.model, case)
    knobs = set_drawn_knobs(spec, be, s.model, case)
    with torch.no_grad():
        y1 = s.model(s.x)
    with tempfile.TemporaryDirectory() as d:
        # one file name in two folders: a format may record its own name (torch.save's archive folder); the
        # suffix is the one the backend's format expects
        name = "adapter" + checkpoint_suffix(be)
        f1, f2 = Path(d, "1", name), Path(d, "2", name)
        f1.parent.mkdir(), f2.parent.mkdir()
        be.save(s.model, f1)
        m2 = _fresh(s, case, layout=lay)
        try:
            be.load(m2, f1)
        except be.errors.any as e:  # any clear refusal (e.g. a load that asks for calibration data) fails here
            raise Falsified(f"{lay}: the checkpoint save wrote does not load into a fresh model: {e}") from None
        with torch.no_grad():
            y2 = m2(s.x)
        require(torch.equal(y2, y1), f"{lay}: loaded output differs by {tol.maxabs(y2.double() - y1.double()):.3g}")
        loaded = {k: be.knobs(m2)[k] for k in knobs}
        require(loaded == knobs, f"{lay}: knobs {knobs} saved, {loaded} loaded")
        be.save(m2, f2)
        require(f1.read_bytes() == f2.read_bytes(),
                f"{lay}: save -> load -> save does not reproduce the checkpoint: {_file_diff(f1, f2)}")
        m3 = _fresh(s, case, layout=lay)
        be.load(m3, f2)
        with torch.no_grad():
            y3 = m3(s.x)
        require(torch.equal(y3, y1), f"{lay}: second load differs by {tol.maxabs(y3.double() - y1.double()):.3g}")
        if not be.unsupported(spec, "base_hash"):
            other = _fresh(s, case, W=s.W + 0.01, layout=lay)
            state, flags = snapshot(other), grad_flags(other)
            try:
                be.load(other, f1)
            except be.errors.checkpoint:
                untouched(be, other, state, flags, f"{lay}: after a refused load")
            else:
                raise Falsified(f"{lay}: load into a model with different base weights was accepted")


@prop("layout", lambda spec, device: cases(spec, dtypes=(torch.float32, torch.float64), bias=True, device=device),
      needs=("conv1d", "merge"))
def layout(spec, be: FullBackend, case):
    """The variant on a Linear and on a transposed-storage Conv1D holding the same weight, with every knob at the
    same drawn non-default value, gives the same outputs, gradients (adapter tensors and input, at the scale of the terms they sum) and merged weight."""
    out = {}
    for lay in ("linear", "conv1d"):
        s = setup(spec, be, case, layout=lay)
        perturb(spec, be, s.model, case)
        set_drawn_knobs(spec, be, s.model, case)
        x = s.x.detach().clone().requires_grad_(True)
        y = s.model(x)
        c = loss_weights(y, case).to(case.dtype).double()
        (y.double() * c.to(y.device)).sum().backward()
        grads = {n: t.grad.detach().clone() for n, t in be.tensors(s.model).items() if t.requires_grad}
        grads["input"] = x.grad.detach().clone()
        if lay == "linear":
            x64 = s.x.detach().double().cpu().requires_grad_(True)
            y_ref, T = oracle_output(spec, be, s, case, x64, grad=True)
            scales = gradient_scales(y_ref, {**T, "input": x64}, c)
        s.model.eval()
        be.merge(s.model)
        out[lay] = (y.detach(), grads, be.base_weight(s.model).detach().clone(), s)
    (yl, gl, Wl, s), (yc, gc, Wc, _) = out["linear"], out["conv1d"]
    ok, worst = tol.close(yc, yl, s.y0, case.dtype)
    require(ok, f"Conv1D output differs from Linear (scaled error {worst:.3g})", worst)
    limit = tol.gradient_limit(case.dtype)
    for n in gl:
        diff = tol.maxabs(gc[n].double() - gl[n].double())
        ok, err = tol.within(diff, limit * scales[n])
        require(ok,
                f"Conv1D gradient of '{n}' differs from Linear's (max diff {diff:.3g}, term scale {scales[n]:.3g})", err)
        worst = max(worst, err)
    ok, err = tol.close(Wc, Wl, None, case.dtype)
    require(ok, f"Conv1D merged weight differs from Linear's (scaled error {err:.3g})", err)
    return max(worst, err)


@prop("degenerate_weights", _dt(torch.float32), frame="forward")
def degenerate_weights(spec, be: FullBackend, case):
    """Degenerate but legal base weights (a zero row, a zero column, rank one) give finite outputs and
    gradients at init and after perturbing: a division by a norm needs a floor."""
    for kind in ("zero_row", "zero_col", "rank1"):
        s = setup(spec, be, case, kind=kind)
        for stage in ("init", "perturbed"):
            if stage == "perturbed":
                perturb(spec, be, s.model, case)
            x = s.x.detach().clone().requires_grad_(True)
            y = s.model(x)
            require(bool(torch.isfinite(y).all()), f"{kind} W, {stage}: non-finite output")
            y.float().sum().backward()
            for n, t in be.tensors(s.model).items():
                if t.requires_grad:
                    require(t.grad is not None and bool(torch.isfinite(t.grad).all()), f"{kind} W, {stage}: non-finite gradient of '{n}'")
                    t.grad = None
            require(bool(torch.isfinite(x.grad).all()), f"{kind} W, {stage}: non-finite input gradient")
    return None


SATURATION = (1e3, 1e-6)  # trainable scales far past any clamp, gain or floor on either side, within float32's range


@prop("saturated_trainables", _dt(torch.float32), frame="forward")
def saturated_trainables(spec, be: FullBackend, case):
    """Extreme but legal trainable values (every trainable at random values of both signs of size 1e3, then of
    size 1e-6: past every clamp's bound and under every norm floor) give finite outputs and finite gradients of
    every trainable and of the input: a gain written with an exp that overflows, or a division by a norm without a
    floor, is caught here and not only on degenerate base weights."""
    s = setup(spec, be, case)
    live = be.tensors(s.model)
    present = spec.present(case.d_in, case.d_out, cfg_of(spec, be, case), trainable=True)
    g = case.gen(14)
    for scale in SATURATION:
        with torch.no_grad():
            for ts in present:
                t = live[ts.name]
                t.copy_((torch.randn(t.shape, generator=g, dtype=torch.float64) * scale).to(t.dtype))
        x = s.x.detach().clone().requires_grad_(True)
        y = s.model(x)
        require(bool(torch.isfinite(y).all()), f"trainables at scale {scale:g}: non-finite output")
        (y.double() * loss_weights(y, case).to(y.device)).sum().backward()
        for ts in present:
            t = live[ts.name]
            require(t.grad is not None and bool(torch.isfinite(t.grad).all()),
                    f"trainables at scale {scale:g}: non-finite gradient of '{ts.name}'")
            t.grad = None
        require(bool(torch.isfinite(x.grad).all()), f"trainables at scale {scale:g}: non-finite input gradient")
    return None


# A declared random init is tested on pooled samples of several attaches of a wide layer; Z standard errors keep
# a correct init's false-failure chance below 1e-8 per statistic, SAMPLES make a wrong scale visible.
INIT_WIDTH, SAMPLES, MAX_ATTACHES, Z = (48, 64), 4096, 128, 6.0


def _random_inits(spec, be: FullBackend, case) -> dict[str, tuple[str, float]]:
    d_out, d_in = INIT_WIDTH
    cfg = cfg_of(spec, be, case)
    env = spec.env(d_in, d_out, cfg)
    out = {}
    for ts in spec.present(d_in, d_out, cfg):
        dist = ts.distribution(spec.shape_of(ts, d_in, d_out, cfg), env)
        if dist is not None:
            out[ts.name] = dist
    return out


def moments_agree(x: torch.Tensor, kind: str, scale: float) -> str:
    """'' when the samples x (distinct values) fit U(−scale, scale) or N(0, scale²) within Z standard errors in
    mean and variance (and, for a uniform, lie within its bound); else what does not fit."""
    n, m, v = x.numel(), float(x.mean()), float((x * x).mean())
    if kind == "uniform":
        var, var_of_sq = scale**2 / 3, 4 * scale**4 / 45
        top = tol.maxabs(x)
        if top > scale * (1 + 4 * tol.eps(torch.float32)):
            return f"a value of size {top:.4g} lies outside the declared bound {scale:.4g}"
    else:
        var, var_of_sq = scale**2, 2 * scale**4
    if abs(m) > Z * (var / n) ** 0.5:
        return f"mean {m:.4g} over {n} samples, expected 0 (standard error {(var / n) ** 0.5:.3g})"
    if abs(v - var) > Z * (var_of_sq / n) ** 0.5:
        return f"standard deviation {v ** 0.5:.4g} over {n} samples, expected {var ** 0.5:.4g}"
    return ""


@prop("init_distribution", lambda spec, device: cases(spec, device=device, defaults_only=True), frame="init",
      applies=lambda spec, be: None if any(t.random for t in spec.tensors) else "the spec declares no random init",
      max_examples=3)
def init_distribution(spec, be: FullBackend, case):
    """Each random init the spec declares (kaiming-uniform: U(−1/sqrt(fan_in), 1/sqrt(fan_in)); N(0, σ²)) holds on
    a wide layer: samples pooled over seeded attaches stay within a uniform's bound and match the declared mean and
    variance within six standard errors (a correct init fails with a chance below 1e-8; a wrong scale by a factor
    of 1.3 or more fails)."""
    d_out, d_in = INIT_WIDTH
    wide = case.with_(d_in=d_in, d_out=d_out)
    dists = _random_inits(spec, be, wide)
    samples: dict[str, list] = {n: [] for n in dists}
    for i in range(MAX_ATTACHES):
        s = setup(spec, be, wide.with_(seed=case.seed + i), with_data=spec.data == "required")
        live = be.tensors(s.model)
        for n in dists:
            samples[n].append(live[n].detach().double().reshape(-1).cpu())
        if min(sum(t.numel() for t in v) for v in samples.values()) >= SAMPLES:
            break
    for n, (kind, scale) in dists.items():
        x = torch.unique(torch.cat(samples[n]))  # distinct values: an init that repeats rows counts each once
        bad = moments_agree(x, kind, scale)
        require(not bad, f"init of '{n}' is not the declared {kind} of scale {scale:.4g}: {bad}")
    return None


@prop("config_roundtrip", _dt(torch.float32), max_examples=6, needs=("checkpoint", "config_record"))
def config_roundtrip(spec, be: FullBackend, case):
    """With non-default dtype, param_dtype and dropout drawn (and the spec's drawn fields, perturbed trainables and
    knobs at drawn non-default values), the config a checkpoint loads into a fresh model equals the saved one, field
    by field (a field dropped on save would reload as its default), and so does the eval output, bit-exactly."""
    g = case.gen(15)
    over = {"dtype": (torch.float32, torch.float64)[int(torch.randint(2, (1,), generator=g))],
            "param_dtype": torch.float64}
    if spec.dropout == "honoured":
        over["dropout"] = 0.1
    s = setup(spec, be, case, **over)
    perturb(spec, be, s.model, case)
    set_drawn_knobs(spec, be, s.model, case)
    s.model.eval()
    saved = be.config_fields(s.model)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d, "adapter" + checkpoint_suffix(be))
        be.save(s.model, f)
        m2 = _fresh(s, case)
        try:
            be.load(m2, f)
        except be.errors.any as e:
            raise Falsified(f"the checkpoint does not load into a fresh model: {e}") from None
        m2.eval()  # after load: the adapter modules load adds start in train mode
        loaded = be.config_fields(m2)
    diff = sorted(k for k in set(saved) | set(loaded) if saved.get(k, "<absent>") != loaded.get(k, "<absent>"))
    require(not diff, "the loaded config differs from the saved one in " +
            ", ".join(f"'{k}' ({saved.get(k, '<absent>')!r} saved, {loaded.get(k, '<absent>')!r} loaded)" for k in diff))
    with torch.no_grad():
        y1, y2 = s.model(s.x), m2(s.x)
    require(torch.equal(y1, y2), f"with this config the loaded eval output differs by {tol.maxabs(y2.double() - y1.double()):.3g}")
    return None


# ----------------------------------------------------------------------------------------------- data


@st.composite
def _data_cases(draw, spec, device):
    c = draw(cases(spec, device=device, dtypes=(torch.float32,)))
    d_in = max(c.d_in, 6)
    d_out = max(c.d_out, 5)
    r = draw(st.integers(2, min(d_in, d_out) - 2), label="r<rank")
    if spec.fields is not None:
        bs = max(1, c.fields.get("block_size", 1))  # r stays a multiple of a block size, and above k directions
        r = max(spec.min_width, bs, c.fields.get("k", 0) + 1, r - r % bs)
    return c.with_(d_in=d_in, d_out=d_out, fields={**c.fields, "r": r})


def _state_after(spec, be: FullBackend, case, cal):
    s = setup(spec, be, case, attach=False)
    torch.manual_seed(case.seed)
    be.attach(s.model, spec, case, cal)
    out = {n: t.detach().clone() for n, t in be.tensors(s.model).items()}
    out["base_weight"] = be.base_weight(s.model).detach().clone()
    return out


@prop("data_path", lambda spec, device: _data_cases(spec, device), needs=("data",),
      applies=lambda spec, be: None if spec.data != "none" else "the variant uses no calibration data")
def data_path(spec, be: FullBackend, case):
    """The data path is live (other anisotropic data give another init), padding masked out by the attention
    mask does not change it, and missing data or fewer tokens than r is a clear error leaving the model
    bit-identical."""
    W, _ = base_weight(case)
    W = W.to(case.dtype).double()
    r = case.fields["r"]
    d1 = calibration(case, W, r)
    a = _state_after(spec, be, case, d1)
    b = _state_after(spec, be, case, calibration(case, W, r, variant=1))
    moved = max(tol.maxabs(a[n].double() - b[n].double()) / (tol.maxabs(a[n]) + 1e-12) for n in a)
    require(moved > 1e-4, "the init does not depend on the calibration data (data path not wired)")
    if spec.data == "optional":
        c = _state_after(spec, be, case, None)
        moved = max(tol.maxabs(a[n].double() - c[n].double()) / (tol.maxabs(a[n]) + 1e-12) for n in a)
        require(moved > 1e-4, "init with calibration data equals init without it")
    m = _state_after(spec, be, case, calibration(case, W, r, pad_value=-777.0))
    for n in a:
        require(torch.equal(a[n], m[n]), f"padding tokens (attention_mask == 0) change the init of '{n}'")
    s = setup(spec, be, case, attach=False)
    state, flags = snapshot(s.model), grad_flags(s.model)
    few = [{"x": d1[0]["x"][:1, : r - 1], "attention_mask": d1[0]["attention_mask"][:1, : r - 1]}]
    for label, cal in (("missing data", None), ("fewer tokens than r", few)):
        if label == "missing data" and spec.data != "required":
            continue
        try:
            be.attach(s.model, spec, case, cal)
        except be.errors.any as e:
            untouched(be, s.model, state, flags, f"after a failed attach ({label})")
            require(len(str(e)) > 10, f"{label}: unhelpful error {e!r}")
            continue
        raise Falsified(f"attach with {label} did not raise")
    return None


@prop("label_mask", lambda spec, device: _data_cases(spec, device), needs=("data", "label_mask"),
      applies=lambda spec, be: None if spec.data != "none" else "the variant uses no calibration data")
def label_mask(spec, be: FullBackend, case):
    """Calibration tokens labelled -100 (the Hugging Face ignore index) are left out of the data-driven init as
    padding is: batches whose left-out tokens hold garbage (1e3) and are marked by labels == -100 alone give the
    same init as the same batches with those tokens marked as padding (attention_mask == 0) and holding other
    garbage (-777). A library that never applies the label mask computes its init from the garbage too."""
    W, _ = base_weight(case)
    W = W.to(case.dtype).double()
    r = case.fields["r"]
    padded = _state_after(spec, be, case, calibration(case, W, r, pad_value=-777.0))
    labelled = _state_after(spec, be, case, calibration(case, W, r, labelled=True))
    for n in padded:
        require(torch.equal(padded[n], labelled[n]),
                f"tokens labelled -100 change the init of '{n}' (max diff {tol.maxabs(padded[n].double() - labelled[n].double()):.3g} "
                "against the same tokens as padding): the label mask is not applied")
    return None


# ----------------------------------------------------------------------------------------------- quantized


@prop("quantized", _dt(torch.float32), max_examples=6, needs=("quantized",))
def quantized(spec, be: FullBackend, case):
    """On bitsandbytes 4-bit and 8-bit layers the variant works as declared (equal, before and after a first
    forward, to the same adapter around F.linear(x, W_deq, b) at fp32 tolerance) or raises its clear error
    at attach, leaving the model untouched."""
    W, b = base_weight(case)
    x = inputs(case).float()
    worst, left_out = 0.0, []
    for lay in ("bnb4", "bnb8"):
        why = be.quantized_na(spec, lay) if has(be, QuantizedNA) else None
        if why:  # the backend's release cannot run this kind here (both kinds: the property is n/a)
            left_out.append(f"{lay} not checked: {why}")
            continue
        q = single(W, b, torch.float32, lay)
        W_deq = be.dequantized(q.layer).detach().double().clone()
        cal = calibration(case.with_(dtype=torch.float32), W_deq, case.fields["r"]) if spec.data != "none" else None
        if spec.quantized == "raises":
            state, flags = snapshot(q), grad_flags(q)
            try:
                be.attach(q, spec, case, cal)
            except be.errors.any as e:
                require("layer" in str(e), f"{lay}: the error does not name the layer: {e}")
                untouched(be, q, state, flags, f"{lay} after the refused attach")
                continue
            raise Falsified(f"{lay}: attach succeeded, but the spec declares 'raises' on quantized layers")
        torch.manual_seed(case.seed)
        be.attach(q, spec, case, cal)
        perturb(spec, be, q, case)
        dense = single(W_deq, b, torch.float32, "linear")
        torch.manual_seed(case.seed)
        be.attach(dense, spec, case, cal)
        with torch.no_grad():
            # only the trainables are copied: frozen tensors (weight norms, SVD factors) are what each attach
            # derived from the weight it read, and the dense layer's, from W_deq itself, are the reference
            for n, t in be.tensors(dense).items():
                if t.requires_grad:
                    t.copy_(be.tensors(q)[n])
            y_ref = dense(x)
            y_base = F.linear(x, W_deq.float(), None if b is None else b.float())
            for i in range(2):  # before and after a first forward (bnb 8-bit moves its scales then)
                y = q(x)
                ok, err = tol.close(y, y_ref, y_base, torch.float32)
                require(ok, f"{lay}, forward {i + 1}: differs from the adapter around F.linear(x, W_deq, b) (scaled error {err:.3g})")
                worst = max(worst, err)
        require(torch.equal(be.dequantized(q.layer).double(), W_deq), f"{lay}: the dequantized weight changed after a forward")
    return Noted(worst, "; ".join(left_out)) if left_out else worst
