"""The README's API example runs as written (in a temporary folder)."""
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    script = tmp_path / "readme_example.py"
    script.write_text(blocks[0])
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(script))
    assert (tmp_path / "adapter.safetensors").exists()
    assert not ns["impl"].is_attached(ns["fresh"])  # merged: no adapter left
