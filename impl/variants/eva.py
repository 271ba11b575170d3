r"""EVA: explained variance adaptation (Paischer et al., 2024), a LoRA whose A is data-driven.

    y' = W x + b + s · B A drop(x),    s = alpha / r   (rsLoRA: alpha / sqrt(r))

Init, per target, from its calibration inputs X (N, d_in) (padding already dropped by the runtime):
    X_c = X − mean(X)                       (the mean over the N tokens)
    A   = the top-r right singular vectors of X_c, one unit row each (the top-r principal directions),
          each row's sign chosen so that its entry of largest |value| is positive (PEFT's svd_flip on V)
    B   = 0
so the layer is bitwise the base layer at init, A is trainable and B gets the gradient first. The principal
directions are the top eigenvectors of the centred Gram matrix X_cᵀ X_c (d_in × d_in, float64), which keeps
the memory at O(d_in²) however many calibration tokens there are.

Declared differences from PEFT: uniform rank r per layer (PEFT's rho > 1 redistributes ranks by explained
variance; rho = 1 is ours); one exact eigen-decomposition instead of PEFT's incremental randomised PCA run
until the components converge; no sharing of the PCA between layers with identical inputs; no whitening.
Calibration data is required at attach (the runtime raises without it, or with fewer tokens than r);
`load` restores A from the checkpoint and never needs data. The base weight is never read, so EVA works on
bitsandbytes layers. Dropout acts on the adapter input only. Merge: W' = W + s · B A.

References:
- paper: https://arxiv.org/abs/2410.07170 (§3: A from the right singular vectors of the activations)
- canonical code: https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/eva.py
  and the sign rule in https://github.com/huggingface/peft/blob/v0.21.2/src/peft/utils/incremental_pca.py
"""
from __future__ import annotations

import torch

from ..registry import TensorDecl, register
from .lora import LoRA


def principal_directions(X: torch.Tensor, r: int) -> torch.Tensor:
    """The top-r principal directions (r, d) of the rows of X (N, d): the top eigenvectors of the centred
    Gram matrix X_cᵀ X_c, in decreasing order of explained variance, computed in float64."""
    X = X.double()
    Xc = X - X.mean(dim=0, keepdim=True)
    _, vecs = torch.linalg.eigh(Xc.T @ Xc)  # ascending eigenvalues
    return vecs[:, -r:].flip(-1).T.contiguous()


def sign_normalise(V: torch.Tensor) -> torch.Tensor:
    """Flip each row of V so that its entry of largest |value| is positive (PEFT's svd_flip on V)."""
    idx = V.abs().argmax(dim=1, keepdim=True)
    signs = torch.where(V.gather(1, idx) < 0, -1.0, 1.0).to(V.dtype)
    return V * signs


@register
class EVA(LoRA):
    name = "eva"
    data = "required"

    def tensors(self, d_in, d_out, cfg):
        return {"A": TensorDecl((cfg.r, d_in), "empty"), "B": TensorDecl((d_out, cfg.r), "zeros")}

    def group_init(self, adapters, acts, cfg):
        for name, ad in adapters.items():
            A = sign_normalise(principal_directions(acts[name], cfg.r))
            ad.A.copy_(A.to(ad.A.dtype))
        return {}
