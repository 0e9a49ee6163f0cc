"""The comparison document (schema spbench.compare/1) and its Markdown rendering."""
from __future__ import annotations

import statistics
from collections import Counter
from importlib import resources
from typing import TYPE_CHECKING

import tomllib

from ..common.schemas import COMPARE

if TYPE_CHECKING:  # rendering a document (`spbench report`) needs no adapter, so no torch
    from .adapters import Implementation

FEATURES = ("strategies", "gqa", "packing", "dpo", "zero")
TIMING_NOTE = ("SP job time: wall time of the implementation's SP run of a case (ranks' whole job: model build, "
               "set-up, every step), as a median ratio to spbench's over the cases both ran in this document. "
               "CPU ratios are only indicative.")


def published_figures() -> list[dict]:
    """The figures each implementation's authors published, with their sources (compare/published.toml)."""
    text = resources.files("spbench.compare").joinpath("published.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["figures"]


def compare_doc(suite: str, impls: list[Implementation], rows: list[dict], prov: dict) -> dict:
    """Rows (one per implementation and case), each implementation's package versions and documented features."""
    return {"schema": COMPARE, "suite": suite, "provenance": prov,
            "implementations": {i.name: {"versions": i.versions(), "features": i.features} for i in impls},
            "rows": rows}


def time_ratio(rows: list[dict], impl: str, base: str = "spbench") -> tuple[float | None, int]:
    """(median of impl's SP job time / base's, over the cases both ran to a pass or wrong verdict; their count).
    None when base is not in the rows or no case ran on both."""
    def times(name):
        return {r["case"]: r["sp_wall_s"] for r in rows
                if r["impl"] == name and r["verdict"] != "refused" and r.get("sp_wall_s")}
    mine, theirs = times(impl), times(base)
    ratios = [mine[c] / theirs[c] for c in mine.keys() & theirs.keys()]
    return (statistics.median(ratios) if ratios else None), len(ratios)


def _ratio_cell(rows: list[dict], name: str) -> str:
    if name == "spbench":
        return "1 (reference)"
    ratio, n = time_ratio(rows, name)
    if ratio is None:
        return "no case ran on both" if any(r["impl"] == "spbench" for r in rows) else "spbench not in this run"
    return f"{ratio:.2f} ({n} cases)"


def _feature_cell(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "—" if value is None else str(value).replace("|", "/")


def render(doc: dict) -> str:
    """report.md: per implementation its verdict counts, SP job time relative to spbench, features and (not yet
    measured) peak memory; every case that did not pass with its cause; the figures its authors published."""
    prov, rows = doc["provenance"], doc["rows"]
    lines = [f"# SP implementations through the parity harness ({doc['suite']} suite)", "",
             f"`{prov['command']}` · git {prov['git_sha'][:10]} · torch {prov['torch']} · {prov['device']} · "
             f"{prov['date']}", "",
             "| implementation | versions | pass | wrong | refused | SP job time / spbench (median) | "
             "peak memory / max length |", "|---|---|---|---|---|---|---|"]
    for name, info in doc["implementations"].items():
        counts = Counter(r["verdict"] for r in rows if r["impl"] == name)
        versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in info["versions"].items())
        lines.append(f"| {name} | {versions} | {counts['pass']} | {counts['wrong']} | {counts['refused']} | "
                     f"{_ratio_cell(rows, name)} | not measured |")
    lines += ["", TIMING_NOTE, "", "## Features (as each adapter documents them)", "",
              "| implementation | " + " | ".join(FEATURES) + " | other |", "|---" * (len(FEATURES) + 2) + "|"]
    for name, info in doc["implementations"].items():
        feats = info.get("features") or {}
        other = "; ".join(f"{k}: {_feature_cell(v)}" for k, v in feats.items() if k not in FEATURES) or "—"
        lines.append(f"| {name} | " + " | ".join(_feature_cell(feats.get(k)) for k in FEATURES) + f" | {other} |")
    groups: dict[tuple, list[str]] = {}  # cases that share implementation, verdict and cause: one row
    for r in rows:
        if r["verdict"] != "pass":
            groups.setdefault((r["impl"], r["verdict"], r["cause"]), []).append(r["case"])
    lines += ["", "## Verdicts other than pass" if groups else "Every case passed.", ""]
    if groups:
        lines += ["| implementation | verdict | cause | cases |", "|---|---|---|---|"]
        lines += [f"| {impl} | {v} | {cause} | {', '.join(cases)} |" for (impl, v, cause), cases in groups.items()]
    lines += ["", "## Figures their authors published (not measured here)", "",
              "| project | model | claim | hardware | source | adapters here |", "|---|---|---|---|---|---|"]
    lines += [f"| {f['project']} | {f['model']} | {f['claim']} | {f['hardware']} | [{f['source']}]({f['url']}) | "
              f"{', '.join(a for a in f['adapters'] if a in doc['implementations']) or '—'} |"
              for f in published_figures()]
    return "\n".join(lines) + "\n"
