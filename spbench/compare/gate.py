"""Holding an adapter's verdicts to a baseline: the (implementation, case) pairs of a new spbench.compare/1 document
that got worse than in a baseline one (`spbench gate` runs it when both files are comparison documents)."""
from __future__ import annotations

from ..check.gate import Regression
from ..common.errors import UsageError


def row_key(row: dict) -> str:
    """The name a comparison row is matched and reported by: implementation/case."""
    return f"{row['impl']}/{row['case']}"


def compare_gate(baseline: dict, results: dict) -> list[Regression]:
    """Regressions in baseline row order: a pair that passed and now is wrong or refused (with its cause), or one
    that is missing from the new document. A pair that was not passing is not judged; new pairs are not either."""
    new = {row_key(r): r for r in results["rows"]}
    if baseline["rows"] and not new.keys() & {row_key(r) for r in baseline["rows"]}:
        raise UsageError(f"no common (implementation, case) pairs between the baseline ({_names(baseline)}) and "
                         f"the results ({_names(results)}); compare documents of the same suite and adapters")
    out = []
    for base in baseline["rows"]:
        name = row_key(base)
        if name not in new:
            out.append(Regression(name, "missing", "in the baseline, absent from the new results"))
        elif base["verdict"] == "pass" and new[name]["verdict"] != "pass":
            out.append(Regression(name, f"verdict pass → {new[name]['verdict']}", str(new[name].get("cause"))))
    return out


def as_cases(doc: dict) -> dict:
    """The document as the parity gate's JUnit writer reads one: a suite with one named entry per row."""
    return {"suite": f"compare.{doc.get('suite', 'adhoc')}", "cases": [{"name": row_key(r)} for r in doc["rows"]]}


def _names(doc: dict, limit: int = 3) -> str:
    names = [row_key(r) for r in doc["rows"]]
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "") or "no rows"
