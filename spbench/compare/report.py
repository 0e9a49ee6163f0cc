"""The comparison document (schema spbench.compare/1) and its Markdown rendering."""
from __future__ import annotations

from collections import Counter

from ..common.schemas import COMPARE
from .adapters import Implementation


def compare_doc(suite: str, impls: list[Implementation], rows: list[dict], prov: dict) -> dict:
    """Rows (one per implementation and case), each implementation's package versions and documented features."""
    return {"schema": COMPARE, "suite": suite, "provenance": prov,
            "implementations": {i.name: {"versions": i.versions(), "features": i.features} for i in impls},
            "rows": rows}


def render(doc: dict) -> str:
    """report.md: verdict counts per implementation, then every case that did not pass, with its cause."""
    prov = doc["provenance"]
    lines = [f"# SP implementations through the parity harness ({doc['suite']} suite)", "",
             f"`{prov['command']}` · git {prov['git_sha'][:10]} · torch {prov['torch']} · {prov['device']} · "
             f"{prov['date']}", "", "| implementation | versions | pass | wrong | refused |", "|---|---|---|---|---|"]
    for name, info in doc["implementations"].items():
        counts = Counter(r["verdict"] for r in doc["rows"] if r["impl"] == name)
        versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        lines.append(f"| {name} | {versions} | {counts['pass']} | {counts['wrong']} | {counts['refused']} |")
    others = [r for r in doc["rows"] if r["verdict"] != "pass"]
    lines += ["", "Verdicts other than pass:" if others else "Every case passed.", ""]
    if others:
        lines += ["| implementation | case | verdict | cause |", "|---|---|---|---|"]
        lines += [f"| {r['impl']} | {r['case']} | {r['verdict']} | {r['cause']} |" for r in others]
    return "\n".join(lines) + "\n"
