"""Model-level properties: what only shows with several layers of a real architecture.

A single-layer model's only layer is the target, so it cannot see a runtime that freezes only the adapted
modules, restores `requires_grad` as "all True", applies a knob to one layer, maps a role to the wrong module or
calibrates a later layer on the activations of an already-adapted earlier one. These properties adapt the tiny
Llama, Qwen and GPT-2 models of harness.models (2 blocks, hidden size 32; GPT-2's projections are transformers'
transposed Conv1D) and keep their example counts small: each is a few whole-model attaches.

What must always be covered is enumerated, and only the values within it are drawn: every example holds every
architecture (harness.models.ARCHS, each with its own drawn case, every boolean config field taking both values
across them), and model_targeting's every kind of selection (SELECTION_KINDS) on each. Three derandomized draws
over architecture x roles x names x layers x exclusions left whole regions unchecked on every run (a GPT-2 role
swap, exclusions matched against leaf names: harness/zoo/targeting.py).
"""
from __future__ import annotations

import copy
import re

import torch
from hypothesis import strategies as st

from . import tolerance as tol
from .models import calibration as token_calibration
from .models import ARCHS, single, tiny
from .backends.protocol import FullBackend, lacks
from .probes import drawn_knob, grad_flags, perturb_layers, prop, require, same_state, snapshot
from .properties import compare_init
from .strategies import cases

HIDDEN = 32
BLOCKS = 2
# Each architecture's adaptable block modules and their roles, written from the transformers model classes (not
# from impl's targeting patterns): the expected target sets are computed from this table.
_LLAMA = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
          "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
MODULES = {"llama": _LLAMA, "qwen": _LLAMA,
           "gpt2": {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}}
BLOCK_PREFIX = {"llama": "model.layers.{i}.", "qwen": "model.layers.{i}.", "gpt2": "transformer.h.{i}."}
DEFAULT_EXCLUDE = (r"lm_head", r"embed")


def block_modules(arch: str) -> dict[str, str]:
    """Every adaptable block module of the tiny model of `arch`: full name -> role."""
    return {BLOCK_PREFIX[arch].format(i=i) + suffix: role for i in range(BLOCKS) for suffix, role in MODULES[arch].items()}


def expected_targets(arch: str, selection: dict) -> set[str]:
    """The module names a selection (target_roles, target_names, layers, exclude_names) must adapt: a module is
    adapted when it has a selected role (if roles are given), matches a name regex (if names are given), lies in a
    selected block (if layers are given) and matches no exclusion."""
    roles, names = selection.get("target_roles", ()), selection.get("target_names", ())
    layers, exclude = selection.get("layers"), selection.get("exclude_names", DEFAULT_EXCLUDE)
    out = set()
    for name, role in block_modules(arch).items():
        block = int(name.split(".")[-3])
        if (roles and role not in roles) or (names and not any(re.search(p, name) for p in names)):
            continue
        if (layers is not None and block not in layers) or any(re.search(p, name) for p in exclude):
            continue
        out.add(name)
    return out


