"""Properties of the API beyond one adapter on one Linear: what users do every day and where adapter libraries'
bugs lived (issue #29).

- runtime_scale: a live scale change (set_scale / scale_by / unscale_by / reset_scale), or where the backend has
  none a live knob change, equals the spec's oracle at the new value, every scaling rule (rsLoRA) included;
- rank_patterns: several layers of one model, each with its own r and alpha, each equal its own oracle;
- adapters_on_one_module: two named adapters on one layer, alone, both active, switched, merged together, and one
  adapter re-made by a weighted combination of itself with weight 1;
- adapter_lifecycle: the disable context nested and left by an exception restores the state exactly; deleting an
  adapter (merged or not) restores the base or is refused; an unknown adapter name is refused;
- layer_kinds: Embedding (and transformers' scaled embeddings), Conv2d (with bias) and an adapter-output bias,
  against the spec's Linear oracle on the layer's Linear equivalent, merged and unmerged;
- model_merge_unload: merging every adapter of a tiny Llama / GPT-2 (float32 and bfloat16) into its weights
  gives the hooked model's logits.

Each compares with the spec's float64 oracle (or the exact base state) through the backend protocol
(harness.backends.protocol: the `scale`, `patterns`, `multi_adapter`, `embedding`, `conv2d`, `lora_bias`
capabilities); a backend lacking one makes the property `na` with its reason. Example counts are small: every
example is a few attaches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from . import tolerance as tol
from .backends.protocol import ADAPTER_NAME, FullBackend, lacks
from .checks import Checks, Measured, Outcome, outcomes_of
from .models import ARCHS, Single, make_layer, tiny
from .models import calibration as token_calibration
from .probes import (Falsified, base_bias, base_out, cfg_of, drawn_knob, engine_base, layouts, oracle_on, perturb,
                     perturb_layers, perturb_tensors, prop, require, same_state, setup, snapshot)
from .strategies import base_weight, cases, inputs

OTHER = "other"  # the second adapter's name


def _f32(spec, device):
    return cases(spec, dtypes=(torch.float32,), device=device)


def _f32_bias(spec, device):
    return cases(spec, dtypes=(torch.float32,), bias=True, device=device)


def _out(model, x):
    with torch.no_grad():
        return model(x)


def _oracle(spec, W, b, T, x64, cfg, knobs=None):
    """The spec's float64 oracle on float64 copies of the given tensors."""
    return oracle_on(spec, W, b, T, x64, cfg, knobs or {})[0]


def _close(what, y, y_ref, y_base, dtype, factor):
    ok, err = tol.close(y.detach().double().cpu(), y_ref, y_base, dtype, factor)
    require(ok, f"{what} (scaled error {err:.3g})", err)
    return err


def _factor(g: torch.Generator) -> float:
    """A scale factor in [0.3, 0.9] or [1.2, 2.5]: never 1, never 0."""
    u = float(torch.rand(1, generator=g, dtype=torch.float64))
    return 0.3 + 0.6 * u if u < 0.5 else 1.2 + 1.3 * u


# ----------------------------------------------------------------------------------------------- scale


def _scale_or_knob(spec, be: FullBackend):
    no_scale = lacks(be, spec, "scale")
    if no_scale is None:
        return None
    if spec.knobs and lacks(be, spec, "knobs") is None:
        return None
    return no_scale + ("" if spec.knobs else "; and the spec declares no runtime knob")


def _scaling_rules(spec, case):
    """The drawn case and, for every boolean field of the spec's config (a scaling rule such as rsLoRA), the case
    with it flipped; r >= 2 where the spec allows it (at r = 1, alpha/r = alpha/sqrt(r))."""
    limit = spec.rank_limit(case.d_in, case.d_out)
    fields = dict(case.fields)
    if fields.get("r") == 1 and (limit is None or limit >= 2):
        fields["r"] = 2
    out = [case.with_(fields=fields)]
    for k, v in fields.items():
        if isinstance(v, bool):
            out.append(case.with_(fields={**fields, k: not v}))
    return out


