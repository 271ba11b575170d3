"""adapters 1.3.0: save_adapter on a base model (LlamaModel, AutoModel) leaves out VeRA's shared A and B.

VeRA (Kopiczko et al. 2024) keeps one pair of frozen random matrices A, B shared by the adapted layers; only the
vectors d, b train. adapters keeps them in `model.base_model.shared_parameters[name]`, and save_adapter keeps the
weights whose names pass `".shared_parameters.{}.".format(adapter_name) in x` (adapters/loading.py:392). On a
model without a head the base model is the model itself, its key is `shared_parameters.<name>.lora_A` (no leading
dot), so A and B are not written; load_adapter then draws new ones and the loaded model computes something else.
Exits 1 while the bug is present.

    pip install adapters==1.3.0 torch
"""
import sys
import tempfile

import torch
import adapters
from transformers import LlamaConfig, LlamaModel


def model():
    m = LlamaModel(LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, head_dim=6,
                               intermediate_size=4, num_hidden_layers=1, vocab_size=4))
    adapters.init(m)
    return m


torch.manual_seed(0)
m1 = model()
m1.add_adapter("v", config=adapters.VeraConfig(attn_matrices=["q"], intermediate_lora=False, output_lora=False))
m1.set_active_adapters("v")
with torch.no_grad():  # a trained adapter: b starts at zero (the adapted model starts at the base), so move it
    m1.layers[0].self_attn.q_proj.loras["v"].vera_B.normal_()
m2 = model()
m2.load_state_dict(m1.state_dict(), strict=False)  # the same base weights
ids = torch.tensor([[0, 1, 2, 3]])
with tempfile.TemporaryDirectory() as d:
    m1.save_adapter(d, "v")
    m2.load_adapter(d, load_as="v", set_active=True)
with torch.no_grad():
    y1, y2 = m1(ids).last_hidden_state, m2(ids).last_hidden_state
shared = m1.base_model.shared_parameters["v"]
same = {k: torch.equal(shared[k], m2.base_model.shared_parameters["v"][k]) for k in ("lora_A", "lora_B")}
err = (y1 - y2).abs().max().item()
print(f"VeRA saved and loaded on a LlamaModel: shared A, B equal after load {same}; max |y_saved - y_loaded| = {err:.3g}")
print("BUG: the shared VeRA matrices are not saved, the loaded model differs" if err > 0 else "ok")
sys.exit(1 if err > 0 else 0)
