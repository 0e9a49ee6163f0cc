"""Rendering results files as report.md with Markdown tables and PNG plots (`spbench report`, cli/report.py, and
`spbench parity` call `render`): a section per parity (spbench.results/1), max-length (spbench.maxlen/1), cost
(spbench.cost/1), stored GPU measurements (spbench.measurements/1), GPU-check (spbench.gpu-check/1) or comparison
(spbench.compare/1) file, each followed by its provenance."""
from __future__ import annotations

import io
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from .check.tolerances import rel_errors
from .common.errors import UsageError
from .common.results import load_results, writable_folder, write_bytes_atomic, write_text_atomic
from .common.schemas import COMPARE, COST, GPU_CHECK, MAXLEN, MEASUREMENTS, PARITY

ERR_FLOOR = 1e-18  # log-scale error plot: an exact match (error 0) is drawn at this floor


def render(paths, out_dir) -> Path:
    """Write report.md and its PNGs into `out_dir`, one section per results file; returns report.md's path."""
    if not paths:
        raise UsageError("no results files given; pass at least one RESULTS.json")
    schemas = (PARITY, MAXLEN, GPU_CHECK, COMPARE, COST, MEASUREMENTS)
    docs = [(Path(p), load_results(p, schemas)) for p in paths]  # all valid first
    out = writable_folder(out_dir, "--out")
    # everything is written into a hidden folder first and moved in at the end: a report that fails half-way
    # leaves no plots without their report.md
    with tempfile.TemporaryDirectory(dir=out, prefix=".report-") as tmp:
        staging = Path(tmp)
        lines = ["# spbench report", ""]
        for i, (path, doc) in enumerate(docs, 1):
            if doc["schema"] == PARITY:
                lines += _parity_section(doc, path, staging, prefix=f"{i}-{_slug(path.stem)}")
            elif doc["schema"] == GPU_CHECK:
                lines += _gpu_check_section(doc, path)
            elif doc["schema"] == COMPARE:
                lines += _compare_section(doc, path, staging, prefix=f"{i}-{_slug(path.stem)}")
            else:
                lines += _memory_section(doc, path)
            lines += _provenance(doc.get("provenance") or {})
        write_text_atomic(staging / "report.md", "\n".join(lines) + "\n")
        for f in sorted(staging.iterdir(), key=lambda f: f.name == "report.md"):  # report.md last
            os.replace(f, out / f.name)
    return out / "report.md"


def _compare_section(doc: dict, path: Path, out: Path, prefix: str) -> list[str]:
    """`spbench compare`'s own report.md (compare/report.py) and its verdict matrix, its headings one level down,
    under the file name."""
    from .compare.figure import verdict_matrix
    from .compare.report import render as render_compare

    try:
        png = verdict_matrix(doc, out, f"{prefix}-verdicts.png")
    except ImportError:  # as for parity plots: the tables are the result
        png = None
    body = render_compare(doc, png).splitlines()
    return [f"## Comparison ({path.name}): {body[0].lstrip('# ')}", *("#" + x if x.startswith("#") else x
                                                                         for x in body[1:])]


def _parity_section(doc: dict, path: Path, out: Path, prefix: str) -> list[str]:
    cases = doc["cases"]
    lines = [f"## Suite `{doc.get('suite', '?')}` ({path.name}): {'PASSED' if doc.get('passed') else 'FAILED'}", "",
             "| case | stage | method | SP | DP×GA | dtype | max loss err | max grad err | verdict | tolerance |",
             "|---|---|---|---:|---|---|---:|---:|---|---|"]
    lines += [_case_row(c) for c in cases]
    failures = [(c["name"], f) for c in cases for f in c.get("failures") or []]
    if failures:
        lines += ["", "### Failures", ""] + [f"- `{name}`: {_cell(f)}" for name, f in failures]
    try:
        pngs = _plots(cases, out, prefix)
    except ImportError:  # e.g. a GPU image without matplotlib: the tables are the result, plots are extra
        lines += ["", "Plots skipped: matplotlib is not installed (pip install matplotlib)."]
        return lines
    if pngs:
        lines += ["", "### Plots", ""] + [f"![{png}]({png})\n" for png in pngs]
    return lines


def _case_row(c: dict) -> str:
    m = c.get("metrics") or {}
    grad = [m[k] for k in ("max_grad_norm_rel_err", "max_param_grad_rel_err") if m.get(k) is not None]
    stage = str(c.get("stage", "?")) + (f" ({c['pref_loss']})" if c.get("pref_loss") else "")
    verdict = f"ERROR: {c['error']}" if c.get("error") else "PASS" if c["passed"] else "FAIL"
    tol = ", ".join(f"{k} {v:.0e}" for k, v in (c.get("tolerance") or {}).items())
    cells = [c["name"], stage, c.get("method", "?"), c.get("sp", "?"), f"{c.get('dp', '?')}×{c.get('ga', '?')}",
             c.get("dtype", "?"), _num(m.get("max_loss_rel_err")), _num(max(grad) if grad else None), verdict, tol]
    return "| " + " | ".join(_cell(x) for x in cells) + " |"