def _every_rule(check, spec, be: FullBackend, case) -> float:
    """The check on each case of _scaling_rules; a failure names the fields of the case it failed on. Every rule
    runs; the first failure is raised, carrying each check's outcome under its first failing rule."""
    worst, first, merged = 0.0, None, {}
    for c in _scaling_rules(spec, case):  # every rule runs, so that a check failing under one hides no other
        try:
            w = check(spec, be, c)
            worst, outcomes = max(worst, float(w or 0.0)), outcomes_of(w) or []
        except Exception as e:  # noqa: BLE001 - re-raised below (the first failure over the rules) after the others ran
            if first is None:
                first = Falsified(f"[fields {c.fields}] {e}", e.size) if isinstance(e, Falsified) else e
            outcomes = outcomes_of(e) or []
        for o in outcomes:  # one verdict per check over the rules: its first failure, named by its case
            err = o.error
            if isinstance(err, Falsified):
                err = Falsified(f"[fields {c.fields}] {err}", err.size)
            if o.name not in merged or (merged[o.name].error is None and err is not None):
                merged[o.name] = Outcome(o.name, err)
    checks = list(merged.values())
    if first is not None:
        first.checks = checks  # type: ignore[attr-defined]
        raise first from None
    return Measured(worst, checks) if checks else worst


@prop("runtime_scale", _f32, applies=_scale_or_knob, max_examples=4)
def runtime_scale(spec, be: FullBackend, case):
    """With every trainable perturbed, each live change of the adapter's scale (set_scale(f), scale_by(f),
    unscale_by(f), reset_scale: s = f·alpha/r, alpha/sqrt(r) with rsLoRA) gives the spec's oracle with alpha
    multiplied alike, under every scaling rule (each boolean config field flipped as well); a backend without a
    scale multiplier changes each runtime knob live instead (two drawn values, then the default), each equal to
    the oracle at that knob value."""
    return _every_rule(_runtime_scale, spec, be, case)


def _runtime_scale(spec, be: FullBackend, case):
    s = setup(spec, be, case)
    perturb(spec, be, s.model, case)
    x64 = s.x.detach().double().cpu()
    cfg0 = cfg_of(spec, be, case)
    g = case.gen(21)
    worst = 0.0

    def check(what, alpha_factor, knobs):
        nonlocal worst
        cfg = cfg_of(spec, be, case, alpha=cfg0.alpha * alpha_factor) if alpha_factor != 1.0 else cfg0
        y_ref = _oracle(spec, *engine_base(be, s), be.tensors(s.model), x64, cfg, knobs)
        worst = max(worst, _close(f"after {what}: output differs from the oracle at that scale", _out(s.model, s.x),
                                  y_ref, base_out(s, x64), case.dtype, spec.identity_factor))

    if lacks(be, spec, "scale") is None:
        f1, f2 = _factor(g), _factor(g)
        be.set_scale(s.model, f1)
        check(f"set_scale({f1:.3g})", f1, None)
        be.scale_by(s.model, f2)
        check(f"set_scale({f1:.3g}), scale_by({f2:.3g})", f1 * f2, None)
        be.unscale_by(s.model, f2)
        check(f"... unscale_by({f2:.3g})", f1, None)
        be.reset_scale(s.model)
        check("... reset_scale()", 1.0, None)
        return worst
    knobs = dict(be.knobs(s.model))
    for knob, identity in spec.knobs.items():
        default = knobs[knob]
        for value in (drawn_knob(default, identity, g), drawn_knob(default, identity, g), default):
            be.set_knob(s.model, knob, value)
            knobs[knob] = value
            check(f"set_knob({knob}={value:.4g})", 1.0, dict(knobs))
    return worst


# ----------------------------------------------------------------------------------------------- patterns


class Layers(nn.Module):
    """Named independent layers (a model whose layers the properties call one by one)."""

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x):  # pragma: no cover - the properties call the layers themselves
        raise NotImplementedError("call a layer of Layers directly")


PATTERN_NAMES = ("p0", "p1", "p2", "xp1")
# the layers rank_pattern / alpha_pattern name; "xp1" ends with the key "p1" but is another module: it keeps the
# config's r and alpha (a pattern matched as a bare suffix of the module name would give it p1's)
PATTERN_KEYS = ("p1", "p2")


