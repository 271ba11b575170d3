"""Shared misreadings: each mutant changes the implementation AND its spec (oracle, init formula, dense form) in
the same way, so every property that checks the implementation against its own spec still passes. Only the
comparison with an implementation written by someone else (PEFT, harness.differential) can flag them.

Mutants that change a tensor's shape or the side of a gate run on square layers (docs/conventions.md §8).
"""
import math

import torch

from impl.variants.delora import DeLoRA
from impl.variants.dora import DoRA, norm_floor
from impl.variants.eva import EVA, sign_normalise
from impl.variants.hra import HRA, householder_apply, householder_right
from impl.variants.ia3 import IA3FF, gate_output
from impl.variants.lora import LoRA, lora_delta
from impl.variants.pissa import PiSSA, principal_factors
from spec.schema import Claim
from spec.variants import delora as delora_spec
from spec.variants import hra as hra_spec

from . import Mutant

# ----------------------------------------------------------------------------------------------- delora


class DeloraNormOverOutputs(DeLoRA):
    """The weight norm taken over the input dim (one norm per output row, ‖W_i,:‖) instead of per input column."""

    def norms(self, W):
        return torch.linalg.vector_norm(W, dim=1)


def _delora_delta_rows(W, T, cfg):
    A, B, lam = T["A"], T["B"], T["lam"]
    w = W.norm(dim=1)
    xi = 1.0 / (A.norm(dim=1).clamp_min(delora_spec.CLAMP) * B.norm(dim=0).clamp_min(delora_spec.CLAMP))
    return (lam / cfg.r) * (B * xi[None, :]) @ A * w[None, :]


def _delora_oracle_rows(W, b, T, x, cfg, knobs, xd=None):
    xd = x if xd is None else xd
    return x @ W.T + (0 if b is None else b) + xd @ _delora_delta_rows(W, T, cfg).T


def _delora_init_rows(W, cfg, X):
    return {**delora_spec.init_oracle(W, cfg, X), "wnorm": W.norm(dim=1)}


def _delora_bound_rows(p):
    """The spec's bounded-update claim as the same misreader writes it: ‖ΔW‖₂ / (|λ| · max_i ‖W_i,:‖)."""
    dW = p.dense_map() - p.base_weight()
    return torch.linalg.matrix_norm(dW, ord=2) / (p.tensors()["lam"].abs().max() * p.base_weight().norm(dim=1).max())


DELORA_ROWS_CLAIM = Claim("bounded_update", "bounded", _delora_bound_rows,
                          "‖ΔW‖₂ ≤ |λ| · max_i ‖W_i,:‖ (the misread norm axis)", bound=1.0)


# ----------------------------------------------------------------------------------------------- hra


class HraReversed(HRA):
    """The reflections applied in the reverse order: x' = H_{r−1} ⋯ H_0 x (H_0 acts first)."""

    def forward_input(self, ad, x):
        return householder_apply(x.to(ad.U.dtype), ad.U.flip(0)).to(x.dtype)

    def merged(self, ad, W, b):
        return householder_right(W.contiguous(), ad.U.detach().float().flip(0)), b


def _hra_oracle_reversed(W, b, T, x, cfg, knobs, xd=None):
    y = x @ (W @ hra_spec.householder(T["U"].flip(0))).T
    return y if b is None else y + b


# ----------------------------------------------------------------------------------------------- eva


class EvaUncentred(EVA):
    """A from the top-r right singular vectors of the raw (uncentred) activations."""

    def group_init(self, adapters, acts, cfg):
        for name, ad in adapters.items():
            X = acts[name].double()
            _, vecs = torch.linalg.eigh(X.T @ X)
            ad.A.copy_(sign_normalise(vecs[:, -cfg.r:].flip(-1).T.contiguous()).to(ad.A.dtype))
        return {}


def _eva_init_uncentred(W, cfg, X):
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    A = Vh[: cfg.r]
    A = A * torch.sign(A.gather(1, A.abs().argmax(dim=1, keepdim=True)))
    return {"A": A, "B": torch.zeros(W.shape[0], cfg.r, dtype=W.dtype)}


# ----------------------------------------------------------------------------------------------- pissa


class PissaUnscaledSplit(PiSSA):
    """The factors split without the scale: A = √S_r Vh_r, B = U_r √S_r, so s·B·A = s·U_r S_r Vh_r (and the
    residual W − s·U_r S_r Vh_r keeps the init an identity)."""

    def factors(self, W, r, s):
        return principal_factors(W, r, 1.0)


def _pissa_init_unscaled(W, cfg, X):
    s = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[: cfg.r].sqrt()
    A, B = root[:, None] * Vh[: cfg.r], U[:, : cfg.r] * root[None, :]
    return {"A": A, "B": B, "base_weight": W - s * B @ A}


# ----------------------------------------------------------------------------------------------- dora


def _dora_scale(cfg):
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)


class DoraColumnNorms(DoRA):
    """Magnitude (and the norm it is divided by) from the column norms ‖(W + sBA)_:,j‖ instead of the rows'."""

    def norm(self, W, A, B, s):
        with torch.no_grad():
            V = W.to(A.dtype).contiguous() + s * (B.detach() @ A.detach())
            return torch.linalg.vector_norm(V, dim=0).clamp_min(norm_floor(A.dtype))


