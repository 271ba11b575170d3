"""loralib 0.1.1: lora.MergedLinear's merge (eval()) pads the (out, in) delta as if it were an activation (fixed in 0.1.2).

    pip install torch loralib==0.1.1 && python loralib_0.1.1_mergedlinear_merge_zero_pad.py

merge_AB builds the delta weight (out_enabled, in_features) and passes it to zero_pad, which in 0.1.1 reshapes its
input to (-1, out_features) and scatters along the last axis (loralib/layers.py:209-214): the layout of an
activation (..., out), not of a weight (out, in). eval() then raises a RuntimeError whenever in_features !=
out_features (a square layer happens to merge right). Exits 1 while the bug is present.
"""
import sys

import loralib as lora
import torch

torch.manual_seed(0)
failed = False
for d_in, d_out in ((5, 3), (4, 4)):
    layer = lora.MergedLinear(d_in, d_out, r=2, lora_alpha=4, enable_lora=[True])
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained adapter (lora_B starts at zero)
    x = torch.randn(2, d_in)
    layer.train()
    with torch.no_grad():
        y_train = layer(x)
        y_ref = x @ layer.weight.T + layer.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    print(f"MergedLinear({d_in}, {d_out}): max |train output - (W x + b + s B A x)| = "
          f"{(y_train - y_ref).abs().max().item():.3g}")
    try:
        layer.eval()  # merges (merge_weights=True)
        with torch.no_grad():
            y_eval = layer(x)
        diff = (y_eval - y_ref).abs().max().item()
        print(f"MergedLinear({d_in}, {d_out}): max |eval (merged) output - (W x + b + s B A x)| = {diff:.3g}")
        failed |= diff > 1e-5
    except RuntimeError as e:
        print(f"MergedLinear({d_in}, {d_out}): eval() raises RuntimeError: {e}")
        failed = True
if failed:
    print("BUG: lora.MergedLinear's merge on eval() does not fold in the delta its forward applies")
    sys.exit(1)
print("ok: the merged output equals the unmerged one")
