"""Reading what the `spbench gpu-check` steps printed: one record per step, the comparisons, the document.

A record carries its plan facts (gpuplan.Step.info), how the command ended, and what its output says. The
issue-5 goals (throughput, activation memory, memory-model error) are recorded and printed next to the
figures measured in the same run; they do not fail a check — a check fails when its command fails.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..common.results import last_json
from ..common.schemas import GPU_CHECK as SCHEMA
from ..common.table import format_table as plain_table
from ..common.units import MB, GiB
from .plan import PROBES, VARIANTS, Step

SKIPPED = "skipped: budget"
MODEL_ERROR_GOAL = 0.10
"""Issue 5's goal for the memory model (|error| ≤ 10%), per probe."""
THROUGHPUT_LENGTH = 32768
THROUGHPUT_GOAL = 1.2
"""Issue 5: ours ≥ 1.2 × plain tokens/s at 32k on one GPU."""
ACTIVATION_GOAL_MB = 0.3
"""Issue 5: activation memory of Qwen2.5-7B full SFT with our features ≤ 0.3 MB (10⁶ B) per token."""


@dataclass
class Completed:
    """What one command did: exit code (None when killed at its timeout), output, seconds it ran."""

    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool = False



def model_error(predicted_gib: float | None, measured_gib: float | None) -> float | None:
    """Relative error of the memory model, predicted / measured − 1 (as memmodel.compare_measurements)."""
    if not isinstance(predicted_gib, (int, float)) or not isinstance(measured_gib, (int, float)) or measured_gib <= 0:
        return None
    return predicted_gib / measured_gib - 1


def bytes_per_token(probe: dict, tokens: int) -> tuple[float | None, str | None]:
    """(bytes, basis): (peak − static) / tokens when the probe reports "static_gib", else peak / tokens."""
    peak, static = probe.get("peak_gib"), probe.get("static_gib")
    if not isinstance(peak, (int, float)):
        return None, None
    if isinstance(static, (int, float)):
        return (peak - static) * GiB / tokens, "(peak - static) / tokens"
    return peak * GiB / tokens, "peak / tokens"


def _no_json(done: Completed) -> str:
    tail = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or [""]
    return f"exit {done.returncode}, no JSON: {tail[0][:300]}"


def parse_attention(step: Step, out: dict | None, done: Completed) -> dict:
    if out is None or "passed" not in out:
        return {"passed": False, "reason": _no_json(done)}
    rel, tol = out.get("max_rel_err") or {}, out.get("tolerance")
    rec = {"passed": bool(out["passed"]) and done.returncode == 0, "kernel": out.get("kernel"), "tolerance": tol,
           "max_rel_err": rel, "max_abs_err": out.get("max_abs_err") or {}}
    if not rec["passed"]:
        worst = max(rel, key=lambda q: rel[q], default=None)
        rec["reason"] = f"{worst} rel err {rel[worst]:.3g} > {tol:.0e}" if worst and tol else _no_json(done)
    return rec


