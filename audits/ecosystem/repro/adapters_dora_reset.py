"""adapters 1.3.0: reset_adapter() after merge_adapter() does not restore the base weight for DoRA.

adapters/methods/lora.py:883-893 (LoRALinear.reset_adapter, DoRA branch) computes the un-merged weight into a local
`delta_w = compute_dora_add_com_inv(...)` and never writes it back to `self.weight.data`, so the merged DoRA
weight stays in place. Plain LoRA restores it. Exits 1 while the bug is present.

    pip install adapters==1.3.0 torch   (adapters pulls transformers 4.57)
"""
import sys

import torch
import adapters
from transformers import LlamaConfig, LlamaModel


def run(config) -> float:
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, head_dim=6,
                                   intermediate_size=4, num_hidden_layers=1, vocab_size=4))
    adapters.init(model)
    model.add_adapter("a", config=config)
    model.train_adapter("a")
    q = model.layers[0].self_attn.q_proj
    with torch.no_grad():  # a trained adapter: move B (and the magnitude) off their init
        for p in q.loras["a"].parameters():
            p.add_(0.3 * torch.randn_like(p))
    w0 = q.weight.detach().clone()
    model.merge_adapter("a")
    moved = (q.weight - w0).abs().max().item()
    model.reset_adapter()
    err = (q.weight - w0).abs().max().item()
    print(f"{type(config).__name__}: merge moved the weight by {moved:.3g}; after reset_adapter |W - W0|max = {err:.3g}")
    return err


lora = run(adapters.LoRAConfig(r=2, alpha=4, attn_matrices=["q"]))
dora = run(adapters.DoRAConfig(r=2, alpha=4, attn_matrices=["q"]))
bug = dora > 1e-5 and lora <= 1e-5
print("BUG: DoRA's reset_adapter leaves the merged weight in place" if bug else "ok: reset_adapter restores the weight")
sys.exit(1 if bug else 0)
