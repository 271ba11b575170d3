"""Tests of tools.render (the audit): Markdown escaping, determinism, exclusive numbering under a race, the
changes section, and two offline runs in a temporary copy of the repository with a zoo bug swapped in between.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jinja2
import pytest

from tests.test_review import manifest_with_ref, verify_json
from tools import render as W
from tools import review as R
from tools.llm import ProviderConfig

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ProviderConfig(provider="offline")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An offline review run of lora with one failing property, reused by the rendering tests."""
    tmp = tmp_path_factory.mktemp("run")
    man, cache = manifest_with_ref(tmp)
    vj = verify_json(tmp / "v.json", [("lora", "oracle", "fail", "scaled error 1 | with a pipe", 1.0),
                                      ("lora", "merge", "pass", "", 1e-7)])
    return R.review(["lora"], verify_json=vj, config=OFFLINE, manifest_path=man, refs_cache=cache,
                    subset=["lora"], audits_dir=tmp / "audits")


# ----------------------------------------------------------------------------------------------- filters


def test_md_cell_and_inline_escape_untrusted_text():
    assert W.md_cell("a | b\nc") == r"a \| b<br>c"
    assert W.md_inline("<script>*x*</script> & [l](u) # h") == \
        r"\<script\>\*x\*\</script\> &amp; \[l\]\(u\) \# h"
    assert "\n" not in W.md_inline("line one\n# not a heading")


def test_code_block_fence_is_longer_than_any_backtick_run():
    text = "before\n````\ninside ``` fence\n````\nafter"
    block = W.code_block(text, "python")
    fence = block.split("\n", 1)[0]
    assert fence == "`````python" and block.endswith("\n`````")
    assert block[len(fence) + 1:-6] == text
    assert W.code_block("plain") == "```\nplain\n```"
    assert W.code_span("a `b` c") == "``a `b` c``" and W.code_span("`x") == "`` `x ``"


def test_md_url_refuses_other_schemes_and_encodes_breakers():
    assert W.md_url("../impl/x.py#L1-L2") == "../impl/x.py#L1-L2"
    assert W.md_url("https://e.com/a b)") == "https://e.com/a%20b%29"
    with pytest.raises(W.RenderError):
        W.md_url("javascript:alert(1)")


def test_templates_use_strict_undefined():
    env = W.make_env()
    with pytest.raises(jinja2.UndefinedError):
        env.get_template(W.AUDIT_TEMPLATE).render(number=1)
    with pytest.raises(jinja2.UndefinedError):
        env.get_template(R.PROMPT_TEMPLATE).make_module({"variant": "lora"}).user()


# ----------------------------------------------------------------------------------------------- content and determinism


def test_audit_content(run, tmp_path):
    text = W.render_audit(run, 1, None, tmp_path)
    assert text.startswith("# Variants review v1\n")
    assert "**No LLM was asked.**" in text and "**Subset:** this audit reviews only `lora`" in text
    assert "| [lora](#lora) | **BUGGY** | oracle |" in text
    assert "```math\n" + run["reviews"][0]["equation"] + "\n```" in text
    assert r"scaled error 1 \| with a pipe" in text  # a table cell cannot be broken by a pipe
    assert "[RefLora L4-L6](https://github.com/example/reflib/blob/" in text  # pinned lines, linked
    assert "| oracle | **fail** (assertion) | see detail |" in text and "| merge | pass | 1e-07 |" in text
    assert "### Differential results" in text and "No differential oracle results" in text
    assert text.count("## Provenance") == 1 and text.index("## Provenance") > text.index("## lora")
    assert "Not reviewed" not in text
    other = W.render_audit(dict(run, not_reviewed={"vera": "variant 'vera' is not implemented here"}), 1, None,
                           tmp_path)
    assert "> **Not reviewed:** `vera`: the verified backend has no counterpart" in other
    assert "variant 'vera' is not implemented here" in other and "## vera" not in other


