"""The default parity suite end to end: every case passes and the curves match the committed golden results."""
import json

import pytest

from spbench.check.cases import load_suite
from spbench.check.gate import gate
from spbench.check.parity import run_cases
from spbench.check.tolerances import GATE as DEFAULT_TOLERANCES
from spbench.common.results import load_results, provenance, results_doc
from spbench.common.suites import golden


@pytest.fixture(scope="module")
def ci_results():
    _, cases = load_suite("ci")
    return cases, run_cases(cases, log=lambda *_: None)


def test_every_ci_case_passes(ci_results):
    cases, results = ci_results
    bad = [(r["name"], r["failures"], r["error"]) for r in results if not r["passed"]]
    assert not bad, json.dumps(bad, indent=1)
    assert len(results) == len(cases) >= 30


def test_curves_match_golden(ci_results):
    _, results = ci_results
    new = results_doc("ci", results, provenance("pytest", "gloo", 4, 0))
    regressions = gate(load_results(golden("ci")), new, DEFAULT_TOLERANCES)
    assert not regressions, "\n".join(f"{r.case}: {r.what}: {r.detail}" for r in regressions)


def test_float64_curves_are_bitwise_reproducible(ci_results):
    """Same seed, same machine → identical float64 curves (rerun two cases)."""
    cases, results = ci_results
    pick = [c for c in cases if c.name in ("dpo-sigmoid-zigzag-sp2", "sft-ring-sp2")]
    again = run_cases(pick, log=lambda *_: None)
    first = {r["name"]: r for r in results}
    for r in again:
        assert r["sp_losses"] == first[r["name"]]["sp_losses"] and r["sp_grad_norms"] == first[r["name"]]["sp_grad_norms"]
