"""PEFT 0.21.2: on a bfloat16 or float16 model, get_peft_model makes AdaLoRA's frozen `ranknum` a trainable Parameter,
so training moves it (PEFT 0.9.0-0.20.0 keep it frozen).

    pip install torch peft==0.21.2 && python peft_0.21_adalora_ranknum_trains.py

AdaLoRA keeps the current rank in `ranknum`, an nn.Parameter with requires_grad=False in an nn.ParameterDict
(peft/tuners/adalora/layer.py:82-84 at 0.21.2), and scales its delta by scaling / (ranknum + 1e-5). On a bf16 model
ranknum follows the base layer's dtype; cast_adapter_dtype then upcasts it. 0.20.0 wrote the upcast into the
Parameter's data (`submodule[adapter_name].data = ...`, peft/tuners/tuners_utils.py:2278), keeping the Parameter and
its flag. 0.21.2 reassigns it (`submodule[adapter_name] = submodule[adapter_name].to(torch.float32)`,
peft/tuners/tuners_utils.py:2745); Parameter.to returns a plain tensor and nn.ParameterDict.__setitem__ wraps a
plain tensor in nn.Parameter(value), whose requires_grad defaults to True. ranknum then gets a gradient, counts as
a trainable parameter and is moved by the optimizer, changing the adapter's scale. Exits 1 while the bug is present.
"""
import sys

import torch
import torch.nn as nn
from peft import AdaLoraConfig, get_peft_model

failed = False
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(dtype)
    pm = get_peft_model(model, AdaLoraConfig(init_r=2, target_r=2, lora_alpha=2, total_step=10, target_modules=["0"]))
    ranknum = pm.base_model.model[0].ranknum["default"]
    before = ranknum.detach().clone()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        pm.base_model.model[0].lora_B["default"].normal_()  # a trained adapter: the delta depends on ranknum
    pm(torch.randn(2, 4, dtype=dtype)).float().square().sum().backward()
    opt.step()
    moved = not torch.equal(ranknum.detach(), before)
    print(f"{dtype}: ranknum requires_grad={ranknum.requires_grad}, {before.item():g} -> {ranknum.item():g} "
          f"after one step")
    failed |= ranknum.requires_grad or moved
if failed:
    print("BUG: AdaLoRA's frozen ranknum is trainable and moves in training")
    sys.exit(1)
print("ok: ranknum stays frozen")
