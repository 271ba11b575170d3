"""The generated verify items: one pytest item per (variant, property), parametrized by harness.plugin."""
import json

import pytest

from spec import SPECS
from harness.engine import run_property
from harness import PROPERTIES


def test_property(variant, prop, verify_env, record_property):
    res = run_property(PROPERTIES[prop], SPECS.get(variant), verify_env["backend"], verify_env["profile"],
                       verify_env["device"], verify_env["deadline_s"], verify_env["interrupted"])
    row = res.to_json()  # its texts capped
    record_property("verify", json.dumps(row))
    res.detail, res.example = row["detail"], row["example"]
    if res.status == "na":
        pytest.skip(f"n/a: {res.detail}")
    if res.status == "fail":
        kind = "crashed" if res.failure_kind == "crash" else "failed"
        pytest.fail(f"{variant}/{prop} {kind}: {res.detail}\nminimal example: {res.example}", pytrace=False)
