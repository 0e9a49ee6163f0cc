"""`spbench gate`: compare a new parity results file with a committed baseline; exit 1 on any regression.

A baseline case regresses when it is missing from the new results, when it passed before and now fails or
errors, when its configuration changed, or when one of its curves (ref_losses, sp_losses, sp_grad_norms)
differs from the baseline's by more than the case dtype's relative tolerance at any step (or in length).
Cases that already failed in the baseline are not judged; new cases not in the baseline are only counted.
"""
from __future__ import annotations

import argparse
import difflib
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .errors import UsageError
from .results import case_key, load_results, rel_errors, write_text_atomic

EPILOG = """examples:
  spbench gate --baseline suites/baselines/ci.json --results reports/ci.json
  spbench gate --baseline base.json --results new.json --tolerances float32=2e-5 --junit gate.xml
"""
# Relative drift allowed between a baseline curve and a new one, per dtype.
DEFAULT_TOLERANCES = {
    "float64": 1e-9,   # deterministic on one machine, but another machine or thread count may reduce in another
                       # order: rounding-level drift (eps 2e-16) grown over a few steps, far below any real bug
    "float32": 1e-5,   # eps 1.2e-7; reduction order and kernel choice move losses by ~1e-6 over a few steps
    "bfloat16": 2e-2,  # eps 7.8e-3: one rounding flip in a norm or loss already moves it by ~1e-2
}
KNOWN_DTYPES = ("float64", "float32", "bfloat16", "float16")
CURVES = ("ref_losses", "sp_losses", "sp_grad_norms")
CONFIG = ("stage", "pref_loss", "method", "sp", "dp", "ga", "dtype", "packing", "model", "steps", "zero")


@dataclass(frozen=True)
class Regression:
    """One way a baseline case got worse: `what` is a short kind ("failed", "sp_losses drift", ...)."""

    case: str
    what: str
    detail: str


def register(subs) -> None:
    p = subs.add_parser("gate", help="fail (exit 1) when parity results regress against a baseline",
                        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, metavar="BASE.json", help="committed spbench.results/1 file")
    p.add_argument("--results", required=True, metavar="NEW.json", help="spbench.results/1 file of this run")
    p.add_argument("--tolerances", default="", metavar="DTYPE=TOL,...",
                   help="override relative curve tolerances (defaults: "
                        + ",".join(f"{k}={v:g}" for k, v in DEFAULT_TOLERANCES.items()) + ")")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML, one testcase per baseline case")
    p.set_defaults(func=run)


def run(args) -> int:
    tolerances = parse_tolerances(args.tolerances)
    baseline, results = load_results(args.baseline), load_results(args.results)
    regressions = gate(baseline, results, tolerances)
    if args.junit:
        write_text_atomic(args.junit, junit_xml(baseline, regressions))
    if regressions:
        rows = [("case", "what", "detail")] + [(r.case, r.what, r.detail) for r in regressions]
        w0, w1 = (max(len(row[i]) for row in rows) for i in (0, 1))
        for case, what, detail in rows:
            print(f"{case:<{w0}}  {what:<{w1}}  {detail}")
    new = len({case_key(c) for c in results["cases"]} - {case_key(c) for c in baseline["cases"]})
    print(f"gate: {len(baseline['cases'])} cases compared, {len(regressions)} regressions"
          + (f" ({new} new cases not in the baseline)" if new else ""))
    return 1 if regressions else 0


