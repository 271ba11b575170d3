"""adapters 1.3.0: DoRA's forward normalises by ||W + B A|| without LoRA's scale, and rescales the bias.

DoRA (Liu et al. 2024, eq. 5): W' = m (W + s B A) / ||W + s B A||_c, y = W' x + b (PEFT: the bias passes through).
adapters computes `norm = compute_dora_norm(self.weight, last_lora.delta_w)` with `delta_w = lora_B @ lora_A`
(unscaled, adapters/methods/lora.py:966 and :135-136), and `compute_dora_deltaw(layer_output, ...)` multiplies the
whole layer output, bias included, by m / norm (lora.py:967, :479-480). Measured against the paper's formula with
s = alpha / r != 1 and a bias. Exits 1 while the bug is present.

    pip install adapters==1.3.0 torch
"""
import sys

import torch
import adapters
from transformers import LlamaConfig, LlamaModel

torch.manual_seed(0)
d_in, d_out, r, alpha = 8, 6, 2, 6
model = LlamaModel(LlamaConfig(hidden_size=d_in, num_attention_heads=1, num_key_value_heads=1, head_dim=d_out,
                               intermediate_size=4, num_hidden_layers=1, vocab_size=4, attention_bias=True))
adapters.init(model)
model.add_adapter("a", config=adapters.DoRAConfig(r=r, alpha=alpha, attn_matrices=["q"]))
model.train_adapter("a")
q = model.layers[0].self_attn.q_proj
dora = q.loras["a"]
with torch.no_grad():  # a trained adapter
    dora.lora_B.copy_(0.5 * torch.randn_like(dora.lora_B))
    dora.m.weight.mul_(1.3)
x = torch.randn(2, 3, d_in)
with torch.no_grad(), adapters.ForwardContext(model, x):
    y = q(x)
    s = alpha / r
    V = q.weight + s * dora.lora_B @ dora.lora_A
    W1 = dora.m.weight.view(-1, 1) * V / V.norm(dim=1, keepdim=True)
    y_paper = x @ W1.T + q.bias
err = (y - y_paper).abs().max().item()
print(f"DoRA r={r}, alpha={alpha} (s={s:g}), with bias: max |y_adapters - y_paper| = {err:.3g} "
      f"(|y| ~ {y_paper.abs().max().item():.3g})")
bug = err > 1e-4
print("BUG: adapters' DoRA output differs from the paper's formula" if bug else "ok")
sys.exit(1 if bug else 0)
