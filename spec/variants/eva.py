"""Spec of EVA, explained variance adaptation (Paischer et al. 2024): LoRA with A from the calibration data."""

import torch
from hypothesis import strategies as st

from ..schema import Constraint, Deviation, Reference, Spec, TensorSpec, register
from .lora import oracle  # EVA changes only the init: its forward is LoRA's, y = W x + b + s B A x_d


def init_oracle(W, cfg, X):
    """A = the top-r right singular vectors of the mean-centred calibration tokens X (N, d_in), each row signed
    so that its entry of largest |value| is positive (sklearn's / PEFT's svd_flip on V); B = 0."""
    Xc = X - X.mean(dim=0, keepdim=True)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    A = Vh[: cfg.r]
    pivot = A.gather(1, A.abs().argmax(dim=1, keepdim=True))
    A = A * torch.sign(pivot)
    return {"A": A, "B": torch.zeros(W.shape[0], cfg.r, dtype=W.dtype)}


SPEC = register(
    Spec(
        name="eva",
        title="EVA: explained variance adaptation",
        equation=r"y = W x + b + s\,B A\,\mathrm{drop}(x),\quad A = V_{:r}^\top \text{ of } "
                 r"X - \bar{X} = U \Sigma V^\top,\quad B = 0",
        tensors=(
            TensorSpec("A", "(r, d_in)", "top-r right singular vectors of the centred calibration inputs",
                       zero_grad_at_init="B = 0, so dL/dA = s Bᵀ (dL/dy) xᵀ = 0"),
            TensorSpec("B", "(d_out, r)", "zeros"),
        ),
        param_count="r * (d_in + d_out)",
        macs="r * (d_in + d_out) + ew(d_out)",  # LoRA's forward: x Aᵀ, then Bᵀ; the scale s
        macs_per_forward="0",
        oracle=oracle,
        init_oracle=init_oracle,
        identity="bitwise",
        data="required",
        constraints=(
            Constraint("r is a positive integer", {"r": 0}),
            Constraint("alpha >= 0", {"alpha": -1.0}),
            Constraint("dropout in [0, 1)", {"dropout": 1.0}),
        ),
        references=(
            Reference("paper (§3)", "https://arxiv.org/abs/2410.07170"),
            Reference("PEFT 0.21.2 eva", "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/eva.py"),
            Reference("PEFT 0.21.2 incremental PCA (sign rule)",
                      "https://github.com/huggingface/peft/blob/v0.21.2/src/peft/utils/incremental_pca.py"),
        ),
        deviations=(
            Deviation("init_formula", "PEFT's EVA runs an incremental PCA with a randomised low-rank SVD "
                      "(svd_lowrank, seed 42) until the first r components converge (cosine >= tau): only components "
                      "separated by a clear spectral gap equal the exact centred PCA; the tail differs",
                      backend="peft", source="peft/tuners/lora/eva.py:138-143 (IncrementalPCA(lowrank=True, "
                      "lowrank_seed=42)) and eva.py:165-171 (convergence test)", match="init of 'A' differs"),
            Deviation("data_path", "PEFT's EVA is a two-step API: get_peft_model(init_lora_weights='eva') zeroes B "
                      "and leaves A at nn.Linear's init; the data pass is a separate call "
                      "(initialize_lora_eva_weights) that nothing enforces", backend="peft",
                      source="peft/tuners/lora/layer.py:303-304; documented at tuners/lora/config.py:496-498",
                      match="attach with missing data did not raise"),
        ),
        notes="Uniform rank r on every layer: PEFT's default rho = 2 redistributes ranks between layers by "
              "explained variance (and un-wraps layers that get rank 0); that is not implemented (rho = 1). "
              "PEFT runs an incremental randomised PCA until the components converge (cosine >= tau); we take "
              "one exact float64 eigen-decomposition of the centred Gram matrix of all calibration tokens, so "
              "the components agree with PEFT's converged ones only up to its tolerance. No whitening, no "
              "sharing of the PCA between layers with identical inputs. Padding (attention_mask == 0) and "
              "tokens labelled -100 are dropped, as PEFT's default LM input preparation does (use_label_mask). rslora is drawn by the property engine.",
        fields=lambda draw, d_in, d_out: {"rslora": draw(st.booleans(), label="rslora")},
    )
)
