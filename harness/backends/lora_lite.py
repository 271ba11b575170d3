"""lora-lite (github.com/wassname/lora-lite) at any commit, as a backend.

    python -m tools.verify --backend lora-lite --ref COMMIT [--repo PATH_OR_URL]

The source of that commit comes from `--repo`: a local git clone (a work tree or a bare git dir: the ref is resolved
with git, impl.untrusted.git_commit, and `git archive COMMIT` is extracted into .cache/lora-lite/<commit>/, whatever
the work tree has checked out), or a source this harness extracted there before (tools.verify fetches a URL's GitHub
archive there through tools.fetch), named by its full commit id. Extraction is capped (`unpack`: members, unpacked
bytes, plain files only) and the extracted tree's sha256, recorded beside it, is checked before each use. The
package is imported from that folder, in the environment verify runs in (`nox -s verify -- --backend lora-lite
--ref C` builds one with that commit's dependencies). Results go to build/verify/lora-lite-<commit>.json, `backend_version` = the full commit.

Both config eras are handled: a single `LoraLiteConfig` with a `variant_kwargs` dict (up to fdb4c77), then one
dataclass per variant registered in `config._CONFIG_REGISTRY`. The tensors are lora-lite's `lora_*` attributes of
the adapted layer, mapped to the specs' names here (`TENSORS`).

Where lora-lite's design differs from a spec on purpose, the capability is missing (n/a, with the reason): no
merge, no Conv1D (targets are found by in_features/out_features), no runtime knobs, no config-time checks, no
whole-model targeting by architectural role in this backend. Adapter dropout is n/a only at the commits whose config
has no `dropout` field: where the field exists (4db5cee..fdb4c77, "currently ignored") it is set to the case's value
and verified like any other field, so a field that does nothing fails. EVA's data pass (group_init) runs on the
harness's calibration batches. Every property also runs on the library's own defaults (`defaults_case`: the config
class's r, alpha, adapter dtype and variant fields), beside the drawn cases.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import SimpleNamespace
from zlib import error as zlib_error

import torch
from torch import nn

from impl import layers
from impl.atomic import atomic_write_bytes
from impl.untrusted import (FULL_COMMIT, GIT_TIMEOUT_S, UntrustedInput, check_ref, git_commit,
                             git_repository)
from spec.schema import Deviation, Spec

from . import BACKENDS
from ..strategies import Case
from .protocol import Errors, Fields, Mapped

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "lora-lite"
PACKAGE = "lora_lite"

# spec tensor -> (lora-lite attribute, transform from lora-lite's layout to the spec's)
TENSORS = {
    "lora": {"A": ("lora_A", "id"), "B": ("lora_B", "id")},
    "pissa": {"A": ("lora_A", "id"), "B": ("lora_B", "id")},
    "dora": {"A": ("lora_A", "id"), "B": ("lora_B", "id"), "m": ("lora_m", "id")},
    "delora": {"A": ("lora_A", "id"), "B": ("lora_B", "id"), "lam": ("lora_lambda", "vector1"),
               "wnorm": ("lora_wnorm", "id")},
    "ia3": {"g": ("lora_g", "id")},
    "ia3_ff": {"g": ("lora_g", "id")},
    "hra": {"U": ("lora_U", "id")},
    "eva": {"A": ("lora_A", "id"), "B": ("lora_B", "id")},
}
DEFAULTS = {"r": 8, "alpha": 16.0, "rslora": False, "dropout": 0.0, "lambda0": 15.0}  # in the specs' field names
OWN_FIELDS = {"delora": ("lambda0",)}  # variant fields lora-lite takes (per-variant dataclass or variant_kwargs)
LACKS = {
    "merge": "lora-lite has no merge (adapters stay as hooks)",
    "conv1d": "lora-lite targets layers with in_features/out_features (nn.Linear, bnb); Conv1D has neither",
    "knobs": "lora-lite's adapters have no runtime knob",
    "dropout": "lora-lite has no adapter dropout at this commit (the first config's `dropout` field, documented as "
               "ignored, was removed in 185eb29)",
    "config_checks": "lora-lite's configs are plain dataclasses: nothing is checked when one is built",
    "model": "this backend adapts the one-layer models only",
    "label_mask": "lora-lite's data pass reads no labels from the calibration batches (src/lora_lite has no "
                  "'labels')",
    "embedding": "lora-lite targets layers with in_features/out_features (nn.Linear, bnb); nn.Embedding has neither",
    "scaled_embedding": "lora-lite targets layers with in_features/out_features; a scaled embedding has neither",
}
DEFAULTS_CASE = dict(d_in=12, d_out=10, bias=True, seed=0)  # the library-defaults case: r = 8 fits min(d_in, d_out)



# lora-lite's precision choices: the variant computes part of its float64 path in float32 (`.float()`, pissa's
# documented "fp32 round-trip"), so a float64 case is off by float32 rounding. Declared per (variant, property) as a
# deviation of measured size on a fixed float64 case (harness.engine: within 0.5x-2x of the size, else a failure),
# matched on the failure's own text, so a real bug in the same property (a crash, another message, another size)
# still fails. The source line is looked up in the commit's variant file.
PRECISION_CASE = {"d_in": 6, "d_out": 5, "bias": False, "dtype": "float64", "seed": 0}
PRECISION = {
    ("pissa", "identity_at_init"): ({"r": 2, "alpha": 3.0, "rslora": False}, 5e-8, "identity off by"),
    ("dora", "identity_at_init"): ({"r": 2, "alpha": 3.0, "rslora": False}, 4.4e-8, "not bitwise identical at init"),
    ("delora", "oracle"): ({"r": 2, "alpha": 3.0, "lambda0": 3.0}, 1.5e5, "output differs from the float64 oracle"),
}
FP32_LINE = re.compile(r"fp32|\.float\(\)")


def _git(repo: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *git_repository(repo), *args], check=True, capture_output=True,
                          timeout=GIT_TIMEOUT_S, **kw)


def resolve(repo: Path, ref: str) -> str:
    """The full commit id of `ref` in a local git clone (a work tree or a bare git dir): impl.untrusted.git_commit."""
    try:
        return git_commit(repo, ref, "lora-lite --ref")
    except UntrustedInput as e:
        raise ValueError(f"lora-lite: {e}") from None


# Caps on what one lora-lite source may unpack to (its archive is 64 MiB at most, compressed).
MAX_MEMBERS = 20_000
MAX_UNPACKED_BYTES = 256 * 1024 * 1024
TREE_SUFFIX = ".tree-sha256"


class SourceRefused(ValueError):
    """A lora-lite source that is not used: an archive over the caps, a tree that changed since it was recorded."""


def unpack(data: bytes, dest: Path, what: str, mode: str = "r:*") -> None:
    """Extract the tar `data` into the empty folder `dest` (tarfile's `data` filter), after checking its members:
    at most MAX_MEMBERS, at most MAX_UNPACKED_BYTES of file data, only files and folders (no links, devices,
    sparse files), no `.git` entry. SourceRefused in one line otherwise."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as tar:
            total, members = 0, []
            for m in tar:
                members.append(m)
                if len(members) > MAX_MEMBERS:
                    raise SourceRefused(f"{what}: more than {MAX_MEMBERS} members; refused")
                if not (m.isfile() or m.isdir()) or m.issparse():
                    raise SourceRefused(f"{what}: member {m.name!r} is not a plain file or folder; refused")
                if ".git" in Path(m.name).parts:
                    raise SourceRefused(f"{what}: member {m.name!r} is git metadata; refused")
                total += m.size
                if total > MAX_UNPACKED_BYTES:
                    raise SourceRefused(f"{what}: unpacks to more than {MAX_UNPACKED_BYTES >> 20} MiB; refused")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib_error) as e:
        raise SourceRefused(f"{what}: not a readable tar archive ({type(e).__name__}: {str(e)[:200]})") from None


