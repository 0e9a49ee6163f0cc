"""The comparison document (schema spbench.compare/1) and its Markdown rendering: one `spbench compare` run, or
several merged (compare/merge.py), each run with its provenance."""
from __future__ import annotations

import statistics
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import tomllib

from ..common.schemas import COMPARE
from .merge import row_suite, runs_of

if TYPE_CHECKING:  # rendering a document (`spbench report`) needs no adapter, so no torch
    from .adapters import Implementation

FEATURES = ("strategies", "gqa", "packing", "dpo", "zero")
TIMING_NOTE = ("SP job time: wall time of the implementation's SP run of a case (ranks' whole job: model build, "
               "set-up, every step), as a median ratio to spbench's over the cases both ran in the same run "
               "(same venv, same machine, same time). CPU ratios are only indicative.")
ESTIMATE_NOTE = ("Max length: an ESTIMATE of the memory model (spbench/memory/model.py) for SFT on 8 × 80 GB with "
                 "the memory features each implementation has (spbench/compare/memory.toml, a reason each), not a "
                 "measurement; peak memory is the model's at that length. `name@run`: the base name's entry.")


def published_figures() -> list[dict]:
    """The figures each implementation's authors published, with their sources (compare/published.toml)."""
    text = resources.files("spbench.compare").joinpath("published.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["figures"]


def compare_doc(suite: str, impls: list[Implementation], rows: list[dict], prov: dict) -> dict:
    """Rows (one per implementation and case), each implementation's package versions and documented features."""
    return {"schema": COMPARE, "suite": suite, "provenance": prov,
            "implementations": {i.name: {"versions": i.versions(), "features": i.features} for i in impls},
            "rows": rows}


def _base(impl: str) -> str:
    return impl.split("@", 1)[0]


def time_ratio(rows: list[dict], impl: str, base: str = "spbench") -> tuple[float | None, int]:
    """(median of impl's SP job time / base's, over the cases both ran to a pass or wrong verdict in the same run;
    their count). None when base is not in the rows or no case ran on both."""
    def times(match):
        return {(r.get("run"), r["case"]): r["sp_wall_s"] for r in rows
                if match(r["impl"]) and r["verdict"] != "refused" and r.get("sp_wall_s")}
    mine, theirs = times(lambda name: name == impl), times(lambda name: _base(name) == base)
    ratios = [mine[k] / theirs[k] for k in mine.keys() & theirs.keys()]
    return (statistics.median(ratios) if ratios else None), len(ratios)


def _ratio_cell(rows: list[dict], name: str) -> str:
    if _base(name) == "spbench":
        return "1 (reference)"
    ratio, n = time_ratio(rows, name)
    if ratio is None:
        return "no case ran on both" if any(_base(r["impl"]) == "spbench" for r in rows) else "spbench not in this run"
    return f"{ratio:.2f} ({n} cases)"


def _cell(value) -> str:
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return "—" if value is None else " ".join(str(value).split()).replace("|", "/")


def _memory_cells(est: dict | None) -> str:
    if not est:
        return "no estimate | —"
    if not est.get("max_len"):
        return "does not fit (est.) | —"
    return f"{est['max_len']:,} (est.) | {est['peak_gib']:.1f} GiB (est.)"


def _runs_section(doc: dict) -> list[str]:
    lines = ["## Runs (each with its own provenance)", "",
             "| run | suite | command | git | python | torch | transformers | deepspeed | device | date | "
             "implementations |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, run in enumerate(runs_of(doc)):
        p = run["provenance"]
        sha = f"{p.get('git_sha', '?')[:10]}{' (dirty)' if p.get('git_dirty') else ''}"
        cells = [run.get("label") or i, run["suite"], f"`{p.get('command', '?')}`", sha, p.get("python"),
                 p.get("torch"), p.get("transformers"), p.get("deepspeed"), p.get("device"), p.get("date"),
                 run["implementations"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines + [""]


def render(doc: dict, figure: str | None = None) -> str:
    """report.md: the runs with their provenance; per implementation its verdict counts per suite, SP job time
    relative to spbench, estimated max length and peak; features; every case that did not pass with its cause;
    the estimates beside the figures its authors published. `figure`: a PNG next to report.md to link."""
    prov, rows, impls = doc["provenance"], doc["rows"], doc["implementations"]
    estimates = doc.get("maxlen_estimates") or {}
    suites = list(dict.fromkeys(row_suite(doc, r) for r in rows)) or [doc.get("suite", "?")]
    lines = [f"# SP implementations through the parity harness ({doc['suite']} suite)", "",
             f"`{prov.get('command', '?')}` · git {str(prov.get('git_sha', '?'))[:10]} · torch {prov.get('torch')} · "
             f"{prov.get('device')} · {prov.get('date')}", ""]
    if figure:
        lines += [f"![verdict per implementation and case]({figure})", ""]
    lines += ["| implementation | versions | " + " | ".join(f"{s}: pass / wrong / refused" for s in suites)
              + " | SP job time / spbench (median) | max length, 8 × 80 GB | peak memory there |",
              "|---" * (len(suites) + 5) + "|"]
    for name, info in impls.items():
        counts = {s: Counter(r["verdict"] for r in rows if r["impl"] == name and row_suite(doc, r) == s)
                  for s in suites}
        versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in info["versions"].items())
        per_suite = [f"{c['pass']} / {c['wrong']} / {c['refused']}" if c else "not run" for c in counts.values()]
        lines.append(f"| {name} | {versions} | " + " | ".join(per_suite) +
                     f" | {_ratio_cell(rows, name)} | {_memory_cells(estimates.get(name))} |")
    lines += ["", TIMING_NOTE, "", ESTIMATE_NOTE, ""]
    lines += _runs_section(doc) if "runs" in doc else []
    lines += ["## Features (as each adapter documents them)", "",
              "| implementation | " + " | ".join(FEATURES) + " | other |", "|---" * (len(FEATURES) + 2) + "|"]
    for name, info in impls.items():
        feats = info.get("features") or {}
        other = "; ".join(f"{k}: {_cell(v)}" for k, v in feats.items() if k not in FEATURES) or "—"
        lines.append(f"| {name} | " + " | ".join(_cell(feats.get(k)) for k in FEATURES) + f" | {other} |")
    groups: dict[tuple, list[str]] = {}  # cases that share implementation, suite, verdict and cause: one row
    for r in rows:
        if r["verdict"] != "pass":
            groups.setdefault((r["impl"], row_suite(doc, r), r["verdict"], r["cause"]), []).append(r["case"])
    lines += ["", "## Verdicts other than pass" if groups else "Every case passed.", ""]
    if groups:
        lines += ["| implementation | suite | verdict | cause | cases |", "|---|---|---|---|---|"]
        lines += [f"| {impl} | {s} | {v} | {_cell(cause)} | {', '.join(cases)} |"
                  for (impl, s, v, cause), cases in groups.items()]
    return _with_estimates_and_figures(lines, doc, estimates)


def _with_estimates_and_figures(lines: list[str], doc: dict, estimates: dict) -> str:
    """report.md's text: `lines`, the estimates table (a reason per feature set), the published figures."""
    from .estimate import features_cell

    if estimates:
        lines += ["", "## Max length on 8 × 80 GB: estimated from each implementation's features", "",
                  "| implementation | model | memory features | max length (est.) | peak GiB (est.) | "
                  "host GiB / rank (est.) | its authors published | why these features |", "|---" * 8 + "|"]
        for name, e in estimates.items():
            max_len = f"{e['max_len']:,}" if e.get("max_len") else "does not fit"
            published = "; ".join(f"{f['model']}: {f['claim']}, {f['hardware']}" for f in published_figures()
                                  if _base(name) in f["adapters"]) or "—"
            lines.append(f"| {name} | {e['model']} | {features_cell(e)} | {max_len} | {_cell(e.get('peak_gib'))} | "
                         f"{_cell(e.get('host_gib'))} | {_cell(published)} | {_cell(e['reason'])} |")
    lines += _traced_section(doc.get("maxlen_traced") or {})
    lines += ["", "## Figures their authors published (not measured here)", "",
              "| project | model | claim | hardware | source | adapters here |", "|---|---|---|---|---|---|"]
    lines += [f"| {f['project']} | {f['model']} | {f['claim']} | {f['hardware']} | [{f['source']}]({f['url']}) | "
              f"{', '.join(a for a in f['adapters'] if a in doc['implementations']) or '—'} |"
              for f in published_figures()]
    return "\n".join(lines) + "\n"


def _traced_section(traced: dict) -> list[str]:
    """The implementations whose step was traced (`spbench compare --trace-memory`, compare/traced.py)."""
    if not traced:
        return []
    lines = ["", "## Max length on 8 × 80 GB: traced on CPU (no checkpoint offload)", "",
             "Each implementation's step traced on fake tensors as SP rank 0 (2 and 3 decoder layers, extrapolated), "
             "with ZeRO's static terms from the memory model; bisected on traced peaks against 75.5 GiB usable "
             f"(resolution {next(iter(traced.values()))['resolution']:,} tokens). spbench's and DeepSpeed ALST's own "
             "steps; ALST's attention in transformers' model with its own loss (HF's Trainer path under SP, and "
             "ALST's attention alone); ms-swift's and verl's attention inside the harness's step (their trainers do "
             "not run here), "
             "traced in their venvs (`traced in`: the run). The memory model models the runtime's step: its error "
             "on another implementation's is how differently that step holds memory.", "",
             "| implementation | model | memory features | max length (traced) | traced GiB there | model GiB there "
             "| model − trace | max length (model) | probes | trace s | traced in |", "|---" * 11 + "|"]
    for name, t in traced.items():
        lines.append(f"| {name} | {t['model']} | {t['setup']} | {t['max_len']:,} | {_cell(_round(t['traced_gib']))} | "
                     f"{_cell(_round(t['model_gib']))} | {t['error']:+.1%} | {t['estimated_max_len']:,} | {t['probes']} | "
                     f"{t['trace_s']} | {'this merge' if t.get('run') is None else 'run ' + str(t['run'])} |")
    return lines


def _round(x):
    return None if x is None else round(x, 1)


def write_report(doc: dict, out: Path) -> list[Path]:
    """report.md and its verdict-matrix PNG (skipped without matplotlib) into `out`; returns the paths written."""
    from ..common.results import write_text_atomic
    from .figure import verdict_matrix

    try:
        png = verdict_matrix(doc, out)
    except ImportError:
        png = None
    write_text_atomic(Path(out) / "report.md", render(doc, png))
    return [Path(out) / "report.md"] + ([Path(out) / png] if png else [])
