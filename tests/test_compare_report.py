"""The comparison report (timing relative to spbench, features, published figures with sources, no estimate
without maxlen_estimates), `spbench report` rendering compare.json, `spbench gate` holding adapters' verdicts to a baseline, and the
flash-attn engines' refusal computed from this machine. No ranks: documents are built by hand."""
from __future__ import annotations

import copy
import json

import pytest

from spbench.check.cases import Case
from spbench.cli import main
from spbench.common.schemas import COMPARE
from spbench.compare import flash_engines
from spbench.compare.gate import compare_gate
from spbench.compare.report import published_figures, render, time_ratio

PROV = {"command": "spbench compare", "git_sha": "0123456789abcdef", "torch": "2.13.0", "device": "cpu",
        "date": "2026-12-01"}


def _row(impl, case, verdict="pass", wall=None, cause=None):
    return {"impl": impl, "case": case, "verdict": verdict, "cause": cause, "metrics": {}, "sp_wall_s": wall}


@pytest.fixture
def doc():
    rows = [_row("spbench", "a", wall=2.0), _row("spbench", "b", wall=4.0), _row("spbench", "c", wall=1.0),
            _row("other", "a", wall=6.0), _row("other", "b", "wrong", wall=4.0, cause="loss step 0: rel err 1e-3"),
            _row("other", "c", "refused", cause="other: no ring")]
    impls = {"spbench": {"versions": {"torch": "2.13.0"}, "features": {"strategies": ["ulysses", "ring"], "zero": [2, 3]}},
             "other": {"versions": {"other": None}, "features": {"strategies": ["ulysses"], "gqa": "kv | SP",
                                                                  "loss": "per-micro-batch means"}}}
    return {"schema": COMPARE, "suite": "ci", "provenance": PROV, "implementations": impls, "rows": rows}


def test_time_ratio_is_the_median_over_cases_both_ran(doc):
    # a: 6/2 = 3, b: 4/4 = 1 (wrong still ran); c is refused by `other`: not counted
    assert time_ratio(doc["rows"], "other") == (2.0, 2)
    assert time_ratio([r for r in doc["rows"] if r["impl"] != "spbench"], "other") == (None, 0)


def test_report_has_timing_features_memory_and_published_figures(doc):
    md = render(doc)
    assert "| other | other not installed | 1 / 1 / 1 | 2.00 (2 cases) | no estimate | — |" in md
    assert "| spbench | torch 2.13.0 | 3 / 0 / 0 | 1 (reference) | no estimate | — |" in md
    assert "CPU ratios are only indicative" in md
    assert "| other | ulysses | kv / SP | — | — | — | loss: per-micro-batch means |" in md  # a '|' cannot break the table
    assert "| other | ci | refused | other: no ring | c |" in md
    alone = render({**doc, "rows": [r for r in doc["rows"] if r["impl"] == "other"]})
    assert "| other | other not installed | 1 / 1 / 1 | spbench not in this run | no estimate | — |" in alone
    for f in published_figures():
        assert f["url"].startswith("https://") and f["source"] and f["claim"]
        assert f"[{f['source']}]({f['url']})" in md
    claims = {(f["project"], f["claim"], f["hardware"]) for f in published_figures()}
    assert ("DeepSpeed ALST", "max sequence length 3.7M tokens", "8 × H100 (one node)") in claims
    assert ("360-LLaMA-Factory", "full SFT max length 210k at SP 8", "8 × A800") in claims


def test_spbench_report_renders_compare_json(doc, tmp_path, capsys):
    (tmp_path / "compare.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path / "compare.json"), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Comparison (compare.json): SP implementations through the parity harness (ci suite)" in md
    assert "### Features" in md and "| other | ci | wrong | loss step 0: rel err 1e-3 | b |" in md
    bad = {**doc, "rows": "not a list"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["report", str(tmp_path / "bad.json"), "--out", str(tmp_path / "r2")]) == 2
    assert "'rows' must be a list of objects" in capsys.readouterr().err


def test_gate_holds_verdicts_to_the_baseline(doc):
    new = copy.deepcopy(doc)
    assert compare_gate(doc, new) == []
    new["rows"][0].update(verdict="wrong", cause="loss step 1: rel err 3e-5")      # spbench/a: pass → wrong
    new["rows"][3].update(verdict="refused", cause="other: ring only")             # other/a: pass → refused
    new["rows"][4].update(verdict="refused", cause="x")                            # other/b: wrong → refused
    new["rows"][5].update(verdict="pass", cause=None)                              # other/c was refused: not judged
    del new["rows"][2]                                                               # spbench/c: missing
    got = [(r.case, r.what, r.detail) for r in compare_gate(doc, new)]
    assert got == [("spbench/a", "verdict pass → wrong", "loss step 1: rel err 3e-5"),
                   ("spbench/c", "missing", "in the baseline, absent from the new results"),
                   ("other/a", "verdict pass → refused", "other: ring only"),
                   ("other/b", "verdict wrong → refused", "x")]


def test_gate_command_on_compare_documents(doc, tmp_path, capsys):
    base, new, parity = tmp_path / "base.json", tmp_path / "new.json", tmp_path / "parity.json"
    base.write_text(json.dumps(doc))
    new.write_text(json.dumps(doc))
    assert main(["gate", "--baseline", str(base), "--results", str(new)]) == 0
    assert "6 verdicts compared, 0 regressions" in capsys.readouterr().out
    worse = copy.deepcopy(doc)
    worse["rows"][3].update(verdict="wrong", cause="grad_norm step 0: rel err 1 > 1e-06")
    new.write_text(json.dumps(worse))
    assert main(["gate", "--baseline", str(base), "--results", str(new), "--junit", str(tmp_path / "g.xml")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION other/a: verdict pass → wrong (grad_norm step 0: rel err 1 > 1e-06)" in out
    assert "1 regressions" in out and 'name="other/a"' in (tmp_path / "g.xml").read_text()
    parity.write_text(json.dumps({"schema": "spbench.results/1", "suite": "ci", "cases": []}))
    assert main(["gate", "--baseline", str(parity), "--results", str(new)]) == 2
    assert "gate two parity results files or two comparison documents" in capsys.readouterr().err


def test_flash_engines_refuse_with_what_this_machine_lacks(monkeypatch):
    case = Case(name="sft-zigzag-sp2", stage="sft", method="zigzag", sp=2)
    missing = flash_engines.missing_for_flash("ring_flash_attn")
    reason = flash_engines.RING_FLASH_ATTN.refuses(case)
    assert missing and reason == f"needs CUDA + flash-attn ({', '.join(missing)})"
    monkeypatch.setattr(flash_engines, "missing_for_flash", lambda package: [])  # a CUDA box with both installed
    assert flash_engines.RING_FLASH_ATTN.refuses(case) is None
    assert flash_engines.YUNCHANG.refuses(Case(name="h", stage="sft", method="hybrid", sp=4)).startswith("yunchang adapter")
    assert "varlen" in flash_engines.YUNCHANG.refuses(Case(name="p", stage="sft", method="ulysses", sp=4, packing=True))
