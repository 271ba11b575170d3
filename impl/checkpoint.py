"""save / load: the checkpoint contract of docs/conventions.md §4.

A checkpoint is one safetensors file: every adapter tensor (a frozen tensor several layers share stored once,
the other keys naming it in the metadata entry `shared`), every base weight the variant rewrote
(as `<target>::base_weight`, dense (d_out, d_in)), and metadata (format version, variant, full config,
runtime knobs, targets, per-target base hashes). load never reruns an init, SVD or calibration pass, and it
validates the whole file against the model before touching it.
"""
from __future__ import annotations

import json
import os
import re
import stat
import struct

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
_FP32_MAX = torch.finfo(torch.float32).max  # a knob beyond it is inf in an fp32 forward
_HEX64 = re.compile(r"[0-9a-f]{64}")


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


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_META_TYPES = {"config": dict, "knobs": dict, "targets": list, "base_hashes": dict}
_BAD_JSON = (ValueError, RecursionError, TypeError, OverflowError)  # incl. a 5,000-digit integer, deep nesting


def _read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file, read only if it is a regular file and only as many bytes as its header declares."""
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a regular file (a device, FIFO, socket or folder); "
                                  "a checkpoint is a safetensors file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): "
                                      f"{len(head)} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, st.st_size - 8):
                raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): "
                                      f"header length {n} exceeds the file ({st.st_size} bytes)")
            header = f.read(n)
            total = 8 + n + _data_length(path, header)
            if total != st.st_size:
                raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): "
                                      f"its header declares {total} bytes, the file has {st.st_size}")
            rest = f.read(total - 8 - n)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return head + header + rest


def _data_length(path, header: bytes) -> int:
    """The byte length of the tensor data that the header's offsets declare."""
    try:
        h = json.loads(header)
        ends = [int(v["data_offsets"][1]) for k, v in h.items() if k != "__metadata__"]
    except (*_BAD_JSON, AttributeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): "
                              f"bad header ({type(e).__name__})") from None
    return max(ends, default=0)


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    raw = _read_bytes(path)
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(raw[8 : 8 + n]).get("__metadata__") or {}
        tensors = safetensors.torch.load(raw)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: format {fmt!r} is not {FORMAT!r} (foreign or other version)")
    try:
        out = {"variant": meta["variant"]}
        for key in _META_TYPES:
            out[key] = json.loads(meta[key])
        out["shared"] = json.loads(meta.get("shared", "{}"))  # a tensor several layers share, stored once
    except KeyError as e:
        raise CheckpointError(f"{path}: metadata incomplete (no {e})") from None
    except _BAD_JSON as e:
        raise CheckpointError(f"{path}: metadata corrupt ({type(e).__name__}: {str(e)[:200]})") from None
    for key, kind in _META_TYPES.items():
        if not isinstance(out[key], kind):
            raise CheckpointError(f"{path}: metadata '{key}' is {type(out[key]).__name__}, expected {kind.__name__}")
    if not isinstance(out["variant"], str):
        raise CheckpointError(f"{path}: metadata 'variant' is not a string")
    if not all(isinstance(t, str) for t in out["targets"]):
        raise CheckpointError(f"{path}: metadata 'targets' is not a list of layer names")
    if not isinstance(out["shared"], dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in out["shared"].items()):
        raise CheckpointError(f"{path}: metadata 'shared' is not an object of tensor names")
    bad = [k for k, h in out["base_hashes"].items() if not (isinstance(h, str) and _HEX64.fullmatch(h))]
    if bad:
        raise CheckpointError(f"{path}: metadata 'base_hashes' of {bad[:3]} is not a sha256 hex digest")
    return out, tensors


def _check_knobs(path, knobs: dict, variant, targets) -> None:
    """Saved knobs: per target, known knob names with finite numbers (the rule of runtime.set_knobs)."""
    for name, values in knobs.items():
        if name not in targets:
            raise CheckpointError(f"{path}: knobs for '{name}', a layer the checkpoint does not target")
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: knobs of layer '{name}' are {type(values).__name__}, expected an object")
        unknown = sorted(set(values) - set(variant.knobs))
        if unknown:
            raise CheckpointError(f"{path}: layer '{name}': variant '{variant.name}' has no runtime knob(s) "
                                  f"{unknown}; knobs: {list(variant.knobs)}")
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) <= _FP32_MAX:
                raise CheckpointError(f"{path}: layer '{name}' knob '{k}': expected a finite (float32) number, got "
                                      f"{str(v)[:40]!r}")


def load(model: nn.Module, path: str | os.PathLike, *, allow_base_mismatch: bool = False,
         allow_nonfinite: bool = False) -> nn.Module:
    """Attach the adapter saved at path to model, with no init, SVD or calibration pass.

    Refuses (CheckpointError, model untouched) anything but a regular file, a corrupt or foreign file,
    metadata of the wrong type, unknown or non-finite knobs, another variant's or shape's tensors, a tensor of
    another dtype than the config declares (param_dtype for trainables, dtype or the base weight's dtype for
    frozen tensors and residuals), a missing or unexpected tensor, NaN or Inf in a tensor (unless
    allow_nonfinite=True, e.g. to inspect a diverged run), and targeted base weights that hash differently
    from the ones the adapter was trained on (unless allow_base_mismatch=True). Everything is checked before
    the model is touched.
    """
    meta, tensors = _read(path)
    if runtime.is_attached(model):
        raise CheckpointError("an adapter is already attached to this model; detach it before load")
    try:
        cfg = Config.from_dict(meta["config"])
    except (AdapterError, *_BAD_JSON) as e:
        raise CheckpointError(f"{path}: {type(e).__name__ + ': ' if not isinstance(e, AdapterError) else ''}"
                              f"{str(e)[:300]}") from None
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
    _check_knobs(path, meta["knobs"], variant, targets)
    for key, src in meta["shared"].items():  # a tensor several layers share is stored once
        if src not in tensors or key in tensors:
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
        decls = variant.tensors(d_in, d_out, cfg)
        expected = {k: d.shape for k, d in decls.items()}
        frozen_dtype = cfg.dtype or layers.weight_dtype(layer)
        dtypes = {k: cfg.param_dtype if d.trainable else frozen_dtype for k, d in decls.items()}
        if variant.rewrites_base and "base_weight" in by_target[name]:
            expected["base_weight"] = (d_out, d_in)
            dtypes["base_weight"] = layers.weight_dtype(layer)
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
            if got[k].dtype != dtypes[k]:
                raise CheckpointError(f"{path}: layer '{name}' tensor '{k}' is {got[k].dtype}, but the config "
                                      f"declares {dtypes[k]}")
            if not allow_nonfinite and got[k].is_floating_point() and not torch.isfinite(got[k]).all():
                raise CheckpointError(f"{path}: layer '{name}' tensor '{k}' holds NaN or Inf; pass "
                                      "allow_nonfinite=True to load it anyway")
        if not allow_base_mismatch:
            h = layers.weight_hash(layer)
            if h != meta["base_hashes"].get(name):
                raise CheckpointError(
                    f"{path}: the base weight of layer '{name}' differs from the one this adapter was trained on "
                    "(sha256 mismatch); pass allow_base_mismatch=True to load anyway"
                )
    runtime.attach(model, cfg, _restore=by_target)
    try:
        for name, ad in runtime.adapters(model).items():
            ad.knobs.update({k: float(v) for k, v in meta["knobs"].get(name, {}).items()})
        runtime.state_of(model).base_hashes.update(meta["base_hashes"])
    except BaseException:
        runtime.detach(model)
        raise
    return model