def test_same_inputs_give_the_same_bytes_and_statistics_stay_in_provenance(run, tmp_path):
    a = W.render_audit(run, 3, None, tmp_path)
    assert W.render_audit(copy.deepcopy(run), 3, None, tmp_path) == a
    other = copy.deepcopy(run)
    other["provenance"].update(generated="2031-01-01T00:00:00Z", seconds=99.5, cache_hits=7, requests=3,
                               input_tokens=12345, output_tokens=678, commit="f" * 40)
    b = W.render_audit(other, 3, None, tmp_path)
    assert a != b
    assert a.split("## Provenance")[0] == b.split("## Provenance")[0]
    assert "12345 in, 678 out" in b.split("## Provenance")[1]


# ----------------------------------------------------------------------------------------------- numbering


def test_existing_audits_are_never_overwritten(run, tmp_path):
    audits = tmp_path / "audits"
    audits.mkdir()
    (audits / "variants_review_v1.md").write_text("hand-written, keep me\n")
    p = W.write_audit(run, audits)
    assert p.name == "variants_review_v2.md" and (audits / "variants_review_v2.json").is_file()
    assert (audits / "variants_review_v1.md").read_text() == "hand-written, keep me\n"
    assert not W.create_exclusive(p, b"other bytes") and p.read_text().startswith("# Variants review v2")
    assert not [f for f in audits.iterdir() if f.name.startswith(".")]  # no temp file left behind


def test_two_renders_racing_for_the_same_number_both_exist(run, tmp_path):
    audits = tmp_path / "audits"
    barrier = threading.Barrier(2, timeout=30)
    first_numbers, paths, errors = [], [], []

    def hold(n, attempt):
        if attempt == 0:  # both have rendered for the same N before either claims it
            first_numbers.append(n)
            barrier.wait()

    def go():
        try:
            paths.append(W.write_audit(run, audits, on_rendered=hold))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and first_numbers == [1, 1]
    assert sorted(p.name for p in paths) == ["variants_review_v1.md", "variants_review_v2.md"]
    for p in paths:
        n = int(p.stem.rsplit("v", 1)[1])
        assert p.read_text().startswith(f"# Variants review v{n}\n")
        assert json.loads(p.with_suffix(".json").read_text())["number"] == n
    # the one that lost the race re-rendered for v2, so it compares itself with v1
    assert "Compared with [v1](variants_review_v1.md)" in (audits / "variants_review_v2.md").read_text()


def test_changes_are_matched_by_identity_over_variants_in_both_runs():
    def side(verdicts, findings, variants=None):
        return {"schema": W.SIDECAR_SCHEMA, "variants": variants or list(verdicts), "verdicts": verdicts,
                "findings": [{"id": i, "variant": v, "severity": s, "category": "c", "claim": i, "verified": ok,
                              "source": "llm"} for i, v, s, ok in findings]}

    prev = side({"a": "OK", "b": "Partial", "gone": "OK"},
                [("p1", "a", "low", True), ("r1", "a", "high", True), ("u1", "a", "low", False),
                 ("g1", "gone", "high", True)])
    cur = side({"a": "BUGGY", "b": "Partial", "new": "OK"},
               [("p1", "a", "low", True), ("n1", "a", "high", True), ("u1", "a", "low", True),
                ("n2", "new", "high", True)])
    d = W.diff_runs((4, prev), cur)
    assert d["previous"] == 4 and d["compared"] == ["a", "b"]
    assert d["only_now"] == ["new"] and d["only_before"] == ["gone"]
    assert [f["id"] for f in d["new"]] == ["n1", "u1"]  # u1 was unverified before: now it is news
    assert [f["id"] for f in d["resolved"]] == ["r1"] and [f["id"] for f in d["persisting"]] == ["p1"]
    assert d["verdicts"] == [{"variant": "a", "before": "OK", "after": "BUGGY"}]
    assert W.diff_runs(None, cur) == {"previous": None}


def test_render_cli_reports_a_missing_review(tmp_path, capsys):
    assert W.main(["--review", str(tmp_path / "none.json"), "--audits", str(tmp_path)]) == 2
    assert "run `python -m tools.review` first" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- two offline runs