@prop("rank_patterns", _f32_bias, needs=("patterns",), max_examples=3)
def rank_patterns(spec, be: FullBackend, case):
    """Four layers of different shapes in one model, p1 and p2 with their own r and alpha (rank_pattern /
    alpha_pattern), p0 and xp1 (whose name ends with the key p1) with the config's: each layer's tensors have the
    shapes of its own r, and with every
    trainable perturbed each layer's output equals the spec's oracle with its own r and alpha, under every
    scaling rule (each boolean config field flipped as well)."""
    return _every_rule(_rank_patterns, spec, be, case)


def _rank_patterns(spec, be: FullBackend, case):
    g = case.gen(22)
    dims, ranks, alphas, layers = {}, {}, {}, {}
    for i, name in enumerate(PATTERN_NAMES):
        own = name in PATTERN_KEYS
        c = case if i == 0 else case.with_(d_in=case.d_in + 2 * i, d_out=max(2, case.d_out - i)) if own else \
            case.with_(d_in=case.d_in + 1, d_out=case.d_out + 1)  # (the config's r fits a wider layer too)
        limit = spec.rank_limit(c.d_in, c.d_out) or 8
        r = 1 + int(torch.randint(min(limit, 8), (1,), generator=g)) if own else case.fields["r"]
        if own and r == case.fields["r"]:
            r = _another_rank(spec, c.d_in, c.d_out, r)
        a = 0.5 + float(torch.rand(1, generator=g, dtype=torch.float64)) * 8 if own else case.fields["alpha"]
        W, b = base_weight(c)
        layers[name] = make_layer(W.to(c.dtype).double(), None if b is None else b.to(c.dtype).double(), c.dtype)
        dims[name], ranks[name], alphas[name] = c, r, a
    model = Layers(layers)
    torch.manual_seed(case.seed)
    be.attach_patterns(model, spec, case, list(PATTERN_NAMES), {n: ranks[n] for n in PATTERN_KEYS},
                       {n: alphas[n] for n in PATTERN_KEYS})
    adapted = be.adapted_layers(model)
    require(set(adapted) == set(PATTERN_NAMES), f"adapted {sorted(adapted)}, expected {list(PATTERN_NAMES)}")
    worst = 0.0
    for name in PATTERN_NAMES:
        c, (tensors, base, knobs) = dims[name], adapted[name]
        cfg = cfg_of(spec, be, case, r=ranks[name], alpha=alphas[name])
        for ts in spec.present(c.d_in, c.d_out, cfg):
            want = spec.shape_of(ts, c.d_in, c.d_out, cfg)
            require(tuple(tensors[ts.name].shape) == want,
                    f"'{name}' (r={ranks[name]}): tensor {ts.name} has shape {tuple(tensors[ts.name].shape)}, "
                    f"expected {want}: the layer's own rank was not applied")
        perturb_tensors(spec, tensors, c.d_in, c.d_out, cfg, c.gen(3))
        x = inputs(c).to(c.dtype)
        x64 = x.double()
        y_ref = _oracle(spec, be.dequantized(base), getattr(base, "bias", None), tensors, x64, cfg, knobs)
        y_base = x64 @ be.dequantized(base).detach().double().T
        worst = max(worst, _close(f"'{name}' (r={ranks[name]}, alpha={alphas[name]:.3g}): output differs from its "
                                  f"own oracle", _out(model.get_submodule(name), x), y_ref, y_base, c.dtype,
                                  spec.identity_factor))
    return worst


# ----------------------------------------------------------------------------------------------- two adapters


def _another_rank(spec, d_in: int, d_out: int, r: int) -> int:
    """A rank other than r within the spec's limit for (d_in, d_out) (at most 8)."""
    top = min(spec.rank_limit(d_in, d_out) or 8, 8)
    return r + 1 if r < top else max(1, r - 1)


def _second(spec, case):
    """The second adapter's r and alpha: another rank (within the spec's limit) and another alpha."""
    return {"r": _another_rank(spec, case.d_in, case.d_out, case.fields["r"]),
            "alpha": case.fields["alpha"] * 1.5 + 0.5}