def tree_sha256(folder: Path) -> str:
    """sha256 over every file under `folder` (sorted relative POSIX paths, each with its bytes' sha256)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        data = b"symlink:" + str(f.readlink()).encode() if f.is_symlink() else hashlib.sha256(f.read_bytes()).digest()
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def record_tree(folder: Path) -> None:
    """Record `folder`'s tree_sha256 beside it (<folder>.tree-sha256), when it is extracted."""
    atomic_write_bytes(folder.with_name(folder.name + TREE_SUFFIX), (tree_sha256(folder) + "\n").encode())


def checked_tree(folder: Path, commit: str) -> Path:
    """`folder` when it is the extracted source of `commit` (named by the commit, its tree_sha256 equal to the
    one recorded at extraction); SourceRefused in one line otherwise (checked before each use)."""
    record = folder.with_name(folder.name + TREE_SUFFIX)
    if folder.name != commit or not record.is_file():
        raise SourceRefused(f"lora-lite: {folder} is not a git repository nor a source extracted for commit "
                            f"{commit[:12]} by this harness (a folder is never verified as it is)")
    want, have = record.read_text().strip(), tree_sha256(folder)
    if want != have:
        raise SourceRefused(f"lora-lite: the extracted source {folder} changed since it was extracted (tree sha256 "
                            f"{have[:12]}, recorded {want[:12]}); delete it to extract it again")
    return folder


