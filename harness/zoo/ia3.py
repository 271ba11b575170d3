"""ia3 / ia3_ff mutants: the gate on the wrong side, the bias left ungated."""
from impl.registry import TensorDecl
from impl.variants.ia3 import IA3, IA3FF, gate_output

from . import Mutant


class FFGatesOutput(IA3FF):
    """ia3_ff gating the layer's output instead of its input (the two sides confused)."""

    side = "output"

    def tensors(self, d_in, d_out, cfg):
        return {"g": TensorDecl((d_out,), "ones")}

    def forward(self, ad, x, y):
        return gate_output(y, ad.g)


class BiasNotGated(IA3):
    """ia3 gating W x only and adding the bias back ungated, where the spec (and PEFT) gate W x + b."""

    def forward(self, ad, x, y):
        b = ad.bias()
        if b is None:
            return gate_output(y, ad.g)
        return (gate_output(y - b, ad.g) + b).to(y.dtype)


MUTANTS = [
    Mutant("ia3_ff.gates_output", FFGatesOutput, "oracle", "ia3_ff gates the output side instead of the input",
           square=True),
    Mutant("ia3.bias_not_gated", BiasNotGated, "oracle", "ia3's gate skips the bias: y = g ⊙ (W x) + b"),
]
