"""Markdown sections of `spbench report` for memory results: max-length rows (estimated, measured or traced, with
model vs trace where a row was traced), `spbench cost` rows, and the memory model against stored GPU measurements."""
from __future__ import annotations

from pathlib import Path

from ..common.table import strategy_label


def _cell(x) -> str:
    return " ".join(str(x).split()).replace("|", "\\|")


def _row(cells) -> str:
    return "| " + " | ".join(_cell(x) for x in cells) + " |"


def _gib(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "—"


def maxlen_section(doc: dict, path: Path) -> list[str]:
    """The max-length table; rows traced by `spbench maxlen --trace check` also show the trace and the model's error
    (model / traced − 1), the sub-step where the trace peaks, and which terms came from the model."""
    def order(r: dict) -> tuple:
        return (str(r.get("model")), str(r.get("stage")), str(r.get("variant")), r.get("gpus") or 0,
                r.get("sp") or 0, r.get("zero") or 0, str(r.get("offload")))

    checked = any("traced_gib" in r or "trace_skipped" in r for r in doc["rows"])
    head = ("| model | stage | variant | GPUs | GPU mem GiB | SP | strategy | kernel | ZeRO | offload | max length "
            "| peak GiB | source |")
    rule = "|---|---|---|---:|---:|---:|---|---|---:|---|---:|---:|---|"
    if checked:
        head += " traced GiB | model − trace | layers traced | traced peak at |"
        rule += "---:|---:|---|---|"
    lines = [f"## Max trainable length ({path.parent.name}/{path.name})", "", head, rule]
    for r in sorted(doc["rows"], key=order):
        max_len = f"{r['max_len']:,}" if isinstance(r.get("max_len"), int) else "—"
        cells = [r.get("model", "?"), r.get("stage", "?"), r.get("variant", "—"), r.get("gpus", "?"),
                 r.get("gpu_mem_gib", "?"), r.get("sp", "?"), strategy_label(r), r.get("attention_kernel", "—"),
                 r.get("zero", "?"),
                 r.get("offload", "none"), max_len, _gib(r.get("peak_gib")), r.get("source", "?")]
        if checked:
            err = r.get("trace_error")
            cells += [_gib(r.get("traced_gib")), "—" if err is None else f"{err:+.2%}", r.get("trace_depth", "—"),
                      r.get("traced_where") or r.get("trace_skipped") or "—"]
        lines.append(_row(cells))
    if checked:
        traced = [r for r in doc["rows"] if isinstance(r.get("trace_error"), (int, float))]
        worst = max(traced, key=lambda r: abs(r["trace_error"]), default=None)
        from_model = next((r["from_model"] for r in traced), [])
        lines += ["", f"Traced on CPU (fake tensors, fake process group, the SP rank that peaks: 0, and sp − 1 for blockwise "
                  f"attention; the trainer's step); terms from "
                  f"the model: {', '.join(from_model) or '—'}; \"layers traced\" 2,3→L: the step traced at 2 and 3 "
                  f"decoder layers, extrapolated to L (spbench/memory/depth.py). {len(traced)} rows traced"
                  + (f", largest model error {worst['trace_error']:+.2%} ({worst['model']} {worst['stage']} "
                     f"{worst['variant']})." if worst else ".")]
    return lines


def cost_section(doc: dict, path: Path) -> list[str]:
    """`spbench cost` rows: per-rank traced peak vs model, FLOPs / ideal, bytes / minimum, attention balance."""
    lines = [f"## Cost of one step per rank ({path.name})", "",
             "| model | stage | length | SP | strategy | kernel | ZeRO | rank tokens | traced GiB | model GiB "
             "| model − trace | FLOPs / ideal | bytes / minimum | bytes / (min + explained) | attention max/mean |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        m, b, bal = r["memory"], r["bytes"], r.get("attention_balance")
        lines.append(_row([r["model"], r["stage"], f"{r['length']:,}", r["sp"], strategy_label(
            {"sp_method": r["method"], "ulysses": r["ulysses"], "ring": r["sp"] // r["ulysses"]}),
            r.get("attention_kernel", "—"), r["zero"],
            f"{r['rank_tokens']:,}", f"{m['traced_gib']:.2f}", f"{m['model_gib']:.2f}", f"{m['error']:+.2%}",
            f"{r['flops']['ratio']:.4f}", "—" if b["ratio"] is None else f"{b['ratio']:.4f}",
            "—" if b["ratio_to_expected"] is None else f"{b['ratio_to_expected']:.4f}",
            "—" if bal is None else f"{bal['max_over_mean']:.4f}"]))
    return lines


def measurements_section(doc: dict, path: Path) -> list[str]:
    """The memory model against stored GPU measurements (memory/model.py compare_measurements)."""
    from .model import compare_measurements

    rows = compare_measurements(path)
    setup, prov = doc.get("setup", {}), doc.get("provenance", {})
    lines = [f"## Memory model vs measured ({path.name}: {setup.get('gpus', '?')} × {prov.get('device', 'GPU')})", "",
             "| model | stage | length | measured GiB | model GiB | model − measured | model phase |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        err = "OOM" if r["oom"] else f"{r['error']:+.2%}"
        lines.append(_row([r["model"], r["stage"], f"{r['length']:,}", _gib(r["measured_gib"]),
                           f"{r['predicted_gib']:.1f}", err, r["phase"]]))
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    if errors:
        lines += ["", f"{len(errors)} measured points, largest |model − measured| {max(errors):.2%}."]
    return lines
