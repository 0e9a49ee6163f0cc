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
    groups: dict[tuple, list[str]] = {}  # cases that share implementation, verdict and cause: one row
    for r in doc["rows"]:
        if r["verdict"] != "pass":
            groups.setdefault((r["impl"], r["verdict"], r["cause"]), []).append(r["case"])
    lines += ["", "Verdicts other than pass:" if groups else "Every case passed.", ""]
    if groups:
        lines += ["| implementation | verdict | cause | cases |", "|---|---|---|---|"]
        lines += [f"| {impl} | {v} | {cause} | {', '.join(cases)} |" for (impl, v, cause), cases in groups.items()]
    return "\n".join(lines) + "\n"
