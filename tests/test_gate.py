"""spbench.gate: each kind of regression, tolerances, exit codes through the argparse subcommand, JUnit XML."""
from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

import pytest

from spbench.check.gate import Regression, gate, parse_tolerances
from spbench.check.tolerances import GATE as DEFAULT_TOLERANCES
from spbench.cli import build_parser
from spbench.common.errors import UsageError
from spbench.common.results import results_doc, write_json_atomic


def _case(name, dtype="float64", passed=True):
    return {"name": name, "stage": "sft", "pref_loss": None, "method": "zigzag", "sp": 2, "dp": 1, "ga": 1,
            "dtype": dtype, "packing": False, "model": "tiny", "steps": 3, "zero": 0, "passed": passed,
            "error": None, "failures": [] if passed else ["loss step 1: rel err 1e-3 > 1e-8"],
            "ref_losses": [2.5, 2.25, 2.0], "sp_losses": [2.5, 2.25, 2.0],
            "ref_grad_norms": [1.0, 0.9, 0.8], "sp_grad_norms": [1.0, 0.9, 0.8], "wall_s": 0.1}


@pytest.fixture
def base():
    return results_doc("ci", [_case("a64"), _case("b32", "float32"), _case("c16", "bfloat16"),
                              _case("d-known-bad", passed=False)], {"git_sha": "base"})


def _scaled(doc, name, curve, step, factor):
    doc = copy.deepcopy(doc)
    case = next(c for c in doc["cases"] if c["name"] == name)
    case[curve][step] *= factor
    return doc


def test_identical_results_have_no_regression(base):
    assert gate(base, copy.deepcopy(base), DEFAULT_TOLERANCES) == []


def test_passed_to_failed(base):
    new = copy.deepcopy(base)
    new["cases"][0].update(passed=False, failures=["grad step 0: rel err 2e-6 > 1e-8"])
    assert gate(base, new, DEFAULT_TOLERANCES) == [Regression("a64", "failed", "grad step 0: rel err 2e-6 > 1e-8")]


def test_passed_to_error(base):
    new = copy.deepcopy(base)
    new["cases"][1].update(passed=False, error="timed out after 600 s", sp_losses=[])
    assert gate(base, new, DEFAULT_TOLERANCES) == [Regression("b32", "error", "timed out after 600 s")]


def test_missing_case(base):
    new = copy.deepcopy(base)
    del new["cases"][2]
    assert gate(base, new, DEFAULT_TOLERANCES) == [Regression("c16", "missing",
                                                              "in the baseline, absent from the new results")]


@pytest.mark.parametrize("curve", ["sp_losses", "ref_losses", "sp_grad_norms"])
def test_drift_beyond_float64_tolerance(base, curve):
    regs = gate(base, _scaled(base, "a64", curve, 1, 1 + 1e-7), DEFAULT_TOLERANCES)
    assert [(r.case, r.what) for r in regs] == [("a64", f"{curve} drift")]
    assert regs[0].detail.startswith("step 1: ") and "rel err 1.0e-07 > 1e-09 (float64)" in regs[0].detail


@pytest.mark.parametrize("name, factor, regressed", [("a64", 1 + 1e-11, False), ("a64", 1 + 1e-8, True),
                                                     ("b32", 1 + 1e-6, False), ("b32", 1 + 1e-4, True),
                                                     ("c16", 1 + 1e-2, False), ("c16", 1 + 5e-2, True)])
def test_tolerance_depends_on_dtype(base, name, factor, regressed):
    regs = gate(base, _scaled(base, name, "sp_losses", 2, factor), DEFAULT_TOLERANCES)
    assert [(r.case, r.what) for r in regs] == ([(name, "sp_losses drift")] if regressed else [])


def test_curve_length_change(base):
    new = copy.deepcopy(base)
    new["cases"][0]["sp_grad_norms"].append(0.7)
    assert gate(base, new, DEFAULT_TOLERANCES) == [Regression("a64", "sp_grad_norms length",
                                                              "3 steps in the baseline, 4 now")]


def test_config_change(base):
    new = copy.deepcopy(base)
    new["cases"][0]["sp"] = 4
    regs = gate(base, new, DEFAULT_TOLERANCES)
    assert [(r.case, r.what) for r in regs] == [("a64", "config changed")] and "sp 2 → 4" in regs[0].detail


def test_baseline_failures_and_new_cases_are_not_regressions(base):
    new = copy.deepcopy(base)
    new["cases"][3].update(error="crashed", sp_losses=[])  # failed before, fails differently now
    new["cases"].append(_case("e-new", passed=False))
    assert gate(base, new, DEFAULT_TOLERANCES) == []