def extract(repo: Path, commit: str, cache: Path = CACHE) -> Path:
    """`git archive COMMIT` of a local clone extracted into cache/<commit> (once; atomic rename); its tree
    checked against the sha256 recorded at extraction on every later use."""
    dest = cache / commit
    if (dest / "src" / PACKAGE).is_dir():
        return checked_tree(dest, commit)
    cache.mkdir(parents=True, exist_ok=True)
    data = _git(repo, "archive", "--format=tar", commit).stdout
    tmp = Path(tempfile.mkdtemp(dir=cache))
    try:
        unpack(data, tmp / "x", f"lora-lite {commit[:12]} (git archive)", mode="r:")
        record_tree(tmp / "x")
        (tmp / ("x" + TREE_SUFFIX)).rename(cache / (commit + TREE_SUFFIX))
        (tmp / "x").rename(dest)
    except OSError:
        if not (dest / "src" / PACKAGE).is_dir():  # not just another worker extracting it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return checked_tree(dest, commit)


def source(ref: str, repo: str) -> tuple[Path, str]:
    """(folder holding src/lora_lite, full commit id) for `ref`: a git repository (work tree or bare git dir) is
    resolved with git and that commit's tree extracted, whatever is checked out; any other folder must be a
    source this harness extracted for the commit `ref` names in full (tree sha256 re-checked)."""
    p = Path(repo)
    if re.match(r"^[a-z]+://", repo):
        raise ValueError(f"lora-lite: {repo} is a URL; `python -m tools.verify --repo URL` fetches its archive "
                         "(the backend itself reads local folders only)")
    if not p.exists():
        raise ValueError(f"lora-lite: --repo {repo} does not exist")
    try:
        git_repository(p)
    except UntrustedInput:
        commit = check_ref(ref, "lora-lite --ref")
        if not FULL_COMMIT.fullmatch(commit):
            raise ValueError(f"lora-lite: {repo} is not a git repository; an extracted source needs the full "
                             f"commit id, not {ref!r}") from None
        return checked_tree(p, commit), commit
    commit = resolve(p, ref)
    return extract(p, commit), commit


def import_package(src: Path):
    """Import lora_lite from src/lora_lite under its own name (one lora-lite per process)."""
    init = src / "src" / PACKAGE / "__init__.py"
    loaded = sys.modules.get(PACKAGE)
    if loaded is not None:
        if Path(loaded.__file__).resolve() != init.resolve():
            raise RuntimeError(f"another lora_lite ({loaded.__file__}) is already imported in this process")
        return loaded
    mod_spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules[PACKAGE] = mod
    try:
        mod_spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(PACKAGE, None)
        raise
    return mod


@contextlib.contextmanager
def _no_model_width(model: nn.Module):
    """lora-lite classifies each target as reader / writer by the model's hidden size, which a one-layer model
    does not have (it infers the widest in_features, and then refuses a square layer not named like a projection
    as ambiguous): give it a hidden size no layer has while it attaches."""
    had = "config" in model.__dict__
    old = model.__dict__.get("config")
    model.__dict__["config"] = SimpleNamespace(hidden_size=-1)
    try:
        yield
    finally:
        if had:
            model.__dict__["config"] = old
        else:
            model.__dict__.pop("config")


