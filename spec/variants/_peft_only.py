"""Declarations shared by the specs verified on PEFT only: PEFT's refusal of transformers' Conv1D, which every
property that builds a Conv1D layer or a GPT-2 model meets."""
from ..schema import Deviation

CONV1D_PROPERTIES = ("layout", "model_oracle", "unmerge_restores", "checkpoint_roundtrip")


def no_conv1d(method: str, source: str, wraps: str = "torch.nn.Linear (and Conv2d/Embedding)",
              match: str = "is not supported") -> tuple[Deviation, ...]:
    """One deviation per property that meets a Conv1D layer: PEFT's `method`, which wraps `wraps` only, refuses
    it at get_peft_model with an error containing `match`."""
    return tuple(
        Deviation(p, f"PEFT's {method} wraps {wraps} only: transformers' Conv1D, as in GPT-2, is refused at "
                     "get_peft_model", backend="peft", source=source, match=match)
        for p in CONV1D_PROPERTIES)
