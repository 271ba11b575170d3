"""tools.peft_history (PEFT's releases) and the PEFT backend's adaptation to a release's API. No network: pip is
replaced by a fake runner, and the installed peft is monkeypatched to lack a feature."""
from __future__ import annotations

import json
import subprocess

import pytest

from tools import peft_history as ph


def test_constraints_file_carries_the_full_version(tmp_path, monkeypatch):
    monkeypatch.setattr(ph, "ENVS", tmp_path)
    a, b = ph.constraints_file("0.10.0"), ph.constraints_file("0.10.1")
    assert a != b
    assert a.name == "verify-peft-0.10.0.constraints.txt" and b.name == "verify-peft-0.10.1.constraints.txt"
    assert ph.env_dir("0.10.0") != ph.env_dir("0.10.1")
    text = ph.release_constraints("0.10.1", "torch==2.13.0\npeft==0.21.2\nbitsandbytes==0.50.2\n")
    assert text.splitlines() == ["torch==2.13.0", "bitsandbytes==0.50.2", "peft==0.10.1"]


def test_versions_are_selected_from_the_index_listing():
    listed = ["0.21.2", "0.21.1", "0.20.0", "0.18.1", "0.18.0", "0.10.1", "0.10.0", "0.9.0", "0.8.2"]
    assert ph.select(listed, "0.9.0", "0.21.2") == ["0.9.0", "0.10.1", "0.18.1", "0.20.0", "0.21.2"]
    assert ph.select(listed, "0.10.0", "0.18.0", all_patches=True) == ["0.10.0", "0.10.1", "0.18.0"]
    with pytest.raises(ValueError, match="not a final release"):
        ph.parse_range("0.9..0.18.0rc0")
    with pytest.raises(ValueError, match="empty range"):
        ph.parse_range("0.21.2..0.9.0")


def _pip(rc: int, stderr: str):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, rc, "", stderr)

    return run, calls


def test_uninstallable_release_is_one_line_naming_why(tmp_path, monkeypatch):
    monkeypatch.setattr(ph, "ENVS", tmp_path)
    run, calls = _pip(1, "WARNING: Location 'file:///x' is ignored\nERROR: Could not find a version that satisfies "
                         "the requirement peft==0.99.0 (from versions: 0.9.0)\nERROR: No matching distribution "
                         "found for peft==0.99.0\n")
    with pytest.raises(ph.ReleaseError) as e:
        ph.ensure_env("0.99.0", run=run)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == "peft 0.99.0 cannot be installed: ERROR: No matching distribution found for peft==0.99.0"
    assert calls and "--no-deps" in calls[0] and "peft==0.99.0" in calls[0]  # the release alone
    assert not (ph.env_dir("0.99.0") / ph.STAMP).exists()