class LoraLiteBackend:
    """lora-lite at one commit, driven through its public API: attach, detach, save, load."""

    name = "lora-lite"
    errors = Errors(config=(TypeError, ValueError, KeyError), attach=(RuntimeError, TypeError, ValueError),
                    checkpoint=(RuntimeError, KeyError, ValueError))

    def __init__(self, ref: str | None = None, repo: str | None = None):
        if not ref or not repo:
            raise ValueError("the lora-lite backend needs --ref COMMIT and --repo PATH_OR_URL")
        self.src, self.version = source(ref, repo)
        self.results_stem = f"lora-lite-{self.version[:12]}"
        try:
            self.ll = import_package(self.src)
        except ImportError as e:
            raise RuntimeError(f"lora-lite {self.version[:12]} does not import in this environment: {e} (`nox -s "
                               "verify -- --backend lora-lite ...` builds one with the packages its pyproject.toml "
                               "lists)") from None
        self.adapter = importlib.import_module(f"{PACKAGE}.adapter")
        self.config_module = importlib.import_module(f"{PACKAGE}.config")
        self.variant_kwargs = hasattr(self.config_module, "LoraLiteConfig")  # the first config era
        self.checkpoint_suffix = ".pt" if "torch.save" in inspect.getsource(self.adapter.save) else ".safetensors"

    # ---- applicability

    def applies(self, spec: Spec) -> str | None:
        if spec.name not in TENSORS:
            return f"this backend maps no lora-lite tensors to '{spec.name}'"
        if spec.name not in self.ll.REGISTRY:
            return f"lora-lite {self.version[:12]} has no '{spec.name}' (it has {sorted(self.ll.REGISTRY)})"
        return None

    def supports(self, spec: Spec, case: Case) -> str | None:
        if case.fields.get("rslora"):
            return "lora-lite has no rsLoRA (its scale is alpha / r)"
        return None

    def config_class(self, spec: Spec):
        """The config dataclass lora-lite builds for the variant at this commit (either era)."""
        if self.variant_kwargs:
            return self.config_module.LoraLiteConfig
        return self.config_module._CONFIG_REGISTRY[spec.name]

    def config_defaults(self, spec: Spec) -> dict:
        """The config class's own field defaults (r, alpha, dtype, dropout where it has one, ...)."""
        return {f.name: f.default for f in dataclasses.fields(self.config_class(spec))
                if f.default is not dataclasses.MISSING}

    def unsupported(self, spec: Spec, capability: str) -> str | None:
        if capability == "base_hash" and "fingerprint" not in inspect.getsource(self.adapter.load):
            return "lora-lite's load does not check the base weights at this commit"
        if capability == "dropout" and spec.name in TENSORS and "dropout" in self.config_defaults(spec):
            return None  # the config has a `dropout` field: whatever it does is verified, not excused
        return LACKS.get(capability)

    def defaults_case(self, spec: Spec, device: str = "cpu") -> Case | None:
        """A case built from lora-lite's own config defaults (r, alpha, the adapter dtype and the variant's own
        fields): the configuration a user who changes nothing gets (None when its r does not fit the case)."""
        if self.applies(spec):
            return None
        d = self.config_defaults(spec)
        fields = {"r": d["r"], "alpha": float(d["alpha"])}
        if spec.fields is not None and "rslora" in DEFAULTS and spec.name in ("lora", "pissa", "dora", "eva"):
            fields["rslora"] = False
        own = d.get("variant_kwargs") or {}
        for k in OWN_FIELDS.get(spec.name, ()):
            fields[k] = d.get(k, own.get(k, DEFAULTS[k]))
        limit = spec.rank_limit(DEFAULTS_CASE["d_in"], DEFAULTS_CASE["d_out"])
        if limit is not None and fields["r"] > limit:
            return None
        # the base model in the adapter's default dtype (bf16 at every commit): the model lora-lite's defaults are
        # made for; an fp32 base under a bf16 adapter would be judged at fp32's tolerance
        return Case(dtype=d.get("dtype", torch.float32), device=device, fields=fields, **DEFAULTS_CASE)

    def deviation(self, spec: Spec, prop: str) -> Deviation | None:
        """lora-lite's backend-wide design difference: attach freezes every parameter of the model and detach
        does not give the flags back (the line is looked up in this commit's adapter.py)."""
        if (spec.name, prop) in PRECISION:
            return self._precision(spec, prop)
        if prop != "detach_restores":
            return None
        src = inspect.getsource(self.adapter)
        line = next((i for i, text in enumerate(src.splitlines(), 1) if "requires_grad_(False)" in text), None)
        return Deviation("detach_restores", "lora-lite's attach freezes every parameter of the model and its detach "
                         "does not restore the requires_grad flags", backend=self.name,
                         source=f"src/lora_lite/adapter.py:{line} at {self.version[:12]}", match="requires_grad flags changed")

    def _precision(self, spec: Spec, prop: str) -> Deviation | None:
        """The variant's float32 computation as a deviation, where this commit's source has it."""
        mod = sys.modules.get(f"{PACKAGE}.variants.{spec.name}")
        if mod is None:
            try:
                mod = importlib.import_module(f"{PACKAGE}.variants.{spec.name}")
            except ImportError:
                return None
        lines = inspect.getsource(mod).splitlines()
        hit = next(((i, t.strip()) for i, t in enumerate(lines, 1) if FP32_LINE.search(t)), None)
        if hit is None:
            return None
        fields, size, match = PRECISION[(spec.name, prop)]
        return Deviation(prop, f"lora-lite computes part of {spec.name} in float32 whatever the layer's dtype "
                         f"(\"{hit[1]}\"), so a float64 layer is off by float32 rounding", backend=self.name,
                         source=f"src/lora_lite/variants/{spec.name}.py:{hit[0]} at {self.version[:12]}",
                         size=size, case={**PRECISION_CASE, "fields": fields}, match=match,
                         dtypes=(PRECISION_CASE["dtype"],))

    # ---- config and attach

    def spec_config(self, spec: Spec, case: Case, **over):
        return Fields.of(DEFAULTS, case, {k: v for k, v in over.items() if k != "param_dtype"})

    def library_config(self, spec: Spec, case: Case, **over):
        """lora-lite's own config for the case, in the era's form; the adapter's dtype is `param_dtype`."""
        cfg = self.spec_config(spec, case, **over)
        common = dict(variant=spec.name, r=cfg.r, alpha=cfg.alpha, dtype=over.get("param_dtype", torch.float32),
                      target_roles=(), target_names=(r"^layer$",), exclude_names=())
        if case == self.defaults_case(spec, case.device) and "param_dtype" not in over:
            del common["dtype"]  # the library's own adapter dtype
        if "dropout" in self.config_defaults(spec):
            common["dropout"] = cfg.dropout  # a field that exists gets the case's value, whatever lora-lite does with it
        own = {k: cfg.fields[k] for k in OWN_FIELDS.get(spec.name, ())}
        if self.variant_kwargs:
            return self.config_module.LoraLiteConfig(**common, variant_kwargs=own)
        cls = self.config_module._CONFIG_REGISTRY[spec.name]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**common, **own}.items() if k in names})

    def attach(self, model: nn.Module, spec: Spec, case: Case, calibration=None, **over) -> nn.Module:
        cfg = self.library_config(spec, case, **over)
        with _no_model_width(model):
            self.ll.attach(model, cfg, calibration)
        return model

    def detach(self, model) -> None:
        self.ll.detach(model)

    def save(self, model, path) -> None:
        self.ll.save(model, str(path))

    def load(self, model, path) -> None:
        with _no_model_width(model):
            self.ll.load(model, str(path))

    # ---- tensors

    def tensors(self, model) -> dict[str, torch.Tensor]:
        layer = model.layer
        variant = getattr(getattr(layer, "_lora_variant", None), "name", None)
        if variant not in TENSORS:
            raise RuntimeError(f"no lora-lite adapter this backend maps on the layer (variant {variant!r})")
        out = {}
        for ours, (attr, transform) in TENSORS[variant].items():
            t = getattr(layer, attr, None)
            if t is None:
                have = sorted(n for n, _ in layer.named_parameters() if n.startswith("lora_"))
                raise RuntimeError(f"lora-lite {self.version[:12]}'s {variant} has no '{attr}' (it has {have})")
            out[ours] = t if transform == "id" else Mapped.of(t, transform)
        return out

    def knobs(self, model) -> dict[str, float]:
        return {}

    def base_weight(self, model) -> torch.Tensor:
        return layers.dense_weight(model.layer)

    def dequantized(self, layer) -> torch.Tensor:
        return layers.dense_weight(layer)

    def hooks_left(self, model) -> list[str]:
        return [n or "<root>" for n, m in model.named_modules()
                if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_lora_variant")
                or hasattr(m, "_lora_lite_attached")]


BACKENDS["lora-lite"] = LoraLiteBackend
