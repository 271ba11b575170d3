"""adapters 1.3.0: IA3 with alpha != 1 does not start at the base model.

(IA)^3 (Liu et al. 2022, §3.3) initialises its gate l to ones so that the adapted model equals the base model at
init. adapters multiplies the gate by the config's alpha (`self.scaling = self.lora_alpha`,
adapters/methods/lora.py:264; `return weights * (added * scaling)`, lora.py:293), so IA3Config(alpha=a) starts at
a times the adapted projection's output. Exits 1 while the bug is present.

    pip install adapters==1.3.0 torch
"""
import sys

import torch
import adapters
from transformers import LlamaConfig, LlamaModel

torch.manual_seed(0)
model = LlamaModel(LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, head_dim=6,
                               intermediate_size=4, num_hidden_layers=1, vocab_size=4))
x = torch.randn(1, 3, 8)
k = model.layers[0].self_attn.k_proj
with torch.no_grad():
    y0 = k(x)
adapters.init(model)
model.add_adapter("a", config=adapters.IA3Config(alpha=2))
model.set_active_adapters("a")
with torch.no_grad(), adapters.ForwardContext(model, x):
    y = model.layers[0].self_attn.k_proj(x)
err = (y - y0).abs().max().item()
print(f"IA3Config(alpha=2) at init: max |y - y_base| on k_proj = {err:.3g} (ratio {float((y / y0).median()):.3g})")
print("BUG: the IA3 gate is scaled by alpha, the adapted model does not start at the base" if err > 0 else "ok")
sys.exit(1 if err > 0 else 0)
