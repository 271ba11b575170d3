"""loralib 0.1.2: in a bf16 model, lora.Linear's adapter is bf16 too, and one AdamW step does not move lora_B.

    pip install torch loralib==0.1.2 && python loralib_bf16_adapter_does_not_train.py

lora.Linear creates its adapter with `self.weight.new_zeros(...)` (loralib/layers.py:110-111), so a bf16 base
layer gets bf16 lora_A / lora_B. AdamW's first step changes each entry by about lr (1e-3 here), below bf16's
spacing (2**-7 = 0.0078) at entries of size 1: lora_B stays bit-identical although its gradient is non-zero.
(PEFT keeps adapter weights in float32 by default, `autocast_adapter_dtype=True`.) Exits 1 while the bug is
present, 0 once lora_B moves.
"""
import sys

import loralib as lora
import torch

torch.manual_seed(0)
layer = lora.Linear(16, 8, r=4, lora_alpha=8, dtype=torch.bfloat16)  # a layer of a bf16 model
lora.mark_only_lora_as_trainable(layer)
with torch.no_grad():  # a trained adapter: B away from its zero init, entries of size about 1
    layer.lora_B.copy_(1 + 0.5 * torch.rand_like(layer.lora_B, dtype=torch.float32).to(torch.bfloat16))
print(f"adapter dtypes: lora_A {layer.lora_A.dtype}, lora_B {layer.lora_B.dtype} (base weight {layer.weight.dtype})")
before = layer.lora_B.detach().clone()
opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
x = torch.randn(32, 16).to(torch.bfloat16)
layer(x).float().square().mean().backward()
grad = layer.lora_B.grad.float().abs().max().item()
opt.step()
moved = (layer.lora_B != before).sum().item()
print(f"max |grad lora_B| = {grad:.3g}; entries of lora_B changed by one AdamW step (lr 1e-3): {moved} of "
      f"{before.numel()}")
if grad > 0 and moved == 0:
    print("BUG: lora_B has a gradient but did not move: the bf16 adapter cannot take the step")
    sys.exit(1)
print("ok: lora_B moved")
