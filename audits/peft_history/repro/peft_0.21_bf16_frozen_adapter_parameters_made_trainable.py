"""PEFT 0.21.2: on a bfloat16 or float16 model, get_peft_model makes frozen adapter Parameters held in an
nn.ParameterDict trainable: AdaLoRA's `ranknum`, which training then moves, and every LoHa / LoKr tensor of an
adapter created with inference_mode=True (PEFT 0.9.0-0.20.0 keep them frozen).

    pip install torch peft==0.21.2 && python peft_0.21_bf16_frozen_adapter_parameters_made_trainable.py

AdaLoRA keeps the current rank in `ranknum`, an nn.Parameter with requires_grad=False in an nn.ParameterDict
(peft/tuners/adalora/layer.py:82-84 at 0.21.2), and scales its delta by scaling / (ranknum + 1e-5). On a bf16 model
ranknum follows the base layer's dtype; cast_adapter_dtype then upcasts it. 0.20.0 wrote the upcast into the
Parameter's data (`submodule[adapter_name].data = ...`, peft/tuners/tuners_utils.py:2278), keeping the Parameter and
its flag. 0.21.2 reassigns it (`submodule[adapter_name] = submodule[adapter_name].to(torch.float32)`,
peft/tuners/tuners_utils.py:2745); Parameter.to returns a plain tensor and nn.ParameterDict.__setitem__ wraps a
plain tensor in nn.Parameter(value), whose requires_grad defaults to True. ranknum then gets a gradient, counts as
a trainable parameter and is moved by the optimizer, changing the adapter's scale. The same line unfreezes the
ParameterDict tensors of LoHa and LoKr adapters made with inference_mode=True (LoRA's are in nn.Linear modules and
stay frozen). Exits 1 while the bug is present.
"""
import sys

import torch
import torch.nn as nn
from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, get_peft_model

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
for name, config in (("LoHa", LoHaConfig), ("LoKr", LoKrConfig)):
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    pm = get_peft_model(model, config(r=2, target_modules=["0"], inference_mode=True))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    print(f"{name}, inference_mode=True, bfloat16: trainable parameters {trainable}")
    failed |= bool(trainable)
if failed:
    print("BUG: frozen adapter parameters of a bfloat16 model are trainable")
    sys.exit(1)
print("ok: frozen adapter parameters stay frozen")