def model_roles(spec, arch: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(roles, module suffixes) a whole-model run targets: the spec's roles; GPT-2 fuses q, k and v into qkv."""
    by_role = {role: suffix for suffix, role in MODULES[arch].items()}
    roles = []
    for role in spec.roles:
        role = "qkv" if arch == "gpt2" and role in ("q", "k", "v") else role
        if role not in roles and role in by_role:
            roles.append(role)
    return tuple(roles), tuple(by_role[r] for r in roles)


@st.composite
def _model_cases(draw, spec, device):
    """One float32 case for each architecture the harness builds (harness.models.ARCHS), in that order: every
    example covers every architecture, each with its own drawn config. Every boolean config field takes both
    values in every example (the second architecture's case holds the negation of the first's): a field that
    switches a data path on (antipasto_ablate's cov_orient) is never left at one value for a whole run."""
    drawn = [draw(cases(spec, dtypes=(torch.float32,), device=device)) for _ in ARCHS]
    flags = {k: not v for k, v in drawn[0].fields.items() if isinstance(v, bool) and k in drawn[1].fields}
    drawn[1] = drawn[1].with_(fields={**drawn[1].fields, **flags})
    return tuple(zip(drawn, ARCHS))


def _each_arch(check, spec, be: FullBackend, drawn):
    """Run check(spec, be, case, arch) on each (case, arch) of a _model_cases example; the worst scaled error."""
    worst = None
    for case, arch in drawn:
        w = check(spec, be, case, arch)
        worst = w if worst is None else max(worst, w if w is not None else worst)
    return worst


# The kinds of selection a targeting config can make (the fields of harness.backends.protocol's attach_targets):
# every run checks each one on every architecture, drawing only the values within it.
SELECTION_KINDS = ("target_roles", "target_names", "layers", "exclude_names by leaf name", "exclude_names by path",
                   "nothing selected")
_NAMES = ("mlp", "attn", r"(_proj|c_fc)$")  # each selects some modules of every block in every arch
_PATHS = (r"\.0\.", r"\.1\.", r"mlp\.", r"attn\.")  # each spans a dot: matches a module's path, never a leaf


def role_trials(roles) -> list[dict]:
    """Selections that tell every role apart: role i (in the given order) gets the code i + 1, and selection k
    holds the roles whose code has bit k set. A module given any other role (or none) than its own is then
    adapted or left out by at least one selection where the expected set says otherwise, with ceil(log2(n + 1))
    attaches instead of one per role."""
    bits = len(roles).bit_length()
    return [{"target_roles": tuple(r for i, r in enumerate(roles) if (i + 1) >> k & 1)} for k in range(bits)]


@st.composite
def _arch_selections(draw, arch):
    """Every kind of selection of SELECTION_KINDS for `arch`, with drawn values: the role trials over a drawn
    order of the roles; target_names with one block's layers, alone and with roles; every role with one leaf-name
    and one path exclusion (the leaf chosen among modules the path leaves in); a selection that matches nothing."""
    roles = draw(st.permutations(sorted(set(MODULES[arch].values()))), label=f"{arch} role order")
    trials = role_trials(tuple(roles))
    block = draw(st.sampled_from(range(BLOCKS)), label=f"{arch} block")
    name = draw(st.sampled_from(_NAMES), label=f"{arch} target_names")
    trials.append({"target_names": (name,), "layers": (block,)})
    # names and roles together select their intersection: a proper subset of the roles the names match, and one
    # role they do not match (a union, or either field ignored, then adapts a module outside the expected set)
    named = [r for r in roles if any(re.search(name, s) for s, role in MODULES[arch].items() if role == r)]
    inside = draw(st.lists(st.sampled_from(named), min_size=1, max_size=max(1, len(named) - 1), unique=True),
                  label=f"{arch} roles with target_names")
    outside = [r for r in roles if r not in named][:1]
    trials.append({"target_roles": tuple(inside) + tuple(outside), "target_names": (name,), "layers": (block,)})
    path = draw(st.sampled_from(_PATHS), label=f"{arch} path exclusion")
    leaves = sorted(s for s in MODULES[arch] if not re.search(path, "." + s + "."))
    leaf = draw(st.sampled_from(leaves), label=f"{arch} leaf exclusion").rpartition(".")[2]
    trials.append({"target_roles": tuple(roles), "exclude_names": DEFAULT_EXCLUDE + (leaf + "$", path)})
    trials.append({"target_roles": (roles[0],), "layers": (block,),
                   "exclude_names": DEFAULT_EXCLUDE + (rf"\.{block}\.",)})
    return trials


@st.composite
def _selections(draw, spec, device):
    """A case and every selection kind on every architecture (see _arch_selections)."""
    c = draw(cases(spec, dtypes=(torch.float32,), device=device))
    return c, tuple((arch, draw(_arch_selections(arch))) for arch in ARCHS)


def _needs(*capabilities):
    def applies(spec, be: FullBackend):
        lacking = lacks(be, spec, *capabilities)
        if lacking:
            return lacking
        return "the spec runs on square layers only; a tiny model's layers are not square" if spec.square_only else None

    return applies


def _calibration(spec):
    return token_calibration(n=2) if spec.data != "none" else None


def _logits(model, batch, grad: bool = False):
    with torch.set_grad_enabled(grad):
        return model(**batch).logits


@prop("model_targeting", _selections, applies=_needs("model", "targets", "detach"), max_examples=1)
def model_targeting(spec, be: FullBackend, drawn):
    """On each tiny model (Llama, Qwen, GPT-2), the adapted modules are exactly the expected set for every kind of
    selection (SELECTION_KINDS): role selections that tell every role apart (role_trials), target_names within one
    block's layers (alone and with roles), every role less one leaf-name and one path exclusion; a selection that
    matches nothing is a clear error leaving the model untouched. Every example checks every kind on every
    architecture; only the values within each kind are drawn."""
    case, per_arch = drawn
    cal = _calibration(spec)
    for arch, trials in per_arch:
        model = tiny(arch, seed=case.seed % 5, hidden=HIDDEN)
        for sel in trials:
            expected = expected_targets(arch, sel)
            flags, state = grad_flags(model), snapshot(model)
            try:
                torch.manual_seed(case.seed)
                be.attach_targets(model, spec, case, sel, cal)
            except be.errors.attach as e:
                require(not expected, f"{arch} {sel}: attach refused ({e}) but {sorted(expected)} should be adapted")
                require(grad_flags(model) == flags and same_state(snapshot(model), state),
                        f"{arch} {sel}: a refused attach changed the model")
                continue
            got = set(be.adapted_layers(model))
            be.detach(model)
            require(got == expected, f"{arch} {sel}: adapted {sorted(got - expected)} that the selection excludes "
                                     f"and missed {sorted(expected - got)}")
    return None


def _freeze_some(model, case) -> None:
    """Freeze a drawn subset of the base parameters (a user's partly frozen model before attach)."""
    g = case.gen(11)
    for _, p in model.named_parameters():
        if float(torch.rand(1, generator=g)) < 0.4:
            p.requires_grad_(False)


def _attach(spec, be: FullBackend, case, arch, model, **over):
    roles, suffixes = model_roles(spec, arch)
    torch.manual_seed(case.seed)
    be.attach_model(model, spec, case, roles, suffixes, _calibration(spec), **over)
    adapted = be.adapted_layers(model)
    require(len(adapted) >= 2, f"{arch}: only {sorted(adapted)} adapted for roles {roles}")
    return adapted


@prop("model_freezing", _model_cases, applies=_needs("model", "detach"), max_examples=1)
def model_freezing(spec, be: FullBackend, drawn):
    """On each tiny model (Llama, Qwen, GPT-2: every example covers all three, each with its own drawn case) with some
    base parameters frozen before attach: after attach every base parameter is frozen; after a training step every
    base parameter is unchanged and has no gradient while every adapter tensor moved; detach restores each
    requires_grad flag exactly as it was."""
    return _each_arch(_model_freezing, spec, be, drawn)


def _model_freezing(spec, be: FullBackend, case, arch):
    model = tiny(arch, seed=case.seed % 5, hidden=HIDDEN)
    _freeze_some(model, case)
    flags = grad_flags(model)
    adapted = _attach(spec, be, case, arch, model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}  # after attach: a rewritten base counts
    # by storage, not identity: a backend's tensors may be views (reshaped, transposed) of its parameters
    adapter = {t.untyped_storage().data_ptr() for tensors, _, _ in adapted.values() for t in tensors.values()}
    is_adapter = {n: p.untyped_storage().data_ptr() in adapter for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not is_adapter[n]]
    require(not trainable, f"{arch}: base parameters left trainable after attach: {trainable[:5]}")
    perturb_layers(spec, adapted, case)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    batch = token_calibration(n=1, seed=case.seed)[0]
    logits = _logits(model, batch, grad=True)
    (logits * torch.randn(logits.shape, generator=case.gen(4))).sum().backward()
    opt.step()
    require(all(not torch.equal(p.detach(), b) for p, b in zip(params, before)), f"{arch}: an adapter tensor did not move")
    for n, p in model.named_parameters():
        if is_adapter.get(n, False):
            continue
        require(p.grad is None, f"{arch}: base parameter '{n}' received a gradient")
        require(n not in base or torch.equal(p.detach(), base[n]), f"{arch}: base parameter '{n}' changed in training")
    be.detach(model)
    after = grad_flags(model)
    changed = sorted(n for n in flags if after.get(n) != flags[n])
    require(not changed, f"{arch}: detach did not restore requires_grad exactly: {changed[:5]}")
    return None


@prop("model_knobs", _model_cases,
      applies=lambda spec, be: ("the spec declares no runtime knob" if not spec.knobs
                                else _needs("model", "knobs")(spec, be)), max_examples=1)
def model_knobs(spec, be: FullBackend, drawn):
    """On each tiny model (Llama, Qwen, GPT-2: every example covers all three, each with its own drawn case), a knob
    set on the live model reaches every adapted layer (each reports the drawn value), and with every knob at its
    identity value the logits with every trainable perturbed equal the logits with every trainable at its init, on
    every layer at once."""
    return _each_arch(_model_knobs, spec, be, drawn)


def _model_knobs(spec, be: FullBackend, case, arch):
    model = tiny(arch, seed=case.seed % 5, hidden=HIDDEN)
    adapted = _attach(spec, be, case, arch, model)
    batch = token_calibration(n=1, seed=case.seed)[0]
    for knob, identity in spec.knobs.items():
        default = next(iter(adapted.values()))[2][knob]
        value = drawn_knob(default, identity, case.gen(12))
        be.set_knob(model, knob, value)
        seen = {n: k[knob] for n, (_, _, k) in be.adapted_layers(model).items()}
        require(all(v == value for v in seen.values()), f"{arch}: set_knob({knob}={value:.4g}) reached only some "
                                                          f"layers: {seen}")
        be.set_knob(model, knob, identity)
    y_init = _logits(model, batch)
    perturb_layers(spec, adapted, case)
    y_knob = _logits(model, batch)
    ok, err = tol.close(y_knob, y_init, None, torch.float32, spec.identity_factor)
    require(ok, f"{arch}: with {dict(spec.knobs)} set on the live model, perturbing the trainables changes the "
                f"logits (scaled error {err:.3g}): a layer does not honour the knob", err)
    return err


def _inputs_of(model, names, batches) -> dict[str, list[torch.Tensor]]:
    """Each named module's (B, T, d_in) input over the batches, from forward pre-hooks on `model`."""
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(args[0].detach().clone())) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return seen


