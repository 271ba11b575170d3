"""torchtune 0.6.1: in a bf16 model, LoRALinear's adapter is bf16 too, and one AdamW step does not move lora_b.

The recipe builds the model under its dtype (training.set_default_dtype, bf16 in its shipped configs).
    pip install torch torchtune==0.6.1 torchao==0.16.0 (torchtune with --no-deps) && python torchtune_bf16_adapter_does_not_train.py

LoRALinear creates lora_a / lora_b as nn.Linear under the default dtype (torchtune/modules/peft/lora.py:82-83); the
LoRA recipe builds the whole model under the model's dtype (bf16 in its shipped configs). AdamW's first step
changes each entry by about lr (1e-3 here), below bf16's spacing (2**-7) at entries of size 1: lora_b stays
bit-identical although its gradient is non-zero. (PEFT keeps adapter weights in float32 by default.) Exits 1 while
the bug is present, 0 once lora_b moves.
"""
import sys

import torch
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

torch.manual_seed(0)
old = torch.get_default_dtype()
torch.set_default_dtype(torch.bfloat16)  # what torchtune.training.set_default_dtype(bf16) does around the build
try:
    layer = LoRALinear(16, 8, rank=4, alpha=8.0)
finally:
    torch.set_default_dtype(old)
set_trainable_params(layer, get_adapter_params(layer))
with torch.no_grad():  # a trained adapter: lora_b away from its zero init, entries of size about 1
    layer.lora_b.weight.copy_(1 + 0.5 * torch.rand(8, 4))
print(f"adapter dtypes: lora_a {layer.lora_a.weight.dtype}, lora_b {layer.lora_b.weight.dtype}")
before = layer.lora_b.weight.detach().clone()
opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
x = torch.randn(32, 16).to(torch.bfloat16)
layer(x).float().square().mean().backward()
grad = layer.lora_b.weight.grad.float().abs().max().item()
opt.step()
moved = (layer.lora_b.weight != before).sum().item()
print(f"max |grad lora_b| = {grad:.3g}; entries of lora_b changed by one AdamW step (lr 1e-3): {moved} of "
      f"{before.numel()}")
if grad > 0 and moved == 0:
    print("BUG: lora_b has a gradient but did not move: the bf16 adapter cannot take the step")
    sys.exit(1)
print("ok: lora_b moved")
