"""`spbench gate`: compare a new parity results file with a committed baseline; exit 1 on any regression.

A baseline case regresses when it is missing from the new results, when it passed before and now fails or
errors, when its configuration changed, or when one of its curves (ref_losses, sp_losses, sp_grad_norms)
differs from the baseline's by more than the case dtype's relative tolerance at any step (or in length).
Cases that already failed in the baseline are not judged; new cases not in the baseline are only counted.
Given two comparison documents (spbench.compare/1, `spbench compare`), it holds every adapter's verdicts to the
baseline instead: an (implementation, case) pair that passed and is now wrong or refused, that was wrong and is now
refused (the adapter no longer reaches it), or is missing, regresses; only the baseline's pairs of implementations and
suites the results ran are judged (one adapter's run against a merged baseline).
Exit 2 on unusable input (a missing or malformed file, an unknown dtype, a parity file against a comparison one).
Imports no torch.
"""
from __future__ import annotations

from pathlib import Path

from ..check.gate import gate, junit_xml, parse_tolerances
from ..check.tolerances import GATE
from ..common.errors import UsageError
from ..common.results import case_key, load_results, writable_folder, write_text_atomic
from ..common.schemas import COMPARE, PARITY
from ..common.table import format_table

EPILOG = """examples:
  spbench gate --baseline spbench/suites/golden/ci.json --results out/parity/ci.json
  spbench gate --baseline base.json --results new.json --tolerances float32=2e-5 --junit gate.xml
  spbench gate --baseline spbench/suites/golden/compare.json --results out/compare/compare.json
"""


def add_arguments(p) -> None:
    p.add_argument("--baseline", required=True, metavar="BASE.json", help="committed spbench.results/1 (or spbench.compare/1) file")
    p.add_argument("--results", required=True, metavar="NEW.json", help="spbench.results/1 (or spbench.compare/1) file of this run")
    p.add_argument("--tolerances", default="", metavar="DTYPE=TOL,...",
                   help="override relative curve tolerances (defaults: "
                        + ",".join(f"{k}={v:g}" for k, v in GATE.items()) + ")")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML, one testcase per baseline case")


def run(args) -> int:
    tolerances = parse_tolerances(args.tolerances)
    if args.junit:
        writable_folder(Path(args.junit).parent, "--junit")
    baseline, results = load_results(args.baseline, (PARITY, COMPARE)), load_results(args.results, (PARITY, COMPARE))
    if baseline["schema"] != results["schema"]:
        raise UsageError(f"--baseline is {baseline['schema']}, --results is {results['schema']}: gate two parity "
                         f"results files or two comparison documents")
    if baseline["schema"] == COMPARE:
        return _gate_compare(args, baseline, results)
    regressions = gate(baseline, results, tolerances)
    if args.junit:
        write_text_atomic(args.junit, junit_xml(baseline, regressions))
    if regressions:
        print(format_table(["case", "what", "detail"], [[r.case, r.what, r.detail] for r in regressions]))
    new = len({case_key(c) for c in results["cases"]} - {case_key(c) for c in baseline["cases"]})
    print(f"gate: {len(baseline['cases'])} cases compared, {len(regressions)} regressions"
          + (f" ({new} new cases not in the baseline)" if new else ""))
    return 1 if regressions else 0


def _gate_compare(args, baseline: dict, results: dict) -> int:
    from ..compare.gate import as_cases, compare_gate, judged_rows, row_key

    regressions = compare_gate(baseline, results)
    judged = judged_rows(baseline, results)
    if args.junit:
        write_text_atomic(args.junit, junit_xml(as_cases({**baseline, "rows": judged}), regressions))
    for r in regressions:
        print(f"REGRESSION {r.case}: {r.what} ({r.detail})")
    new = len({row_key(r) for r in results["rows"]} - {row_key(r) for r in baseline["rows"]})
    skipped = len(baseline["rows"]) - len(judged)
    print(f"gate: {len(judged)} verdicts compared, {len(regressions)} regressions"
          + (f" ({new} new pairs not in the baseline)" if new else "")
          + (f" ({skipped} baseline pairs of implementations or suites not in the results, not judged)"
             if skipped else ""))
    return 1 if regressions else 0
