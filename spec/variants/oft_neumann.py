"""Spec of OFT with the Cayley–Neumann parametrisation (OFTv2, Qiu et al. 2025), PEFT's default for OFT: the
inverse (I − S)⁻¹ of the Cayley transform replaced by its Neumann series, truncated."""
import dataclasses

import torch

from ..schema import Reference, register
from . import oft
from .oft import skew

TERMS = 4  # I + S + S² + S³: the series PEFT's default num_cayley_neumann_terms = 5 computes


def cayley_neumann(S, terms=TERMS):
    """R ≈ (I + S)(I − S)⁻¹ ≈ (I + S) Σ_{i<terms} Sⁱ (OFTv2 §3: the Neumann series of (I − S)⁻¹); the same
    rotation as exact OFT up to the truncation, close to orthogonal for small S."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype)
    series, power = eye.clone(), eye
    for _ in range(1, terms):
        power = power @ S
        series = series + power
    return (eye + S) @ series


def dense(W, b, T, cfg, knobs):
    """W R with R = diag(cayley_neumann(skew(q_k))), acting on the input side as in exact OFT."""
    bs = W.shape[1] // T["Q"].shape[0]
    return W @ torch.block_diag(*(cayley_neumann(skew(q, bs)) for q in T["Q"]))


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W R x + b; float64, row convention."""
    y = x @ dense(W, b, T, cfg, knobs).T
    return y if b is None else y + b


SPEC = register(dataclasses.replace(
    oft.SPEC,
    name="oft_neumann",
    title="OFT with the Cayley–Neumann parametrisation (OFTv2; PEFT's default OFT)",
    equation=r"y = W R x + b,\ R = \mathrm{diag}(R_k),\ R_k = (I + S_k)\sum_{i=0}^{3} S_k^{\,i} \approx (I + S_k)(I - S_k)^{-1}",
    macs_per_forward="r * 3 * (d_in // r) ** 3",
    oracle=oracle,
    dense=dense,
    claims=(),
    references=(
        Reference("OFTv2 paper (§3, Cayley–Neumann parametrisation)", "https://arxiv.org/abs/2506.19847"),
        *oft.SPEC.references,
    ),
    notes="No orthogonality claim: the truncated series is orthogonal only up to O(S⁴). The rotation must be the "
          "one exact OFT applies (spec 'oft'), so that a checkpoint means the same rotation in both modes.",
))