def _dora_oracle(dim: int, detach: bool):
    def oracle(W, b, T, x, cfg, knobs, xd=None):
        xd = x if xd is None else xd
        s = _dora_scale(cfg)
        A, B, m = T["A"], T["B"], T["m"]
        V = W + s * (B.detach() @ A.detach() if detach else B @ A)
        n = V.norm(dim=dim).clamp_min(1e-12)
        k = m / (n.detach() if detach else n)
        y = x @ W.T + (0 if b is None else b)
        return y + (k - 1) * (xd @ W.T) + k * s * (xd @ A.T @ B.T)

    return oracle


def _dora_dense_columns(W, b, T, cfg, knobs):
    s = _dora_scale(cfg)
    n = (W + s * T["B"].detach() @ T["A"].detach()).norm(dim=0).clamp_min(1e-12)
    return (T["m"] / n)[:, None] * (W + s * T["B"] @ T["A"])


def _dora_dense_attached(W, b, T, cfg, knobs):
    s = _dora_scale(cfg)
    V = W + s * T["B"] @ T["A"]
    return (T["m"] / V.norm(dim=1).clamp_min(1e-12))[:, None] * V


def _dora_init_columns(W, cfg, X):
    return {"m": W.norm(dim=0), "B": torch.zeros(W.shape[0], cfg.r, dtype=W.dtype)}


class DoraNormAttached(DoRA):
    """‖W + sBA‖ differentiated through (not treated as a constant): the same outputs, other gradients."""

    def norm(self, W, A, B, s):
        V = W.to(A.dtype).contiguous() + s * (B @ A)
        return torch.linalg.vector_norm(V, dim=1).clamp_min(norm_floor(A.dtype))


# ----------------------------------------------------------------------------------------------- lora


class LoraRsloraAsLora(LoRA):
    """rsLoRA's scale read as alpha / r (the plain LoRA scale) instead of alpha / sqrt(r)."""

    def forward(self, ad, x, y):
        return y + lora_delta(ad.drop(x), ad.A, ad.B, ad.cfg.alpha / ad.cfg.r).to(y.dtype)

    def merged(self, ad, W, b):
        return W + ad.cfg.alpha / ad.cfg.r * (ad.B.float() @ ad.A.float()), b


def _lora_oracle_plain_scale(W, b, T, x, cfg, knobs, xd=None):
    xd = x if xd is None else xd
    return x @ W.T + (0 if b is None else b) + cfg.alpha / cfg.r * (xd @ T["A"].T @ T["B"].T)


# ----------------------------------------------------------------------------------------------- ia3_ff


class Ia3FFOutputSide(IA3FF):
    """The feed-forward gate applied to the layer's output (bias included) instead of its input."""

    side = "output"

    def forward(self, ad, x, y):
        return gate_output(y, ad.g)

    def merged(self, ad, W, b):
        g = ad.g.detach().float()
        return g[:, None] * W, None if b is None else g * b


def _ia3_ff_oracle_output(W, b, T, x, cfg, knobs, xd=None):
    y = x @ W.T + (0 if b is None else b)
    return y * T["g"]


MUTANTS = [
    Mutant("delora.shared_norm_over_outputs", DeloraNormOverOutputs, "reference_init",
           "shared misreading: DeLoRA's weight norm over the output axis (per row) instead of per input column",
           spec_changes={"oracle": _delora_oracle_rows, "init_oracle": _delora_init_rows,
                         "dense": lambda W, b, T, cfg, knobs: W + _delora_delta_rows(W, T, cfg),
                         "claims": (DELORA_ROWS_CLAIM,)},
           square=True),
    Mutant("hra.shared_reversed_order", HraReversed, "reference_equivalence",
           "shared misreading: HRA's reflections applied in reverse order (H_0 acts on x first)",
           spec_changes={"oracle": _hra_oracle_reversed}),
    Mutant("eva.shared_uncentred", EvaUncentred, "reference_init",
           "shared misreading: EVA's A from the uncentred activations (SVD of X, not X − mean)",
           spec_changes={"init_oracle": _eva_init_uncentred}),
    Mutant("pissa.shared_unscaled_split", PissaUnscaledSplit, "reference_init",
           "shared misreading: PiSSA's factors split without the scale (s·B·A = s·U S Vh)",
           spec_changes={"init_oracle": _pissa_init_unscaled}),
    Mutant("dora.shared_column_norms", DoraColumnNorms, "reference_init",
           "shared misreading: DoRA's magnitude (and norm) from column instead of row norms; the spec's row-norm "
           "claim is dropped with it (a column-norm reader would not make it)",
           spec_changes={"oracle": _dora_oracle(0, True), "dense": _dora_dense_columns,
                         "init_oracle": _dora_init_columns, "claims": ()},
           square=True),
    Mutant("dora.shared_norm_not_detached", DoraNormAttached, "reference_equivalence",
           "shared misreading: DoRA's norm ‖W + sBA‖ differentiated through instead of detached (paper §4.3)",
           spec_changes={"oracle": _dora_oracle(1, False), "dense": _dora_dense_attached}),
    Mutant("lora.shared_rslora_plain_scale", LoraRsloraAsLora, "reference_equivalence",
           "shared misreading: rsLoRA's scale taken as alpha / r",
           spec_changes={"oracle": _lora_oracle_plain_scale}),
    Mutant("ia3_ff.shared_output_side", Ia3FFOutputSide, "reference_equivalence",
           "shared misreading: the feed-forward IA3 gate applied to the output side (bias scaled)",
           spec_changes={"oracle": _ia3_ff_oracle_output, "bias": "scaled",
                         "bias_note": "the mutant's gate scales the output, bias included"},
           square=True),
]