def test_too_old_release_and_bad_version_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ph, "ENVS", tmp_path)
    assert ph.main(["one", "0.8.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "peft 0.8.2 is older than 0.9.0" in err
    assert ph.main(["one", "latest"]) == 2
    assert "not a final release version: 'latest'" in capsys.readouterr().err


def test_unimportable_release_is_one_line(tmp_path):
    def run(cmd, **kw):
        out = json.dumps({"version": "unimportable", "shims": [], "transformers": "5.25.0",
                          "error": "ImportError: cannot import name 'Foo' from 'transformers'"})
        return subprocess.CompletedProcess(cmd, 0, out + "\n", "")

    with pytest.raises(ph.ReleaseError) as e:
        ph.probe("0.16.0", tmp_path, run=run)
    assert str(e.value) == ("peft 0.16.0 does not import with transformers 5.25.0: "
                            "ImportError: cannot import name 'Foo' from 'transformers'")


def _res(v, p, status, kind=None, detail="", example=None):
    return {"variant": v, "property": p, "status": status, "failure_kind": kind, "detail": detail,
            "example": example, "where": "peft/x.py:1" if status == "fail" else None}


def test_history_first_failing_and_fixed_in_and_render(tmp_path):
    releases = [
        {"version": "0.9.0", "status": "ran", "results": [_res("lora", "merge", "pass"), _res("dora", "oracle", "na", detail="peft 0.9.0 has no X")]},
        {"version": "0.10.0", "status": "ran", "results": [
            _res("lora", "merge", "fail", "check", "merge drifted by 3e-2", "Case(r=2)"), _res("dora", "oracle", "pass")]},
        {"version": "0.11.1", "status": "ran", "results": [
            _res("lora", "merge", "fail", "crash", "AttributeError: x [at /home/u/.nox/verify-peft-0.11.1/site/peft/a.py:3 in f]",
                 "Case(r=1)"), _res("dora", "oracle", "pass")]},
        {"version": "0.12.0", "status": "ran", "results": [_res("lora", "merge", "pass"), _res("dora", "oracle", "pass")]},
        {"version": "0.13.2", "status": "error", "line": "peft 0.13.2 cannot be installed: ERROR: x", "results": None},
        {"version": "0.14.0", "status": "skipped", "line": "not started: the budget of 10 s was spent", "results": None},
    ]
    h = ph.build_history(releases)
    rows = {(r["variant"], r["property"]): r for r in h["rows"]}
    merge = rows[("lora", "merge")]
    assert merge["cells"] == {"0.9.0": "pass", "0.10.0": "F", "0.11.1": "E", "0.12.0": "pass", "0.13.2": "", "0.14.0": ""}
    assert merge["first_failing"] == "0.10.0" and merge["fixed_in"] == "0.12.0"
    assert [f["releases"] for f in merge["failures"]] == [["0.10.0"], ["0.11.1"]]
    assert merge["failures"][1]["detail"] == "AttributeError: x [at peft/a.py:3 in f]"  # no machine's folders
    assert ("dora", "oracle") not in rows  # na at one release, never failing or deviating: no row
    avail = {a["variant"]: a for a in h["availability"]}
    assert avail["dora"]["cells"]["0.9.0"] == "peft 0.9.0 has no X" and avail["dora"]["first_available"] == "0.10.0"
    run = {"range": "0.9.0..0.14.0", "all_patches": False, "profile": "history", "variants": "lora,dora",
           "properties": "merge,oracle", "budget_s": 10, "budget_spent": True, "seconds": 12, "date": "today"}
    js, md = ph.write_history(h, run, stem=tmp_path / "peft_history")
    text = md.read_text()
    assert "| lora | merge | pass | F | E | pass |  |  | 0.10.0 | 0.12.0 |" in text
    assert "| dora | peft 0.9.0 has no X | yes | yes | yes |  |  | 0.10.0 |" in text
    assert "minimal example: `Case(r=2)`" in text and "merge drifted by 3e-2" in text
    assert "peft 0.13.2 cannot be installed" in text and "\n- Budget 10 s; the run took 12 s. **The budget was spent" in text
    assert json.loads(js.read_text())["rows"][0]["cells"]
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, no temporary left
    repros = sorted((ph.ROOT / "audits" / "peft_history" / "repro").glob("*.py"))
    assert repros and all(f"`audits/peft_history/repro/{p.name}`: PEFT " in text for p in repros)  # with its claim


def test_a_failure_followed_by_a_declared_deviation_is_fixed_there():
    """hra/model_oracle crashes on 0.12.0 (a dtype bug) and shows the declared Conv1D refusal from 0.16.0: the
    crash is fixed in 0.16.0, not 'not fixed' because the later cells are dev rather than pass."""
    releases = [{"version": v, "status": "ran", "results": [_res("hra", "model_oracle", st, kind)]}
                for v, st, kind in (("0.12.0", "fail", "crash"), ("0.16.0", "deviation", None))]
    row = ph.build_history(releases)["rows"][0]
    assert row["cells"] == {"0.12.0": "E", "0.16.0": "dev"} and row["fixed_in"] == "0.16.0"


def test_missing_feature_is_na_naming_the_release(monkeypatch):
    """A release without DeLoRA, without EVA's data pass or whose init_lora_weights lists no 'pissa' makes the
    property n/a with the reason, never a failure counted against PEFT."""
    pytest.importorskip("peft")
    import peft

    from harness import PROPERTIES
    from harness.backends import peft as backend
    from harness.engine import run_property
    from spec import SPECS

    be = backend.PeftBackend()
    monkeypatch.delattr(peft, "DeloraConfig")
    monkeypatch.delattr(peft, "initialize_lora_eva_weights")
    r = run_property(PROPERTIES["oracle"], SPECS.get("delora"), be, "history")
    assert r.status == "na" and r.detail == f"peft {backend.VERSION} has no DeloraConfig"
    r = run_property(PROPERTIES["data_path"], SPECS.get("eva"), be, "history")
    assert r.status == "na" and r.detail == f"peft {backend.VERSION} has no initialize_lora_eva_weights"

    class OldLoraConfig(peft.LoraConfig):  # 0.9.0's annotation: bool | Literal["gaussian", "loftq"]
        pass

    OldLoraConfig.__dataclass_fields__ = dict(peft.LoraConfig.__dataclass_fields__)
    f = OldLoraConfig.__dataclass_fields__["init_lora_weights"]
    g = type(f).__new__(type(f))
    for slot in type(f).__slots__:
        setattr(g, slot, getattr(f, slot))
    g.type = 'bool | Literal["gaussian", "loftq"]'
    OldLoraConfig.__dataclass_fields__["init_lora_weights"] = g
    monkeypatch.setattr(peft, "LoraConfig", OldLoraConfig)
    r = run_property(PROPERTIES["oracle"], SPECS.get("pissa"), be, "history")
    assert r.status == "na" and r.detail.startswith(f"peft {backend.VERSION} has no init_lora_weights='pissa'")
    assert run_property(PROPERTIES["oracle"], SPECS.get("lora"), be, "history").status == "pass"


def test_eva_subconfig_is_built_as_the_release_class():
    """peft 0.14.0-0.20.0 keep eva_config={'rho': 1.0} a dict and then read .rho: the backend builds EvaConfig."""
    peft = pytest.importorskip("peft")
    from harness.backends import peft as backend

    if not hasattr(peft, "EvaConfig"):
        pytest.skip("this peft has no EvaConfig")
    out = backend._subconfigs({"r": 2, "eva_config": {"rho": 1.0}, "init_lora_weights": "eva"})
    assert isinstance(out["eva_config"], peft.EvaConfig) and out["eva_config"].rho == 1.0 and out["r"] == 2


def test_transformers_shim_only_for_a_removed_name():
    from harness.backends import peft as backend

    e = ImportError("cannot import name 'HybridCache' from 'transformers' (/x/transformers/__init__.py)")
    assert backend._removed_name(e) == "HybridCache"
    assert backend._removed_name(ImportError("cannot import name 'Other' from 'transformers'")) is None
    assert backend._removed_name(ValueError("cannot import name 'HybridCache' from 'transformers'")) is None


def test_spent_budget_starts_no_job_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(ph, "SHARDS", tmp_path)
    clock = iter([0.0, 5.0, 10.0])  # the start, then each job's check: the 1 s budget is already spent
    monkeypatch.setattr(ph.time, "monotonic", lambda: next(clock))
    lines = []
    out, stopped = ph.run_jobs([("0.9.0", "lora"), ("0.10.0", "lora")], 1.0, [], "history",
                               log=lambda s, **k: lines.append(s),
                               prepare=lambda v: pytest.fail("a release was started"))
    assert stopped and [r["status"] for r in out] == ["skipped", "skipped"]
    assert lines == ["[1/2] peft 0.9.0 / lora: skipped (budget of 1 s spent)",
                     "[2/2] peft 0.10.0 / lora: skipped (budget of 1 s spent)"]


# ------------------------------------------------------------------------------------------------ shards


def _fake_history(monkeypatch, tmp_path):
    """A history with no network and no PEFT: three releases, one of which does not install, and a verify whose
    rows depend only on (release, spec) (lora's merge fails from 0.10.0 on and is fixed in 0.12.0)."""
    monkeypatch.setattr(ph, "SHARDS", tmp_path / "shards")
    monkeypatch.setattr(ph, "AUDIT", tmp_path / "audit" / "peft_history")
    (tmp_path / "audit").mkdir()

    def prepare(v):
        if v == "0.11.1":
            raise ph.ReleaseError("peft 0.11.1 cannot be installed: ERROR: x")
        return {"site": tmp_path, "shims": [], "transformers": "5.0"}

    def verify(v, specs, site, profile, args, python, timeout_s):
        rows = []
        for s in specs:
            bad = s == "lora" and v == "0.10.0"
            rows += [_res(s, "merge", "fail" if bad else "pass", "check" if bad else None, "drift 3e-2" if bad else ""),
                     _res(s, "oracle", "na" if s == "delora" and v == "0.9.0" else "pass", detail=f"peft {v} has no D")]
        return rows

    monkeypatch.setattr(ph, "_verify_job", verify)
    monkeypatch.setattr(ph, "run_jobs", lambda *a, **k: _orig_run_jobs(*a, **{**k, "verify": verify, "prepare": prepare}))


_orig_run_jobs = ph.run_jobs
_RELEASES = "0.9.0,0.10.0,0.11.1,0.12.0"
_ARGS = ["run", "--releases", _RELEASES, "--variants", "lora,dora,delora", "--properties", "merge,oracle"]


def test_shard_slices_partition_the_jobs_and_bad_shards_are_clear_errors():
    jobs = ph.job_list(["0.9.0", "0.10.0", "0.12.0"], ["lora", "dora"])
    slices = [ph.shard_slice(jobs, i, 4) for i in range(1, 5)]
    assert sorted(j for sl in slices for j in sl) == sorted(jobs) and sum(map(len, slices)) == len(jobs)
    assert slices[0] == [("0.9.0", "lora"), ("0.12.0", "lora")]  # deterministic: the same slice on every machine
    for bad in ("0/2", "3/2", "2", "a/b", ""):
        with pytest.raises(ValueError, match="--shard must be I/N"):
            ph.parse_shard(bad)


def test_merged_shards_give_the_audit_of_one_unsharded_run(tmp_path, monkeypatch):
    _fake_history(monkeypatch, tmp_path)
    assert ph.main(_ARGS) == 1  # 0.11.1 does not install: an error row, exit 1
    whole = json.loads((tmp_path / "audit" / "peft_history.json").read_text())
    for i in (1, 2, 3):
        ph.main(_ARGS + ["--shard", f"{i}/3"])
    shards = [str(ph.shard_path(i, 3)) for i in (1, 2, 3)]
    assert ph.main(["merge", *shards]) == 1
    merged = json.loads((tmp_path / "audit" / "peft_history.json").read_text())
    run_w, run_m = whole.pop("run"), merged.pop("run")
    assert json.dumps(ph.without_times(merged)) == json.dumps(ph.without_times(whole))
    assert [s["shard"] for s in run_m["shards"]] == ["1/3", "2/3", "3/3"] and len(run_w["shards"]) == 1
    assert ph.without_times({k: v for k, v in run_m.items() if k != "shards"}) == \
        ph.without_times({k: v for k, v in run_w.items() if k != "shards"})
    rows = {(r["variant"], r["property"]): r for r in merged["rows"]}
    assert rows[("lora", "merge")]["first_failing"] == "0.10.0" and rows[("lora", "merge")]["fixed_in"] == "0.12.0"
    rel = {r["version"]: r for r in merged["releases"]}
    assert rel["0.11.1"]["status"] == "error" and "cannot be installed" in rel["0.11.1"]["line"]
    # the merge refuses an incomplete or mixed set of shards
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        ph.merge_shards([json.loads(open(p).read()) for p in (shards[0], shards[2])])
    with pytest.raises(ValueError, match=r"given twice \[1\]"):
        ph.merge_shards([json.loads(open(p).read()) for p in (shards[0], shards[0], shards[2])])
    other = json.loads(open(shards[1]).read())
    other["jobs"] = other["jobs"][:-1]
    with pytest.raises(ValueError, match="another history"):
        ph.merge_shards([json.loads(open(shards[0]).read()), other, json.loads(open(shards[2]).read())])


def test_local_jobs_run_the_shard_commands_then_merge(tmp_path, monkeypatch):
    """--jobs K launches K times the command a CI matrix job runs (`run ... --shard I/K --out F`), then merges."""
    _fake_history(monkeypatch, tmp_path)
    launched = []

    def launch(argv):  # in-process stand-in for the K processes
        launched.append(argv)
        ph.main(argv)

    monkeypatch.setattr(ph, "run_local_shards",
                        lambda common, k, folder: _orig_local(common, k, folder, launch=launch))
    assert ph.main(_ARGS + ["--jobs", "2"]) == 1
    assert [a[a.index("--shard") + 1] for a in launched] == ["1/2", "2/2"]
    assert all(a[0] == "run" and a[a.index("--releases") + 1] == _RELEASES for a in launched)
    doc = json.loads((tmp_path / "audit" / "peft_history.json").read_text())
    assert [s["shard"] for s in doc["run"]["shards"]] == ["1/2", "2/2"]
    assert {(r["variant"], r["property"]) for r in doc["rows"]} == {("lora", "merge")}
    assert "- Sharded into 2 slices of the (release, spec) jobs" in (tmp_path / "audit" / "peft_history.md").read_text()


_orig_local = ph.run_local_shards


def test_full_breadth_runs_every_mapped_spec_with_every_property_in_the_ci_profile(tmp_path, monkeypatch):
    """--full: every spec PEFT has a mapping of, every property (no HISTORY_SKIP), the ci profile, in a shard as in an unsharded run."""
    from harness.backends.peft_maps import MAPS
    _fake_history(monkeypatch, tmp_path)
    seen = []
    real = _orig_run_jobs

    def recording(*a, verify, **k):  # _fake_history's run_jobs hands its verify stand-in here
        return real(*a, **k, verify=lambda v, specs, site, profile, args, *rest:
                    seen.extend((v, s, profile, args) for s in specs) or verify(v, specs, site, profile, args, *rest))
    monkeypatch.setitem(globals(), "_orig_run_jobs", recording)
    ph.main(["run", "--releases", "0.12.0", "--full", "--shard", "1/1", "--out", str(tmp_path / "s.json")])
    assert sorted(s for _, s, _, _ in seen) == sorted(MAPS) and len(MAPS) >= 19
    assert {p for _, _, p, _ in seen} == {"ci"}
    assert all("--properties" not in a for _, _, _, a in seen)  # every property, the whole-model and bnb ones too


@pytest.mark.parametrize("flag", [["--profile", "history"], ["--variants", "lora"], ["--properties", "oracle"]])
def test_full_refuses_an_explicit_profile_specs_or_properties(flag, capsys, monkeypatch):
    """--full decides the profile, the specs and the properties; one given as well is refused, never overridden."""
    monkeypatch.setattr(ph, "index_versions", lambda: pytest.fail("refused before the index is read"))
    assert ph.main(["run", "--full", *flag]) == 2
    assert f"drop {flag[0]}" in capsys.readouterr().err


def test_each_check_of_a_property_gets_its_own_history_row():
    """adapters_on_one_module fails on 'both_active' at every release; its 'both_merged' check, hidden behind it
    before, fails at 0.10.0 only: its own row, first failing 0.10.0, fixed in 0.12.0."""
    def aoom(v):
        merged = "fail" if v == "0.10.0" else "pass"
        checks = [{"name": "both_active", "status": "fail", "detail": "both active: off", "failure_kind": "assertion",
                   "where": None},
                  {"name": "both_merged", "status": merged, "detail": "both merged: off" if merged == "fail" else "",
                   "failure_kind": "assertion" if merged == "fail" else None, "where": None}]
        return {**_res("dora", "adapters_on_one_module", "fail", "assertion", "both active: off", "Case()"),
                "checks": checks}

    releases = [{"version": v, "status": "ran", "results": [aoom(v)]} for v in ("0.9.0", "0.10.0", "0.12.0")]
    h = ph.build_history(releases)
    rows = {r["property"]: r for r in h["rows"]}
    assert set(rows) == {"adapters_on_one_module", "adapters_on_one_module: both_active",
                         "adapters_on_one_module: both_merged"}
    m = rows["adapters_on_one_module: both_merged"]
    assert m["cells"] == {"0.9.0": "pass", "0.10.0": "F", "0.12.0": "pass"}
    assert m["first_failing"] == "0.10.0" and m["fixed_in"] == "0.12.0" and m["failures"][0]["detail"] == "both merged: off"
    assert rows["adapters_on_one_module"]["fixed_in"] is None
    assert h["counts"]["0.10.0"] == {"pass": 0, "fail": 1, "deviation": 0, "na": 0}  # counts stay per property


def test_a_release_that_names_the_method_otherwise_gets_its_older_mapping(monkeypatch):
    """Before MiSS (peft 0.14-0.16) PEFT shipped the same layer as BoneConfig with bone_block: the backend takes
    the older mapping there; a release with neither class is n/a naming the release and the current class."""
    pytest.importorskip("peft")
    import types

    from harness.backends import peft as backend
    from spec import SPECS

    class BoneConfig:  # stands in for peft 0.15's class (only its presence is read here)
        pass

    old = types.SimpleNamespace(**{k: getattr(backend._peft, k) for k in dir(backend._peft) if k != "MissConfig"},
                                BoneConfig=BoneConfig)
    monkeypatch.setattr(backend, "_peft", old)
    for name, tensor in (("miss", "D"), ("bone", "B")):
        pm = backend.release_map(SPECS.get(name))
        assert pm.config == "BoneConfig" and pm.tensors[tensor] == ("bone_block", "id")
    del old.BoneConfig
    assert backend.release_map(SPECS.get("miss")).config == "MissConfig"
    assert backend.PeftBackend().applies(SPECS.get("miss")) == (f"peft {backend.VERSION} has no MissConfig (nor "
                                                                "BoneConfig, its older name)")
    monkeypatch.undo()
    assert backend.release_map(SPECS.get("miss")).config == "MissConfig"  # the current release: today's names


def test_the_jobs_of_one_release_are_one_verify_process_split_back_into_jobs(tmp_path, monkeypatch):
    """Consecutive jobs of a release share one verify (one start of torch + PEFT); each job gets its own rows, its
    properties' seconds plus an equal share of the start, and its own job file, which --reuse then takes."""
    monkeypatch.setattr(ph, "SHARDS", tmp_path)
    clock, real_clock = iter([0.0, 1.0, 1.0, 100.0, 110.0, 1.0, 200.0, 204.0]), ph.time.monotonic
    monkeypatch.setattr(ph.time, "monotonic", lambda: next(clock))  # t0, budget checks, (start, end) of each verify
    calls = []

    def verify(v, specs, site, profile, args, python, timeout_s):
        calls.append((v, specs, timeout_s))
        return [{**_res(s, "oracle", "pass"), "seconds": 1.0} for s in specs]
    jobs = [("0.9.0", "lora"), ("0.9.0", "dora"), ("0.10.0", "lora")]
    out, _ = ph.run_jobs(jobs, 1e6, ["-n", "1"], "ci", log=lambda *a, **k: None, verify=verify, timeout_s=60.0,
                         prepare=lambda v: {"site": tmp_path, "shims": [], "transformers": "5.0"})
    assert calls == [("0.9.0", ["lora", "dora"], 120.0), ("0.10.0", ["lora"], 60.0)]
    assert [(r["variant"], [x["variant"] for x in r["results"]]) for r in out] == [("lora", ["lora"]),
                                                                                    ("dora", ["dora"]),
                                                                                    ("lora", ["lora"])]
    assert [r["seconds"] for r in out] == [5.0, 5.0, 4.0]  # 1 s of properties + (10 s - 2 s) / 2; 1 + 3
    monkeypatch.setattr(ph.time, "monotonic", real_clock)
    again, _ = ph.run_jobs(jobs, 1e6, ["-n", "1"], "ci", log=lambda *a, **k: None, reuse=True,
                           verify=lambda *a: pytest.fail("a reused job ran"))
    assert [r["results"] for r in again] == [r["results"] for r in out]


def test_reuse_takes_a_job_of_the_same_profile_and_arguments_with_its_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(ph, "SHARDS", tmp_path)
    row = {"variant": "bone", "property": "oracle", "status": "pass"}
    ph._job_file("0.15.2", "bone").parent.mkdir(parents=True)
    ph._job_file("0.15.2", "bone").write_text(json.dumps({"profile": "ci", "backend_version": "0.15.2",
                                                          "results": [row]}))
    ph._job_file("0.15.2", "bone", ".meta.json").write_text(json.dumps(
        {"seconds": 593.0, "shims": [], "transformers": "5.0", "profile": "ci", "verify_args": ["-n", "1"]}))
    out, _ = ph.run_jobs([("0.15.2", "bone")], 100.0, ["-n", "1"], "ci", log=lambda *a, **k: None, reuse=True,
                         prepare=lambda v: pytest.fail("a reused job prepared its release"))
    assert out[0]["reused"] and out[0]["seconds"] == 593.0 and out[0]["results"] == [row]
    assert ph._reused_job("0.15.2", "bone", "history", ["-n", "1"]) is None  # another profile
    assert ph._reused_job("0.15.2", "bone", "ci", ["-n", "2"]) is None  # other verify arguments
    rel = ph.releases_from_jobs(["0.15.2"], ["bone"], out)
    assert rel[0]["status"] == "ran" and rel[0]["reused"] is True


def _release(version: str, **classes):
    """A stand-in for a PEFT release: `version` and config classes (dataclasses with the given fields)."""
    import dataclasses
    import types

    made = {name: dataclasses.make_dataclass(name, [(f, object, None) for f in fields]) for name, fields in
            classes.items()}
    return types.SimpleNamespace(__version__=version, **made)


_OFT_0_15 = ("r", "oft_block_size", "module_dropout", "coft", "eps", "block_share", "init_weights")
_OFT_0_16 = _OFT_0_15 + ("use_cayley_neumann", "num_cayley_neumann_terms")
# (release, its config classes) -> per spec: the config class the backend builds, or the start of its n/a reason.
# The fields are the releases' own (peft/tuners/*/config.py), cut to those the mappings read.
RELEASE_MAPS = [
    (_release("0.13.2", OFTConfig=_OFT_0_15[:1] + _OFT_0_15[2:]),
     {"oft": "na: peft 0.13.2's OFTConfig (no use_cayley_neumann) is the earlier OFT",
      "oft_neumann": "na: peft 0.13.2's OFTConfig (no num_cayley_neumann_terms, use_cayley_neumann) is the earlier",
      "miss": "na: peft 0.13.2 has no MissConfig (nor BoneConfig, its older name)",
      "bone": "na: peft 0.13.2 has no MissConfig (nor BoneConfig, its older name)"}),
    (_release("0.15.2", OFTConfig=_OFT_0_15, BoneConfig=("r", "init_weights")),
     {"oft": "na: peft 0.15.2's OFTConfig (no use_cayley_neumann) is the earlier OFT (0.9-0.13",
      "oft_neumann": "na: peft 0.15.2's OFTConfig", "miss": "BoneConfig", "bone": "BoneConfig"}),
    (_release("0.16.0", OFTConfig=_OFT_0_16, BoneConfig=("r", "init_weights")),
     {"oft": "OFTConfig", "oft_neumann": "OFTConfig", "miss": "BoneConfig", "bone": "BoneConfig"}),
    (_release("0.18.1", OFTConfig=_OFT_0_16, BoneConfig=("r", "init_weights"),
              MissConfig=("r", "miss_dropout", "init_weights")),
     {"oft": "OFTConfig", "oft_neumann": "OFTConfig", "miss": "MissConfig", "bone": "MissConfig"}),
]


@pytest.mark.parametrize("release,expected", RELEASE_MAPS, ids=[r.__version__ for r, _ in RELEASE_MAPS])
def test_each_release_gets_the_mapping_it_can_build_or_na_naming_it(monkeypatch, release, expected):
    """Per release, the mapping the backend takes: the newest whose config class the release exports with the
    fields it needs (`requires`); a release without one is n/a naming the release and what it ships instead (the
    earlier OFT is another parametrization, not a renaming). Runs without PEFT: the release is a stand-in."""
    from harness.backends import peft as backend
    from spec import SPECS

    monkeypatch.setattr(backend, "_peft", release)
    monkeypatch.setattr(backend, "VERSION", release.__version__)
    for name, want in expected.items():
        pm = backend.release_map(SPECS.get(name))
        na = backend.release_na(pm)
        got = f"na: {na}" if na else pm.config
        assert got.startswith(want), (name, got)
        if not na:
            keys = {key for key, _ in pm.tensors.values()}
            assert keys == ({"bone_block"} if want == "BoneConfig" else {"miss_block"} if want == "MissConfig"
                            else {"oft_R.weight"}), (name, keys)


def test_a_deviation_a_release_predates_is_not_declared_there(monkeypatch):
    """FourierFT's float32 spectrum came in PEFT 0.16.0: on 0.15.2 the spec's declared deviation does not apply
    (the property is judged as is, not failed for a declared size it does not show there); from 0.16.0 it does."""
    pytest.importorskip("peft")
    from harness.backends import peft as backend
    from harness.engine import declared_deviation
    from spec import SPECS

    spec, be = SPECS.get("fourierft"), backend.PeftBackend()
    for version, declared in (("0.12.0", False), ("0.15.2", False), ("0.16.0", True), ("0.21.2", True)):
        monkeypatch.setattr(backend, "VERSION", version)
        dev = declared_deviation(spec, "oracle", be)
        assert (dev is not None and dev.reason.startswith("PEFT builds the dense spectrum")) is declared, version
    monkeypatch.setattr(backend, "VERSION", "0.14.0")
    assert declared_deviation(spec, "dropout", be) is not None  # a deviation without a release bound stays
