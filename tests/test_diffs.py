"""tools.diffs: changes since an audit's commit (a real git repository in a temporary folder), quotes of diff
lines checked against the files at both sides, and the function-by-function alignment with a reference."""
from __future__ import annotations

import subprocess
from pathlib import Path

from tools import diffs as D

OURS = """\
def lora_scale(alpha, r, rslora=False):
    return alpha / (r ** 0.5) if rslora else alpha / r


class LoRA:
    def forward(self, x, A, B, alpha, r):
        s = lora_scale(alpha, r)
        return (x @ A.T) @ B.T * s
""".splitlines()

THEIRS = """\
import math


class Linear:
    def update_layer(self, r, alpha, rslora):
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r

    def forward(self, x, lora_A, lora_B, scaling):
        result = x
        result = result + lora_B(lora_A(x)) * scaling
        return result

    def unrelated_bookkeeping(self):
        names = sorted(self._adapters)
        return {n: len(n) for n in names}
""".splitlines()


def _repo(tmp: Path) -> tuple[Path, str]:
    git = ["git", "-C", str(tmp), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    (tmp / "v.py").write_text("a = 1\nb = 2\nc = 3\n")
    (tmp / "same.py").write_text("x = 0\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    base = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp / "v.py").write_text("a = 1\nb = 20\nc = 3\nd = 4\n")
    return tmp, base


def test_changes_since_lists_changed_files_and_their_diff(tmp_path):
    root, base = _repo(tmp_path)
    ch = D.changes_since(base, ["v.py", "same.py"], root)
    assert ch["files"] == [{"path": "v.py", "status": "modified", "added": 2, "removed": 1},
                           {"path": "same.py", "status": "unchanged", "added": 0, "removed": 0}]
    assert "-b = 2" in ch["diff"] and "+b = 20" in ch["diff"] and "+d = 4" in ch["diff"]
    assert D.changes_since(base, ["same.py"], root)["diff"] == []


def test_a_diff_line_maps_to_its_file_line_and_quotes_are_checked_at_both_sides(tmp_path):
    root, base = _repo(tmp_path)
    diff = D.changes_since(base, ["v.py"], root)["diff"]
    i_old, i_new = diff.index("-b = 2"), diff.index("+b = 20")
    assert D.diff_line_origin(diff, i_old) == ("v.py", "old", 2)
    assert D.diff_line_origin(diff, i_new) == ("v.py", "new", 2)
    assert D.diff_line_origin(diff, 0) is None  # a header
    assert D.check_diff_quote(diff, i_old + 1, i_new + 1, base, root) == (True, "matches")
    forged = list(diff)
    forged[i_old] = "-b = 7"  # a line the base commit never held
    ok, why = D.check_diff_quote(forged, i_old + 1, i_old + 1, base, root)
    assert not ok and "v.py:2" in why and base[:12] in why
    (root / "v.py").write_text("a = 1\n")  # the working tree no longer holds the added line
    ok, why = D.check_diff_quote(diff, i_new + 1, i_new + 1, base, root)
    assert not ok and "working tree" in why


def test_functions_align_by_the_names_they_use_and_unmatched_ones_are_left_out():
    pairs = D.align(OURS, THEIRS)
    got = {p["ours"]: p["theirs"] for p in pairs}
    assert got == {"lora_scale": "Linear.update_layer", "LoRA.forward": "Linear.forward"}
    fwd = next(p for p in pairs if p["ours"] == "LoRA.forward")
    assert fwd["ours_lines"] == [6, 8] and fwd["theirs_lines"] == [8, 11]
    rows, _ = D.side_by_side(OURS, THEIRS, "ours.py", "ref.py")
    header = next(r for r in rows if r.startswith("== LoRA.forward"))
    assert "(ours.py:6-8) <-> Linear.forward (ref.py:8-11)" in header
    assert any(r.startswith("~") and "7 |" in r and "9 |" in r for r in rows)  # line numbers on both sides
    assert D.align(OURS, ["x = 1"]) == []
