"""Small composable Hypothesis strategies: cases (shapes, bias, dtype, config), base weights and data.

A case draws a seed; tensors are made from a torch.Generator seeded by it, so each example is reproducible
and its printout says every structural choice (shape, r, alpha, bias, dtype, fields).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from hypothesis import strategies as st

from spec.schema import Spec

MAX_DIM = 12


@dataclass(frozen=True)
class Case:
    d_in: int
    d_out: int
    bias: bool
    dtype: torch.dtype
    seed: int
    fields: dict[str, Any] = field(default_factory=dict)
    batch: tuple[int, ...] = (2, 3)
    device: str = "cpu"

    def with_(self, **kw) -> "Case":
        return replace(self, **kw)

    def gen(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + salt)


@st.composite
def _dims(draw, min_width: int, square: bool) -> tuple[int, int]:
    """Mostly typical non-square shapes (d_in != d_out catches a transpose or a wrong axis), sometimes
    out_features = 1 where the spec allows it."""
    lo = max(min_width, 3)
    if square:
        n = draw(st.integers(lo, MAX_DIM), label="d")
        return n, n
    kind = draw(st.sampled_from(["typical", "typical", "typical", "out1"]), label="shape kind")
    if kind == "out1" and min_width <= 1:
        return draw(st.integers(2, MAX_DIM), label="d_in"), 1
    d_in = draw(st.integers(lo, MAX_DIM), label="d_in")
    d_out = draw(st.integers(lo, MAX_DIM - 1), label="d_out")
    return d_in, d_out + (d_out >= d_in)


@st.composite
def cases(draw, spec: Spec, dtypes=(torch.float32,), square: bool = False, bias=None, device: str = "cpu",
          defaults_only: bool = False) -> Case:
    """A case within the spec's declared constraints: r in [1, the spec's rank limit] (or what spec.fields draws),
    alpha != r, bias on and off, the given dtypes."""
    d_in, d_out = draw(_dims(spec.min_width, square or spec.square_only))
    lo = spec.rank_limit(d_in, d_out) or 2 * max(d_in, d_out)  # no declared limit: ranks above the width too
    r_kind = draw(st.sampled_from(["mid", "mid", "one", "max"]), label="r kind")
    r = {"one": 1, "max": lo}.get(r_kind) or draw(st.integers(min(2, lo), lo), label="r")
    alpha = draw(st.sampled_from([2.0, 3.0, 5.0, 12.0]).filter(lambda a: a != r), label="alpha")
    fields = {"r": r, "alpha": alpha}
    if spec.fields is not None and not defaults_only:
        fields.update(spec.fields(draw, d_in, d_out))
    elif spec.fields is not None:
        fields.update({k: v for k, v in spec.fields(draw, d_in, d_out).items() if k in ("r", "block_size", "k")})
    return Case(
        d_in=d_in,
        d_out=d_out,
        bias=draw(st.booleans(), label="bias") if bias is None else bias,
        dtype=draw(st.sampled_from(list(dtypes)), label="dtype"),
        seed=(seed := draw(st.integers(0, 2**16), label="seed")),
        fields=fields,
        batch=leading_dims(seed),
        device=device,
    )


def leading_dims(seed: int) -> tuple[int, ...]:
    """The input's leading dimensions, a function of the drawn seed (one draw fewer keeps every other drawn value
    of a derandomized run where it was): 3-D (2, 3, d_in) for seeds 0 mod 3 (the shrunk case), 2-D (N, d_in) with
    N in 2..6, or 4-D (2, 1, 3, d_in). At most 6 rows, so no shape costs more than the 3-D one."""
    kind = seed % 3
    if kind == 0:
        return (2, 3)
    if kind == 1:
        return (2 + seed // 3 % 5,)
    return (2, 1, 3)


def base_weight(case: Case, kind: str = "random") -> tuple[torch.Tensor, torch.Tensor | None]:
    """A base (W, b) in float64. kind: random | zero_row | zero_col | rank1."""
    g = case.gen(1)
    W = torch.randn(case.d_out, case.d_in, generator=g, dtype=torch.float64) / case.d_in**0.5
    if kind == "zero_row":
        W[0] = 0
    elif kind == "zero_col":
        W[:, 0] = 0
    elif kind == "rank1":
        W = torch.outer(W[:, 0], W[0]) / (W[0, 0].abs() + 1)
    b = torch.randn(case.d_out, generator=g, dtype=torch.float64) * 0.5 if case.bias else None
    return W, b


def inputs(case: Case, salt: int = 2, n: int | None = None) -> torch.Tensor:
    shape = case.batch if n is None else (n,)
    return torch.randn(*shape, case.d_in, generator=case.gen(salt), dtype=torch.float64)


def calibration(case: Case, W: torch.Tensor, r: int, variant: int = 0, pad_value: float = 1e3,
                tokens: int = 12, labelled: bool = False) -> list[dict[str, torch.Tensor]]:
    """Anisotropic calibration batches for a single-layer model (docs/conventions.md §8).

    A few directions with large variance lying along right singular vectors of W *outside* its top r, plus a
    mean offset and small isotropic noise; padded positions (attention_mask == 0) hold `pad_value` garbage.
    `variant` = 1 gives a different data set for the 'data path is live' check: its large variances lie along
    W's LEADING right singular directions, tilted at random, so that every kind of data-chosen basis (a PCA, a
    covariance orientation, or a selection among W's own singular directions, which a shift within the tail
    often leaves unchanged) differs from variant 0's. `labelled`: the same tokens are left out through `labels`
    == -100 (the Hugging Face ignore index) instead of the attention mask, which stays 1 on them; every batch
    then has labels (0 on the calibration tokens).
    """
    g = case.gen(100 + variant)
    d = W.shape[1]
    _, _, Vh = torch.linalg.svd(W, full_matrices=True)
    tail = list(range(min(r, d), d)) or list(range(d))
    picks = [tail[i % len(tail)] for i in range(3)] if not variant else [i % d for i in range(3)]
    dirs = Vh[picks]  # (3, d)
    if variant:
        dirs = dirs + 0.5 * torch.randn(dirs.shape, generator=g, dtype=torch.float64)
    scales = torch.tensor([6.0, 4.0, 2.5], dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    mean = 2.0 * mean / mean.norm()
    batches = []
    for i in range(2):
        z = torch.randn(2, tokens, 3, generator=g, dtype=torch.float64) * scales
        x = mean + z @ dirs + 0.1 * torch.randn(2, tokens, d, generator=g, dtype=torch.float64)
        mask = torch.ones(2, tokens, dtype=torch.long)
        mask[1, -3:] = 0  # right padding
        x[mask == 0] = pad_value
        if labelled:
            batches.append({"x": x.to(case.dtype), "attention_mask": torch.ones_like(mask), "labels": (mask - 1) * 100})
        else:
            batches.append({"x": x.to(case.dtype), "attention_mask": mask})
    return batches


def calibration_tokens(batches) -> torch.Tensor:
    """The calibration tokens of calibration batches (attention_mask 1, labels not -100) as (N, d_in) float64 (what
    the spec's init sees)."""
    return torch.cat([b["x"][b["attention_mask"].bool() & (b.get("labels", b["attention_mask"]) != -100)].double()
                      for b in batches], 0)


def square_or_not(spec: Spec, dtypes=(torch.float32,), device: str = "cpu") -> st.SearchStrategy[Case]:
    """Cases on non-square and on square layers: a transpose on a square layer computes a wrong value where a
    non-square one would fail on shapes."""
    return st.one_of(cases(spec, dtypes=dtypes, device=device), cases(spec, dtypes=dtypes, square=True, device=device))
