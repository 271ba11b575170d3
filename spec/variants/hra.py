"""Spec of HRA, Householder reflection adaptation (Yuan et al. 2024), in PEFT's order and init."""
import torch
from hypothesis import strategies as st

from ..schema import Claim, Constraint, Deviation, Reference, Spec, TensorSpec, register


def householder(U):
    """H = H_0 H_1 ⋯ H_{r−1}, H_i = I − 2 û_i û_iᵀ with û_i = u_i / ‖u_i‖ (u_i = row i of U), dense, float64."""
    d = U.shape[1]
    H = torch.eye(d, dtype=U.dtype)
    for u in U:
        h = u / u.norm()
        H = H @ (torch.eye(d, dtype=U.dtype) - 2.0 * torch.outer(h, h))
    return H


def oracle(W, b, T, x, cfg, knobs, xd=None):
    """y = W H x + b (H_{r−1} acts on x first); float64, row convention y = x (W H)ᵀ + b."""
    y = x @ (W @ householder(T["U"])).T
    return y if b is None else y + b


def input_map(probe):
    """H measured on the implementation: the same tensors on a twin layer whose base weight is the identity
    (d_in × d_in, no bias), so that the twin's dense map is the input rotation itself. (On the probed layer
    the dense map is W H, from which H is not recoverable when d_out < d_in.)"""
    return probe.twin(d_out=probe.case.d_in, bias=False).dense_map()


def rotation_of(probe):
    """The input rotation H as a batch of one square matrix."""
    return input_map(probe).unsqueeze(0)


def norm_pairs(probe):
    """(x, H x) for random inputs x, with H measured on the implementation."""
    x = torch.randn(16, probe.case.d_in, generator=probe.case.gen(11), dtype=torch.float64)
    return x, x @ input_map(probe).T


def fields(draw, d_in, d_out):
    """An even r in [2, d_in]: the paired init needs even r; the reflections act on the input space."""
    return {"r": 2 * draw(st.integers(1, d_in // 2), label="r/2")}


SPEC = register(
    Spec(
        name="hra",
        title="HRA: Householder reflection adaptation",
        equation=r"y = W H x + b,\quad H = \prod_{i=0}^{r-1} \Big(I - \frac{2\,u_i u_i^\top}{\lVert u_i\rVert^2}\Big)"
                 r"\ \ (H_{r-1}\text{ acts first})",
        tensors=(TensorSpec("U", "(r, d_in)", "r/2 kaiming-uniform(fan_in=r/2) rows (the fan-in of PEFT's (d_in, r/2) "
                                              "half matrix), each repeated twice (H = I)"),),
        param_count="r * d_in",
        # compact WY form (impl): x Uᵀ, then Tᵀ, then U per token; the Gram U Uᵀ and T's triangular solve per forward
        macs="2 * r * d_in + r * r",
        macs_per_forward="r * r * d_in + solve(r * r * (r + 1) // 2) + ew(r)",
        oracle=oracle,
        identity="tolerance",
        dropout="rejected",
        fields=fields,
        max_rank="d_in",  # r reflections act on the input space: any d_out
        constraints=(
            Constraint("r is even (paired init: H_{2j} H_{2j+1} = I)", {"r": 3}),
            Constraint("r is a positive integer", {"r": 0}),
            Constraint("dropout is rejected: there is no separate adapter input", {"dropout": 0.1}),
        ),
        claims=(
            Claim("orthogonal", "orthogonal_det1", rotation_of,
                  "H (measured on the implementation) is orthogonal with det +1 (an even number of reflections)"),
            Claim("norm", "norm_preserving", norm_pairs, "the input rotation preserves norms: ‖H x‖ = ‖x‖"),
        ),
        references=(
            Reference("paper (§3)", "https://arxiv.org/abs/2405.17484"),
            Reference("PEFT 0.21.2 hra layer", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/hra/layer.py"),
        ),
        deviations=(
            Deviation("reference_quantized", "on a bitsandbytes 8-bit layer PEFT's HRA multiplies the stored int8 "
                      "codes, unscaled, by H (it reads the packed storage as the weight): its output is wrong there "
                      "(a PEFT bug, harness/backends/peft.py 'quantized'); ours rotates the input of the layer's own forward",
                      source="peft/tuners/hra/layer.py:263 (orig_weight = self.get_base_layer().weight.data)",
                      match="bnb8", size=6.52e4,
                      case={"d_in": 8, "d_out": 6, "bias": True, "dtype": "float32", "seed": 1,
                            "fields": {"r": 2, "alpha": 2.0}}),
            Deviation("layout", "PEFT's HRA wraps only torch.nn.Linear and Conv2d: transformers' Conv1D is refused "
                      "at get_peft_model", backend="peft",
                      source="peft/tuners/hra/model.py:_create_new_module (v0.21.2, line 118)",
                      match="is not supported"),
            Deviation("model_oracle", "PEFT's HRA wraps only torch.nn.Linear and Conv2d: GPT-2's Conv1D projections "
                      "are refused at get_peft_model", backend="peft",
                      source="peft/tuners/hra/model.py:_create_new_module (v0.21.2, line 118)",
                      match="is not supported"),
            Deviation("unmerge_restores", "PEFT's HRA wraps only torch.nn.Linear and Conv2d: transformers' Conv1D "
                      "is refused at get_peft_model", backend="peft",
                      source="peft/tuners/hra/model.py:_create_new_module (v0.21.2, line 118)",
                      match="is not supported"),
        ),
        notes="Identity at init holds to rounding only (each pair of equal reflections cancels up to rounding), hence "
              "the 'tolerance' class. We floor ‖u_i‖² at 1e-12 (PEFT divides by ‖u_i‖ unguarded). r ≤ d_in is "
              "checked per layer (PEFT does not check it). We apply H to x in its compact WY form x − ((x Uᵀ) Tᵀ) U "
              "(2 r·d_in + r² per token, an r × r triangular solve per forward) where PEFT forms the dense "
              "d_in × d_in product and W H on every forward. The paper's orthogonality "
              "regulariser and PEFT's apply_GS mode are not implemented. alpha is unused.",
    )
)
