"""The declarative record of a variant's math: one `Spec` per variant, in the shape of PyTorch's OpInfo.

A spec is data a reader can check against the paper line by line: equation, tensors with shape formulas and
init, parameter-count formula, identity class, knobs, bias treatment, dropout and data requirements,
quantized support, config constraints, claims, pinned references, declared deviations, and an independent
float64 oracle written straight from the paper's equation (sharing no code with impl/). How a library names the
same tensors and fields is its backend's business (harness/backends/), not the spec's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

IDENTITY_CLASSES = ("bitwise", "tolerance", "non_identity")
CLAIM_KINDS = ("nonnegative", "unit_interval", "bounded", "orthogonal_det1", "norm_preserving", "gram_preserving")


@dataclass(frozen=True)
class TensorSpec:
    """One adapter tensor, as the paper defines it.

    name: the attribute the implementation gives it (`ad.<name>`). shape: a Python expression over d_in, d_out
    and the config fields, e.g. "(r, d_in)". init: free text for the reader and the audit ("zeros",
    "kaiming-uniform(a=sqrt 5)", "0.1"); the values are checked through the spec's `init_oracle`, not
    through this text. trainable: a trained Parameter (True) or a frozen buffer (False). shared: frozen, and
    one tensor for every adapted layer of the same shape (stored once in a checkpoint; property
    `tensor_sharing`).
    """

    name: str
    shape: str
    init: str
    trainable: bool = True
    zero_grad_at_init: str = ""  # why its gradient is exactly zero at init ("" = non-zero)
    perturb: Callable[[tuple, torch.Generator], torch.Tensor] | None = None  # non-init values; default N(0, 0.5²)
    when: str = ""  # a Python expression over the config fields: the tensor exists only where it is true ("" = always)
    shared: bool = False

    def distribution(self, shape: tuple[int, ...], env: Mapping[str, Any]) -> tuple[str, float] | None:
        """The random distribution `init` declares, as ("uniform", bound) or ("normal", std); None for a
        deterministic init. Two forms are read: "kaiming-uniform(a=sqrt 5)..." (nn.Linear's init: U(−b, b) with
        b = 1/sqrt(fan_in), fan_in the tensor's last dim, or the formula given as "kaiming-uniform(fan_in=<formula>)")
        and "N(0, <variance>)"; formulas are over d_in, d_out and the config fields."""
        text = self.init.strip()
        if "kaiming-uniform" in text:
            m = re.search(r"kaiming-uniform\(fan_in=([^)]*)\)", text)
            fan_in = float(eval(m.group(1), {"__builtins__": {}}, dict(env))) if m else shape[-1]
            return "uniform", 1.0 / fan_in**0.5
        if self.random:
            var = float(eval(text[4:-1].replace("²", "**2"), {"__builtins__": {}}, dict(env)))
            return "normal", var**0.5
        return None

    @property
    def derived(self) -> bool:
        """Whether `init` declares values that only a spec's `init_oracle` checks: anything but a random
        distribution (checked by `init_distribution`) and "zeros" / "ones" (seen by the identity at init), e.g. an
        SVD factor of W, a norm of W, a function of calibration data, a config value."""
        first = self.init.strip().split(" ", 1)[0].split("(", 1)[0]
        return not self.random and first not in ("zeros", "ones")

    @property
    def random(self) -> bool:
        """Whether `init` declares a random distribution (one of the two forms `distribution` reads)."""
        text = self.init.strip()
        return "kaiming-uniform" in text or (text.startswith("N(0,") and text.endswith(")"))


@dataclass(frozen=True)
class Constraint:
    """A config constraint; `bad` holds field values that violate it and must raise at config time."""

    text: str
    bad: Mapping[str, Any]


@dataclass(frozen=True)
class Reference:
    label: str
    url: str


@dataclass(frozen=True)
class Claim:
    """A spectral or structural claim about the implementation.

    `of(probe)` returns the object the claim is about, measured on the implementation through `probe`
    (see harness.probes.Probe); `kind` names the generic check applied to it:
    nonnegative (all >= 0), unit_interval (all in [0, 1]), bounded (all <= `bound`),
    orthogonal_det1 (a batch of square matrices, orthogonal with determinant +1),
    norm_preserving (pairs (x, Rx) with equal norms), gram_preserving (a pair (W, W') of (d_out, d_in) maps with
    W' W'ᵀ = W Wᵀ: the neurons' Gram matrix is kept, as by an orthogonal rotation of the input side, W' = W R).
    """

    name: str
    kind: str
    of: Callable[[Any], Any]
    text: str
    bound: float = 0.0
    saturate: float = 1.0  # scale of the perturbation that drives the claim's inputs to extremes


@dataclass(frozen=True)
class Deviation:
    """A declared, reasoned difference: the property's failure is reported as a deviation, not a failure.

    Optional, for a deviation with a size: `size` is the property's measured size (the `size` its Falsified
    reports, e.g. a scaled error) on the fixed seeded `case` (Case fields: d_in, d_out, bias, dtype name, seed,
    fields); verify re-measures it there and fails if it moves outside 0.5x-2x of `size`. `match`: a regular
    expression (Python `re`); only a failure whose message it matches in whole tokens is the declared one, any other
    failure stays a failure (see `matches`). Empty: every failure of the property on the backend is the declared one.
    `dtypes`: the dtype names whose failures the deviation explains (a float64 rounding choice does not excuse a
    bf16 failure); empty: every dtype.
    """

    property: str
    reason: str
    backend: str = "impl"
    source: str = ""
    size: float | None = None
    case: Mapping[str, Any] | None = None
    match: str = ""
    dtypes: tuple[str, ...] = ()

    def __post_init__(self):
        try:
            re.compile(self.match)
        except re.error as e:
            raise ValueError(f"deviation on '{self.property}': match {self.match!r} is not a regular expression: {e}") \
                from None

    def matches(self, message: str) -> bool:
        """Whether a failure message is the declared one: `match` must match somewhere in it, starting and ending
        on token boundaries: not inside a word, not inside a number. So "measured 0" does not match
        "measured 0.0286", "accepted" does not match "unaccepted", and "Conv1D" does match "(Conv1D)"."""
        if not self.match:
            return True
        return re.search(rf"(?<![\w.])(?:{self.match})(?!\w|\.\d)", message) is not None


@dataclass(frozen=True)
class Spec:
    """The math of one variant. Required: name (the registered variant name), title, equation (LaTeX),
    tensors, param_count (a formula over d_in, d_out and config fields: the number of trainable entries), and
    oracle(W, b, T, x, cfg, knobs, xd=None) -> y: the adapted output in float64 from the base weight W
    (d_out, d_in), bias b (or None), the adapter tensors T by name, the input x (..., d_in), the Config and
    the runtime knobs; xd is the input after dropout (the adapter's input path), x when None. Every other
    field has a default that suits a plain LoRA-like variant (see the comments beside each field).
    """

    name: str
    title: str
    equation: str  # LaTeX, for the audit
    tensors: tuple[TensorSpec, ...]
    param_count: str  # formula over d_in, d_out and config fields
    oracle: Callable[..., torch.Tensor]  # (W, b, T, x, cfg, knobs, xd=None) -> y, float64
    # Added multiply-accumulates (formulas over the same names as param_count; "" = not declared, which
    # `python -m tools.cost` rejects). macs: per token; macs_per_forward: per forward, not scaling with tokens
    # ("0" if none). Terms wrapped in ew(...) (elementwise) or solve(...) (solves, QR, inverses) are work that
    # torch's FlopCounterMode does not see; every other term is matmul work that tools.cost checks against it.
    macs: str = ""
    macs_per_forward: str = ""
    identity: str = "bitwise"
    identity_factor: float = 1.0  # multiplies the dtype tolerance for the 'tolerance' class
    init_shrink: float = 0.0  # for 'non_identity': the largest relative start-off size
    knobs: Mapping[str, float] = field(default_factory=dict)  # knob -> value at which the layer is the identity
    bias: str = "passthrough"  # or "scaled"
    bias_note: str = ""
    dropout: str = "honoured"  # or "rejected"
    data: str = "none"  # none | optional | required
    quantized: str = "works"  # or "raises"
    rewrites_base: bool = False
    fields: Callable[..., dict] | None = None  # (draw, d_in, d_out) -> config fields (r, alpha, structural ones)
    min_width: int = 1
    # the largest rank r a layer of shape (d_in, d_out) accepts (a Python expression over d_in, d_out), attach
    # refusing a larger one; None: any r (r sets no layer-shaped matrix, or the variant works above the width)
    max_rank: str | None = "min(d_in, d_out)"
    square_only: bool = False  # draw square layers only (zoo mutants that would otherwise break shapes)
    constraints: tuple[Constraint, ...] = ()
    init_oracle: Callable[..., dict] | None = None  # (W, cfg, X) -> {tensor or "base_weight": expected}
    sign_free: Mapping[str, int] = field(default_factory=dict)  # tensor -> dim of vectors whose sign is free
    # extra names the formulas (shape, param_count, when, max_rank, macs) may call, e.g. a width factorization
    formula_names: Mapping[str, Callable] = field(default_factory=dict)
    claims: tuple[Claim, ...] = ()
    references: tuple[Reference, ...] = ()
    deviations: tuple[Deviation, ...] = ()
    roles: tuple[str, ...] = ("q", "v", "down")  # roles a whole-model (end-to-end) run targets; GPT-2 maps q/k/v to qkv
    dense: Callable[..., Any] | None = None  # (W, b, T, cfg, knobs) -> dense (d_out, d_in) map [or (map, bias)], float64
    notes: str = ""
    # values of the spec's own config fields (beyond r, alpha, dropout) for a backend with no config of its own for
    # this variant (PEFT verifying a spec impl does not implement); the case's drawn fields override them
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.identity not in IDENTITY_CLASSES:
            raise ValueError(f"spec '{self.name}': identity must be one of {IDENTITY_CLASSES}")
        for c in self.claims:
            if c.kind not in CLAIM_KINDS:
                raise ValueError(f"spec '{self.name}': claim '{c.name}' has unknown kind {c.kind!r}")
        if self.bias not in ("passthrough", "scaled") or self.dropout not in ("honoured", "rejected"):
            raise ValueError(f"spec '{self.name}': bad bias or dropout declaration")
        if self.data not in ("none", "optional", "required") or self.quantized not in ("works", "raises"):
            raise ValueError(f"spec '{self.name}': bad data or quantized declaration")
        if not isinstance(self.roles, tuple) or not self.roles or not all(isinstance(r, str) for r in self.roles):
            raise ValueError(f"spec '{self.name}': roles must be a non-empty tuple of role names")
        if any(t.shared and t.trainable for t in self.tensors):
            raise ValueError(f"spec '{self.name}': only frozen tensors (trainable=False) can be shared")
        for d in self.deviations:
            if (d.size is None) != (d.case is None) or (d.size is not None and d.size <= 0):
                raise ValueError(f"spec '{self.name}': deviation on '{d.property}' needs both a positive size and a case")

    def env(self, d_in: int, d_out: int, cfg) -> dict[str, Any]:
        return {"d_in": d_in, "d_out": d_out, **dict(cfg.fields), "min": min, "max": max, **dict(self.formula_names)}

    def shape_of(self, t: TensorSpec, d_in: int, d_out: int, cfg) -> tuple[int, ...]:
        return tuple(int(v) for v in eval(t.shape, {"__builtins__": {}}, self.env(d_in, d_out, cfg)))

    def count(self, d_in: int, d_out: int, cfg) -> int:
        return int(eval(self.param_count, {"__builtins__": {}}, self.env(d_in, d_out, cfg)))

    def deviation(self, prop: str, backend: str) -> Deviation | None:
        return next((d for d in self.deviations if d.property == prop and d.backend == backend), None)

    def rank_limit(self, d_in: int, d_out: int) -> int | None:
        """The largest r a (d_in, d_out) layer accepts, or None for no limit."""
        if self.max_rank is None:
            return None
        return int(eval(self.max_rank, {"__builtins__": {}},
                        {"d_in": d_in, "d_out": d_out, "min": min, "max": max, **dict(self.formula_names)}))

    def present(self, d_in: int, d_out: int, cfg, trainable: bool | None = None) -> tuple[TensorSpec, ...]:
        """The tensors a layer with this config has (those whose `when` holds), optionally only the trainable
        (trainable=True) or frozen (False) ones."""
        env = self.env(d_in, d_out, cfg)
        return tuple(t for t in self.tensors
                     if (not t.when or eval(t.when, {"__builtins__": {}}, env))
                     and (trainable is None or t.trainable == trainable))

    def unchecked_init(self) -> str | None:
        """What of the init no property checks, because the spec has no `init_oracle`: the tensors whose init is
        derived (see TensorSpec.derived), a rewritten base weight, a data-driven init; None when nothing is."""
        if self.init_oracle is not None:
            return None
        what = [f"'{t.name}' ({t.init})" for t in self.tensors if t.derived]
        what += ["the rewritten base weight"] if self.rewrites_base else []
        what += ["the init from calibration data"] if self.data != "none" else []
        return ", ".join(what) or None

    @property
    def trainable(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.trainable)


class SpecRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, Spec] = {}

    def register(self, s: Spec) -> Spec:
        if s.name in self._specs and self._specs[s.name] is not s:
            raise ValueError(f"spec '{s.name}' is already registered")
        self._specs[s.name] = s
        return s

    def get(self, name: str) -> Spec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"no spec for variant '{name}'; specs: {sorted(self._specs)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)


SPECS = SpecRegistry()
register = SPECS.register
