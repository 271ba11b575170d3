"""`python -m tools.zoo`: run every zoo mutant through the property that names its bug.

Prints one line per mutant and the detection rate, writes build/zoo.json, exits non-zero if any mutant
escapes. Hypothesis' shrink phase is off and each mutant stops at its first failure (profile `zoo`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.zoo")
    ap.add_argument("--only", default="", help="comma-separated mutant names or variant prefixes")
    ap.add_argument("--json", default=str(ROOT / "build" / "zoo.json"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from harness.engine import write_json
    from harness.zoo import all_mutants, detected, report, run_mutant

    torch.set_num_threads(1)
    want = [w for w in a.only.split(",") if w]
    mutants = [m for m in all_mutants() if not want or m.name in want or m.base in want]
    results = []
    for m in mutants:
        r = run_mutant(m)
        results.append(r)
        mark = "caught" if detected(r) else "ESCAPED"
        print(f"{mark:8} {m.name:<34} by {m.expects:<22} {r.seconds:6.2f}s  {r.detail[:90]}")
    rep = report(mutants, results)
    write_json(Path(a.json), rep)
    print(f"detection rate: {rep['detected']}/{rep['total']} = {rep['rate']:.0%} -> {a.json}")
    return 0 if rep["detected"] == rep["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
