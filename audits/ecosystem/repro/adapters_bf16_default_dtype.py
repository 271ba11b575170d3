"""adapters 1.3.0: a LoRA added with the default config to a bf16 model crashes in the forward pass.

LoRA's tensors are created with `dtype = getattr(torch, config.dtype) if config.dtype else None`
(adapters/methods/lora.py:95), i.e. float32 when LoRAConfig.dtype is left at its default None, and the forward
multiplies the bf16 input by them without a cast (lora.py:162-165). Exits 1 while the bug is present.

    pip install adapters==1.3.0 torch
"""
import sys

import torch
import adapters
from transformers import LlamaConfig, LlamaModel

model = LlamaModel(LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, head_dim=6,
                               intermediate_size=4, num_hidden_layers=1, vocab_size=4)).to(torch.bfloat16)
adapters.init(model)
model.add_adapter("a", config=adapters.LoRAConfig(r=2, alpha=4))
model.train_adapter("a")
q = model.layers[0].self_attn.q_proj
print("base weight", q.weight.dtype, "| lora_A", q.loras["a"].lora_A.dtype)
try:
    model(input_ids=torch.tensor([[1, 2, 3]]))
except RuntimeError as e:
    print(f"BUG: forward of a bf16 model with a default LoRAConfig raises: {e}")
    sys.exit(1)
print("ok: the forward runs")
