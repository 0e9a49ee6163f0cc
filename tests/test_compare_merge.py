"""Several `spbench compare` runs as one report (compare/merge.py): every run's provenance and package versions kept,
a later run's spbench renamed, timing within a run; the verdict matrix PNG; the max-length estimates from each
implementation's memory features (compare/memory.toml); one adapter's run gated against a merged baseline."""
from __future__ import annotations

import json

import pytest

from runtime.memory import MemoryFeatures
from spbench.cli import main
from spbench.common.errors import UsageError
from spbench.common.schemas import COMPARE
from spbench.compare.estimate import estimates, memory_features, setup_of
from spbench.compare.gate import compare_gate
from spbench.compare.merge import merge, parse_input
from spbench.compare.registry import implementations
from spbench.compare.report import render, time_ratio, write_report


def _row(impl, case, verdict="pass", wall=None, cause=None):
    return {"impl": impl, "case": case, "verdict": verdict, "cause": cause, "metrics": {}, "sp_wall_s": wall}


def _doc(suite, transformers, command, impls, rows):
    prov = {"command": command, "git_sha": "0123456789abcdef", "python": "3.11.7", "torch": "2.13.0",
            "transformers": transformers, "device": "cpu", "date": "2026-12-01", "world": 4}
    return {"schema": COMPARE, "suite": suite, "provenance": prov, "rows": rows,
            "implementations": {n: {"versions": {"transformers": transformers, **v}, "features": {}}
                                for n, v in impls.items()}}


@pytest.fixture
def runs():
    main_run = _doc("ci", "5.24.0", "spbench compare --impl spbench,deepspeed-alst", {"spbench": {}, "deepspeed-alst": {"deepspeed": "0.19.8"}},
                    [_row("spbench", "a", wall=2.0), _row("deepspeed-alst", "a", "wrong", 8.0, "grad_norm step 0: rel err 1")])
    swift_run = _doc("ci", "5.19.0", "spbench compare --impl spbench,ms-swift-ulysses", {"spbench": {}, "ms-swift-ulysses": {"ms-swift": "4.6.0"}},
                     [_row("spbench", "a", wall=1.0), _row("ms-swift-ulysses", "a", wall=3.0),
                      _row("ms-swift-ulysses", "b", "refused", cause="ms-swift runs Ulysses 2 x ring 2 here")])
    return [("main", "main/compare.json", main_run), ("swift", "swift/compare.json", swift_run)]


def test_merge_keeps_each_runs_provenance_and_renames_a_later_spbench(runs):
    doc = merge(runs, {"command": "spbench compare --merge", "git_sha": "fedcba9876543210"})
    assert list(doc["implementations"]) == ["spbench", "deepspeed-alst", "spbench@swift", "ms-swift-ulysses"]
    assert doc["implementations"]["spbench@swift"]["versions"] == {"transformers": "5.19.0"}
    assert [r["provenance"]["transformers"] for r in doc["runs"]] == ["5.24.0", "5.19.0"]
    assert [(r["impl"], r["run"], r["suite"]) for r in doc["rows"]][2] == ("spbench@swift", 1, "ci")
    # each implementation's time against spbench of its own run: 8/2 in main, 3/1 in swift
    assert time_ratio(doc["rows"], "deepspeed-alst") == (4.0, 1)
    assert time_ratio(doc["rows"], "ms-swift-ulysses") == (3.0, 1)
    md = render(doc)
    for text in ("`spbench compare --impl spbench,deepspeed-alst`", "`spbench compare --impl spbench,ms-swift-ulysses`",
                 "| main | ci |", "| swift | ci |", "| spbench@swift | transformers 5.19.0 | 1 / 0 / 0 | 1 (reference) |",
                 "| ms-swift-ulysses | transformers 5.19.0, ms-swift 4.6.0 | 1 / 0 / 1 | 3.00 (1 cases) |",
                 "| ms-swift-ulysses | ci | refused | ms-swift runs Ulysses 2 x ring 2 here | b |"):
        assert text in md


