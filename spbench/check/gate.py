"""Gating parity results against a baseline: the regressions of a new results file (cli/gate.py runs it)."""
from __future__ import annotations

import difflib
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..common.errors import UsageError
from ..common.results import case_key
from .tolerances import GATE, rel_errors

KNOWN_DTYPES = ("float64", "float32", "bfloat16", "float16")
CURVES = ("ref_losses", "sp_losses", "sp_grad_norms")
CONFIG = ("stage", "pref_loss", "method", "sp", "dp", "ga", "dtype", "packing", "model", "steps", "zero")


@dataclass(frozen=True)
class Regression:
    """One way a baseline case got worse: `what` is a short kind ("failed", "sp_losses drift", ...)."""

    case: str
    what: str
    detail: str


def parse_tolerances(text: str) -> dict[str, float]:
    """'float32=2e-5,bfloat16=3e-2' → the GATE tolerances with those entries replaced."""
    tolerances = dict(GATE)
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
