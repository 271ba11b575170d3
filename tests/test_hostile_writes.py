"""Writers killed midway (issue #27): `impl.save` and the audit renderer are SIGKILLed in a child process while
they hold their temporary file. The temporary file is git-ignored, a live writer's is left alone, the next write
into the folder removes a dead writer's, and an orphan sidecar never becomes the audit compared with."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import impl
from impl.atomic import TEMP_SUFFIX
from tests.test_review import manifest_with_ref, verify_json
from tools import render as W
from tools import review as R
from tools.llm import ProviderConfig

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys, time
from pathlib import Path
mode, target = sys.argv[1], Path(sys.argv[2])
real_link = os.link

def hang(*args, **kw):
    print("holding", flush=True)
    time.sleep(600)

if mode == "save":
    os.replace = hang  # impl.atomic renames the fsynced temporary file with os.replace
    import impl
    from torch import nn
    m = nn.Sequential(nn.Linear(4, 3))
    impl.attach(m, impl.config("lora", r=2, target_names=[r"^0$"]))
    impl.save(m, target)
else:  # render: the sidecar is claimed, then the process dies while claiming the audit
    os.link = lambda src, dst: hang() if str(dst).endswith(".md") else real_link(src, dst)
    from tools.render import load_review, write_audit
    write_audit(load_review(Path(sys.argv[3])), target)
"""


def _start(tmp_path, *args) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, text=True)
    line = proc.stdout.readline()  # blocks until the child holds its temporary file
    assert line.strip() == "holding", line
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def _git_ignored(path: Path) -> bool:
    rel = Path("audits") / path.name  # the same name inside the repository
    return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", str(rel)]).returncode == 0


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3))
    impl.attach(m, impl.config("lora", r=2, target_names=[r"^0$"]))
    return m


def test_a_killed_save_leaves_an_ignored_temp_that_the_next_write_removes(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    proc = _start(tmp_path, "save", folder / "a.safetensors")
    try:
        (live,) = _temps(folder)
        impl.save(_model(), folder / "b.safetensors")  # a live writer's temporary file is left alone
        assert _temps(folder) == [live]
    finally:
        _kill(proc)
    assert live.exists() and live.name.startswith(".a.safetensors.") and _git_ignored(live)
    assert not (folder / "a.safetensors").exists()
    impl.save(_model(), folder / "a.safetensors")  # the next write removes the dead writer's file
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert impl.is_attached(impl.load(nn.Sequential(nn.Linear(4, 3)), folder / "a.safetensors",
                                      allow_base_mismatch=True))


@pytest.fixture(scope="module")
def review_json(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    man, cache = manifest_with_ref(tmp)
    vj = verify_json(tmp / "v.json", [("lora", "oracle", "fail", "scaled error 1", 1.0)])
    run = R.review(["lora"], verify_json=vj, config=ProviderConfig(provider="offline"), manifest_path=man,
                   refs_cache=cache, subset=["lora"])
    path = tmp / "review.json"
    path.write_text(json.dumps(run))
    return path


def test_a_killed_render_leaves_no_orphan_link_and_its_temp_is_cleaned(tmp_path, review_json):
    audits = tmp_path / "audits"
    run = W.load_review(review_json)
    assert W.write_audit(run, audits).name == "variants_review_v1.md"
    proc = _start(tmp_path, "render", audits, review_json)
    _kill(proc)
    (stale,) = _temps(audits)
    assert stale.name.startswith(".variants_review_v2.md.") and _git_ignored(stale)
    assert (audits / "variants_review_v2.json").is_file() and not (audits / "variants_review_v2.md").exists()

    v3 = W.write_audit(run, audits)
    assert v3.name == "variants_review_v3.md" and _temps(audits) == []
    text = v3.read_text()
    assert "Compared with [v1](variants_review_v1.md)" in text and "variants_review_v2.md" not in text
    assert W.previous_sidecar(audits, 3)[0] == 1
