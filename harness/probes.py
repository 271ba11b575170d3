"""The building blocks shared by the generic properties and the differential ones: the Property record and
its registry, Falsified, the single-layer set-up, perturbation of trainables, the float64 oracle call, state
snapshots, gradient scales and the Probe that a spec's claims measure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import strategies as st

from spec.schema import Spec

from . import tolerance as tol
from .backends.protocol import BaseBias, FullBackend, Mapped, has, lacks
from .models import single
from .strategies import Case, base_weight, calibration, calibration_tokens, cases, inputs


class Falsified(AssertionError):
    """A property does not hold on this case; `size` is the measured size of the failure, when it has one
    (compared with a declared deviation's size)."""

    def __init__(self, msg: str, size: float | None = None):
        super().__init__(msg)
        self.size = size


class Noted(float):
    """A property's worst scaled error with a note the Result's detail keeps when the property passes (e.g. which
    dtypes a check could judge)."""

    note: str

    def __new__(cls, value: float, note: str):
        obj = super().__new__(cls, value)
        obj.note = note
        return obj


def require(cond: bool, msg: str, size: float | None = None) -> None:
    if not cond:
        raise Falsified(msg, size)


@dataclass(frozen=True)
class Property:
    name: str
    doc: str
    check: Callable[[Spec, FullBackend, Any], float | None]
    strategy: Callable[[Spec, str], st.SearchStrategy]
    applies: Callable[[Spec, FullBackend], str | None] = lambda spec, be: None
    max_examples: int | None = None  # cap for properties with little to draw
    needs: tuple[str, ...] = ()  # backend capabilities (harness.backends.protocol.CAPABILITIES); missing -> na
    # what a spec declares that only this property checks: where it returns a text and the property is n/a, the
    # Result is marked unchecked (table mark U, counted in the summary), not a silent n/a
    gap: Callable[[Spec], str | None] = lambda spec: None
    # the method of the implementation whose result a failed check judged ("forward", "init", "merged"): the engine
    # names its file and line in the failure
    frame: str = ""


PROPERTIES: dict[str, Property] = {}


def prop(name: str, strategy: Callable[[Spec, str], st.SearchStrategy],
         applies: Callable[[Spec, FullBackend], str | None] | None = None, max_examples: int | None = None,
         needs: tuple[str, ...] = (), gap: Callable[[Spec], str | None] | None = None,
         frame: str = "") -> Callable[[Callable[[Spec, FullBackend, Any], float | None]],
                                      Callable[[Spec, FullBackend, Any], float | None]]:
    """Register a property; `needs` names the backend capabilities it uses (a backend lacking one makes it na,
    with the backend's reason)."""
    own = applies or (lambda spec, be: None)

    def deco(fn):
        PROPERTIES[name] = Property(name, (fn.__doc__ or "").strip(), fn, strategy,
                                    lambda spec, be: lacks(be, spec, *needs) or own(spec, be), max_examples, needs,
                                    gap or (lambda spec: None), frame)
        return fn

    return deco


# ----------------------------------------------------------------------------------------------- helpers


def _dt(*dtypes):
    return draws_case(lambda spec, device: cases(spec, dtypes=dtypes, device=device))


def draws_case(strategy):
    """Mark a property's strategy as drawing plain float32-capable `Case`s: the engine then also runs the
    library's own default config as one case (harness.engine.defaults_case)."""
    strategy.draws_case = True
    return strategy


@dataclass
class Setup:
    W: torch.Tensor  # original base weight, float64, rounded to the case dtype
    b: torch.Tensor | None
    model: torch.nn.Module
    x: torch.Tensor
    cal: list | None
    y0: torch.Tensor  # base output before attach
    # The engine's own copy of the base the adapter rides on (float64, CPU), taken from the plain layer before
    # attach; for a spec that rewrites the base (a residual), read once right after attach, before any mode
    # switch. Every reference (the oracle, a merge check) is computed from it, never from weights read back
    # after eval()/train(): a library that merges on eval() cannot make a check compare it with itself.
    W_base: torch.Tensor | None = None
    b_base: torch.Tensor | None = None


def setup(spec: Spec, be: FullBackend, case: Case, layout: str = "linear", kind: str = "random", attach: bool = True,
          with_data: bool = True, **over) -> Setup:
    """Build a single-layer model for the case, record its base output, attach the variant."""
    W, b = base_weight(case, kind)
    W = W.to(case.dtype).double()
    b = None if b is None else b.to(case.dtype).double()
    model = single(W, b, case.dtype, layout, case.device)
    x = inputs(case).to(case.dtype).to(case.device)
    with torch.no_grad():
        y0 = model(x)
    plain_bias = getattr(model.layer, "bias", None)  # the plain layer's (Conv1D always has one)
    W_base, b_base = W.clone(), None if plain_bias is None else plain_bias.detach().double().cpu().clone()
    cal = calibration(case, W, case.fields["r"]) if spec.data != "none" and with_data else None
    if cal is not None:
        cal = [{k: v.to(case.device) for k, v in batch.items()} for batch in cal]
    if attach:
        torch.manual_seed(case.seed)
        if case.dtype == torch.float64 and "param_dtype" not in over:
            over["param_dtype"] = torch.float64
        be.attach(model, spec, case, cal, **over)
        if spec.rewrites_base:  # the residual attach wrote (checked against the spec's init formula elsewhere)
            W_base = be.base_weight(model).detach().double().cpu().clone()
    return Setup(W, b, model, x, cal, y0, W_base, b_base)


def perturb_tensors(spec: Spec, tensors: dict[str, torch.Tensor], d_in: int, d_out: int, cfg, g: torch.Generator,
                    sigma: float = 0.5, around_current: bool = False) -> None:
    """Move every trainable tensor the spec declares present for (d_in, d_out, cfg) off its init: to the spec's
    own `perturb` value where it declares a domain, else to sigma·N(0, 1), or by sigma·N(0, 1) from where it is
    (`around_current`). One helper for the properties, the end-to-end tests and the cost report."""
    with torch.no_grad():
        for ts in spec.present(d_in, d_out, cfg, trainable=True):
            t = tensors[ts.name]
            if ts.perturb is not None:
                new = ts.perturb(tuple(t.shape), g)
            else:
                new = torch.randn(t.shape, generator=g, dtype=torch.float64) * sigma
                if around_current:
                    new = new + t.detach().double().cpu()
            t.copy_(new.to(device=t.device, dtype=t.dtype))


def perturb_layers(spec: Spec, adapted: dict, case: Case) -> None:
    """Move every trainable tensor of every adapted layer of a whole model (`be.adapted_layers`) away from its
    init: the spec's `perturb` where it declares a domain, else N(0, 0.5²)."""
    g = case.gen(3)
    with torch.no_grad():
        for tensors, _, _ in adapted.values():
            for ts in spec.trainable:
                if ts.name in tensors:
                    t = tensors[ts.name]
                    new = ts.perturb(tuple(t.shape), g) if ts.perturb else torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.5
                    t.copy_(new.to(t.dtype))


def perturb(spec: Spec, be: FullBackend, model, case: Case, scale: float = 1.0) -> None:
    """Move every trainable tensor away from its init (docs/conventions.md §8)."""
    perturb_tensors(spec, be.tensors(model), case.d_in, case.d_out, cfg_of(spec, be, case), case.gen(3), sigma=0.5 * scale)


def cfg_of(spec: Spec, be: FullBackend, case: Case, **over):
    """The config the spec's formulas read, as the backend builds it for the case (and the overrides)."""
    return be.spec_config(spec, case, **over)


def base_bias(be: FullBackend, model):
    """The base layer's bias Parameter (None when it has none): the backend's optional `base_bias(model)`, else
    `model.layer.bias` (a wrapper that does not expose its base layer's bias, e.g. PEFT before 0.10, says it
    through base_bias)."""
    return be.base_bias(model) if has(be, BaseBias) else getattr(model.layer, "bias", None)


def oracle_on(spec: Spec, W, b, T: dict, x64: torch.Tensor, cfg, knobs, xd=None, grad: bool = False):
    """The spec's float64 oracle on float64 CPU copies of the given base weight, bias and tensors (a copy of a
    trainable tensor requires grad when `grad`); returns (y, the tensors' copies)."""
    T = {n: t.detach().double().cpu().requires_grad_(grad and t.requires_grad) for n, t in T.items()}
    b = None if b is None else b.detach().double().cpu()
    return spec.oracle(W.detach().double().cpu(), b, T, x64, cfg, knobs, xd=xd), T


def engine_base(be: FullBackend, s: Setup) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base (W, b) a reference is computed from: the engine's own copy (Setup.W_base, b_base), never weights
    read back from the library after a mode switch; a Setup built without one (a twin) reads the backend's."""
    if s.W_base is not None:
        return s.W_base, s.b_base
    return be.base_weight(s.model), base_bias(be, s.model)


def oracle_output(spec: Spec, be: FullBackend, s: Setup, case: Case, x64: torch.Tensor, xd=None, grad: bool = False, **over):
    """The spec's float64 oracle on the backend's live tensors and knobs, around the engine's copy of the base."""
    W, b = engine_base(be, s)
    return oracle_on(spec, W, b, be.tensors(s.model), x64, cfg_of(spec, be, case, **over), be.knobs(s.model),
                     xd=xd, grad=grad)


def base_out(s: Setup, x64):
    y = x64 @ s.W.T
    return y if s.b is None else y + s.b


def loss_weights(y: torch.Tensor, case: Case) -> torch.Tensor:
    return torch.randn(y.shape, generator=case.gen(4), dtype=torch.float64)


def owner(t: torch.Tensor) -> torch.Tensor:
    """The library's own tensor behind a backend's tensor (a Mapped view's source; else the tensor itself)."""
    return t.source if isinstance(t, Mapped) else t


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def grad_flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def untouched(be: FullBackend, s_model, before_state, before_flags, what: str) -> None:
    require(same_state(snapshot(s_model), before_state), f"{what}: the model's state dict changed")
    require(not be.hooks_left(s_model), f"{what}: hooks or adapters left on {be.hooks_left(s_model)}")
    require(grad_flags(s_model) == before_flags, f"{what}: requires_grad flags changed")


def gradient_scales(y_ref: torch.Tensor, inputs: dict[str, torch.Tensor], c: torch.Tensor) -> dict[str, float]:
    """For each input θ, max over its entries of Σ_i |c_i| |∂y*_i/∂θ|: the size of the terms its gradient sums.

    A gradient that is a near-cancelling sum is only as accurate as its terms, so its rounding error is judged
    against this scale, not against the (small) sum itself.
    """
    flat, cw = y_ref.reshape(-1), c.reshape(-1).abs()
    names = [n for n, t in inputs.items() if t.requires_grad]
    acc = {n: torch.zeros_like(inputs[n]) for n in names}
    for i in range(flat.numel()):
        rows = torch.autograd.grad(flat[i], [inputs[n] for n in names], retain_graph=True, allow_unused=True)
        for n, g in zip(names, rows):
            if g is not None:
                acc[n] += cw[i] * g.abs()
    return {n: tol.maxabs(a) for n, a in acc.items()}



class Probe:
    """What a claim may measure on the implementation: its tensors, knobs and dense input->output map."""

    def __init__(self, spec, be: FullBackend, s: Setup, case: Case):
        self.spec, self.be, self.s, self.case = spec, be, s, case
        self.cfg = cfg_of(spec, be, case)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().double().cpu() for n, t in self.be.tensors(self.s.model).items()}

    def knobs(self) -> dict[str, float]:
        return self.be.knobs(self.s.model)

    def base_weight(self) -> torch.Tensor:
        """The base the adapter rides on: the engine's copy (see Setup.W_base)."""
        return engine_base(self.be, self.s)[0].detach().double().cpu()

    def set(self, name: str, value: torch.Tensor) -> None:
        t = self.be.tensors(self.s.model)[name]
        with torch.no_grad():
            t.copy_(value.to(t.dtype))

    def set_knob(self, name: str, value: float) -> None:
        self.be.set_knob(self.s.model, name, value)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.s.model(x.to(self.case.dtype).to(self.case.device)).double().cpu()

    def original_weight(self) -> torch.Tensor:
        """The base weight as it was before attach (float64, rounded to the case dtype)."""
        return self.s.W

    def calibration_tokens(self) -> torch.Tensor:
        """The calibration batches' token rows (padding dropped), float64."""
        return calibration_tokens(self.s.cal)

    def twin(self, **case_changes) -> "Probe":
        """The same adapter's tensors copied onto a fresh layer of another shape whose base weight is the
        identity (square cases: d_out = d_in, no bias), so the twin's dense map is the adapter's own map."""
        c = self.case.with_(**case_changes)
        eye = torch.eye(c.d_out, c.d_in, dtype=torch.float64)
        model = single(eye, None, c.dtype, "linear", c.device)
        over = {"param_dtype": torch.float64} if c.dtype == torch.float64 else {}
        self.be.attach(model, self.spec, c, None, **over)
        twin = self.be.tensors(model)
        with torch.no_grad():
            for name, t in self.be.tensors(self.s.model).items():
                twin[name].copy_(t)
        return Probe(self.spec, self.be, Setup(eye, None, model, None, None, None), c)

    def dense_map(self) -> torch.Tensor:
        """M (d_out, d_in) with y(x) = M x + y(0), measured from the implementation's outputs."""
        d_in = self.case.d_in
        eye = torch.eye(d_in, dtype=torch.float64)
        y = self.output(torch.cat([eye, torch.zeros(1, d_in, dtype=torch.float64)], 0))
        return (y[:-1] - y[-1:]).T