@prop("adapters_on_one_module", _f32_bias, needs=("multi_adapter",), max_examples=3)
def adapters_on_one_module(spec, be: FullBackend, case):
    """Two named adapters on one layer (another r and alpha for the second), every trainable perturbed: each
    active alone equals its oracle; both active equal the base plus both oracle deltas (the hooked sum); switching
    back reproduces the first output bit-exactly; merging both gives the hooked sum and unmerging restores the base
    weight; a weighted combination of the first adapter alone with weight 1 reproduces it. Under every scaling
    rule (each boolean config field flipped as well)."""
    return _every_rule(_adapters_on_one_module, spec, be, case)


def _adapters_on_one_module(spec, be: FullBackend, case):
    s = setup(spec, be, case)
    over = _second(spec, case)
    be.add_adapter(s.model, spec, case, OTHER, **over)
    cfgs = {ADAPTER_NAME: cfg_of(spec, be, case), OTHER: cfg_of(spec, be, case, **over)}
    for i, (name, cfg) in enumerate(cfgs.items()):
        perturb_tensors(spec, be.adapter_tensors(s.model, name), case.d_in, case.d_out, cfg, case.gen(30 + i))
    W = be.base_weight(s.model).detach().double().clone()  # as attach left it, before any mode switch
    bias = base_bias(be, s.model)
    s.model.eval()
    x64 = s.x.detach().double().cpu()
    y_base = x64 @ W.T + (0 if bias is None else bias.detach().double())
    delta = {n: _oracle(spec, W, bias, be.adapter_tensors(s.model, n), x64, cfg) - y_base for n, cfg in cfgs.items()}
    both = y_base + delta[ADAPTER_NAME] + delta[OTHER]
    f, worst, ck = spec.identity_factor, 0.0, Checks()  # each check runs whatever the others gave (harness.checks)
    y_first = None
    with ck("first_alone"):
        be.set_active(s.model, [ADAPTER_NAME])
        y_first = _out(s.model, s.x)
        worst = max(worst, _close(f"'{ADAPTER_NAME}' active: output differs from its oracle", y_first,
                                  y_base + delta[ADAPTER_NAME], y_base, case.dtype, f))
    with ck("other_alone"):
        be.set_active(s.model, [OTHER])
        worst = max(worst, _close(f"'{OTHER}' active alone: output differs from its oracle", _out(s.model, s.x),
                                  y_base + delta[OTHER], y_base, case.dtype, f))
    with ck("both_active"):
        be.set_active(s.model, [ADAPTER_NAME, OTHER])
        y_both = _out(s.model, s.x)
        worst = max(worst, _close("both active: output differs from the base plus both adapters' oracle deltas",
                                  y_both, both, y_base, case.dtype, f))
    with ck("switch_back"):
        be.set_active(s.model, [ADAPTER_NAME])
        require(y_first is not None and torch.equal(_out(s.model, s.x), y_first),
                f"switching back to '{ADAPTER_NAME}' does not reproduce its output bit-exactly")
    Wm = None
    with ck("both_merged"):
        be.set_active(s.model, [ADAPTER_NAME, OTHER])
        be.merge_adapters(s.model, [ADAPTER_NAME, OTHER])
        Wm = be.base_weight(s.model).detach().double().clone()
        worst = max(worst, _close("both merged: output differs from the hooked sum of both adapters",
                                  _out(s.model, s.x), both, y_base, case.dtype, f))
    with ck("unmerge_both"):
        be.unmerge_all(s.model)
        worst = max(worst, _close("unmerging both: base weight not restored", be.base_weight(s.model), W,
                                  W if Wm is None else Wm, case.dtype, f))
    with ck("weighted_one"):
        be.set_active(s.model, [ADAPTER_NAME])
        be.weighted_adapter(s.model, [ADAPTER_NAME], [1.0], "combined")
        worst = max(worst, _close(f"add_weighted_adapter(['{ADAPTER_NAME}'], [1.0]): output differs from "
                                  f"'{ADAPTER_NAME}' alone", _out(s.model, s.x), y_base + delta[ADAPTER_NAME], y_base,
                                  case.dtype, f))
    return ck.done(worst)


class _Raised(Exception):
    """Raised inside the disable context by adapter_lifecycle."""


