"""PEFT 0.9.0-0.21.2 (not fixed): LoHa rounds its scale alpha / r to float32 on a float64 model.

    pip install torch peft==0.21.2 && python peft_loha_float32_scale_in_float64.py

LoHaLayer.get_delta_weight passes `scale=torch.tensor(self.scaling[adapter_name])` (peft/tuners/loha/layer.py:193
and :201 in 0.20.0-0.21.2; :170/:178 in 0.9.0-0.11.1, :164/:172 in 0.12.0-0.17.1, :191/:199 in
0.18.1-0.19.1): torch.tensor of a Python float is a
float32 tensor, so ΔW = ((B1 A1) ⊙ (B2 A2)) · fl32(alpha / r). Wherever alpha / r is not a float32 number (12 / 7)
a float64 model's output is off by ~1e-8 relative, a million times float64's rounding; LoKr's make_kron takes the
Python float (exact). The history's `loha / model_oracle` row. Exits 1 while the bug is present.
"""
import sys

import peft
import torch
from peft import LoHaConfig, get_peft_model


class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(5, 3, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.layer(x)


torch.manual_seed(0)
model = get_peft_model(OneLayer(), LoHaConfig(r=7, alpha=12.0, target_modules=["layer"]))
lyr = model.base_model.model.layer
with torch.no_grad():
    for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
        getattr(lyr, name)["default"].normal_()  # a trained adapter (hada_w2_b starts at zero)
    w1 = lyr.hada_w1_a["default"] @ lyr.hada_w1_b["default"]
    w2 = lyr.hada_w2_a["default"] @ lyr.hada_w2_b["default"]
    exact = (w1 * w2) * (12.0 / 7)
    got = lyr.get_delta_weight("default")
rel = ((got - exact).abs().max() / exact.abs().max()).item()
print(f"peft {peft.__version__}: ΔW dtype {got.dtype}, max |ΔW - exact| / max |ΔW| = {rel:.3g} "
      f"(float64 eps {torch.finfo(torch.float64).eps:.3g})")
if rel > 1e3 * torch.finfo(torch.float64).eps:
    print("BUG: LoHa's float64 ΔW carries alpha / r rounded to float32")
    sys.exit(1)
print("ok: LoHa's float64 ΔW is exact to float64 rounding")
