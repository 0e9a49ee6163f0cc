"""Run a suite through each implementation and give every case a verdict: pass, wrong (with the error size) or
refused (with the implementation's own reason)."""
from __future__ import annotations

from ..check.cases import Case
from ..check.parity import run_cases
from .adapters import Implementation


def verdict(result: dict) -> dict:
    """{"verdict", "cause"} of one parity result: pass; refused (it raised: its message); wrong (a hang, or numbers
    outside tolerance: the first failures and the largest errors)."""
    if result["passed"]:
        return {"verdict": "pass", "cause": None}
    error = result.get("error")
    if error and "timed out" in error:
        return {"verdict": "wrong", "cause": f"hang: {error}"}
    if error:
        return {"verdict": "refused", "cause": error.split(": ", 1)[-1].replace(" (see stderr)", "")}
    m = result["metrics"]
    sizes = ", ".join(f"{k} {m[k]:.3g}" for k in ("max_loss_rel_err", "max_grad_norm_rel_err", "max_param_grad_rel_err",
                                                   "max_dpo_rel_err", "max_eval_rel_err") if m.get(k) is not None)
    return {"verdict": "wrong", "cause": "; ".join(result["failures"][:2]) + (f" ({sizes})" if sizes else "")}


def compare(impls: list[Implementation], cases: list[Case], log=print, **run_kw) -> list[dict]:
    """One row per (implementation, case): the case, the verdict and its cause, the parity metrics."""
    rows = []
    refs: dict = {}  # the SP-off references are the same for every implementation
    for impl in impls:
        log(f"compare: {impl.name}")
        declined = {c.name: impl.refuses(c) for c in cases}
        runnable = [c for c in cases if declined[c.name] is None]
        results = {r["name"]: r for r in run_cases(runnable, log=log, refs=refs, sp_job=impl.sp_job, **run_kw)}
        for c in cases:
            if declined[c.name] is not None:
                rows.append({"impl": impl.name, "case": c.name, "verdict": "refused", "cause": declined[c.name],
                             "metrics": {}})
                continue
            r = results[c.name]
            rows.append({"impl": impl.name, "case": c.name, **verdict(r), "metrics": r["metrics"],
                         "sp_wall_s": r.get("sp_wall_s")})
    return rows
