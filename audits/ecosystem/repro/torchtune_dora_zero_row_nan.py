"""torchtune 0.6.1: DoRALinear on a base weight with a zero row gives NaN outputs (the norm has no floor).

    pip install torch torchtune==0.6.1 torchao==0.16.0 (torchtune with --no-deps) && python torchtune_dora_zero_row_nan.py

A zero output row of W is legal (a pruned unit). At init B = 0, so ||W + sBA|| is 0 on that row, and
initialize_dora_magnitude sets m = 0 there (torchtune/modules/peft/dora.py:136-138); forward divides
magnitude / weight_norm (dora.py:183-185) with no floor: 0/0 = NaN, for every input. The layer should equal the
base layer at init. Exits 1 while the output is not finite.
"""
import sys

import torch
from torchtune.modules.peft import DoRALinear

torch.manual_seed(0)
layer = DoRALinear(4, 3, rank=2, alpha=4.0)
W = torch.randn(3, 4)
W[1] = 0.0  # one pruned output unit
layer.load_state_dict({"weight": W}, strict=False)
layer.initialize_dora_magnitude()
x = torch.randn(2, 4)
with torch.no_grad():
    y = layer(x)
print(f"magnitude after init: {layer.magnitude.tolist()}")
print(f"output: {y.tolist()}")
print(f"base output: {(x @ W.T).tolist()}")
if not torch.isfinite(y).all():
    print("BUG: DoRALinear's output is not finite for a base weight with a zero row")
    sys.exit(1)
print("ok: finite output")
