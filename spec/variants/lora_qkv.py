"""Spec of LoRA on a fused q/k/v projection with per-part enable and grouped queries (litgpt's LoRAQKVLinear).

One dense layer computes q, k and v at once: its output is [q | k | v] with q of size head_size * n_head and k, v
of size head_size * n_query_groups each (grouped-query attention shares one k, v head among n_head / n_query_groups
query heads). LoRA adapts each enabled part with its own rank-r pair (A_p, B_p); a disabled part's rows get no
update. The tensors are stacked as one layer holds them: A = [A_p; ...] (r rows per enabled part), B = [B_p; ...]
(the enabled parts' output rows, in q, k, v order).
"""
import torch
from hypothesis import strategies as st

from ..schema import Constraint, Reference, Spec, TensorSpec, register

PARTS = ("q", "k", "v")


def part_sizes(cfg) -> list[tuple[str, int, int]]:
    """(part, first output row, size) of each part of the fused output [q | k | v]."""
    q = cfg.head_size * cfg.n_head
    kv = cfg.head_size * cfg.n_query_groups
    return [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)]


def enabled(cfg) -> list[tuple[str, int, int]]:
    return [p for p in part_sizes(cfg) if getattr(cfg, f"enable_{p[0]}")]


def delta_weight(T, cfg, d_out: int) -> torch.Tensor:
    """ΔW (d_out, d_in) = s · Σ_p P_p B_p A_p: part p's rank-r product placed in that part's output rows."""
    s = cfg.alpha / cfg.r
    A, B = T["A"], T["B"]
    dW = torch.zeros(d_out, A.shape[1], dtype=A.dtype)
    row = 0
    for i, (_, start, size) in enumerate(enabled(cfg)):
        A_p, B_p = A[i * cfg.r:(i + 1) * cfg.r], B[row:row + size]
        dW[start:start + size] = s * (B_p @ A_p)
        row += size
    return dW


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W x + b + ΔW x_d, ΔW = s Σ_p P_p B_p A_p (s = alpha / r); float64, row convention."""
    xd = x if xd is None else xd
    y = x @ W.T + (0 if b is None else b)
    return y + xd @ delta_weight(T, cfg, W.shape[0]).T


def dense(W, b, T, cfg, knobs):
    return W + delta_weight(T, cfg, W.shape[0])


def init_oracle(W, cfg, X):
    """B = 0 exactly (every enabled part); A is random (kaiming-uniform)."""
    rows = sum(size for _, _, size in enabled(cfg))
    return {"B": torch.zeros(rows, cfg.r, dtype=W.dtype)}


@st.composite
def _layout(draw, d_out: int):
    """head_size, n_head, n_query_groups with head_size * (n_head + 2 n_query_groups) = d_out (n_head a multiple of
    n_query_groups), and a non-empty set of enabled parts."""
    shapes = [(h, g, q) for h in range(1, d_out + 1) for g in range(1, d_out + 1) for q in range(1, d_out + 1)
              if h * g * (q + 2) == d_out]
    h, g, q = draw(st.sampled_from(shapes), label="head_size, n_query_groups, q_per_kv")
    on = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any), label="enable q, k, v")
    return {"head_size": h, "n_head": g * q, "n_query_groups": g,
            "enable_q": on[0], "enable_k": on[1], "enable_v": on[2]}


def default_layout(d_out: int) -> dict:
    """The layout of a case drawn without the spec's fields: multi-query heads of size 1 (the one layout every
    d_out >= 3 has), q and v adapted (the LoRA paper's choice, §4.2)."""
    return {"head_size": 1, "n_head": d_out - 2, "n_query_groups": 1, "enable_q": True, "enable_k": False,
            "enable_v": True}


def fields(draw, d_in, d_out):
    return draw(_layout(d_out))


_N_EN = "(enable_q + enable_k + enable_v)"
_ROWS = "head_size * (n_head * enable_q + n_query_groups * (enable_k + enable_v))"

SPEC = register(
    Spec(
        name="lora_qkv",
        title="LoRA on a fused q/k/v projection (per-part enable, grouped queries)",
        equation=r"y = W x + b + s \sum_{p \in \{q,k,v\},\ \mathrm{on}} P_p B_p A_p\,\mathrm{drop}(x),\quad s = \alpha / r",
        tensors=(
            TensorSpec("A", f"(r * {_N_EN}, d_in)", "kaiming-uniform(a=sqrt 5), r rows per enabled part",
                       zero_grad_at_init="B = 0, so dL/dA_p = s B_pᵀ (dL/dy_p) xᵀ = 0"),
            TensorSpec("B", f"({_ROWS}, r)", "zeros, the enabled parts' output rows"),
        ),
        param_count=f"r * {_N_EN} * d_in + r * {_ROWS}",
        macs=f"r * {_N_EN} * d_in + r * {_ROWS} + ew(d_out)",
        macs_per_forward="0",
        oracle=oracle,
        init_oracle=init_oracle,
        dense=dense,
        identity="bitwise",
        min_width=3,  # d_out = head_size * (n_head + 2 n_query_groups) >= 3
        fields=fields,
        roles=("qkv",),
        constraints=(
            Constraint("r is a positive integer", {"r": 0}),
            Constraint("dropout in [0, 1)", {"dropout": 1.0}),
        ),
        references=(
            Reference("LoRA paper (eq. 3; §4.2 adapts W_q and W_v)", "https://arxiv.org/abs/2106.09685"),
            Reference("litgpt 0.5.13 LoRAQKVLinear", "https://github.com/Lightning-AI/litgpt/blob/v0.5.13/litgpt/lora.py"),
            Reference("loralib MergedLinear (enable_lora)", "https://github.com/microsoft/LoRA/blob/main/loralib/layers.py"),
        ),
        notes="The output layout is [q | k | v] (q: head_size * n_head rows, k and v: head_size * n_query_groups rows "
              "each). Each enabled part has its own rank-r pair; the stacked A is (r · #enabled, d_in) and the "
              "stacked B holds the enabled parts' rows. The drawn layouts cover multi-head, grouped-query and "
              "multi-query (n_query_groups = 1) shapes and every non-empty subset of enabled parts.",
    )
)
