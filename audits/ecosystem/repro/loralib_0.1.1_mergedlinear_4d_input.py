"""loralib 0.1.1: lora.MergedLinear's unmerged forward fails on an input with more than one batch axis (fixed in 0.1.2).

    pip install torch loralib==0.1.1 && python loralib_0.1.1_mergedlinear_4d_input.py

nn.Linear, which MergedLinear subclasses, takes any (..., in_features) input, and the layer's docstring names no
limit. The LoRA branch of the 0.1.1 forward passes `after_A.transpose(-2, -1)` to F.conv1d (loralib/layers.py:255),
which takes a 2-D or 3-D input only, so a (batch, heads, tokens, in_features) input raises a RuntimeError while
the layer is unmerged (train mode). Exits 1 while the bug is present.
"""
import sys

import loralib as lora
import torch

torch.manual_seed(0)
layer = lora.MergedLinear(6, 4, r=2, lora_alpha=4, enable_lora=[True])
with torch.no_grad():
    layer.lora_B.normal_()  # a trained adapter (lora_B starts at zero)
layer.train()
failed = False
for shape in ((5, 6), (3, 5, 6), (2, 3, 5, 6)):
    x = torch.randn(*shape)
    try:
        with torch.no_grad():
            y = layer(x)
            y_ref = x @ layer.weight.T + layer.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
        diff = (y - y_ref).abs().max().item()
        print(f"input {tuple(shape)}: output {tuple(y.shape)}, max |output - (W x + b + s B A x)| = {diff:.3g}")
        failed |= diff > 1e-5
    except RuntimeError as e:
        print(f"input {tuple(shape)}: RuntimeError: {str(e).splitlines()[0]}")
        failed = True
if failed:
    print("BUG: lora.MergedLinear's forward does not take every (..., in_features) input nn.Linear takes")
    sys.exit(1)
print("ok: every input shape gives W x + b + s B A x")
