"""The lora-lite backend and its timeline, against a lora-lite-shaped repository made on the fly (both config eras,
a bug planted in the second commit), GitHub's archive path against the local HTTP server, and, only where
LORA_LITE_REPO names a real clone, lora-lite itself."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.http_files import FileServer
from tools.lora_lite import fetch_archive

ROOT = Path(__file__).resolve().parents[1]

ADAPTER = '''
import json, re
import torch
from torch import nn
from safetensors.torch import save_file, load_file
from . import config


class LoRA:
    name = "lora"


REGISTRY = {"lora": LoRA}


def _hook(layer, args, y):
    cfg = layer._lora_cfg
    x = args[0].to(cfg.dtype)
    return (y + SCALE * (x @ layer.lora_A.t() @ layer.lora_B.t())).to(y.dtype)


def attach(model, cfg, calibration_data=None):
    model.requires_grad_(False)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(re.search(p, name) for p in cfg.target_names):
            A = torch.empty(cfg.r, m.in_features, dtype=cfg.dtype)
            nn.init.kaiming_uniform_(A, a=5 ** 0.5)
            m.lora_A = nn.Parameter(A)
            m.lora_B = nn.Parameter(torch.zeros(m.out_features, cfg.r, dtype=cfg.dtype))
            m._lora_cfg, m._lora_variant = cfg, LoRA
            m._lora_handle = m.register_forward_hook(_hook)
    model._lora_lite_attached = cfg


def detach(model):
    for m in model.modules():
        if hasattr(m, "_lora_handle"):
            m._lora_handle.remove()
            del m.lora_A, m.lora_B, m._lora_cfg, m._lora_variant, m._lora_handle
    del model._lora_lite_attached


def save(model, path):
    cfg = model._lora_lite_attached
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    meta = {"r": cfg.r, "alpha": cfg.alpha, "dtype": str(cfg.dtype).removeprefix("torch."), "names": cfg.target_names}
    save_file(sd, path, metadata={"cfg": json.dumps(meta)})


def load(model, path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["cfg"])
    cfg = config.make(r=meta["r"], alpha=meta["alpha"], dtype=getattr(torch, meta["dtype"]),
                      target_names=tuple(meta["names"]))
    attach(model, cfg)
    model.load_state_dict(load_file(path), strict=False)
'''

COMMON_FIELDS = '''
    r: int = 8
    alpha: float = 16.0
    dtype: torch.dtype = torch.bfloat16
    target_roles: tuple = ()
    target_names: tuple = ()
    exclude_names: tuple = ()
    layers: tuple | None = None
'''

CONFIG_ERA1 = f'''
from dataclasses import dataclass, field
import torch


@dataclass
class LoraLiteConfig:
    variant: str = "lora"
{COMMON_FIELDS}
    variant_kwargs: dict = field(default_factory=dict)


def make(**kw):
    return LoraLiteConfig(**kw)
'''

CONFIG_ERA2 = f'''
from dataclasses import dataclass
import torch


@dataclass
class AdapterConfig:
    variant: str = "?"
{COMMON_FIELDS}


@dataclass
class LoRAConfig(AdapterConfig):
    variant: str = "lora"


_CONFIG_REGISTRY = {{"lora": LoRAConfig}}


def make(**kw):
    return LoRAConfig(**kw)
'''

INIT = "from .adapter import REGISTRY, attach, detach, load, save\n"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, config: str, scale: str, message: str) -> str:
    pkg = repo / "src" / "lora_lite"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(INIT)
    (pkg / "config.py").write_text(config)
    (pkg / "adapter.py").write_text(ADAPTER.replace("SCALE *", f"({scale}) *"))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", message)
    return _git(repo, "rev-parse", "HEAD")


def test_timeline_over_both_config_eras_flags_the_commit_that_broke(tmp_path):
    """Commit 1 (one config with variant_kwargs) is right; commit 2 (per-variant dataclasses) scales by alpha/(r+1):
    the timeline shows lora/oracle passing, then failing, each commit's JSON carrying its commit id."""
    repo = tmp_path / "lora-lite"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    good = _commit(repo, CONFIG_ERA1, "cfg.alpha / cfg.r", "era 1")
    bad = _commit(repo, CONFIG_ERA2, "cfg.alpha / (cfg.r + 1)", "era 2 with a bug")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.lora_lite", "timeline", "--repo", str(repo), "--variants", "lora,dora",
         "--properties", "identity_at_init,oracle,merge,checkpoint_roundtrip", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "lora-lite-timeline.json").read_text())
    assert [c["commit"] for c in data["commits"]] == [good, bad]
    first, second = ({(r["variant"], r["property"]): r for r in c["results"]} for c in data["commits"])
    assert first[("lora", "oracle")]["status"] == "pass" and second[("lora", "oracle")]["status"] == "fail"
    assert first[("lora", "checkpoint_roundtrip")]["status"] == second[("lora", "checkpoint_roundtrip")]["status"] == "pass"
    assert "has no merge" in first[("lora", "merge")]["detail"] and first[("lora", "merge")]["status"] == "na"
    assert "has no 'dora'" in first[("dora", "oracle")]["detail"]
    per_commit = json.loads((out / f"lora-lite-{bad[:12]}.json").read_text())
    assert per_commit["backend"] == "lora-lite" and per_commit["backend_version"] == bad
    table = (out / "lora-lite-timeline.md").read_text()
    assert "| lora/oracle | . | F |" in table
    # the failure list names the commit that broke it, says it still fails, and carries the minimal example
    line = next(l for l in table.splitlines() if l.startswith("- **lora/oracle**"))
    assert f"fails at {bad[:7]}..{bad[:7]}, still failing" in line and "minimal example `Case(" in line