def drawn_knob(default: float, identity: float, g: torch.Generator) -> float:
    """A knob value strictly between its identity value and its config value (both legal, so every value between
    them is for a knob whose legal set is an interval), equal to neither: code that reads the knob from the
    config, or sets it on one layer only, computes something else."""
    u = 0.3 + 0.6 * float(torch.rand(1, generator=g, dtype=torch.float64))
    return identity + u * ((default - identity) or 1.0)


def set_drawn_knobs(spec: Spec, be: FullBackend, model, case: Case) -> dict[str, float]:
    """Set every knob the spec declares to a drawn non-default value on the live model; return them."""
    if be.unsupported(spec, "knobs"):
        return {}
    g = case.gen(13)
    values = {}
    for knob, identity in spec.knobs.items():
        values[knob] = drawn_knob(be.knobs(model)[knob], identity, g)
        be.set_knob(model, knob, values[knob])
    return values


def layouts(spec: Spec, be: FullBackend) -> tuple[str, ...]:
    """The layouts a restore or round-trip property runs on: Linear and transformers' transposed Conv1D, unless
    the spec declares (for this backend) that the variant does not run on Conv1D."""
    dev = spec.deviation("layout", be.name)
    return ("linear",) if dev is not None or be.unsupported(spec, "conv1d") else ("linear", "conv1d")
