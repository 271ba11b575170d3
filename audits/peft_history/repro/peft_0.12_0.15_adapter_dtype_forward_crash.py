"""PEFT 0.12.0-0.15.2: LoHa, LoKr, HRA and Bone crash in their forward on a bfloat16 model, HRA also on a float64 one
(fixed in 0.16.0).

    pip install torch transformers peft==0.15.2 && python peft_0.12_0.15_adapter_dtype_forward_crash.py

What a user does: the model in its dtype, get_peft_model with default arguments, one forward. PEFT 0.12.0's
get_peft_model gained autocast_adapter_dtype=True (peft/mapping.py:138), which upcasts every bf16/fp16 adapter
tensor to float32 after the layer put it in the base's dtype (PeftModel.__init__, peft/peft_model.py:158-159 ->
BaseTuner._cast_adapter_dtype, peft/tuners/tuners_utils.py:316). LoRA's forward casts x to the adapter's dtype;
these tuners did not, so a bf16 input meets a float32 weight:
  loha/layer.py:243 `F.linear(input, delta_weight)` (0.12.0-0.15.2), lokr/layer.py:285 (0.12.0-0.13.2) and :307
  (0.14.0-0.15.2), hra/layer.py:247 `torch.mm(orig_weight, new_weight)`, bone/layer.py:332 (0.14.0-0.15.2).
HRA's float64 crash has another cause: `new_weight = torch.eye(self.in_features, device=x.device)` (hra/layer.py:237
in 0.15.2) is float32 whatever the layer's dtype, then torch.mm with the float64 delta (hra/layer.py:243).
0.16.0 fixed both: BaseTunerLayer._cast_input_dtype (tuners/tuners_utils.py:916) called before each of these matmuls
(loha/layer.py:242, lokr/layer.py:306, bone/layer.py:330, hra/layer.py:254-259 with
`new_weight.to(delta_weight.dtype)`).
BOFT crashed alike in 0.11.1-0.12.0 (its float32 torch.eye and boft_P, boft/layer.py:623/634) and was fixed in 0.13.2.
Exits 1 while a crash is present.
"""
import sys

import peft
import torch
from peft import get_peft_model


class OneLayer(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.layer = torch.nn.Linear(8, 12, bias=False, dtype=dtype)

    def forward(self, x):
        return self.layer(x)


CONFIGS = {"LoHaConfig": {"r": 2}, "LoKrConfig": {"r": 2}, "HRAConfig": {"r": 2}, "BoneConfig": {"r": 2},
           "BOFTConfig": {"boft_block_num": 2, "boft_block_size": 0}}
failed = False
print("peft", peft.__version__)
for name, kwargs in CONFIGS.items():
    if not hasattr(peft, name):
        print(f"{name}: not in this release")
        continue
    for dtype in (torch.bfloat16, torch.float64):
        torch.manual_seed(0)
        model = get_peft_model(OneLayer(dtype), getattr(peft, name)(target_modules=["layer"], **kwargs))
        kinds = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
        try:
            model(torch.randn(3, 8, dtype=dtype))
            print(f"{name} {dtype} (adapter {kinds}): ok")
        except RuntimeError as e:
            print(f"{name} {dtype} (adapter {kinds}): RuntimeError: {str(e).splitlines()[0]}")
            failed = True
if failed:
    print("BUG: a PEFT tuner's forward crashes on a model in its own dtype with get_peft_model's defaults")
    sys.exit(1)
print("ok: every forward runs")
