"""The verify command end to end: a user's own variant from outside impl/, its JSON, and its exit code."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_verify(tmp_path, module: Path, variant: str):
    out = tmp_path / "verify.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.verify", "--variant-module", str(module), "--variants", variant, "-n", "0",
         "--json", str(out), "--profile", "ci"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_user_variant_module_verifies(tmp_path):
    proc, data = run_verify(tmp_path, ROOT / "examples" / "scaled_lora.py", "scaled_lora")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert data["schema"] == "lora-verify/results/2" and data["variants"] == ["scaled_lora"]
    statuses = {r["property"]: r["status"] for r in data["results"]}
    assert statuses["oracle"] == statuses["checkpoint_roundtrip"] == statuses["merge"] == "pass"
    assert set(statuses.values()) <= {"pass", "na"}
    assert "scaled_lora" in proc.stdout  # the table


def test_a_broken_user_variant_fails_with_its_property(tmp_path):
    src = (ROOT / "examples" / "scaled_lora.py").read_text()
    broken = src.replace("* (s * ad.gamma)", "* (s * ad.gamma * 2)")
    assert broken != src
    mod = tmp_path / "broken_lora.py"
    mod.write_text(broken)
    proc, data = run_verify(tmp_path, mod, "scaled_lora")
    assert proc.returncode != 0
    failed = {r["property"] for r in data["results"] if r["status"] == "fail"}
    assert "oracle" in failed and "merge" in failed
    assert "minimal example" in proc.stdout
