"""PEFT 0.9.0-0.21.2: LoraModel.add_weighted_adapter on adapters with use_rslora=True makes an adapter sqrt(r) too
strong (not fixed in any release up to 0.21.2; fix proposed upstream in huggingface/peft PR #3449).

    pip install torch peft && python peft_add_weighted_adapter_rslora.py

add_weighted_adapter folds each source adapter's own scaling into the new A and B (linear: sqrt(w * scaling) on
each, peft/tuners/lora/model.py:1030-1034 at 0.21.2) and gives the new adapter r = lora_alpha = new_rank so that its
own scaling is 1 (model.py:863-870 at 0.21.2; model.py:479-484 at 0.9.0). The config is copied from the first
source adapter with dataclasses.replace, which keeps use_rslora=True, so update_layer scales the new adapter by
lora_alpha / sqrt(r) = sqrt(new_rank) (tuners/lora/layer.py:278-279 at 0.21.2), not 1. A single adapter with weight
1.0 (PEFT forces combination_type="linear" for one adapter, model.py:740) must give that adapter back; it does
without rsLoRA and is off by sqrt(r) with it. Exits 1 while the bug is present.
"""
import sys

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

failed = False
for rslora in (False, True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["0"], use_rslora=rslora,
                                          init_lora_weights=False))  # B non-zero: a trained adapter
    x = torch.randn(5, 8)
    with torch.no_grad():
        base = pm.base_model.model[0].base_layer(x)
        y = pm(x)
        pm.add_weighted_adapter(["default"], [1.0], "combined")
        pm.set_adapter("combined")
        y_combined = pm(x)
    ratio = ((y_combined - base).norm() / (y - base).norm()).item()
    print(f"use_rslora={rslora}: |delta(combined)| / |delta(default)| = {ratio:.4f} (expected 1)")
    failed |= abs(ratio - 1) > 1e-4
if failed:
    print("BUG: add_weighted_adapter(['default'], [1.0]) is not 'default' under use_rslora=True (off by sqrt(r))")
    sys.exit(1)
print("ok: a single adapter with weight 1 is reproduced")
