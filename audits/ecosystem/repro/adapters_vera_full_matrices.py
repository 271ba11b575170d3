"""adapters 1.3.0: VeRA trains full (r x r) and (d_out x d_out) matrices instead of the paper's scaling vectors.

VeRA (Kopiczko et al. 2024, eq. 1) trains two vectors per layer: Λ_d = diag(d), d in R^r and Λ_b = diag(b),
b in R^d_out. adapters stores them as dense Parameters, `self.vera_D = nn.Parameter(torch.diag(torch.ones(self.d_shape)
* self.d))` and `self.vera_B = nn.Parameter(torch.diag(torch.ones(self.b_shape) * self.b))`
(adapters/methods/lora.py:354-355), and uses them as matrices (`self.vera_B @ lora_B @ self.vera_D @ lora_A`, lora.py:373):
every off-diagonal entry is trainable and gets a gradient, so the adapter has r² + d_out² trainables instead of r + d_out
and after training is no longer VeRA. Exits 1 while the bug is present.

    pip install adapters==1.3.0 torch
"""
import sys

import torch
import adapters
from transformers import LlamaConfig, LlamaModel

r, d_in, d_out = 4, 8, 6
torch.manual_seed(0)
model = LlamaModel(LlamaConfig(hidden_size=d_in, num_attention_heads=1, num_key_value_heads=1, head_dim=d_out,
                               intermediate_size=4, num_hidden_layers=1, vocab_size=4))
adapters.init(model)
model.add_adapter("a", config=adapters.VeraConfig(r=r, attn_matrices=["q"]))
model.train_adapter("a")
vera = model.layers[0].self_attn.q_proj.loras["a"]
with torch.no_grad():
    vera.vera_B.copy_(torch.diag(torch.randn(d_out)))  # a trained b: the delta is live
trainable = {n: p for n, p in vera.named_parameters() if p.requires_grad}
count = sum(p.numel() for p in trainable.values())
model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state.sum().backward()
off = {n: float((p.grad - torch.diag(torch.diagonal(p.grad))).abs().max()) for n, p in trainable.items()}
print(f"trainable tensors {sorted(trainable)}: {count} entries; the paper's VeRA has r + d_out = {r + d_out}")
print("largest off-diagonal gradient per tensor:", {n: f"{v:.3g}" for n, v in off.items()})
bug = count != r + d_out or any(v > 0 for v in off.values())
print("BUG: VeRA's scaling vectors are trained as full matrices" if bug else "ok: diagonal scalings only")
sys.exit(1 if bug else 0)