def parse_parity(step: Step, out: dict | None, done: Completed) -> dict:
    if out is None or "results" not in out:
        return {"passed": False, "reason": _no_json(done)}
    try:
        case = json.loads(Path(out["results"]).read_text(encoding="utf-8"))["cases"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return {"passed": False, "results": out["results"], "reason": f"cannot read {out['results']}: {e}"}
    rec = {"passed": bool(case.get("passed")) and done.returncode == 0, "results": out["results"],
           "metrics": case.get("metrics", {}), "tolerance": case.get("tolerance"), "failures": case.get("failures", []),
           "error": case.get("error")}
    if not rec["passed"]:
        rec["reason"] = case.get("error") or (rec["failures"] or [f"exit {done.returncode}"])[0]
    return rec


PROBE_FIELDS = ("peak_gib", "reserved_gib", "nvml_peak_used_gib", "static_gib", "step_s", "tokens_per_s", "kernel",
                "device_name", "loss", "rank_peak_gib")


def parse_probe(step: Step, out: dict | None, done: Completed) -> dict:
    if out is None or "status" not in out:
        rec = {"passed": False, "probe_status": "error", "reason": _no_json(done)}
    else:
        rec = {"passed": out["status"] == "ok", "probe_status": out["status"],
               **{k: out.get(k) for k in PROBE_FIELDS if k in out}}
        if out["status"] == "ok":
            tokens = out.get("rank_tokens") or out.get("tokens") or step.info["length"]  # per GPU
            rec["bytes_per_token"], rec["bytes_per_token_basis"] = bytes_per_token(out, tokens)
            err = model_error(step.info.get("predicted_gib"), out.get("peak_gib"))
            rec["model_error"] = err
            rec["model_error_within_goal"] = None if err is None else abs(err) <= MODEL_ERROR_GOAL
        else:
            rec["reason"] = out.get("error") or out["status"]
    if step.kind == "maxlen":
        rec["result"] = "success" if rec["passed"] else rec["probe_status"]
    return rec


PARSERS = {"attention": parse_attention, "parity": parse_parity, "probes": parse_probe, "dist": parse_probe,
           "maxlen": parse_probe}


def evaluate(step: Step, done: Completed, timeout_s: float, clipped: bool) -> dict:
    """The step's record: its plan, how the command ended, and what its output says."""
    rec = {"name": step.name, "kind": step.kind, "command": step.command, **step.info, "timeout_s": timeout_s,
           "returncode": done.returncode, "wall_s": round(done.wall_s, 3)}
    if done.timed_out:
        rec.update(passed=False, reason=f"timeout after {timeout_s:.0f} s" + (" (budget)" if clipped else ""))
        if step.kind == "maxlen":
            rec["result"] = "timeout"
    else:
        rec.update(PARSERS[step.kind](step, last_json(done.stdout), done))
    rec["status"] = "passed" if rec["passed"] else "failed"
    return rec


# ------------------------------------------------------------------------------------------- the document
def activation_slope(by_length: dict[int, dict]) -> float | None:
    """MB (10⁶ B) per token between the shortest and the longest length whose probe reported a peak."""
    ok = sorted((n, r["peak_gib"]) for n, r in by_length.items() if isinstance(r.get("peak_gib"), (int, float)))
    if len(ok) < 2:
        return None
    (n0, p0), (n1, p1) = ok[0], ok[-1]
    return (p1 - p0) * GiB / (n1 - n0) / MB


def comparisons(records: list[dict]) -> list[dict]:
    """Per probed model: plain and ours at THROUGHPUT_LENGTH side by side, ours / plain tokens/s, and each
    variant's activation slope (None unless two lengths ran), with the goals they are held to."""
    rows = []
    for model in dict.fromkeys(m for m, _ in PROBES):
        probes = [r for r in records if r["kind"] == "probes" and r["model"] == model]
        if not probes:
            continue
        by = {v: {r["length"]: r for r in probes if r["variant"] == v} for v in VARIANTS}
        at = {v: by[v][THROUGHPUT_LENGTH] for v in VARIANTS if THROUGHPUT_LENGTH in by[v]}
        keys = ("status", "peak_gib", "predicted_gib", "model_error", "tokens_per_s", "bytes_per_token")
        row = {"model": model, "length": THROUGHPUT_LENGTH, **{v: {k: r.get(k) for k in keys} for v, r in at.items()}}
        rates = [at.get(v, {}).get("tokens_per_s") for v in ("ours", "plain")]
        ratio = rates[0] / rates[1] if all(isinstance(x, (int, float)) and x > 0 for x in rates) else None
        slopes = {v: activation_slope(by[v]) for v in VARIANTS}
        rows.append({**row, "tokens_per_s_ratio": ratio, "tokens_per_s_goal": THROUGHPUT_GOAL,
                     "tokens_per_s_goal_met": None if ratio is None else ratio >= THROUGHPUT_GOAL,
                     "activation_lengths": sorted({r["length"] for r in probes}),
                     "activation_mb_per_token": slopes, "activation_goal_mb_per_token": ACTIVATION_GOAL_MB,
                     "activation_goal_met": None if slopes["ours"] is None else slopes["ours"] <= ACTIVATION_GOAL_MB})
    return rows


def document(records: list[dict], settings: dict, device: dict | None, prov: dict, final: bool) -> dict:
    """The spbench.gpu-check/1 document (`final` False while steps are still running)."""
    executed = [r for r in records if r["status"] != SKIPPED]
    skipped = [r["name"] for r in records if r["status"] == SKIPPED]
    return {"schema": SCHEMA, "passed": all(r["passed"] for r in executed), "complete": final and not skipped,
            "final": final, "device": device, "settings": settings, "provenance": prov, "steps": records,
            "comparisons": comparisons(executed),
            "summary": {"executed": len(executed), "passed": sum(bool(r["passed"]) for r in executed),
                        "failed": [r["name"] for r in executed if not r["passed"]], "skipped": skipped}}


def _fmt(x, spec: str, none: str = "-") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else none


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def detail(rec: dict) -> str:
    """One short line of what a step found."""
    kind, reason = rec["kind"], rec.get("reason")
    if rec["status"] == SKIPPED:
        return reason
    failed = f"; {reason}" if reason else ""
    if kind == "attention" and "kernel" in rec:
        worst = max(rec["max_rel_err"].values(), default=None)
        return f"kernel {rec['kernel']}, max rel err {_fmt(worst, '.1e')} (tol {_fmt(rec['tolerance'], '.0e')}){failed}"
    if kind == "parity" and "metrics" in rec:
        m = rec["metrics"]
        return (f"max rel err: loss {_fmt(m.get('max_loss_rel_err'), '.1e')}, "
                f"grad norm {_fmt(m.get('max_grad_norm_rel_err'), '.1e')}, "
                f"param grad {_fmt(m.get('max_param_grad_rel_err'), '.1e')}{failed}")
    where = f" at length {rec['length']:,}" if kind == "maxlen" else ""
    if rec.get("probe_status") == "oom":
        return f"OOM{where} (predicted {rec['predicted_gib']:.1f} GiB)"
    if rec.get("probe_status") != "ok":
        return f"{reason}{where}"
    err, bpt = rec.get("model_error"), rec.get("bytes_per_token")
    text = (f"peak {_fmt(rec.get('peak_gib'), '.1f')} GiB (model {rec['predicted_gib']:.1f}, "
            f"{_fmt(None if err is None else 100 * err, '+.1f')}%), {_fmt(rec.get('tokens_per_s'), ',.0f')} tokens/s, "
            f"{_fmt(None if bpt is None else bpt / 1e6, '.2f')} MB/token")
    if kind == "maxlen":
        text = (f"{rec['result']}{where} = {rec['maxlen_fraction']:g} x predicted max {rec['predicted_max_len']:,}; "
                + text)
    return text


def comparison_lines(doc: dict) -> list[str]:
    """Ours vs plain per probed model: tokens/s ratio and activation slope, each with its goal."""
    lines = []
    for c in doc["comparisons"]:
        lines.append(f"{c['model']} at {c['length']:,}: ours / plain tokens/s = {_fmt(c['tokens_per_s_ratio'], '.2f')}"
                     f" (goal >= {c['tokens_per_s_goal']:g}: {_verdict(c['tokens_per_s_goal_met'])})")
        slopes = c["activation_mb_per_token"]
        if any(x is not None for x in slopes.values()):
            lo, hi = c["activation_lengths"][0], c["activation_lengths"][-1]
            lines.append(f"{c['model']} activation MB/token ({lo:,} -> {hi:,} slope): "
                         + ", ".join(f"{v} {_fmt(x, '.3f')}" for v, x in slopes.items())
                         + f" (goal ours <= {c['activation_goal_mb_per_token']:g}: {_verdict(c['activation_goal_met'])})")
    return lines


def format_table(doc: dict) -> str:
    """The compact summary: one line per step, then ours vs plain per model."""
    rows = [[r["name"], r["status"], _fmt(r.get("wall_s"), ".1f"), detail(r)] for r in doc["steps"]]
    lines = [plain_table(["step", "status", "wall s", "result"], rows, right={2}), *comparison_lines(doc)]
    s = doc["summary"]
    verdict = "PASSED" if doc["passed"] else "FAILED"
    lines.append(f"{verdict}: {s['passed']}/{s['executed']} executed checks passed"
                 + (f", {len(s['skipped'])} skipped (budget)" if s["skipped"] else ""))
    return "\n".join(lines)
