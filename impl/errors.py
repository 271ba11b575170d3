"""Error types of the adapter runtime. Every error names the field, layer or file at fault."""


class AdapterError(Exception):
    """Base class of every error the runtime raises on bad input."""


class ConfigError(AdapterError, ValueError):
    """A config is invalid (unknown variant or field, bad value, violated constraint)."""


class AttachError(AdapterError, RuntimeError):
    """attach cannot proceed on this model (no target, already attached, unsupported layer, missing data)."""


class CheckpointError(AdapterError, RuntimeError):
    """A checkpoint cannot be loaded (corrupt, foreign, other variant, shape or base mismatch)."""


class MergeError(AdapterError, RuntimeError):
    """merge is not possible for this variant or layer."""