def _copy_repo(dst: Path) -> Path:
    skip = {".git", ".cache", "build", ".nox", ".hypothesis", "__pycache__", ".pytest_cache"}

    def ignore(folder, names):
        out = {n for n in names if n in skip or n.endswith((".pyc", ".whl"))}
        if Path(folder).name == "audits":
            out |= {n for n in names if W.AUDIT_NAME.match(n)}
        return out

    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", *cmd], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=400, check=False)
    assert p.returncode in (0, 1), f"{cmd} exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _swap_in_zoo_bug(repo: Path) -> str:
    """Replace LoRA.forward in the copy's impl/variants/lora.py by the zoo mutant lora.alpha_scale's forward."""
    from harness.zoo.lora import AlphaScale

    src = textwrap.dedent(inspect.getsource(AlphaScale.forward)).replace("def forward(", "def _zoo_forward(", 1)
    f = repo / "impl" / "variants" / "lora.py"
    f.write_text(f.read_text() + "\n\n# zoo bug lora.alpha_scale swapped in by tests/test_audit.py\n"
                 + src + "\n\nLoRA.forward = _zoo_forward\n")
    return "lora.alpha_scale"


def test_two_offline_runs_write_v1_then_v2_and_v2_reports_the_swapped_in_bug(tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REVIEW_", "OPENAI_", "ANTHROPIC_"))}
    env.update(REFS_CACHE=str(tmp_path / "empty-cache"), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    props = "identity_at_init,oracle,init_formula,config_constraints,merge"
    verify = ["tools.verify", "--variants", "lora", "-n", "0", "--json", "build/verify/impl.json",
              "--properties", props]
    review = ["tools.review", "--offline", "--variants", "lora"]

    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    _run(verify, repo, env)
    _run(review, repo, env)
    p1 = _run(["tools.render"], repo, env)
    subprocess.run([*git, "add", "audits"], check=True)
    subprocess.run([*git, "commit", "-qm", "audit v1"], check=True)  # v2 diffs the variant against this commit
    v1 = repo / "audits" / "variants_review_v1.md"
    assert "audit written" in p1.stdout and v1.is_file()
    v1_bytes = v1.read_bytes()
    side1 = json.loads((repo / "audits" / "variants_review_v1.json").read_text())
    assert side1["verdicts"] == {"lora": "OK"} and side1["subset"] == ["lora"]

    _swap_in_zoo_bug(repo)
    _run(verify, repo, env)
    _run(review, repo, env)
    _run(["tools.render"], repo, env)
    v2 = repo / "audits" / "variants_review_v2.md"
    assert v1.read_bytes() == v1_bytes  # never overwritten
    side2 = json.loads((repo / "audits" / "variants_review_v2.json").read_text())
    assert side2["verdicts"] == {"lora": "BUGGY"}

    text = v2.read_text()
    changes = text.split("## Changes since the previous audit", 1)[1].split("\n## lora", 1)[0]
    oracle_id = R.finding_id("lora", "verify_failure", "verify", "property:oracle")
    new = changes.split("### New findings", 1)[1].split("### Resolved findings", 1)[0]
    resolved = changes.split("### Resolved findings", 1)[1].split("### Persisting findings", 1)[0]
    persisting = changes.split("### Persisting findings", 1)[1]
    assert "Compared with [v1](variants_review_v1.md)" in changes
    assert "| lora | OK | **BUGGY** |" in changes
    assert f"`{oracle_id}`" in new and "verify\\_failure" in new
    assert "None." in resolved
    v1_ids = [f["id"] for f in side1["findings"] if f["verified"]]
    assert v1_ids and all(f"`{i}`" in persisting for i in v1_ids)
    assert f"({len(v1_ids)})" in changes.split("### Persisting findings", 1)[1].split("\n", 1)[0]
    assert "**Subset:** this audit reviews only `lora`" in text
    changed = text.split("### Changed since the previous audit", 1)[1].split("###", 1)[0]
    assert "Diffed against v1" in changed and "| `impl/variants/lora.py` | modified |" in changed
    assert "`spec/variants/lora.py`" not in changed  # unchanged files are not listed
    review_json = json.loads((repo / "build" / "review" / "review.json").read_text())
    assert "generated/changes/lora.diff" in [f["path"] for f in review_json["reviews"][0]["bundle"]["files"]]
