"""The committed comparison (reports/compare/compare.json, merged from the runs of every venv) held to its golden
verdicts (spbench/suites/golden/compare.json) by `spbench gate`'s compare rule: it passes as committed, and a doctored
copy (a pass lost, a wrong case no longer run, a row gone) fails with exactly those regressions. No ranks."""
from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

from spbench.compare.gate import compare_gate

ROOT = Path(__file__).resolve().parents[1]
REPORT, GOLDEN = ROOT / "reports" / "compare" / "compare.json", ROOT / "spbench" / "suites" / "golden" / "compare.json"


def test_committed_report_holds_to_its_golden_verdicts():
    base, report = json.loads(GOLDEN.read_text()), json.loads(REPORT.read_text())
    assert compare_gate(base, report) == []
    worse = copy.deepcopy(report)
    passed = next(r for r in worse["rows"] if r["verdict"] == "pass" and r["impl"] != "spbench")
    wrong = next(r for r in worse["rows"] if r["verdict"] == "wrong")
    passed.update(verdict="wrong", cause="loss step 0: rel err 1e-3 > 1e-08")
    wrong.update(verdict="refused", cause="adapter no longer runs")
    gone = next(r for r in worse["rows"] if r["impl"] == "spbench")
    worse["rows"].remove(gone)
    got = {(r.case, r.what) for r in compare_gate(base, worse)}
    assert got == {(f"{passed['impl']}/{passed['case']}", "verdict pass → wrong"),
                   (f"{wrong['impl']}/{wrong['case']}", "verdict wrong → refused"),
                   (f"spbench/{gone['case']}", "missing")}


def test_committed_report_has_every_run_and_full_rows():
    report = json.loads(REPORT.read_text())
    assert {(r["label"], r["suite"]) for r in report["runs"]} >= {("main", "ci"), ("main", "probes"), ("swift", "ci"),
                                                                  ("verl", "ci")}
    ran = Counter(r["impl"] for r in report["rows"] if r["verdict"] != "refused")
    for name in ("deepspeed-alst", "deepspeed-alst-attention", "verl-ulysses-sdpa", "ms-swift-ulysses"):
        assert ran[name] and report["maxlen_estimates"][name]["max_len"] > 0, name
    assert all(r["cause"] for r in report["rows"] if r["verdict"] != "pass")  # every refused/wrong names its cause
    traced = report["maxlen_traced"]  # beside the estimates, traced max lengths: ALST, HF's path, 2 other venvs'
    for name in ("spbench", "deepspeed-alst", "deepspeed-alst-attention", "hf-accelerate-sp", "ms-swift-ulysses",
                 "verl-ulysses-sdpa"):
        assert traced[name]["max_len"] > 0 and abs(traced[name]["error"]) < 0.05, name
