"""`spbench gate`: compare a new parity results file with a committed baseline; exit 1 on any regression.

A baseline case regresses when it is missing from the new results, when it passed before and now fails or
errors, when its configuration changed, or when one of its curves (ref_losses, sp_losses, sp_grad_norms)
differs from the baseline's by more than the case dtype's relative tolerance at any step (or in length).
Cases that already failed in the baseline are not judged; new cases not in the baseline are only counted.
Exit 2 on unusable input (a missing or malformed file, an unknown dtype). Imports no torch.
"""
from __future__ import annotations

from pathlib import Path

from ..check.gate import gate, junit_xml, parse_tolerances
from ..check.tolerances import GATE
from ..common.results import case_key, load_results, writable_folder, write_text_atomic
from ..common.table import format_table

EPILOG = """examples:
  spbench gate --baseline spbench/suites/golden/ci.json --results out/parity/ci.json
  spbench gate --baseline base.json --results new.json --tolerances float32=2e-5 --junit gate.xml
"""


def add_arguments(p) -> None:
    p.add_argument("--baseline", required=True, metavar="BASE.json", help="committed spbench.results/1 file")
    p.add_argument("--results", required=True, metavar="NEW.json", help="spbench.results/1 file of this run")
    p.add_argument("--tolerances", default="", metavar="DTYPE=TOL,...",
                   help="override relative curve tolerances (defaults: "
                        + ",".join(f"{k}={v:g}" for k, v in GATE.items()) + ")")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML, one testcase per baseline case")


def run(args) -> int:
    tolerances = parse_tolerances(args.tolerances)
    if args.junit:
        writable_folder(Path(args.junit).parent, "--junit")
    baseline, results = load_results(args.baseline), load_results(args.results)
    regressions = gate(baseline, results, tolerances)
    if args.junit:
        write_text_atomic(args.junit, junit_xml(baseline, regressions))
    if regressions:
        print(format_table(["case", "what", "detail"], [[r.case, r.what, r.detail] for r in regressions]))
    new = len({case_key(c) for c in results["cases"]} - {case_key(c) for c in baseline["cases"]})
    print(f"gate: {len(baseline['cases'])} cases compared, {len(regressions)} regressions"
          + (f" ({new} new cases not in the baseline)" if new else ""))
    return 1 if regressions else 0
