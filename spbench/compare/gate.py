"""Holding an adapter's verdicts to a baseline: the (implementation, case) pairs of a new spbench.compare/1 document
that got worse than in a baseline one (`spbench gate` runs it when both files are comparison documents)."""
from __future__ import annotations

from ..check.gate import Regression
from ..common.errors import UsageError
from .merge import row_suite


def row_key(row: dict) -> str:
    """The name a comparison row is matched and reported by: implementation/case."""
    return f"{row['impl']}/{row['case']}"


WORSE = {("pass", "wrong"), ("pass", "refused"), ("wrong", "refused")}
"""(baseline, new) verdicts that regress: a pass lost, or a wrong case the implementation no longer runs (its
adapter stopped reaching the code the verdict was about). wrong → pass and anything from refused are not judged."""


def judged_rows(baseline: dict, results: dict) -> list[dict]:
    """The baseline's rows of the implementations and suites the results ran (a run of one adapter on one suite
    is held to its part of a merged baseline; a case the results miss still counts)."""
    impls = set(results["implementations"])
    suites = {row_suite(results, r) for r in results["rows"]} or {results.get("suite")}
    return [r for r in baseline["rows"] if r["impl"] in impls and row_suite(baseline, r) in suites]


def compare_gate(baseline: dict, results: dict) -> list[Regression]:
    """Regressions in baseline row order (of `judged_rows`): a pair whose verdict got worse (`WORSE`, with the new
    cause), or one that is missing from the new document. New pairs are not judged."""
    new = {row_key(r): r for r in results["rows"]}
    rows = judged_rows(baseline, results)
    if baseline["rows"] and not new.keys() & {row_key(r) for r in rows}:
        raise UsageError(f"no common (implementation, case) pairs between the baseline ({_names(baseline)}) and "
                         f"the results ({_names(results)}); compare documents of the same suite and adapters")
    out = []
    for base in rows:
        name = row_key(base)
        if name not in new:
            out.append(Regression(name, "missing", "in the baseline, absent from the new results"))
        elif (base["verdict"], new[name]["verdict"]) in WORSE:
            out.append(Regression(name, f"verdict {base['verdict']} → {new[name]['verdict']}",
                                  str(new[name].get("cause"))))
    return out


def baseline_of(doc: dict) -> dict:
    """A gate baseline from a compare document: the same document with each row's verdict and cause only (no
    metrics or timings), for spbench/suites/golden/compare.json."""
    keep = ("impl", "case", "suite", "run", "verdict", "cause")
    return {**{k: v for k, v in doc.items() if k not in ("rows", "maxlen_estimates")},
            "rows": [{k: r[k] for k in keep if k in r} for r in doc["rows"]]}


def as_cases(doc: dict) -> dict:
    """The document as the parity gate's JUnit writer reads one: a suite with one named entry per row."""
    return {"suite": f"compare.{doc.get('suite', 'adhoc')}", "cases": [{"name": row_key(r)} for r in doc["rows"]]}


def _names(doc: dict, limit: int = 3) -> str:
    names = [row_key(r) for r in doc["rows"]]
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "") or "no rows"