@prop("adapter_lifecycle", _f32_bias, needs=("multi_adapter",), max_examples=3)
def adapter_lifecycle(spec, be: FullBackend, case):
    """With every trainable perturbed: inside nested disable contexts the output is the base layer's (as attach
    left it) bit-exactly, also
    after the inner one is left; after the outer one, and after a disable context left by an exception, it is the
    adapted output bit-exactly. An unknown adapter name (activate, delete) is refused with the model unchanged.
    Deleting a second adapter leaves the first adapter's output bit-exactly; deleting a merged adapter is refused
    (state unchanged) or restores the base weight; deleting the unmerged last adapter gives the base output."""
    s = setup(spec, be, case)
    perturb(spec, be, s.model, case)
    s.model.eval()
    bias = base_bias(be, s.model)
    with torch.no_grad():  # the base layer as attach left it (a base-rewriting init's residual: its own property)
        y0 = F.linear(s.x, be.base_weight(s.model), bias)
    y_a = _out(s.model, s.x)
    ck = Checks()  # each check runs whatever the others gave (harness.checks)
    with ck("nested_disable"):
        with be.disabled(s.model):
            require(torch.equal(_out(s.model, s.x), y0), "inside the disable context: output is not the base's")
            with be.disabled(s.model):
                require(torch.equal(_out(s.model, s.x), y0), "inside a nested disable context: output is not the "
                                                             "base's")
            require(torch.equal(_out(s.model, s.x), y0), "after leaving a nested disable context the outer one no "
                                                         "longer disables the adapter")
        require(torch.equal(_out(s.model, s.x), y_a), "after nested disable contexts: output is not the adapted one")
    with ck("disable_exception"):
        try:
            with be.disabled(s.model):
                raise _Raised()
        except _Raised:
            pass
        require(torch.equal(_out(s.model, s.x), y_a), "after a disable context left by an exception: output is not "
                                                      "the adapted one (the adapter stays disabled)")
    with ck("unknown_name"):
        state, y_now = snapshot(s.model), _out(s.model, s.x)  # (unchanged from here, whatever an earlier check left)
        for what, call in (("activating", lambda: be.set_active(s.model, ["no_such_adapter"])),
                           ("deleting", lambda: be.delete_adapter(s.model, "no_such_adapter"))):
            try:
                call()
            except be.errors.any:
                pass
            else:
                raise AssertionError(f"{what} an unknown adapter name was accepted") from None
            require(same_state(snapshot(s.model), state) and torch.equal(_out(s.model, s.x), y_now),
                    f"{what} an unknown adapter name changed the model")
    with ck("delete_second"):
        be.add_adapter(s.model, spec, case, OTHER, **_second(spec, case))
        perturb_tensors(spec, be.adapter_tensors(s.model, OTHER), case.d_in, case.d_out,
                        cfg_of(spec, be, case, **_second(spec, case)), case.gen(31))
        be.set_active(s.model, [ADAPTER_NAME])
        y_first = _out(s.model, s.x)  # (a base-rewriting init rewrites the base again for the second adapter)
        be.delete_adapter(s.model, OTHER)
        require(torch.equal(_out(s.model, s.x), y_first), f"after deleting '{OTHER}': output is not "
                                                          f"'{ADAPTER_NAME}'s")
    err = 0.0
    with ck("delete_merged"):
        with torch.no_grad():
            y0 = F.linear(s.x, be.base_weight(s.model), bias)
        W = be.base_weight(s.model).detach().double().clone()
        be.merge_adapters(s.model, [ADAPTER_NAME])
        Wm, merged = be.base_weight(s.model).detach().double().clone(), snapshot(s.model)
        try:
            be.delete_adapter(s.model, ADAPTER_NAME)
        except be.errors.any:
            require(same_state(snapshot(s.model), merged), "a refused delete of a merged adapter changed the model")
            be.unmerge_all(s.model)
            be.delete_adapter(s.model, ADAPTER_NAME)
        err = _close("after deleting the (merged) adapter: base weight not restored", be.base_weight(s.model), W, Wm,
                     case.dtype, spec.identity_factor)
    with ck("delete_last"):
        err = max(err, _close("after deleting the last adapter: output is not the base's", _out(s.model, s.x), y0,
                              None, case.dtype, spec.identity_factor))
    return ck.done(err)


