"""A second, independent property for bugs that one property alone used to catch: each entry reruns a mutant of
another zoo module under another property that sees the same class by another route (merged weights against the
oracle's dense map; dropout's randomness; a round trip with non-default config fields)."""
import dataclasses

from . import antipasto, blind_spots, delora, dora, eva, lora, pissa

SECOND = {
    "lora.merge_wrong_scale": "merge_oracle",
    "antipasto.merge_coeff_from_config": "merge_oracle",
    "lora.dropout_ignored": "dropout_live",
    "dora.dropout_ignored": "dropout_live",
    "delora.dropout_ignored": "dropout_live",
    "eva.dropout_ignored": "dropout_live",
    "pissa.dropout_ignored": "dropout_live",
    "lora.checkpoint_missing": "config_roundtrip",
    "antipasto.residual_not_saved": "config_roundtrip",
    "pissa.residual_not_saved": "config_roundtrip",
    "eva.load_needs_calibration": "config_roundtrip",
}

_ALL = {m.name: m for mod in (antipasto, blind_spots, delora, dora, eva, lora, pissa) for m in mod.MUTANTS}

MUTANTS = [dataclasses.replace(_ALL[name], name=f"{name}.by_{prop}", expects=prop) for name, prop in SECOND.items()]