def test_no_common_cases(base):
    other = results_doc("nightly", [_case("x"), _case("y")], {})
    with pytest.raises(UsageError, match="no common cases: baseline suite 'ci' has a64, b32, c16, d-known-bad, "
                                         "results suite 'nightly' has x, y"):
        gate(base, other, DEFAULT_TOLERANCES)


def test_dtype_without_tolerance(base):
    base["cases"][0]["dtype"] = "float16"
    with pytest.raises(UsageError, match="dtype 'float16' with no gate tolerance; add one with --tolerances float16="):
        gate(base, copy.deepcopy(base), DEFAULT_TOLERANCES)


def test_parse_tolerances():
    assert parse_tolerances("") == DEFAULT_TOLERANCES
    assert parse_tolerances("float32=2e-5, float16=1e-3") == {**DEFAULT_TOLERANCES, "float32": 2e-5,
                                                              "float16": 1e-3}


@pytest.mark.parametrize("text, found", [("float64", "'float64' is not DTYPE=TOLERANCE"),
                                         ("float64=abc", "'float64=abc' is not DTYPE=TOLERANCE"),
                                         ("float64=-1", "'float64=-1' is not DTYPE=TOLERANCE"),
                                         ("flaot32=1e-5", "unknown dtype 'flaot32'; did you mean 'float32'?")])
def test_parse_tolerances_rejects(text, found):
    with pytest.raises(UsageError, match=found):
        parse_tolerances(text)


# --- the subcommand: exit codes and JUnit ---

def _run(tmp_path, base, new, *extra):
    write_json_atomic(tmp_path / "base.json", base)
    write_json_atomic(tmp_path / "new.json", new)
    args = build_parser(["gate"]).parse_args(["gate", "--baseline", str(tmp_path / "base.json"),
                                              "--results", str(tmp_path / "new.json"), *extra])
    return args.func(args)


def test_cli_exit_0(tmp_path, base, capsys):
    new = copy.deepcopy(base)
    new["cases"].append(_case("e-new"))
    assert _run(tmp_path, base, new) == 0
    assert capsys.readouterr().out == "gate: 4 cases compared, 0 regressions (1 new cases not in the baseline)\n"


def test_cli_exit_1_prints_table(tmp_path, base, capsys):
    new = _scaled(base, "b32", "sp_losses", 0, 1 + 1e-3)
    del new["cases"][0]
    assert _run(tmp_path, base, new) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["case", "what", "detail"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[:2] == ["a64", "missing"]
    assert lines[3].split()[:4] == ["b32", "sp_losses", "drift", "step"]
    assert lines[-1] == "gate: 4 cases compared, 2 regressions"


def test_cli_tolerances_option(tmp_path, base):
    new = _scaled(base, "b32", "sp_losses", 0, 1 + 1e-3)
    assert _run(tmp_path, base, new, "--tolerances", "float32=1e-2") == 0


def test_cli_malformed_tolerances(tmp_path, base):
    with pytest.raises(UsageError, match="'float32:1' is not DTYPE=TOLERANCE"):
        _run(tmp_path, base, base, "--tolerances", "float32:1")


def test_cli_schema_mismatch(tmp_path, base):
    with pytest.raises(UsageError, match="new.json has schema 'spbench.maxlen/1', expected 'spbench.results/1'"):
        _run(tmp_path, base, {"schema": "spbench.maxlen/1", "rows": []})


def test_cli_missing_file(tmp_path):
    args = build_parser(["gate"]).parse_args(["gate", "--baseline", str(tmp_path / "nope.json"), "--results", "x.json"])
    with pytest.raises(UsageError, match="nope.json does not exist"):
        args.func(args)


def test_junit(tmp_path, base):
    new = copy.deepcopy(base)
    new["cases"][0].update(passed=False, error="rank 2 died")
    assert _run(tmp_path, base, new, "--junit", str(tmp_path / "junit.xml")) == 1
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert (suite.get("name"), suite.get("tests"), suite.get("failures")) == ("spbench.gate.ci", "4", "1")
    cases = {tc.get("name"): tc.find("failure") for tc in suite.iter("testcase")}
    assert list(cases) == ["a64", "b32", "c16", "d-known-bad"]
    assert cases["a64"].get("message") == "error" and cases["a64"].text == "error: rank 2 died"
    assert all(cases[n] is None for n in ("b32", "c16", "d-known-bad"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.json", "junit.xml", "new.json"]