# ----------------------------------------------------------------------------------------------- layer kinds

KINDS = ("embedding", "scaled_embedding", "conv2d", "lora_bias")


def _kinds(spec, be: FullBackend):
    reasons = [lacks(be, spec, k) for k in KINDS]
    return "; ".join(reasons) if all(reasons) else None


def _spec_layout(spec, be: FullBackend, model, d_in, d_out, cfg):
    """The backend's tensors of a non-Linear layer reshaped (views) to the spec's Linear-layout shapes."""
    out = {}
    for name, t in be.kind_tensors(model).items():
        ts = next(x for x in spec.tensors if x.name == name)
        out[name] = t.reshape(spec.shape_of(ts, d_in, d_out, cfg))
    return out


def _merge_round(spec, be: FullBackend, model, x, y_hooked, params, case, what):
    """merge_adapter gives the hooked output; unmerge_adapter restores every base parameter (weight and bias)."""
    before = {n: p.detach().double().clone() for n, p in params().items()}
    be.merge_adapter(model)
    merged = {n: p.detach().double().clone() for n, p in params().items()}
    worst = _close(f"{what}: merged output differs from the hooked output", _out(model, x), y_hooked, None,
                   case.dtype, spec.identity_factor)
    be.unmerge_adapter(model)
    for n, p in params().items():
        worst = max(worst, _close(f"{what}: unmerge does not restore the base {n}", p, before[n], merged[n],
                                  case.dtype, spec.identity_factor))
    return worst


def _at_init(spec, what, y, y0, dtype):
    """An adapted layer's output at init (before any perturbation) against the base layer's, in the spec's
    identity class: bitwise, within the dtype's tolerance, or off by at most the declared start size (per token,
    relative to the base output)."""
    diff = tol.maxabs(y.double() - y0.double())
    if spec.identity == "bitwise":
        require(torch.equal(y, y0), f"{what}: not bitwise identical to the base at init (max |y - y_base| = "
                                    f"{diff:.3g})")
        return 0.0
    if spec.identity == "tolerance":
        return _close(f"{what}: not the identity at init", y, y0.double(), None, dtype, spec.identity_factor)
    rel = float((y.double() - y0.double()).norm(dim=-1).max()) / (float(y0.double().norm(dim=-1).max()) + 1e-300)
    slack = tol.bound(y0, None, dtype, spec.identity_factor) * y0.shape[-1] ** 0.5
    ok, scaled = tol.within(rel, spec.init_shrink + slack)
    require(ok, f"{what}: off the base at init by {rel:.3g} (per token, relative), above the declared start size "
                f"{spec.init_shrink:g}", scaled)
    return scaled


def _embedding(spec, be: FullBackend, case, scaled: bool):
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

    W, _ = base_weight(case)  # the Linear equivalent (d_out, d_in): the embedding matrix is its transpose
    V, D = case.d_in, case.d_out
    c = 0.5 + float(torch.rand(1, generator=case.gen(23), dtype=torch.float64)) * 3
    emb = BartScaledWordEmbedding(V, D, None, embed_scale=c) if scaled else nn.Embedding(V, D)
    with torch.no_grad():
        emb.weight.copy_(W.T.to(case.dtype))
    model = Single(emb.to(case.dtype))
    ids = torch.randint(V, (2, 5), generator=case.gen(24))
    what = f"{'scaled (x%.3g) ' % c if scaled else ''}Embedding"
    y0 = _out(model, ids)
    torch.manual_seed(case.seed)
    be.attach_kind(model, spec, case)
    init = _at_init(spec, what, _out(model, ids), y0, case.dtype)  # the adapter's own init, before any perturbation
    cfg = cfg_of(spec, be, case)
    perturb_tensors(spec, _spec_layout(spec, be, model, V, D, cfg), V, D, cfg, case.gen(3))
    onehot = F.one_hot(ids, V).double()
    E = emb.weight.detach().double()
    y_ref = _oracle(spec, E.T, None, _spec_layout(spec, be, model, V, D, cfg), onehot, cfg) * (c if scaled else 1.0)
    y = _out(model, ids)
    y_base = onehot @ E * (c if scaled else 1.0)
    err = max(init, _close(f"{what}: output differs from the oracle on one-hot inputs", y, y_ref, y_base,
                           case.dtype, spec.identity_factor))
    return max(err, _merge_round(spec, be, model, ids, y_ref, lambda: {"weight": emb.weight}, case, what))