@prop("model_data_init", _model_cases,
      applies=lambda spec, be: ("the variant uses no calibration data" if spec.data == "none"
                                else _needs("model")(spec, be)), max_examples=1)
def model_data_init(spec, be: FullBackend, drawn):
    """On each tiny model (Llama, Qwen, GPT-2: every example covers all three, each with its own drawn case), each
    adapted layer's data-driven init equals the init of that layer alone calibrated on the inputs it receives in the
    UNADAPTED model (deterministic tensors and the rewritten base weight): no layer is calibrated on activations
    that an already-adapted earlier layer produced."""
    return _each_arch(_model_data_init, spec, be, drawn)


def _model_data_init(spec, be: FullBackend, case, arch):
    model = tiny(arch, seed=case.seed % 5, hidden=HIDDEN)
    unadapted = copy.deepcopy(model)
    adapted = _attach(spec, be, case, arch, model)
    batches = _calibration(spec)
    acts = _inputs_of(unadapted, list(adapted), batches)
    random = {t.name for t in spec.tensors if t.random}  # drawn afresh by each attach: not comparable in value
    worst = 0.0
    for name, (tensors, layer, _) in adapted.items():
        base = unadapted.get_submodule(name)
        W = be.dequantized(base).detach().double()
        b = None if getattr(base, "bias", None) is None else base.bias.detach().double()
        one = single(W, b, torch.float32, "conv1d" if type(base).__name__ == "Conv1D" else "linear")
        cal = [{"x": x, "attention_mask": bt["attention_mask"]} for x, bt in zip(acts[name], batches)]
        torch.manual_seed(case.seed)
        be.attach(one, spec, case.with_(d_in=W.shape[1], d_out=W.shape[0]), cal)
        alone = {n: t.detach().double() for n, t in be.tensors(one).items()}
        alone["base_weight"] = be.base_weight(one).detach().double()
        ours = {n: t.detach().double() for n, t in tensors.items()}
        ours["base_weight"] = be.dequantized(layer).detach().double()
        expected = {n: t for n, t in alone.items() if n not in random}
        # the same init on the same inputs: only the dtype's rounding allowance, no SVD width factor
        worst = max(worst, compare_init(spec, expected, ours, W, torch.float32, spec.identity_factor, f"{arch} '{name}': "))
    return worst