def _plots(cases: list[dict], out: Path, prefix: str) -> list[str]:
    """Loss overlays per (stage, method) and one error-per-step plot; returns the PNG file names."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state

    groups = defaultdict(list)  # (stage with its dpo loss, method) → cases with a curve; losses differ in scale
    for c in cases:
        if c.get("sp_losses"):
            stage = str(c.get("stage", "?")) + (f"-{c['pref_loss']}" if c.get("pref_loss") else "")
            groups[(stage, str(c.get("method", "?")))].append(c)
    names = []
    for (stage, method), group in groups.items():
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        refs = {}  # distinct reference curve → first case that has it
        for c in group:
            refs.setdefault(tuple(c.get("ref_losses") or ()), c["name"])
        refs.pop((), None)
        for ref, name in refs.items():
            label = "SP off (reference)" if len(refs) == 1 else f"SP off, reference of {name}"
            ax.plot(range(len(ref)), ref, color="0.55", lw=6, alpha=0.5, label=label)
        for c in sorted(group, key=lambda c: c.get("sp") or 0):
            ax.plot(range(len(c["sp_losses"])), c["sp_losses"], marker="o", ms=3, lw=1.2,
                    label=f"SP={c.get('sp')}: {c['name']}")
        ax.set(xlabel="optimizer step", ylabel="training loss", title=f"{stage} / {method}: loss, SP off vs SP on")
        names.append(_save(fig, ax, out, f"{prefix}-loss-{_slug(stage)}-{_slug(method)}.png"))
    comparable = [c for c in cases if c.get("sp_losses") and len(c["sp_losses"]) == len(c.get("ref_losses") or ())]
    if comparable:
        names.append(_error_plot(comparable, out, f"{prefix}-loss-error.png"))
    return names


def _error_plot(cases: list[dict], out: Path, name: str) -> str:
    """Relative loss error per step, one small plot per stage and SP strategy (a few lines each, so each can be
    named), with the loss tolerance drawn in."""
    from matplotlib.figure import Figure

    groups = defaultdict(list)  # (stage, strategy) → its cases
    for c in cases:
        groups[(str(c.get("stage", "?")), str(c.get("method", "?")))].append(c)
    fig = Figure(figsize=(8, 3.2 * len(groups)))
    for i, ((stage, method), group) in enumerate(sorted(groups.items()), 1):
        ax = fig.add_subplot(len(groups), 1, i)
        for c in group:
            errs = [max(e, ERR_FLOOR) for e in rel_errors(c["sp_losses"], c["ref_losses"])]
            ax.plot(range(len(errs)), errs, marker="o", ms=3, label=c["name"])
        for tol in sorted({c["tolerance"]["loss"] for c in group if (c.get("tolerance") or {}).get("loss")}):
            ax.axhline(tol, color="red", ls=":", lw=1, label=f"loss tolerance {tol:.0e}")
        ax.set_yscale("log")
        ax.set(xlabel="optimizer step", title=f"{stage} / {method}: relative loss error, SP vs reference",
               ylabel=f"|SP − ref| / |ref| (0 drawn at {ERR_FLOOR:.0e})")
        _style(ax)
    fig.tight_layout()
    return _write_png(fig, out, name)


def _style(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))


def _write_png(fig, out: Path, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(out / name, buf.getvalue())
    return name


def _save(fig, ax, out: Path, name: str) -> str:
    _style(ax)
    return _write_png(fig, out, name)


def _gpu_check_section(doc: dict, path: Path) -> list[str]:
    from .gpu.results import comparison_lines, detail  # only here: the GPU plan imports the memory model (torch)

    device = (doc.get("device") or {}).get("name", "?")
    verdict = "PASSED" if doc.get("passed") else "FAILED"
    lines = [f"## GPU check ({path.name}): {verdict}{'' if doc.get('complete') else ' (incomplete)'} on {device}", "",
             "| step | status | wall s | result |", "|---|---|---:|---|"]
    for r in doc["steps"]:
        wall = f"{r['wall_s']:.1f}" if isinstance(r.get("wall_s"), (int, float)) else "—"
        lines.append("| " + " | ".join(_cell(x) for x in (r.get("name", "?"), r.get("status", "?"), wall, detail(r)))
                     + " |")
    goals = comparison_lines(doc)
    return lines + (["", "### Ours vs plain", ""] + [f"- {g}" for g in goals] if goals else [])


def _memory_section(doc: dict, path: Path) -> list[str]:
    """Max-length, cost or stored-measurement sections (memory/reportmd.py)."""
    from .memory import reportmd  # only here: the measurements section imports the memory model

    section = {MAXLEN: reportmd.maxlen_section, COST: reportmd.cost_section,
               MEASUREMENTS: reportmd.measurements_section}[doc["schema"]]
    return section(doc, path)


def _provenance(prov: dict) -> list[str]:
    if not prov:
        return ["", "_No provenance recorded._", ""]
    return ["", "### Provenance", "", "| field | value |", "|---|---|",
            *(f"| {k} | {_cell(v)} |" for k, v in prov.items()), ""]


def _num(x) -> str:
    return "—" if x is None else f"{x:.2e}"


def _cell(x) -> str:
    """A value as one Markdown table cell: no newlines, pipes escaped."""
    return " ".join(str(x).split()).replace("|", "\\|")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "x"