def _conv2d(spec, be: FullBackend, case):
    g = case.gen(25)
    c_in, k = 2 + int(torch.randint(2, (1,), generator=g)), 2 + int(torch.randint(2, (1,), generator=g))
    d_in, d_out = c_in * k * k, case.d_out
    c = case.with_(d_in=d_in)
    W, b = base_weight(c.with_(bias=True))
    conv = nn.Conv2d(c_in, d_out, k, bias=True)
    with torch.no_grad():
        conv.weight.copy_(W.reshape(d_out, c_in, k, k))
        conv.bias.copy_(b)
    model = Single(conv.to(case.dtype))
    torch.manual_seed(case.seed)
    be.attach_kind(model, spec, c)
    cfg = cfg_of(spec, be, c)
    perturb_tensors(spec, _spec_layout(spec, be, model, d_in, d_out, cfg), d_in, d_out, cfg, case.gen(3))
    x = torch.randn(2, c_in, 5, 4, generator=case.gen(26), dtype=torch.float64)
    patches = F.unfold(x, k).transpose(1, 2)  # (N, L, c_in*k*k): the Linear equivalent's inputs
    Wf, bias = conv.weight.detach().double().flatten(1), conv.bias.detach().double()
    y_ref = _oracle(spec, Wf, bias, _spec_layout(spec, be, model, d_in, d_out, cfg), patches, cfg)
    hw = (5 - k + 1, 4 - k + 1)
    y_ref = y_ref.transpose(1, 2).reshape(2, d_out, *hw)
    y_base = (patches @ Wf.T + bias).transpose(1, 2).reshape(2, d_out, *hw)
    xd = x.to(case.dtype)
    err = _close(f"Conv2d (k={k}): output differs from the oracle on the unfolded patches", _out(model, xd), y_ref,
                 y_base, case.dtype, spec.identity_factor)
    return max(err, _merge_round(spec, be, model, xd, y_ref, lambda: {"weight": conv.weight, "bias": conv.bias}, case,
                                 f"Conv2d (k={k})"))


def _lora_bias(spec, be: FullBackend, case):
    W, b = base_weight(case.with_(bias=True))
    model = Single(make_layer(W.to(case.dtype).double(), b.to(case.dtype).double(), case.dtype))
    torch.manual_seed(case.seed)
    be.attach_kind(model, spec, case, lora_bias=True)
    cfg = cfg_of(spec, be, case)
    perturb_tensors(spec, be.kind_tensors(model), case.d_in, case.d_out, cfg, case.gen(3))
    with torch.no_grad():
        be.kind_bias(model).copy_(torch.randn(case.d_out, generator=case.gen(27)))
    x = inputs(case).to(case.dtype)
    return _merge_round(spec, be, model, x, _out(model, x).double(),
                        lambda: {"weight": be.base_weight(model), "bias": base_bias(be, model)}, case,
                        "adapter-output bias")


@prop("layer_kinds", _f32, applies=_kinds, max_examples=4)
def layer_kinds(spec, be: FullBackend, case):
    """On each layer kind the backend adapts for the spec: a plain Embedding and transformers' scaled embedding
    (its adapter output scaled alike), each a capability of its own, equal the base embedding at init (the spec's
    identity class, before any perturbation) and, with every trainable perturbed, the spec's oracle on one-hot
    inputs with W = the embedding matrix transposed; a Conv2d with bias equals the oracle on the unfolded patches
    with W = the flattened kernel; on each, and on a Linear with an adapter-output bias (lora_bias), merge gives the
    hooked output and unmerge restores the base weight and bias."""
    worst = 0.0
    if lacks(be, spec, "embedding") is None:
        worst = max(worst, _embedding(spec, be, case, scaled=False))
    if lacks(be, spec, "scaled_embedding") is None:
        worst = max(worst, _embedding(spec, be, case, scaled=True))
    if lacks(be, spec, "conv2d") is None:
        worst = max(worst, _conv2d(spec, be, case))
    if lacks(be, spec, "lora_bias") is None:
        worst = max(worst, _lora_bias(spec, be, case))
    return worst