def _archive(top: str, files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_github_archive_is_fetched_once_and_its_sha256_pinned(tmp_path):
    commit = "ab" * 20
    good = _archive(f"lora-lite-{commit}", {"src/lora_lite/__init__.py": "X = 1\n"})
    cache = tmp_path / "cache"
    with FileServer() as srv:
        srv.add(f"/wassname/lora-lite/archive/{commit}.tar.gz", good)
        url = srv.base_url + "/wassname/lora-lite"
        dest = fetch_archive(url, commit, cache)
        assert (dest / "src" / "lora_lite" / "__init__.py").read_text() == "X = 1\n"
        assert json.loads((cache / "sha256.json").read_text()) == {commit: hashlib.sha256(good).hexdigest()}
        assert fetch_archive(url, commit, cache) == dest and len(srv.paths()) == 1  # cached: no request
        # the server now serves other bytes for the same commit: refused, nothing extracted
        import shutil

        shutil.rmtree(dest)
        srv.add(f"/wassname/lora-lite/archive/{commit}.tar.gz",
                _archive(f"lora-lite-{commit}", {"src/lora_lite/__init__.py": "X = 2\n"}))
        with pytest.raises(RuntimeError, match="differs from the .* recorded on its first fetch"):
            fetch_archive(url, commit, cache)
        assert not dest.exists()
        with pytest.raises(RuntimeError, match="HTTP 404"):
            fetch_archive(url, "cd" * 20, cache)
    with pytest.raises(ValueError, match="full 40-hex commit"):
        fetch_archive(url, "main", cache)


@pytest.mark.lora_lite_clone
@pytest.mark.skipif(not os.environ.get("LORA_LITE_REPO"), reason="set LORA_LITE_REPO to a clone of lora-lite")
def test_real_lora_lite_clone(tmp_path):
    """lora-lite itself at its newest main commit: LoRA's forward matches the spec's oracle."""
    out = tmp_path / "v.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.verify", "--backend", "lora-lite", "--ref", "main", "--repo",
         os.environ["LORA_LITE_REPO"], "--variants", "lora", "--properties", "oracle,merge", "-n", "0",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    data = json.loads(out.read_text())
    status = {r["property"]: r["status"] for r in data["results"]}
    assert status == {"oracle": "pass", "merge": "na"}, proc.stdout[-2000:]
    assert len(data["backend_version"]) == 40


def test_ignored_dropout_field_fails_and_the_library_defaults_are_a_case(tmp_path):
    """Commit 1's config has a `dropout` field the adapter never reads: the dropout property fails there (not n/a);
    commit 2 has no such field (n/a, with the reason) and a bug only at the library's own default alpha (16, which
    the drawn cases never take): the oracle catches it through the library-defaults case."""
    repo = tmp_path / "lora-lite"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    era1 = CONFIG_ERA1.replace("    variant_kwargs:", "    dropout: float = 0.0  # currently ignored\n    variant_kwargs:")
    ignored = _commit(repo, era1, "cfg.alpha / cfg.r", "dropout field, ignored")
    default_bug = _commit(repo, CONFIG_ERA2, "(cfg.alpha if cfg.alpha != 16.0 else 1.0) / cfg.r", "bug at the default")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.lora_lite", "timeline", "--repo", str(repo), "--variants", "lora",
         "--properties", "dropout,oracle", "--out", str(out), "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "lora-lite-timeline.json").read_text())
    assert [c["commit"] for c in data["commits"]] == [ignored, default_bug]
    first, second = ({(r["variant"], r["property"]): r for r in c["results"]} for c in data["commits"])
    assert first[("lora", "dropout")]["status"] == "fail", first[("lora", "dropout")]
    assert "dropout mask" in first[("lora", "dropout")]["detail"]
    assert second[("lora", "dropout")]["status"] == "na" and "no adapter dropout" in second[("lora", "dropout")]["detail"]
    assert first[("lora", "oracle")]["status"] == "pass", first[("lora", "oracle")]
    assert second[("lora", "oracle")]["status"] == "fail"
    assert "fields={'r': 8, 'alpha': 16.0" in second[("lora", "oracle")]["example"]