def parse_tolerances(text: str) -> dict[str, float]:
    """'float32=2e-5,bfloat16=3e-2' → DEFAULT_TOLERANCES with those entries replaced."""
    tolerances = dict(DEFAULT_TOLERANCES)
    for item in filter(None, (s.strip() for s in text.split(","))):
        dtype, sep, value = item.partition("=")
        try:
            tol = float(value) if sep else math.nan
        except ValueError:
            tol = math.nan
        if not (tol >= 0 and math.isfinite(tol)):
            raise UsageError(f"--tolerances: {item!r} is not DTYPE=TOLERANCE with a number >= 0 "
                             f"(e.g. --tolerances float64=1e-9,float32=1e-5)")
        if dtype not in KNOWN_DTYPES:
            close = difflib.get_close_matches(dtype, KNOWN_DTYPES, n=1)
            raise UsageError(f"--tolerances: unknown dtype {dtype!r}" + (f"; did you mean {close[0]!r}?" if close
                             else "") + f" (known: {', '.join(KNOWN_DTYPES)})")
        tolerances[dtype] = tol
    return tolerances


def gate(baseline: dict, results: dict, tolerances: dict[str, float]) -> list[Regression]:
    """Regressions of `results` against `baseline` (both spbench.results/1 dicts), in baseline case order."""
    new = {case_key(c): c for c in results["cases"]}
    if not new.keys() & {case_key(c) for c in baseline["cases"]}:
        raise UsageError(f"no common cases: baseline suite {baseline.get('suite')!r} has "
                         f"{_names(baseline['cases'])}, results suite {results.get('suite')!r} has "
                         f"{_names(results['cases'])}; compare results of the same suite")
    regressions = []
    for base in baseline["cases"]:
        name = case_key(base)
        if name not in new:
            regressions.append(Regression(name, "missing", "in the baseline, absent from the new results"))
        elif base["passed"]:
            regressions += _compare(base, new[name], tolerances)
    return regressions


def _compare(base: dict, case: dict, tolerances: dict[str, float]) -> list[Regression]:
    name = case_key(case)
    if not case["passed"]:
        if case.get("error"):
            return [Regression(name, "error", str(case["error"]))]
        return [Regression(name, "failed", "; ".join(case.get("failures") or ["passed is false"]))]
    changed = [f"{k} {base.get(k)!r} → {case.get(k)!r}" for k in CONFIG if base.get(k) != case.get(k)]
    if changed:
        return [Regression(name, "config changed", ", ".join(changed) + "; regenerate the baseline if intended")]
    dtype = case.get("dtype")
    if dtype not in tolerances:
        raise UsageError(f"case {name!r} has dtype {dtype!r} with no gate tolerance; "
                         f"add one with --tolerances {dtype}=REL_TOL")
    tol, out = tolerances[dtype], []
    for curve in CURVES:
        want, got = base.get(curve) or [], case.get(curve) or []
        if len(want) != len(got):
            out.append(Regression(name, f"{curve} length", f"{len(want)} steps in the baseline, {len(got)} now"))
            continue
        errs = rel_errors(got, want)
        step = max(range(len(errs)), key=errs.__getitem__, default=None)
        if step is not None and errs[step] > tol:
            out.append(Regression(name, f"{curve} drift", f"step {step}: {got[step]!r} vs baseline {want[step]!r}, "
                                                          f"rel err {errs[step]:.1e} > {tol:.0e} ({dtype})"))
    return out


def junit_xml(baseline: dict, regressions: list[Regression]) -> str:
    """JUnit XML text: one testcase per baseline case, with a failure element when it regressed."""
    by_case: dict[str, list[Regression]] = {}
    for r in regressions:
        by_case.setdefault(r.case, []).append(r)
    suite = ET.Element("testsuite", name=f"spbench.gate.{baseline.get('suite', 'adhoc')}",
                       tests=str(len(baseline["cases"])), failures=str(len(by_case)), errors="0")
    for base in baseline["cases"]:
        name = case_key(base)
        tc = ET.SubElement(suite, "testcase", classname=suite.get("name"), name=name)
        if name in by_case:
            failure = ET.SubElement(tc, "failure", message="; ".join(r.what for r in by_case[name]))
            failure.text = "\n".join(f"{r.what}: {r.detail}" for r in by_case[name])
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _names(cases: list[dict], limit: int = 5) -> str:
    names = [case_key(c) for c in cases]
    if not names:
        return "no cases"
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")