# ----------------------------------------------------------------------------------------------- whole model


def _merge_cases(spec, device):
    """A case for each architecture (harness.models.ARCHS) and the dtype of the tiny Llama; the tiny Qwen and GPT-2
    of the same example run in the other dtype, so each example covers every architecture and both dtypes."""
    return st.tuples(st.tuples(*(cases(spec, dtypes=(torch.float32,), device=device) for _ in ARCHS)),
                     st.sampled_from([torch.float32, torch.bfloat16]))


def _whole(spec, be: FullBackend):
    if spec.square_only:
        return "the spec runs on square layers only; a tiny model's layers are not square"
    return None


ROUNDING_MARGIN = 3.0  # merged and hooked logits each carry the model's own rounding; their gap up to 3x of it


@prop("model_merge_unload", _merge_cases, needs=("model", "merge"), applies=_whole, max_examples=1)
def model_merge_unload(spec, be: FullBackend, drawn):
    """On a tiny Llama, Qwen and GPT-2 in float32 or bfloat16 with every adapter tensor of every adapted layer
    perturbed, merging all adapters into the weights and unloading (merge_and_unload) leaves no adapter module or
    hook and gives the hooked model's logits: the merged logits are as close to the float64 hooked logits (a float64
    twin holding the same state) as the dtype's tolerance allows, or as ROUNDING_MARGIN times the hooked model's own
    rounding error (a whole model amplifies rounding through its norms and attention: the hooked model in the same
    dtype shows how much)."""
    per_arch, dtype = drawn
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    # GPT-2's projections are transformers' Conv1D: where the spec declares (for this backend) that the variant
    # does not run on Conv1D, the Llama runs in both dtypes
    arch = "gpt2" if "conv1d" in layouts(spec, be) else "llama"
    runs = (("llama", dtype), ("qwen", other), (arch, other))
    return max(_merge_unload(spec, be, case, a, dt) for case, (a, dt) in zip(per_arch, runs))


def _merge_unload(spec, be: FullBackend, case, arch, dtype):
    from .whole_model import HIDDEN, model_roles

    batch = token_calibration(n=1, seed=case.seed)[0]
    roles, names = model_roles(spec, arch)
    cal = token_calibration(n=2) if spec.data != "none" else None
    twins = []
    for dt in (dtype, torch.float64):
        m = tiny(arch, seed=case.seed % 5, dtype=dt, hidden=HIDDEN)
        with torch.no_grad():
            y0 = m(**batch).logits
        torch.manual_seed(case.seed)
        be.attach_model(m, spec, case, roles, names, cal, **({"param_dtype": dt} if dt == torch.float64 else {}))
        twins.append((m, y0))
    (model, y0), (m64, _) = twins
    adapted = be.adapted_layers(model)
    require(len(adapted) >= 2, f"{arch}: only {sorted(adapted)} adapted")
    perturb_layers(spec, adapted, case)
    m64.load_state_dict(model.state_dict())  # the same base, adapter tensors and buffers, held in float64
    with torch.no_grad():
        y_h = model(**batch).logits
        y_ref = m64(**batch).logits.double()
    be.merge(model)
    left = be.hooks_left(model)
    require(not left, f"{arch}: adapter modules or hooks left after merge: {left[:5]}")
    with torch.no_grad():
        y_m = model(**batch).logits
    own = tol.maxabs(y_h.double() - y_ref)
    err = tol.maxabs(y_m.double() - y_ref)
    ok, scaled = tol.within(err, max(tol.bound(y_ref, y0, dtype, spec.identity_factor), ROUNDING_MARGIN * own))
    require(ok, f"{arch} {str(dtype).removeprefix('torch.')}: merged model's logits differ from the hooked model's "
                f"(max diff {err:.3g} from the float64 hooked logits, the hooked model's own {own:.3g}; scaled error "
                f"{scaled:.3g})", scaled)
    return scaled
