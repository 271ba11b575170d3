"""`python -m tools.cost`: what each variant costs, beside PEFT's implementation and the frozen base layer.

One row per variant in `impl.VARIANTS` (or `--variants a,b`), on one `nn.Linear(d_in, d_out)` adapted by
`impl.attach` (defaults: 1024x1024, input 8x128 tokens, r = 16, float32, CPU):

- trainable parameters, frozen buffer elements and base tensors rewritten, measured on the attached layer and
  each checked against the spec (`Spec.param_count`, the frozen `TensorSpec` shapes, `Spec.rewrites_base`);
  a mismatch is an error (`CostError`), not a footnote;
- added multiply-accumulates, analytic from the spec's `macs` (per token) and `macs_per_forward` formulas, and
  their matmul part cross-checked against torch's FlopCounterMode (which reports 2*m*n*k FLOPs per matmul and
  does not see elementwise work, solves or QR: those terms are wrapped in ew(...) / solve(...) in the formula
  and listed as unchecked). The split per token / per forward is measured from two token counts. A mismatch
  is an error;
- forward and forward+backward time of our layer, the frozen base layer and, where the spec has a PeftMap,
  PEFT 0.21.2's layer (built with get_peft_model on a one-layer container and loaded with our tensor values),
  all run interleaved in one process: every repetition runs every (layer, setting, mode) once in a shuffled
  order, after warm-up, with torch threads fixed and printed. Settings: "first" (an input without grad, the
  first adapted layer) and "inner" (the input requires grad). Medians, and percentile-bootstrap 95 %
  intervals of the ratios ours/base and ours/PEFT, resampling whole repetitions (paired). The frozen base
  layer has no backward in the "first" setting (nothing requires grad), so its forward+backward there is its
  forward: the ratio is what adapting that layer costs over not adapting it;
- peak memory of one forward+backward: on CPU in a child process per variant (peak RSS minus RSS before,
  the kernel's peak counter reset through /proc/self/clear_refs, glibc told to mmap every large block so
  that freed memory leaves the RSS); on CUDA max_memory_allocated after a reset, minus the memory before;
- attach time (init plus group init) on a tiny Llama built from a config, with calibration batches made in
  code, for every variant; the data-driven ones are marked.

Goals (stated met / not met / undecided from the 95 % interval): every variant's forward+backward at most
1.1x PEFT's; hra at most 0.5x PEFT's ("well below"); antipasto_rot at most 1.3x antipasto; on a GPU, every
variant under 1.5x the frozen base (inner layer).

Outputs: <out>/cost_<device>.md, <out>/cost_<device>.json, <out>/cost_<device>.png (default out: audits/cost).
On a CUDA device the times come from CUDA events.
"""
from __future__ import annotations

import argparse
import ast
import copy
import gc
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.backends.peft_maps import peft_map

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "lora-verify/cost/1"
SETTINGS = ("first", "inner")  # input without grad (first adapted layer) / input requiring grad (inner layer)
MODES = ("fwd", "fwdbwd")
MARKERS = ("ew", "solve")  # formula wrappers for work FlopCounterMode does not count
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MEMORY_TAG = "COST-MEMORY "
GOAL_PEFT = 1.1
GOAL_HRA = 0.5
GOAL_ROT = 1.3
GOAL_GPU = 1.5
TINY_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


class CostError(RuntimeError):
    """The cost report cannot be produced honestly: a formula is missing or disagrees with the measurement,
    or a measurement failed."""


