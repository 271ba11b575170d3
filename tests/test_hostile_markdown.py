"""Hostile input, round two (issue 35), class 15: generated Markdown.

One escaping filter (tools.render.md_text, the audit environment's finalize) handles every value printed from
input: variant names, commit subjects, history fields. HTML and Markdown link syntax are neutralised; text with
nothing to escape renders byte for byte as before (the committed PEFT history re-renders identical).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from tests.test_review import manifest_with_ref, verify_json
from tools import lora_lite as LL
from tools import peft_history as ph
from tools import render as W
from tools import review as R
from tools.llm import ProviderConfig

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "lora<img src=x onerror=alert(1)> [click](https://evil.example/x) &lt; www.evil.example\n# heading"


def _clean(md: str) -> None:
    """No live HTML tag, link, bare URL or injected block outside code spans (where Markdown is inert)."""
    text = re.sub(r"(`+)(?:(?!\1).)*?\1", "", md.replace("<br>", ""))
    assert not re.search(r"<[A-Za-z/!?]", text), text
    assert not re.search(r"(?<!\\)\][(\[]", text) and "https://" not in text and "www.evil" not in text
    assert not any(line.startswith("# heading") for line in md.splitlines())


@pytest.mark.parametrize("text, want", [
    ("plain text (with parens), [brackets] and a|pipe: c10::BFloat16 != float", None),
    ("a <b>bold</b> tag", "a &lt;b>bold&lt;/b> tag"),
    ("[x](javascript:alert(1))", "[x\\](javascript:alert(1))"),
    ("![img][ref]", "![img\\][ref]"),
    ("&amp; &#60; & x", "&amp;amp; &amp;#60; & x"),
    ("see https://a.example and www.b.example", "see https\\://a.example and www\\.b.example"),
    ("two\nlines", "two lines"),
])
def test_md_text_neutralises_html_and_links_only(text, want):
    assert W.md_text(text) == (text if want is None else want)


def test_every_printed_value_of_an_audit_template_is_escaped_once():
    env = W.make_env()
    out = env.from_string("{{ v }} | {{ v | md_cell }} | {{ n }} | {{ [v] | join(',') }}").render(v="<i>x</i>", n=3)
    assert out == "&lt;i>x&lt;/i> | \\<i\\>x\\</i\\> | 3 | &lt;i>x&lt;/i>"
    # the review prompt shows the model the files as they are
    assert W.make_env(markdown=False).from_string("{{ v }}").render(v="<i>x</i>") == "<i>x</i>"


def test_the_committed_peft_history_re_renders_byte_identical():
    doc = json.loads((ROOT / "audits" / "peft_history.json").read_text())
    run = doc.pop("run")
    assert ph.render_markdown(doc, run) == (ROOT / "audits" / "peft_history.md").read_text()


def test_history_fields_from_input_are_escaped():
    res = {"variant": HOSTILE, "property": "oracle<script>", "status": "fail", "failure_kind": None,
           "detail": "[x](https://evil.example) <b>", "example": "Case(`<b>`)", "where": "[w](https://evil.example)"}
    history = ph.build_history([{"version": "0.9.0", "status": "ran", "results": [res], "line": None},
                                {"version": "0.10.0", "status": "error", "results": None,
                                 "line": "pip: <a href='https://evil.example'>x</a>"}])
    md = ph.render_markdown(history, {"date": "d", "range": "0.9.0..0.10.0", "all_patches": False, "variants": HOSTILE,
                                      "properties": "p", "profile": "ci", "budget_s": 1, "seconds": 1,
                                      "budget_spent": False})
    _clean(md)


def test_commit_subjects_in_the_timeline_are_escaped():
    row = {"variant": "lora", "property": "oracle", "status": "fail", "detail": HOSTILE, "example": "Case()", "where": None}
    md, _ = LL.table([{"commit": "a" * 40, "subject": HOSTILE, "results": [row]}])
    _clean(md)


def test_an_audit_with_nothing_to_escape_is_unchanged_and_a_hostile_one_is_escaped(tmp_path, monkeypatch):
    man, cache = manifest_with_ref(tmp_path)
    vj = verify_json(tmp_path / "v.json", [("lora", "oracle", "fail", "scaled error 1 (x) [y]", 1.0)])
    run = R.review(["lora"], verify_json=vj, config=ProviderConfig(provider="offline"), manifest_path=man,
                   refs_cache=cache, audits_dir=tmp_path / "audits")
    escaped = W.render_audit(run, 1, None, tmp_path / "audits")
    plain_env = W.make_env
    monkeypatch.setattr(W, "make_env", lambda t=W.TEMPLATES: plain_env(t, markdown=False))
    assert W.render_audit(run, 1, None, tmp_path / "audits") == escaped  # nothing to escape: the same bytes
    monkeypatch.undo()
    bad = copy.deepcopy(run)
    bad["reviews"][0]["variant"] = HOSTILE
    for f in bad["reviews"][0]["findings"]:
        f["source"] = "<img src=x>"
    md = W.render_audit(bad, 1, None, tmp_path / "audits")
    text = re.sub(r"(`+)(?:(?!\1).)*?\1", "", md.replace("<br>", ""))
    assert not re.search(r"(?<!\\)<[A-Za-z/!?]", text) and "[click](" not in text
    assert "\n## lora&lt;img src=x onerror=alert(1)> [click\\](https\\://evil.example/x)" in md
