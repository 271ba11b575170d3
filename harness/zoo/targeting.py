"""Targeting mutants the whole-model properties used to miss (issue 34): each hides in a region of the selection
space (an architecture, a kind of selection) that three derandomized draws left unchecked on every run. Both are
runtime bugs of impl's targeting, patches active while the mutant runs."""
import contextlib
from unittest import mock

from impl import targeting
from impl.variants.lora import LoRA

from . import Mutant


@contextlib.contextmanager
def gpt2_projections_swapped():
    """The role table gives GPT-2's attn.c_proj the role 'down' and mlp.c_proj the role 'o' (each other's)."""
    swap = {r"(^|\.)attn\.c_proj$": "down", r"(^|\.)mlp\.c_proj$": "o"}
    table = tuple((p, swap.get(p, r)) for p, r in targeting._ROLE_PATTERNS)
    with mock.patch.object(targeting, "_ROLE_PATTERNS", table):
        yield


@contextlib.contextmanager
def exclusions_on_leaf_names():
    """exclude_names is matched against the module's leaf name only ('c_fc', not 'transformer.h.0.mlp.c_fc'):
    an exclusion by path such as '\\.0\\.' silently excludes nothing."""
    real = targeting._matches

    def matches(field, patterns, name, deadline):
        return real(field, patterns, name.rpartition(".")[2] if field == "exclude_names" else name, deadline)

    with mock.patch.object(targeting, "_matches", matches):
        yield


MUTANTS = [
    Mutant("lora.gpt2_projections_swapped", LoRA, "model_targeting",
           "GPT-2's attn.c_proj and mlp.c_proj given each other's roles (o <-> down)", patch=gpt2_projections_swapped),
    Mutant("lora.exclusions_on_leaf_names", LoRA, "model_targeting",
           "exclude_names matched against the leaf name only: an exclusion by path is silently ignored",
           patch=exclusions_on_leaf_names),
]