@dataclass(frozen=True)
class Options:
    """Everything a run depends on (recorded in the JSON)."""

    variants: tuple[str, ...]
    d_in: int = 1024
    d_out: int = 1024
    batch: int = 8
    seq: int = 128
    r: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2
    reps: int = 40
    warmup: int = 5
    boot: int = 2000
    seed: int = 0
    memory: bool = True
    jobs: int = 2
    init: bool = True
    init_r: int = 8
    init_reps: int = 3
    calib_tokens: int = 1024
    out: str = "audits/cost"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate(self) -> None:
        """Raise CostError naming the first bad option."""
        for name in ("d_in", "d_out", "batch", "seq", "r", "threads", "reps", "boot", "jobs", "init_r", "init_reps",
                     "calib_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise CostError(f"option {name} must be a positive integer, got {v!r}")
        if self.warmup < 0:
            raise CostError(f"option warmup must be >= 0, got {self.warmup}")
        if self.dtype not in DTYPES:
            raise CostError(f"option dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise CostError(f"option device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise CostError("device cuda requested but torch sees no CUDA device")
        if not self.variants:
            raise CostError("no variants to measure")


# ------------------------------------------------------------------------------------------------ formulas


def _keep(v):
    """A marked term that is counted."""
    return v


def _drop(v):
    """A marked term that is left out (the matmul-only count)."""
    return 0


def eval_formula(spec, which: str, d_in: int, d_out: int, cfg, matmul_only: bool = False) -> int:
    """Evaluate the spec's MAC formula `which` ("macs" or "macs_per_forward") for one layer.

    matmul_only drops the terms wrapped in ew(...) and solve(...), leaving what FlopCounterMode can see.
    A missing formula or a non-integer value is a CostError, never a silent zero."""
    expr = getattr(spec, which, "")
    if not isinstance(expr, str) or not expr.strip():
        raise CostError(f"spec '{spec.name}' declares no `{which}` formula; add it to spec/variants/{spec.name}.py")
    env = spec.env(d_in, d_out, cfg)
    env.update({m: (_drop if matmul_only else _keep) for m in MARKERS})
    try:
        v = eval(expr, {"__builtins__": {}}, env)
    except Exception as e:  # noqa: BLE001 - name the formula that broke
        raise CostError(f"spec '{spec.name}': `{which}` = {expr!r} does not evaluate: {type(e).__name__}: {e}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v - round(v)) > 1e-6:
        raise CostError(f"spec '{spec.name}': `{which}` = {expr!r} gives {v!r}, not a whole number of MACs")
    return round(v)


def marked_terms(expr: str) -> list[str]:
    """The terms of a formula wrapped in ew(...) or solve(...), as written (these FlopCounterMode cannot see)."""
    if not expr.strip():
        return []
    calls = [node for node in ast.walk(ast.parse(expr, mode="eval"))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in MARKERS]
    return [ast.unparse(c) for c in sorted(calls, key=lambda c: c.col_offset)]


# ------------------------------------------------------------------------------------------------ layers


class Host(nn.Module):
    """A one-layer container (`lin`): the unit impl.attach and PEFT's get_peft_model both adapt. Extra keyword
    inputs (attention_mask of calibration batches) are ignored."""

    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x, attention_mask=None):
        return self.lin(x)


def base_weights(opts: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """The base (W, b) every layer of the run starts from, float32 on the CPU, from the run's seed."""
    g = torch.Generator().manual_seed(opts.seed)
    W = torch.randn(opts.d_out, opts.d_in, generator=g) / math.sqrt(opts.d_in)
    b = torch.randn(opts.d_out, generator=g) * 0.1
    return W, b


def frozen_linear(W: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype, device: str) -> nn.Linear:
    """An nn.Linear holding (W, b) in dtype, every parameter frozen."""
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(W)
        if b is not None:
            lin.bias.copy_(b)
    lin = lin.to(device=device, dtype=dtype)
    for p in lin.parameters():
        p.requires_grad_(False)
    return lin


def calibration_batches(d_in: int, tokens: int, dtype: torch.dtype, device: str, seed: int,
                        batch: int = 4, seq: int = 64) -> list[dict[str, torch.Tensor]]:
    """Anisotropic calibration batches for the one-layer host: per-channel scales falling from 2 to 0.1 and a
    mean offset, `tokens` tokens in all, dicts {"x", "attention_mask"} as impl.attach takes them."""
    g = torch.Generator().manual_seed(seed + 17)
    scale = torch.linspace(2.0, 0.1, d_in)
    mean = torch.randn(d_in, generator=g) * 0.3
    n_batches = max(1, math.ceil(tokens / (batch * seq)))
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, seq, d_in, generator=g) * scale + mean
        out.append({"x": x.to(device=device, dtype=dtype),
                    "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)})
    return out


def variant_config(name: str, opts: Options):
    """The config every row uses: the variant's defaults, r from the options, the host's one layer targeted."""
    import impl

    return impl.config(name, r=opts.r, target_names=(r"^lin$",))


def perturb_trainables(spec, tensors: dict[str, torch.Tensor], d_in: int, d_out: int, cfg, seed: int) -> None:
    """Move every trainable tensor off its init (timing and the PEFT comparison on a degenerate init, such as
    B = 0, would hide work): the spec's own `perturb` where it declares a domain, else init + N(0, 0.05²)."""
    from harness.probes import perturb_tensors

    g = torch.Generator().manual_seed(seed + 3)
    perturb_tensors(spec, tensors, d_in, d_out, cfg, g, sigma=0.05, around_current=True)


@dataclass
class Ours:
    """Our adapted layer: its one-layer host, the hooked Linear, the config and the attach time (s)."""

    host: Host
    layer: nn.Module
    cfg: Any
    attach_s: float


def build_ours(name: str, spec, W, b, opts: Options) -> Ours:
    """Attach the variant to a fresh host holding (W, b); calibration batches for data-driven variants;
    trainables perturbed off their init."""
    import impl

    cfg = variant_config(name, opts)
    host = Host(frozen_linear(W, b, opts.torch_dtype, opts.device))
    cal = None
    if spec.data != "none":
        cal = calibration_batches(opts.d_in, opts.calib_tokens, opts.torch_dtype, opts.device, opts.seed)
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    impl.attach(host, cfg, calibration=cal)
    dt = time.perf_counter() - t0
    perturb_trainables(spec, impl.adapters(host)["lin"].tensors(), opts.d_in, opts.d_out, cfg, opts.seed)
    return Ours(host, host.lin, cfg, dt)




def build_peft(spec, ours: Ours, opts: Options) -> nn.Module:
    """PEFT's layer for the same variant, through the PEFT backend (harness.backends.peft): attached to a layer
    holding our current base weight (the residual for base-rewriting variants) with r from the options and no
    calibration data (PEFT's data pass changes no forward work), then our tensor values and base weight mirrored
    in through the PeftMap; the same-function check below confirms the two layers compute the same map."""
    import impl
    from harness.backends.peft import PeftBackend
    from harness.differential import mirror
    from harness.models import single
    from harness.strategies import Case

    ad = impl.adapters(ours.host)["lin"]
    W, bias = ad.weight().detach().double().cpu(), ad.bias()
    b = None if bias is None else bias.detach().double().cpu()
    be = PeftBackend()
    case = Case(opts.d_in, opts.d_out, b is not None, opts.torch_dtype, opts.seed, fields={"r": opts.r},
                device=opts.device)
    model = single(W, b, opts.torch_dtype, "linear", opts.device)
    torch.manual_seed(opts.seed)
    try:
        be.attach(model, spec, case)
        mirror(ad.tensors(), be, model, W if spec.rewrites_base else None)
    except (*be.errors.any, KeyError, ValueError) as e:
        raise CostError(f"spec '{spec.name}': PEFT's layer could not be built: {e}") from e
    model.train()
    return model.layer


def same_function(ours_layer: nn.Module, peft_layer: nn.Module, base_layer: nn.Module, x: torch.Tensor) -> float:
    """max|y_ours - y_peft| / (max|y_ours - y_base| + eps max|y_base|) on one input: how far the timed PEFT layer
    is from computing the same map as ours (0 up to rounding when the PeftMap is exact)."""
    with torch.no_grad():
        yo, yp, yb = ours_layer(x).float(), peft_layer(x).float(), base_layer(x).float()
    eps = torch.finfo(x.dtype).eps
    return float((yo - yp).abs().max() / ((yo - yb).abs().max() + eps * yb.abs().max() + 1e-30))


# ------------------------------------------------------------------------------------------------ static counts


def count_params(name: str, spec, ours: Ours, opts: Options) -> dict:
    """Trainable parameters, frozen buffer elements and rewritten base tensors of our layer, each checked
    against the spec; raises CostError on a mismatch."""
    import impl

    cfg = ours.cfg
    ad = impl.adapters(ours.host)["lin"]
    trainable = sum(p.numel() for p in ours.host.parameters() if p.requires_grad)
    expected = spec.count(opts.d_in, opts.d_out, cfg)
    if trainable != expected:
        raise CostError(f"'{name}': {trainable} trainable parameters, the spec's formula "
                        f"{spec.param_count} gives {expected}")
    buffers = {n: t for n, t in ad.named_buffers(recurse=False)}
    frozen = sum(t.numel() for t in buffers.values())
    frozen_specs = spec.present(opts.d_in, opts.d_out, cfg, trainable=False)
    frozen_expected = sum(math.prod(spec.shape_of(t, opts.d_in, opts.d_out, cfg)) for t in frozen_specs)
    if frozen != frozen_expected or set(buffers) != {t.name for t in frozen_specs}:
        raise CostError(f"'{name}': frozen buffers {sorted(buffers)} hold {frozen} elements; the spec declares "
                        f"{[f'{t.name}{t.shape}' for t in frozen_specs]} = {frozen_expected}")
    rewritten = int(ad.rewritten)
    if rewritten != int(spec.rewrites_base):
        raise CostError(f"'{name}': {rewritten} base tensor(s) rewritten, the spec declares "
                        f"rewrites_base={spec.rewrites_base}")
    return {
        "trainable": trainable,
        "trainable_formula": spec.param_count,
        "frozen_buffer_elements": frozen,
        "frozen_buffers": {t.name: t.shape for t in frozen_specs},
        "base_tensors_rewritten": rewritten,
        "base_elements_rewritten": rewritten * opts.d_in * opts.d_out,
        "original_weight_kept_elements": 0 if ad.original_weight is None else ad.original_weight.numel(),
    }


def matmul_macs(fn: Callable[[], Any]) -> int:
    """Multiply-accumulates of the matmuls fn runs, from FlopCounterMode (which reports 2*m*n*k per matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    flops = int(fc.get_total_flops())
    if flops % 2:
        raise CostError(f"FlopCounterMode reported an odd FLOP count {flops}; the 2*m*n*k convention changed")
    return flops // 2


def split_counts(count: Callable[[int], int], n1: int, n2: int) -> tuple[int, int]:
    """(per token, per forward) from counts at two token numbers, with a check that the count is affine."""
    c1, c2 = count(n1), count(n2)
    if (c2 - c1) % (n2 - n1):
        raise CostError(f"matmul MACs {c1} at {n1} tokens and {c2} at {n2} do not scale by a whole number per token")
    per_token = (c2 - c1) // (n2 - n1)
    return per_token, c1 - per_token * n1


def measured_added_macs(layer: nn.Module, base: nn.Module, d_in: int, dtype, device, backward: bool = False,
                        n1: int = 8, n2: int = 24) -> tuple[int, int]:
    """Added matmul MACs (per token, per forward) of `layer` over `base`, measured with FlopCounterMode on inputs
    of n1 and n2 tokens. backward=True counts forward+backward with an input requiring grad."""

    def run(mod: nn.Module, n: int) -> int:
        x = torch.randn(1, n, d_in, generator=torch.Generator().manual_seed(n)).to(device=device, dtype=dtype)
        x.requires_grad_(backward)

        def go():
            y = mod(x)
            if backward:
                y.backward(torch.ones_like(y))

        m = matmul_macs(go)
        if backward:
            _zero_grads(mod, x)
        return m

    return split_counts(lambda n: run(layer, n) - run(base, n), n1, n2)


def mac_counts(name: str, spec, ours: Ours, peft_layer, base: nn.Module, opts: Options) -> dict:
    """Analytic MACs from the spec and the FlopCounterMode cross-check of their matmul part (a mismatch is a
    CostError); PEFT's measured matmul MACs beside them."""
    cfg = ours.cfg
    args = (opts.d_in, opts.d_out, cfg)
    tok, fwd = eval_formula(spec, "macs", *args), eval_formula(spec, "macs_per_forward", *args)
    tok_mm = eval_formula(spec, "macs", *args, matmul_only=True)
    fwd_mm = eval_formula(spec, "macs_per_forward", *args, matmul_only=True)
    m_tok, m_fwd = measured_added_macs(ours.layer, base, opts.d_in, opts.torch_dtype, opts.device)
    if (m_tok, m_fwd) != (tok_mm, fwd_mm):
        raise CostError(
            f"'{name}': FlopCounterMode measures {m_tok} added matmul MACs per token and {m_fwd} per forward; the "
            f"spec's matmul terms give {tok_mm} ({spec.macs!r}) and {fwd_mm} ({spec.macs_per_forward!r})")
    b_tok, b_fwd = measured_added_macs(ours.layer, base, opts.d_in, opts.torch_dtype, opts.device, backward=True)
    out = {
        "per_token": tok,
        "per_forward": fwd,
        "formula_per_token": spec.macs,
        "formula_per_forward": spec.macs_per_forward,
        "matmul_per_token": tok_mm,
        "matmul_per_forward": fwd_mm,
        "checked": {"per_token_matmul": m_tok, "per_forward_matmul": m_fwd, "match": True},
        "unchecked_terms": marked_terms(spec.macs) + [f"{t} per forward" for t in marked_terms(spec.macs_per_forward)],
        "measured_fwdbwd_matmul": {"per_token": b_tok, "per_forward": b_fwd},
        "base_per_token": opts.d_in * opts.d_out,
        "peft": None,
    }
    if peft_layer is not None:
        p_tok, p_fwd = measured_added_macs(peft_layer, base, opts.d_in, opts.torch_dtype, opts.device)
        pb_tok, pb_fwd = measured_added_macs(peft_layer, base, opts.d_in, opts.torch_dtype, opts.device, backward=True)
        out["peft"] = {"fwd_matmul": {"per_token": p_tok, "per_forward": p_fwd},
                       "fwdbwd_matmul": {"per_token": pb_tok, "per_forward": pb_fwd}}
    return out


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class Subject:
    """One timed layer: (variant, impl) with impl in ours | peft | base (the base has variant None)."""

    variant: str | None
    impl: str
    layer: nn.Module

    @property
    def key(self) -> str:
        return "base" if self.impl == "base" else f"{self.variant}/{self.impl}"


def _zero_grads(layer: nn.Module, x: torch.Tensor | None = None) -> None:
    """Drop every gradient (set_to_none, as a training loop's zero_grad does), so each step allocates them."""
    for p in layer.parameters():
        p.grad = None
    if x is not None:
        x.grad = None


def step(layer: nn.Module, x: torch.Tensor, go: torch.Tensor, backward: bool) -> None:
    """One forward (autograd on, as in training) and, if asked and anything requires grad, its backward."""
    y = layer(x)
    if backward and y.requires_grad:
        y.backward(go)


class Clock:
    """Times one callable: perf_counter on the CPU, CUDA events (after a synchronize) on a GPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def make_inputs(opts: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """The timed input (batch, seq, d_in) and the output gradient fed to backward, from the run's seed."""
    g = torch.Generator().manual_seed(opts.seed + 1)
    x = torch.randn(opts.batch, opts.seq, opts.d_in, generator=g)
    go = torch.randn(opts.batch, opts.seq, opts.d_out, generator=g)
    return x.to(opts.device, opts.torch_dtype), go.to(opts.device, opts.torch_dtype)


def round_robin(subjects: list[Subject], x: torch.Tensor, go: torch.Tensor, reps: int, warmup: int, seed: int,
                device: str, progress: Callable[[str], None] | None = None) -> dict[tuple[str, str, str], list[float]]:
    """Times every (subject, setting, mode) once per repetition, in a fresh shuffled order each repetition;
    the first `warmup` repetitions are dropped. Returns {(key, setting, mode): [seconds per repetition]}."""
    clock = Clock(device)
    tasks = [(s, setting, mode) for s in subjects for setting in SETTINGS for mode in MODES]
    out: dict[tuple[str, str, str], list[float]] = {(s.key, st, m): [] for s, st, m in tasks}
    rng = random.Random(seed)
    x_inner = x.detach().clone().requires_grad_(True)
    for rep in range(warmup + reps):
        order = tasks[:]
        rng.shuffle(order)
        for s, setting, mode in order:
            xi = x if setting == "first" else x_inner
            _zero_grads(s.layer, xi)
            dt = clock(lambda s=s, xi=xi, mode=mode: step(s.layer, xi, go, mode == "fwdbwd"))
            if rep >= warmup:
                out[(s.key, setting, mode)].append(dt)
        if progress and (rep + 1) % 10 == 0:
            progress(f"  repetition {rep + 1}/{warmup + reps}")
    return out


def median_ms(ts: list[float]) -> float:
    return statistics.median(ts) * 1e3


def ratio_ci(a: list[float], b: list[float], boot: int, seed: int) -> dict:
    """median(a) / median(b) with a 95 % percentile-bootstrap interval, resampling repetitions (the pairs
    (a[i], b[i]) ran in the same repetition, so drift is shared)."""
    import numpy as np

    A, B = np.asarray(a, float), np.asarray(b, float)
    if A.shape != B.shape or A.size == 0:
        raise CostError(f"ratio of unpaired samples ({A.size} vs {B.size})")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, A.size, size=(boot, A.size))
    r = np.median(A[idx], axis=1) / np.median(B[idx], axis=1)
    lo, hi = np.percentile(r, [2.5, 97.5])
    return {"ratio": float(np.median(A) / np.median(B)), "lo": float(lo), "hi": float(hi)}


def verdict(ci: dict, limit: float) -> str:
    """met (the whole 95 % interval at or below the limit), not met (all above) or undecided."""
    if ci["hi"] <= limit:
        return "met"
    if ci["lo"] > limit:
        return "not met"
    return "undecided"


# ------------------------------------------------------------------------------------------------ memory


def _proc_status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise CostError(f"/proc/self/status has no {field_name}")


def rss_peak_delta(fn: Callable[[], None]) -> int:
    """Bytes: the peak resident set during fn minus the resident set just before it (Linux: the kernel's
    peak counter is reset by writing 5 to /proc/self/clear_refs)."""
    gc.collect()
    before = _proc_status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        raise CostError(f"cannot reset the peak RSS ({e}); CPU memory needs Linux /proc, or pass --no-memory") from None
    fn()
    return (_proc_status_kb("VmHWM") - before) * 1024


def cuda_peak_delta(fn: Callable[[], None]) -> int:
    """Bytes: max_memory_allocated during fn (after a reset) minus the memory allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_memory(subjects: list[Subject], x: torch.Tensor, go: torch.Tensor, device: str, repeats: int = 3) -> dict:
    """{key: {setting: bytes}}: the peak extra memory of one forward+backward, after one warm-up step; the
    median of `repeats` measurements (the kernel's RSS counters are per-CPU batched, so one reading can be off
    by a few hundred KiB)."""
    meter = cuda_peak_delta if device == "cuda" else rss_peak_delta
    out: dict[str, dict[str, int]] = {}
    for s in subjects:
        for setting in SETTINGS:
            xi = x if setting == "first" else x.detach().clone().requires_grad_(True)
            _zero_grads(s.layer, xi)
            step(s.layer, xi, go, True)
            readings = []
            for _ in range(repeats):
                _zero_grads(s.layer, xi)
                readings.append(meter(lambda s=s, xi=xi: step(s.layer, xi, go, True)))
            _zero_grads(s.layer, xi)
            out.setdefault(s.key, {})[setting] = int(statistics.median(readings))
    return out


def memory_child(payload: str) -> int:
    """Entry point of the per-variant child: build the variant's subjects, print their peak memory as JSON."""
    d = json.loads(payload)
    opts = Options(**{**d["options"], "variants": tuple(d["options"]["variants"])})
    torch.set_num_threads(opts.threads)
    subjects, _ = build_subjects(d["variant"], opts)
    x, go = make_inputs(opts)
    print(MEMORY_TAG + json.dumps(peak_memory(subjects, x, go, opts.device)), flush=True)
    return 0


def memory_in_children(opts: Options, progress: Callable[[str], None]) -> dict[str, dict]:
    """Runs one child process per variant (opts.jobs at a time) and collects {variant: {key: {setting: bytes}}}.
    glibc is told to serve every block over 64 KiB with mmap, so freed tensors leave the RSS."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": str(opts.threads)}
    pending = list(opts.variants)
    running: list[tuple[str, subprocess.Popen]] = []
    out: dict[str, dict] = {}
    while pending or running:
        while pending and len(running) < opts.jobs:
            v = pending.pop(0)
            payload = json.dumps({"variant": v, "options": asdict(opts)})
            p = subprocess.Popen([sys.executable, "-m", "tools.cost", "--memory-child", payload], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((v, p))
        v, p = running.pop(0)
        stdout, stderr = p.communicate(timeout=900)
        lines = [ln for ln in stdout.splitlines() if ln.startswith(MEMORY_TAG)]
        if p.returncode != 0 or not lines:
            raise CostError(f"memory child for '{v}' failed (exit {p.returncode}): {stderr[-2000:]}")
        out[v] = json.loads(lines[-1][len(MEMORY_TAG):])
        progress(f"  memory {v}: done")
    return out


# ------------------------------------------------------------------------------------------------ group init


def tiny_llama(seed: int):
    """A 2-layer Llama, hidden 64, built from a config with random weights (harness.models.tiny)."""
    from harness.models import tiny

    return tiny("llama", seed)


def tiny_calibration(seed: int, n: int = 4, b: int = 2, t: int = 32) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for the tiny Llama: skewed token ids (anisotropic activations), right padding."""
    g = torch.Generator().manual_seed(seed + 29)
    probs = torch.full((128,), 0.2)
    probs[:6] = 20.0
    out = []
    for _ in range(n):
        ids = torch.multinomial(probs, b * t, replacement=True, generator=g).view(b, t)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[-1, -t // 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def init_times(variants: tuple[str, ...], opts: Options, progress: Callable[[str], None]) -> dict[str, dict]:
    """Median wall time of impl.attach (init and group init together) on the tiny Llama, every role targeted,
    calibration batches given to every data-driven variant."""
    import impl
    import spec as spec_pkg

    base = tiny_llama(opts.seed)
    cal = tiny_calibration(opts.seed)
    targets = None
    out = {}
    for name in variants:
        sp = spec_pkg.SPECS.get(name)
        cfg = impl.config(name, r=opts.init_r, target_roles=TINY_ROLES)
        times = []
        for i in range(opts.init_reps):
            model = copy.deepcopy(base)
            torch.manual_seed(opts.seed + i)
            t0 = time.perf_counter()
            impl.attach(model, cfg, calibration=cal if sp.data != "none" else None)
            times.append(time.perf_counter() - t0)
            targets = len(impl.adapters(model))
            impl.detach(model)
        out[name] = {"ms": median_ms(times), "data": sp.data, "targets": targets, "r": opts.init_r,
                     "calibration_tokens": int(sum(int(c["attention_mask"].sum()) for c in cal)) if sp.data != "none" else 0}
        progress(f"  init {name}: {out[name]['ms']:.1f} ms")
    return out


# ------------------------------------------------------------------------------------------------ assembling


def timed_peft(sp) -> bool:
    """Whether PEFT implements the same variant: a PeftMap whose `compare` is set names a counterpart that shares
    only the init (other tensors, another forward), which is not the same variant's implementation."""
    return peft_map(sp) is not None and getattr(peft_map(sp), "compare", None) is None


def build_subjects(name: str, opts: Options) -> tuple[list[Subject], dict]:
    """Our layer, PEFT's (if the spec maps it) and the frozen base for one variant, plus the facts learned
    building them (attach time, same-function error)."""
    import spec as spec_pkg

    sp = spec_pkg.SPECS.get(name)
    W, b = base_weights(opts)
    ours = build_ours(name, sp, W, b, opts)
    base = frozen_linear(W, b, opts.torch_dtype, opts.device)
    subjects = [Subject(name, "ours", ours.layer), Subject(None, "base", base)]
    facts: dict[str, Any] = {"ours": ours, "base": base, "peft_layer": None, "peft_same_function": None}
    if timed_peft(sp):
        pl = build_peft(sp, ours, opts)
        subjects.append(Subject(name, "peft", pl))
        facts["peft_layer"] = pl
        xs = make_inputs(replace(opts, batch=1, seq=min(opts.seq, 16)))[0]
        facts["peft_same_function"] = same_function(ours.layer, pl, base, xs)
    return subjects, facts


def check_variants(variants: tuple[str, ...]) -> None:
    """Every variant is registered in impl and has a spec with both MAC formulas; else CostError."""
    import impl
    import spec as spec_pkg

    missing = [v for v in variants if v not in impl.VARIANTS]
    if missing:
        raise CostError(f"unknown variant(s) {missing}; registered: {list(impl.VARIANTS)}")
    for v in variants:
        try:
            sp = spec_pkg.SPECS.get(v)
        except KeyError as e:
            raise CostError(str(e)) from None
        for which in ("macs", "macs_per_forward"):
            if not str(getattr(sp, which, "")).strip():
                raise CostError(f"spec '{v}' declares no `{which}` formula; add it to spec/variants/{v}.py")


def time_table(times: dict, variants: tuple[str, ...], has_peft: dict[str, bool], opts: Options) -> dict:
    """Per variant and setting: medians (ms) and the ratio intervals ours/base, ours/PEFT, PEFT/base."""
    out: dict[str, dict] = {}
    for i, v in enumerate(variants):
        row: dict[str, dict] = {}
        for setting in SETTINGS:
            cell: dict[str, Any] = {}
            for mode in MODES:
                ours = times[(f"{v}/ours", setting, mode)]
                base = times[("base", setting, mode)]
                c = {"ours_ms": median_ms(ours), "base_ms": median_ms(base),
                     "ours_over_base": ratio_ci(ours, base, opts.boot, opts.seed + 7 * i)}
                if has_peft[v]:
                    peft_t = times[(f"{v}/peft", setting, mode)]
                    c["peft_ms"] = median_ms(peft_t)
                    c["ours_over_peft"] = ratio_ci(ours, peft_t, opts.boot, opts.seed + 7 * i + 1)
                    c["peft_over_base"] = ratio_ci(peft_t, base, opts.boot, opts.seed + 7 * i + 2)
                cell[mode] = c
            row[setting] = cell
        out[v] = row
    return out


def goals(tt: dict, times: dict, variants: tuple[str, ...], opts: Options) -> list[dict]:
    """The issue's goals, each met / not met / undecided (95 % interval) or not applicable with the reason."""
    out = []
    for v in variants:
        if "ours_over_peft" not in tt[v]["first"]["fwdbwd"]:
            continue
        limit, gid = (GOAL_HRA, "hra_well_below_peft") if v == "hra" else (GOAL_PEFT, "fwdbwd_vs_peft")
        for setting in SETTINGS:
            ci = tt[v][setting]["fwdbwd"]["ours_over_peft"]
            out.append({"goal": gid, "variant": v, "setting": setting, "what": "ours/PEFT fwd+bwd",
                        "limit": limit, **ci, "status": verdict(ci, limit)})
    if "antipasto_rot" in variants and "antipasto" in variants:
        for setting in SETTINGS:
            ci = ratio_ci(times[("antipasto_rot/ours", setting, "fwdbwd")], times[("antipasto/ours", setting, "fwdbwd")],
                          opts.boot, opts.seed + 991)
            out.append({"goal": "rot_vs_antipasto", "variant": "antipasto_rot", "setting": setting,
                        "what": "antipasto_rot/antipasto fwd+bwd", "limit": GOAL_ROT, **ci, "status": verdict(ci, GOAL_ROT)})
    else:
        out.append({"goal": "rot_vs_antipasto", "variant": "antipasto_rot", "setting": "-", "limit": GOAL_ROT,
                    "status": "not applicable: antipasto_rot and antipasto are not both in this run"})
    for v in variants:
        ci = tt[v]["inner"]["fwdbwd"]["ours_over_base"]
        status = verdict(ci, GOAL_GPU) if opts.device == "cuda" else "not measured: no GPU in this run (CPU ratio shown)"
        out.append({"goal": "gpu_vs_base", "variant": v, "setting": "inner", "what": "ours/base fwd+bwd",
                    "limit": GOAL_GPU, **ci, "status": status})
    return out


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(opts: Options) -> dict:
    """Where the numbers come from (threads fixed and printed)."""
    import peft
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__,
           "transformers": transformers.__version__, "machine": platform.machine(), "processor": cpu_model(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch_interop_threads": torch.get_num_interop_threads(), "device": opts.device,
           "timer": "CUDA events" if opts.device == "cuda" else "time.perf_counter",
           "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if opts.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def timed_printer() -> Callable[[str], None]:
    """A progress callback printing to stderr with the seconds since it was made."""
    t0 = time.perf_counter()
    return lambda msg: print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def run(opts: Options, progress: Callable[[str], None] | None = None) -> dict:
    """Measure everything and return the JSON payload (nothing written)."""
    import spec as spec_pkg

    progress = progress or timed_printer()

    opts.validate()
    check_variants(opts.variants)
    torch.set_num_threads(opts.threads)
    progress(f"cost: {len(opts.variants)} variants, Linear {opts.d_in}x{opts.d_out}, input {opts.batch}x{opts.seq}, "
             f"r={opts.r}, {opts.dtype} on {opts.device}, torch threads = {torch.get_num_threads()}")
    memory = memory_in_children(opts, progress) if opts.memory and opts.device == "cpu" else {}

    subjects: list[Subject] = []
    rows: dict[str, dict] = {}
    base_subject = None
    for v in opts.variants:
        sp = spec_pkg.SPECS.get(v)
        subs, facts = build_subjects(v, opts)
        ours = facts["ours"]
        if base_subject is None:
            base_subject = next(s for s in subs if s.impl == "base")
            subjects.append(base_subject)
        subjects += [s for s in subs if s.impl != "base"]
        rows[v] = {
            "variant": v,
            "config": ours.cfg.to_dict(),
            "data": sp.data,
            "side": type(ours.host.lin.adapter.variant).side,
            "params": count_params(v, sp, ours, opts),
            "macs": mac_counts(v, sp, ours, facts["peft_layer"], base_subject.layer, opts),
            "attach_ms": ours.attach_s * 1e3,
            "peft": None if not timed_peft(sp) else {
                "config": peft_map(sp).config,
                "trainable": sum(p.numel() for p in facts["peft_layer"].parameters() if p.requires_grad),
                "same_function_error": facts["peft_same_function"]},
            "peft_not_timed": None if timed_peft(sp) else (
                "PEFT has no counterpart (harness/backends/peft_maps.py maps none)" if peft_map(sp) is None else
                f"PEFT's {peft_map(sp).config} counterpart shares only the init (another adapter in the forward)"),
        }
        if opts.device == "cuda":
            x, go = make_inputs(opts)
            memory[v] = peak_memory(subs, x, go, opts.device)
        progress(f"  built {v}: {rows[v]['params']['trainable']} trainable, "
                 f"{rows[v]['macs']['per_token']} MACs/token")
    x, go = make_inputs(opts)
    progress(f"timing {len(subjects)} layers x {len(SETTINGS)} settings x {len(MODES)} modes, "
             f"{opts.reps} repetitions after {opts.warmup} warm-up")
    load_before = os.getloadavg()
    times = round_robin(subjects, x, go, opts.reps, opts.warmup, opts.seed, opts.device, progress)
    load_after = os.getloadavg()
    has_peft = {v: rows[v]["peft"] is not None for v in opts.variants}
    tt = time_table(times, opts.variants, has_peft, opts)
    inits = init_times(opts.variants, opts, progress) if opts.init else {}
    for v in opts.variants:
        rows[v]["time"] = tt[v]
        rows[v]["memory"] = None if v not in memory else {
            k.split("/")[-1]: by_setting for k, by_setting in memory[v].items()}
        rows[v]["init"] = inits.get(v)
    env = {**environment(opts), "loadavg_1min_before_timing": round(load_before[0], 2),
           "loadavg_1min_after_timing": round(load_after[0], 2)}
    return {"schema": SCHEMA, "options": asdict(opts), "environment": env,
            "rows": [rows[v] for v in opts.variants], "goals": goals(tt, times, opts.variants, opts),
            "raw_times_ms": {f"{k}|{st}|{m}": [round(t * 1e3, 4) for t in ts] for (k, st, m), ts in times.items()}}


# ------------------------------------------------------------------------------------------------ rendering


def _ci(c: dict | None) -> str:
    return "–" if c is None else f"{c['ratio']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]"


def _n(v: int) -> str:
    return f"{v:,}".replace(",", " ")


def _mb(v: int | None) -> str:
    return "–" if v is None else f"{v / 2**20:.1f}"


def render_markdown(res: dict) -> str:
    """The report as Markdown (audits/templates/cost.md.j2, through the audit's Jinja environment): setup,
    parameters and MACs, times, memory, init, goals, method."""
    from tools.render import make_env

    env = make_env(ROOT / "audits" / "templates")
    text = env.get_template("cost.md.j2").render(o=res["options"], env=res["environment"], rows=res["rows"],
                                                 goals=res["goals"], settings=SETTINGS, n=_n, ci=_ci, mb=_mb)
    return text.rstrip("\n") + "\n"


def render_png(res: dict) -> bytes:
    """Dot plot of fwd+bwd time over the frozen base (ours and PEFT, with 95 % intervals), one panel per setting,
    log-scaled x with plain tick labels; the line at 1 is the base, the dashed one the GPU aim of 1.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows = res["rows"]
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.42 * len(rows) + 2.2), sharey=True)
    for ax, setting in zip(axes, SETTINGS):
        for j, (key, color, label) in enumerate((("ours_over_base", "tab:blue", "ours"),
                                                 ("peft_over_base", "tab:orange", "PEFT"))):
            ys, vals, err = [], [], [[], []]
            for i, r in enumerate(rows):
                c = r["time"][setting]["fwdbwd"].get(key)
                if c is None:
                    continue
                ys.append(i + (j - 0.5) * 0.3)
                vals.append(c["ratio"])
                err[0].append(max(c["ratio"] - c["lo"], 0.0))
                err[1].append(max(c["hi"] - c["ratio"], 0.0))
            ax.errorbar(vals, ys, xerr=err, fmt="o", color=color, label=label, capsize=3, ms=5)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.axvline(GOAL_GPU, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"fwd+bwd time / frozen base, {setting} layer")
        ax.set_xlabel("ratio (log scale); bars: 95 % bootstrap interval")
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels(names)
    axes[0].set_ylim(len(names) - 0.5, -0.5)
    axes[1].legend(loc="lower right")
    o = res["options"]
    fig.suptitle(f"Linear {o['d_in']}x{o['d_out']}, input {o['batch']}x{o['seq']}, r={o['r']}, {o['dtype']}, "
                 f"{o['device']}, {res['environment']['torch_threads']} torch threads")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_outputs(res: dict, out_dir: Path) -> dict[str, Path]:
    """Write cost_<device>.{md,json,png} atomically; returns the paths."""
    from impl.atomic import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"cost_{res['options']['device']}"
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "json", "png")}
    atomic_write_bytes(paths["json"], (json.dumps(res, indent=1, sort_keys=True) + "\n").encode())
    atomic_write_bytes(paths["md"], (render_markdown(res) + "\n").encode())
    atomic_write_bytes(paths["png"], render_png(res))
    return paths


# ------------------------------------------------------------------------------------------------ CLI


def parse(argv: list[str] | None) -> Options | str:
    """Options from the command line (or the child payload for the hidden --memory-child)."""
    ap = argparse.ArgumentParser(prog="python -m tools.cost", description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="", help="comma-separated (default: every variant in impl.VARIANTS)")
    ap.add_argument("--d-in", type=int, default=1024)
    ap.add_argument("--d-out", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("-r", "--r", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPU count)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--jobs", type=int, default=2, help="memory child processes at a time")
    ap.add_argument("--no-init", action="store_true", help="skip the attach timing on the tiny Llama")
    ap.add_argument("--init-r", type=int, default=8)
    ap.add_argument("--init-reps", type=int, default=3)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "audits" / "cost"))
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.memory_child is not None:
        return a.memory_child
    import impl

    variants = tuple(v.strip() for v in a.variants.split(",") if v.strip()) or tuple(impl.VARIANTS)
    return Options(variants=variants, d_in=a.d_in, d_out=a.d_out, batch=a.batch, seq=a.seq, r=a.r, dtype=a.dtype,
                   device=a.device, threads=a.threads or os.cpu_count() or 1, reps=a.reps, warmup=a.warmup,
                   boot=a.boot, seed=a.seed, memory=not a.no_memory, jobs=a.jobs, init=not a.no_init,
                   init_r=a.init_r, init_reps=a.init_reps, calib_tokens=a.calib_tokens, out=a.out)


def main(argv: list[str] | None = None) -> int:
    parsed = parse(argv)
    if isinstance(parsed, str):
        return memory_child(parsed)
    try:
        res = run(parsed)
    except CostError as e:
        print(f"cost: error: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(res, Path(parsed.out))
    for g in res["goals"]:
        if "lo" in g:
            print(f"goal {g['goal']:<20} {g['variant']:<16} {g['setting']:<6} {_ci(g):<24} limit {g['limit']}: {g['status']}")
        else:
            print(f"goal {g['goal']:<20} {g['variant']:<16} {g['status']}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
