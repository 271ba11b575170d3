"""save / load: the checkpoint contract of conventions section 4.

A checkpoint is one safetensors file: every adapter tensor (a frozen tensor several layers share stored once,
the other keys naming it in the metadata entry `shared`), every base weight the variant rewrote
(as `<target>::base_weight`, dense (d_out, d_in)), and metadata (format version, variant, full config,
runtime knobs, targets, per-target base hashes). load never reruns an init, SVD or calibration pass, and it
validates the whole file against the model before touching it.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from . import layers, runtime
from .atomic import atomic_write_bytes
from .config import Config
from .errors import AdapterError, CheckpointError
from .registry import REGISTRY
from .targeting import find_targets

FORMAT = "lora-verify-adapter/1"
_SEP = "::"


_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a deterministic header (sorted keys), so equal content gives equal files.

    (safetensors' own writer orders the metadata through a hash map, which differs between processes.)
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the attached adapter of model to path (safetensors), atomically."""
    st = runtime.state_of(model)
    tensors: dict[str, torch.Tensor] = {}
    knobs = {}
    first: dict[int, str] = {}  # id of a tensor several layers share -> the key it is stored under
    shared: dict[str, str] = {}  # every later key of a shared tensor -> that key (stored once)
    for name, layer in st.targets.items():
        ad = layer.adapter
        for tname, t in ad.tensors().items():
            key = f"{name}{_SEP}{tname}"
            if id(t) in first:
                shared[key] = first[id(t)]
                continue
            first[id(t)] = key
            tensors[key] = t.detach().cpu().contiguous().clone()
        if ad.rewritten:
            tensors[f"{name}{_SEP}base_weight"] = layers.dense_weight(layer).detach().cpu().contiguous().clone()
        knobs[name] = ad.knobs
    meta = {
        "format": FORMAT,
        "variant": st.cfg.variant,
        "config": json.dumps(st.cfg.to_dict(), sort_keys=True),
        "knobs": json.dumps(knobs, sort_keys=True),
        "targets": json.dumps(list(st.targets)),
        "base_hashes": json.dumps(st.base_hashes, sort_keys=True),
    }
    if shared:
        meta["shared"] = json.dumps(shared, sort_keys=True)
    data = serialize(tensors, meta)
    atomic_write_bytes(path, data)


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        tensors = safetensors.torch.load(raw)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r} (foreign or other version)")
    try:
        meta = {
            "variant": meta["variant"],
            "config": json.loads(meta["config"]),
            "knobs": json.loads(meta["knobs"]),
            "targets": json.loads(meta["targets"]),
            "base_hashes": json.loads(meta["base_hashes"]),
            "shared": json.loads(meta.get("shared", "{}")),
        }
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: metadata incomplete or corrupt ({e})") from None
    return meta, tensors


def load(model: nn.Module, path: str | os.PathLike, *, allow_base_mismatch: bool = False) -> nn.Module:
    """Attach the adapter saved at path to model, with no init, SVD or calibration pass.

    Refuses (CheckpointError, model untouched) a corrupt or foreign file, another variant's or shape's
    tensors, a missing or unexpected tensor, and targeted base weights that hash differently from the ones
    the adapter was trained on (unless allow_base_mismatch=True).
    """
    meta, tensors = _read(path)
    if runtime.is_attached(model):
        raise CheckpointError("an adapter is already attached to this model; detach it before load")
    try:
        cfg = Config.from_dict(meta["config"])
    except AdapterError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if cfg.variant != meta["variant"]:
        raise CheckpointError(f"{path}: metadata variant {meta['variant']!r} != config variant {cfg.variant!r}")
    variant = REGISTRY.get(cfg.variant)()
    try:
        targets = find_targets(model, cfg)
    except AdapterError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if list(targets) != meta["targets"]:
        raise CheckpointError(
            f"{path}: checkpoint targets {meta['targets']} but this model's matching layers are {list(targets)}"
        )
    shared = meta["shared"]
    if not isinstance(shared, dict):
        raise CheckpointError(f"{path}: metadata 'shared' is not a mapping of tensor keys")
    for key, src in shared.items():  # a tensor several layers share is stored once
        if not isinstance(src, str) or src not in tensors or key in tensors:
            raise CheckpointError(f"{path}: shared tensor '{key}' names '{src}', which is not stored once in the file")
        tensors[key] = tensors[src]
    by_target: dict[str, dict[str, torch.Tensor]] = {n: {} for n in targets}
    for key, t in tensors.items():
        name, _, tname = key.rpartition(_SEP)
        if name not in by_target:
            raise CheckpointError(f"{path}: unexpected tensor '{key}' for a layer the config does not target")
        by_target[name][tname] = t
    for name, layer in targets.items():
        d_in, d_out = layers.dims(layer)
        expected = {k: d.shape for k, d in variant.tensors(d_in, d_out, cfg).items()}
        if variant.rewrites_base and "base_weight" in by_target[name]:
            expected["base_weight"] = (d_out, d_in)
        got = by_target[name]
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{path}: layer '{name}': missing tensors {missing}, unexpected tensors {extra}")
        for k, shape in expected.items():
            if tuple(got[k].shape) != tuple(shape):
                raise CheckpointError(
                    f"{path}: layer '{name}' tensor '{k}' has shape {tuple(got[k].shape)}, expected {tuple(shape)}"
                )
        if not allow_base_mismatch:
            h = layers.weight_hash(layer)
            if h != meta["base_hashes"].get(name):
                raise CheckpointError(
                    f"{path}: the base weight of layer '{name}' differs from the one this adapter was trained on "
                    "(sha256 mismatch); pass allow_base_mismatch=True to load anyway"
                )
    runtime.attach(model, cfg, _restore=by_target)
    for name, ad in runtime.adapters(model).items():
        ad.knobs.update(meta["knobs"].get(name, {}))
    runtime.state_of(model).base_hashes.update(meta["base_hashes"])
    return model
