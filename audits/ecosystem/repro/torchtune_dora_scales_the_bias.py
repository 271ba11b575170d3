"""torchtune 0.6.1: DoRALinear scales the base layer's bias by the magnitude ratio m/||W + sBA||.

    pip install torch torchtune==0.6.1 torchao==0.16.0 (torchtune with --no-deps) && python torchtune_dora_scales_the_bias.py

DoRA (Liu et al. 2024, eq. 5) rescales the weight's columns: y = m/||W + sBA|| * (W + sBA) x + b; the bias is not
part of the decomposed weight. DoRALinear.forward computes base_out = F.linear(x, W, b) with the bias inside and
returns (m/n - 1) * base_out + m/n * s * lora_out + base_out (torchtune/modules/peft/dora.py:168 and 187-191), so
the bias comes out multiplied by m/n. Its own merge, get_merged_lora_ckpt (torchtune/modules/peft/_utils.py:187-195),
rescales the weight only: the merged layer's output differs from the adapted layer's. Exits 1 while the bug is
present.
"""
import sys

import torch
import torch.nn.functional as F
from torchtune.modules.peft import DoRALinear, get_merged_lora_ckpt

torch.manual_seed(0)
d_in, d_out, rank, alpha = 6, 4, 2, 4.0
layer = DoRALinear(d_in, d_out, rank=rank, alpha=alpha, use_bias=True).double()
W, b = torch.randn(d_out, d_in, dtype=torch.float64), torch.randn(d_out, dtype=torch.float64)
layer.load_state_dict({"weight": W, "bias": b}, strict=False)  # the recipe's order: base weights,
layer.initialize_dora_magnitude()                               # then the magnitude
with torch.no_grad():  # a trained adapter: B and m away from their init
    layer.lora_b.weight.copy_(torch.randn(d_out, rank, dtype=torch.float64))
    layer.magnitude.mul_(1.5)
s = alpha / rank
A, B, m = layer.lora_a.weight, layer.lora_b.weight, layer.magnitude
V = W + s * B @ A
x = torch.randn(3, d_in, dtype=torch.float64)
with torch.no_grad():
    y = layer(x)
    y_dora = x @ (m / V.norm(dim=1)).unsqueeze(1).mul(V).T + b  # DoRA: the bias is added, not rescaled
    merged = get_merged_lora_ckpt({f"l.{k}": v.clone() for k, v in layer.state_dict().items()}, rank=rank, alpha=alpha)
    y_merged = F.linear(x, merged["l.weight"], merged["l.bias"])
err_forward = (y - y_dora).abs().max().item()
err_merge = (y_merged - y).abs().max().item()
ratio = (m / V.norm(dim=1)).detach()
print(f"m/||W + sBA|| per output: {[round(v, 4) for v in ratio.tolist()]}")
print(f"max |DoRALinear(x) - ((m/n)(W + sBA) x + b)| = {err_forward:.3g}")
print(f"max |DoRALinear(x) - (m/n)(W + sBA) x - (m/n) b| = {(y - (y_dora - b + ratio * b)).abs().max().item():.3g}")
print(f"max |merged layer(x) - DoRALinear(x)| = {err_merge:.3g}")
if err_forward > 1e-9:
    print("BUG: DoRALinear multiplies the bias by m/||W + sBA||; its merged checkpoint does not")
    sys.exit(1)
print("ok: the bias is added unscaled")
