"""The comparison's figure: a verdict matrix, implementations × cases, one panel per suite, each cell coloured
pass / wrong / refused (white: the implementation did not run that suite)."""
from __future__ import annotations

import io
from pathlib import Path

from ..common.results import write_bytes_atomic
from .merge import row_suite

COLOURS = {"pass": "#2e9d4f", "wrong": "#d62728", "refused": "#b0b0b0"}
CODES = {None: 0, "pass": 1, "wrong": 2, "refused": 3}


def verdict_matrix(doc: dict, out: Path, name: str = "verdicts.png") -> str:
    """Write the PNG into `out` (atomically); returns its file name. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state
    from matplotlib.patches import Patch

    impls = list(doc["implementations"])
    suites: dict[str, list[str]] = {}  # suite → its cases, in row order
    cell: dict[tuple[str, str, str], str] = {}
    for r in doc["rows"]:
        suite = row_suite(doc, r)
        cases = suites.setdefault(suite, [])
        if r["case"] not in cases:
            cases.append(r["case"])
        cell[(suite, r["impl"], r["case"])] = r["verdict"]
    widths = [max(len(c), 4) for c in suites.values()]
    fig = Figure(figsize=(max(6.0, 0.16 * sum(widths) + 3.5), 1.2 + 0.32 * len(impls) + 1.6))
    axes = fig.subplots(1, len(suites), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    cmap = ListedColormap(["white", COLOURS["pass"], COLOURS["wrong"], COLOURS["refused"]])
    for i, (ax, (suite, cases)) in enumerate(zip(axes, suites.items())):
        grid = [[CODES[cell.get((suite, impl, case))] for case in cases] for impl in impls]
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=3, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(cases)), cases, rotation=90, fontsize=5)
        ax.set_yticks(range(len(impls)), impls if i == 0 else [""] * len(impls), fontsize=7)
        ax.set_xticks([x - 0.5 for x in range(1, len(cases))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(impls))], minor=True)
        ax.grid(which="minor", color="white", lw=0.6)
        ax.tick_params(which="minor", length=0)
        ax.set_title(f"{suite} suite ({len(cases)} cases)", fontsize=9)
    fig.legend(handles=[Patch(color=c, label=v) for v, c in COLOURS.items()] +
               [Patch(facecolor="white", edgecolor="0.6", label="not run")],
               loc="upper right", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("SP implementations through the parity harness: verdict per case", fontsize=10, x=0.02, ha="left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(Path(out) / name, buf.getvalue())
    return name
