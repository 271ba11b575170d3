"""Which modules a config adapts: by name regexes, by architectural role, by layer index.

Roles are known per architecture family from module names; GPT-2 fuses q, k and v into `c_attn`, which is
targeted whole by the role `qkv` and never split silently.

The config's own regexes (`target_names`, `exclude_names`) come from users and from checkpoints, so they are
matched with the `regex` engine under a time budget (MATCH_BUDGET_S for one `find_targets`, every name and
pattern together): a pattern that backtracks catastrophically is a ConfigError naming the field, not a hang.
"""
from __future__ import annotations

import re
import time

import regex
from torch import nn

from . import layers
from .errors import AttachError, ConfigError

MATCH_BUDGET_S = 2.0

# (regex on the module name) -> role. Llama, Qwen and Mistral layouts share names; GPT-2 has its own.
_ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)q_proj$", "q"),
    (r"(^|\.)k_proj$", "k"),
    (r"(^|\.)v_proj$", "v"),
    (r"(^|\.)o_proj$", "o"),
    (r"(^|\.)gate_proj$", "gate"),
    (r"(^|\.)up_proj$", "up"),
    (r"(^|\.)down_proj$", "down"),
    (r"(^|\.)attn\.c_attn$", "qkv"),
    (r"(^|\.)attn\.c_proj$", "o"),
    (r"(^|\.)mlp\.c_fc$", "up"),
    (r"(^|\.)mlp\.c_proj$", "down"),
)
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def role_of(name: str) -> str | None:
    for pattern, role in _ROLE_PATTERNS:
        if re.search(pattern, name):
            return role
    return None


def layer_index(name: str) -> int | None:
    m = _LAYER_INDEX.search("." + name + ".")
    return int(m.group(1)) if m else None


def _matches(field: str, patterns: tuple[str, ...], name: str, deadline: float) -> bool:
    """Does any pattern of the config field occur in name? ConfigError when the time budget runs out."""
    for p in patterns:
        try:
            if regex.search(p, name, timeout=max(deadline - time.monotonic(), 1e-3)):
                return True
        except TimeoutError:
            raise ConfigError(
                f"field '{field}': regex {p!r} did not finish on module name {name!r} within the "
                f"{MATCH_BUDGET_S:g} s budget (catastrophic backtracking); simplify it"
            ) from None
    return False


def find_targets(model: nn.Module, cfg) -> dict[str, nn.Module]:
    """The adaptable modules selected by cfg, in model order. Raises AttachError naming what exists, and
    ConfigError for a config regex that does not finish in time."""
    if not cfg.target_names and not cfg.target_roles:
        raise AttachError("config selects nothing: give target_names (regexes) or target_roles")
    candidates = {n: m for n, m in model.named_modules() if n and layers.kind(m) is not None}
    fused = sorted(n for n in candidates if role_of(n) == "qkv")
    split_roles = sorted(set(cfg.target_roles) & {"q", "k", "v"})
    if fused and split_roles:
        raise AttachError(
            f"roles {split_roles} cannot be targeted in this model: q, k and v are fused in "
            f"'{fused[0]}' (c_attn); target the role 'qkv' to adapt it whole"
        )
    out: dict[str, nn.Module] = {}
    deadline = time.monotonic() + MATCH_BUDGET_S
    for name, module in candidates.items():
        if _matches("exclude_names", cfg.exclude_names, name, deadline):
            continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        if cfg.target_roles and role_of(name) not in cfg.target_roles:
            continue
        if cfg.target_names and not _matches("target_names", cfg.target_names, name, deadline):
            continue
        out[name] = module
    if not out:
        names = sorted(candidates)
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise AttachError(
            f"no module matches target_names={list(cfg.target_names)} target_roles={list(cfg.target_roles)} "
            f"layers={cfg.layers} exclude_names={list(cfg.exclude_names)}; adaptable modules: {shown or 'none'}"
        )
    return out
