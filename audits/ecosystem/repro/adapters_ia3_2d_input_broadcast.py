"""adapters 1.3.0: an IA3 layer given a 2-D input (tokens, features) returns a (tokens, tokens, features) tensor.

IA3.forward builds its scaling vector for a 3-D input, `self.lora_B.view(1, 1, -1).repeat(layer_input.shape[0],
1, 1)` (adapters/methods/lora.py:300), and `com` multiplies the layer output by it, `weights * (added * scaling)`
(lora.py:293). On a 2-D input of N rows the (N, d_out) output broadcasts against the (N, 1, d_out) vector into
(N, N, d_out), silently: no error, and every row of the base output appears N times. LoRA in the same LoRALinear
returns (N, d_out) for the same input. Exits 1 while the bug is present.

    pip install adapters==1.3.0 torch
"""
import sys

import torch
import adapters
from transformers import LlamaConfig, LlamaModel

torch.manual_seed(0)
model = LlamaModel(LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, head_dim=6,
                               intermediate_size=4, num_hidden_layers=1, vocab_size=4))
x = torch.randn(3, 8)  # 2-D: 3 tokens, no batch axis (e.g. hidden_states[:, 0], or flattened tokens)
k = model.layers[0].self_attn.k_proj
with torch.no_grad():
    y0 = k(x)
adapters.init(model)
shapes = {}
for name, config in (("lora", adapters.LoRAConfig()), ("ia3", adapters.IA3Config())):
    model.add_adapter(name, config=config)
    model.set_active_adapters(name)
    with torch.no_grad(), adapters.ForwardContext(model, x):
        shapes[name] = tuple(model.layers[0].self_attn.k_proj(x).shape)
print(f"input {tuple(x.shape)}: base k_proj output {tuple(y0.shape)}, with LoRA {shapes['lora']}, with IA3 {shapes['ia3']}")
bad = shapes["ia3"] != tuple(y0.shape)
print("BUG: IA3 broadcasts a 2-D input's output to (N, N, d_out)" if bad else "ok")
sys.exit(1 if bad else 0)