def test_a_merged_document_merges_again_as_the_runs_it_holds(runs):
    """A report merged again (a run added, traces re-made) without the runs' files: the same document back, with
    the traced rows of each run's venv kept and the ones its merge traced itself dropped."""
    runs[1][2]["maxlen_traced"] = {"ms-swift-ulysses": {"max_len": 327680}}
    doc = merge(runs, {})
    doc["maxlen_traced"]["spbench"] = {"max_len": 1671168}  # as the merge's own --trace-memory adds it: no "run"
    again = merge([("compare", "reports/compare/compare.json", doc)], {})
    assert again["maxlen_traced"] == {"ms-swift-ulysses": {"max_len": 327680, "run": 1}}
    del doc["maxlen_traced"], again["maxlen_traced"]
    assert again == doc
    extra = _doc("probes", "5.24.0", "spbench compare --suite probes", {"spbench": {}}, [_row("spbench", "c")])
    grown = merge([("compare", "c.json", doc), ("main", "p.json", extra)], {})
    assert [r["label"] for r in grown["runs"]] == ["main", "swift", "main"]
    assert grown["rows"][-1] == {**_row("spbench", "c"), "suite": "probes", "run": 2}


def test_merge_refuses_what_it_cannot_keep_apart(runs):
    with pytest.raises(UsageError, match="not a `spbench compare` document"):
        merge([("m", "other.json", {**runs[0][2], "schema": "spbench.other/1"})], {})
    label, path, swift = runs[1]
    with pytest.raises(UsageError, match="give this run another label"):
        merge(runs + [(label, "again.json", swift)], {})
    assert parse_input("verl=/x/compare.json") == ("verl", "/x/compare.json")
    assert parse_input("/tmp/cmp-verl/compare.json")[0] == "cmp-verl"


def test_report_writes_the_verdict_matrix_and_links_it(runs, tmp_path):
    doc = merge(runs, {"command": "spbench compare --merge"})
    written = write_report(doc, tmp_path)
    assert [p.name for p in written] == ["report.md", "verdicts.png"]
    assert (tmp_path / "verdicts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![verdict per implementation and case](verdicts.png)" in (tmp_path / "report.md").read_text()


def test_compare_merge_command_adds_estimates(runs, tmp_path):
    paths = []
    for label, _, doc in runs:
        (tmp_path / label).mkdir()
        (tmp_path / label / "compare.json").write_text(json.dumps(doc))
        paths.append(f"{label}={tmp_path / label / 'compare.json'}")
    golden = tmp_path / "golden.json"
    assert main(["compare", "--merge", *paths, "--out", str(tmp_path / "out"), "--baseline-out", str(golden)]) == 0
    doc = json.loads((tmp_path / "out" / "compare.json").read_text())
    base = json.loads(golden.read_text())
    assert base["rows"][2] == {"impl": "spbench@swift", "case": "a", "suite": "ci", "run": 1, "verdict": "pass",
                               "cause": None} and base["runs"] == doc["runs"] and compare_gate(base, doc) == []
    est = doc["maxlen_estimates"]
    assert set(est) == set(doc["implementations"]) and est["spbench@swift"] == est["spbench"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Max length on 8 × 80 GB: estimated" in md and f"| {est['deepspeed-alst']['max_len']:,} (est.) |" in md


def test_every_adapter_has_memory_features_the_runtime_accepts():
    table = memory_features()
    assert set(table) == set(implementations())
    for name, entry in table.items():
        assert entry["reason"], name
        setup_of(entry)  # raises for a configuration the runtime would refuse
    assert setup_of(table["hf-accelerate-sp"]).features == MemoryFeatures.plain()  # a feature not named is off
    est = estimates(["deepspeed-alst", "deepspeed-alst-attention", "spbench"])
    assert est["deepspeed-alst"]["max_len"] > est["deepspeed-alst-attention"]["max_len"] > 0  # tiling helps
    assert all(e["peak_gib"] <= 80 and e["source"].startswith("estimated") for e in est.values())


def test_one_adapters_run_is_held_to_its_part_of_a_merged_baseline(runs, capsys, tmp_path):
    base = merge(runs, {"command": "spbench compare --merge"})
    _, _, swift = runs[1]
    (tmp_path / "base.json").write_text(json.dumps(base))
    one = {**swift, "implementations": {"ms-swift-ulysses": swift["implementations"]["ms-swift-ulysses"]},
           "rows": [r for r in swift["rows"] if r["impl"] == "ms-swift-ulysses"]}
    (tmp_path / "new.json").write_text(json.dumps(one))
    assert main(["gate", "--baseline", str(tmp_path / "base.json"), "--results", str(tmp_path / "new.json")]) == 0
    assert "2 verdicts compared, 0 regressions (3 baseline pairs of implementations or suites" in capsys.readouterr().out
