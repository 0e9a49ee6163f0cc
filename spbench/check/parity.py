"""Parity: the same training with SP off (reference) and on, compared number by number.

Each case (check/cases.py) trains the same global batch twice: the reference in this process (SP=1, DP=1,
grad-accum = dp × ga, transformers' own SDPA attention unless packing), and the SP run on a pool of local
ranks (one pool per world size, reused across cases). It compares the per-step loss and grad-norm curves,
per-parameter gradients of the trainable parameters at step 0 (LoRA: step 1, when A's are non-zero; not under
ZeRO, where they are partitioned) and, for DPO, rewards and log-probs, each against its tolerance
(check/tolerances.py). LoRA DPO's reference log-probs come from a second, adapter-free model in the reference
run and from the policy with adapters disabled in the SP run, so the SP run's `disable_adapter` path is checked
against an independent one.
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable

from runtime.attention.hf import ATTN_NAME as SP_ATTENTION
from runtime.config import from_dict
from runtime.train import DPO_KEYS, Trainer

from ..common.backend import rank_device
from ..common.deepspeed import deepspeed_files
from ..common.errors import RankError
from ..common.jobs import train_on_rank
from ..common.pool import RankPool
from .cases import Case
from .tolerances import TOLERANCES, ZERO, rel_err


def applied_tolerances(case: Case) -> dict[str, float]:
    """The relative tolerance each metric of `case` is judged with: its dtype's (check/tolerances.py), and under
    ZeRO DeepSpeed's float32 grad norm and update path (ZERO); `dpo` for DPO cases only."""
    tol = TOLERANCES[case.dtype]
    loss = max(tol["loss"], ZERO["dpo_loss"]) if case.zero and case.stage == "dpo" else tol["loss"]
    out = {"loss": loss, "grad_norm": max(tol["grad"], ZERO["grad_norm"]) if case.zero else tol["grad"],
           "param_grad": tol["grad"]}
    if case.stage == "dpo":
        out["dpo"] = max(tol["loss"], ZERO["dpo"]) if case.zero else tol["loss"]
    return out


def dpo_error(case: Case, key: str, r: dict, s: dict) -> float:
    """Relative error of one DPO quantity. Rewards β(π − ρ) are differences of near-equal log-probs
    (0 at step 0), so they are measured against β·|log p|, the scale they are computed from.
    Accuracies (a 0/1 average that flips when a margin is ~0) are compared only in float64."""
    scale = abs(r[key])
    if key.startswith("rewards/"):
        beta = case.config.get("pref_beta", 0.1)
        scale = max(scale, beta * max(abs(r["logps/chosen"]), abs(r["logps/rejected"])))
    diff = abs(s[key] - r[key])  # NaN stays NaN and fails every `err <= tol`
    return diff / scale if scale > 0 else diff


def judge_case(case: Case, ref: dict, sp: dict) -> dict:
    """Case result (schema spbench.results/1) from the reference and SP runs' outputs."""
    applied = applied_tolerances(case)
    tol, gn_tol, dpo_tol = TOLERANCES[case.dtype], applied["grad_norm"], applied.get("dpo")
    rm, sm = ref["metrics"], sp["metrics"]
    failures = []
    loss_err = [rel_err(s["loss"], r["loss"]) for r, s in zip(rm, sm)]
    gn_err = [rel_err(s["grad_norm"], r["grad_norm"]) for r, s in zip(rm, sm)]
    if len(rm) != len(sm):
        failures.append(f"step count {len(sm)} != reference {len(rm)}")
    for i, (le, ge) in enumerate(zip(loss_err, gn_err)):
        if not le <= applied["loss"]:
            failures.append(f"loss step {i}: rel err {le:.3g} > {applied['loss']:.0e} ({sm[i]['loss']!r} vs {rm[i]['loss']!r})")
        if not ge <= gn_tol:
            failures.append(f"grad_norm step {i}: rel err {ge:.3g} > {gn_tol:.0e}")
    worst_param, param_err = None, None
    if ref.get("grads") and sp.get("grads"):
        if set(sp["grads"]) != set(ref["grads"]) or sp.get("grad_step", 0) != ref.get("grad_step", 0):
            failures.append(f"SP run captured {len(sp['grads'])} gradients at step {sp.get('grad_step', 0)}, the "
                            f"reference {len(ref['grads'])} at step {ref.get('grad_step', 0)}")
        errs = [((sp["grads"][n] - g).abs().max().item() / max(g.abs().max().item(), 1e-30), n)
                for n, g in ref["grads"].items() if n in sp["grads"]]
        param_err, worst_param = max(errs, default=(float("inf"), None))
        if not param_err <= tol["grad"]:
            failures.append(f"step-{ref.get('grad_step', 0)} grad of {worst_param}: rel err {param_err:.3g} > {tol['grad']:.0e}")
    failures += sp_engaged_failures(case, sp)
    eval_err, eval_fail = eval_failures(case, ref.get("eval") or [], sp.get("eval") or [], applied)
    failures += eval_fail
    dpo_err = None
    if case.stage == "dpo":
        dpo_err = max(dpo_error(case, k, r, s) for r, s in zip(rm, sm) for k in DPO_KEYS
                      if case.dtype == "float64" or k != "rewards/accuracies")
        if not dpo_err <= dpo_tol:
            failures.append(f"dpo rewards/logps: max rel err {dpo_err:.3g} > {dpo_tol:.0e}")
    return {
        **case.fields(), "passed": not failures, "error": None,
        "tolerance": applied,
        "metrics": {"max_loss_rel_err": max(loss_err, default=None), "max_grad_norm_rel_err": max(gn_err, default=None),
                    "max_param_grad_rel_err": param_err, "worst_param": worst_param, "max_dpo_rel_err": dpo_err,
                    "max_eval_rel_err": eval_err},
        "failures": failures,
        "ref_losses": [m["loss"] for m in rm], "sp_losses": [m["loss"] for m in sm],
        "ref_grad_norms": [m["grad_norm"] for m in rm], "sp_grad_norms": [m["grad_norm"] for m in sm],
        "sp_engaged": {"rank_tokens": [m["rank_tokens"] for m in sm], "seq_tokens": [m["seq_tokens"] for m in sm],
                       "sp_comm_bytes": [m["sp_comm_bytes"] for m in sm], "attention": sp.get("attention")},
    }


def eval_failures(case: Case, ref: list[dict], sp: list[dict], applied: dict) -> tuple[float | None, list[str]]:
    """(worst relative error, failures) of the evaluations: the same steps, every eval metric within the loss
    tolerance (DPO's within the DPO one), the same eval token or pair counts."""
    if not ref and not sp:
        return None, []
    if [m["step"] for m in ref] != [m["step"] for m in sp]:
        return float("inf"), [f"evaluated after steps {[m['step'] for m in sp]}, reference {[m['step'] for m in ref]}"]
    errs, failures = [], []
    for r, s in zip(ref, sp):
        for key in r:
            if key.startswith("eval_") and key[5:] in ("loss", *DPO_KEYS):
                if key == "eval_rewards/accuracies" and case.dtype != "float64":
                    continue  # a 0/1 average that flips on a ~0 margin (as in training)
                err = rel_err(s[key], r[key])
                tol = applied["loss"] if key == "eval_loss" else applied["dpo"]
                errs.append(err)
                if not err <= tol:
                    failures.append(f"{key} after step {r['step']}: rel err {err:.3g} > {tol:.0e}")
            elif key.startswith("eval_") and s[key] != r[key]:
                failures.append(f"{key} after step {r['step']}: {s[key]} != reference {r[key]}")
    return max(errs, default=None), failures[:3]


def sp_engaged_failures(case: Case, sp: dict) -> list[str]:
    """FAULTS.md F12/F13, without comparing any loss: with SP on, rank 0 held exactly 1/sp of the (padded) tokens of
    every step, its attention sent bytes, and the model's attention is the runtime's registered one."""
    if case.sp == 1:
        return []
    out = [f"SP not engaged at step {i}: rank 0 held {m['rank_tokens']} of {m['seq_tokens']} tokens, expected 1/{case.sp}"
           for i, m in enumerate(sp["metrics"]) if m["rank_tokens"] * case.sp != m["seq_tokens"]]
    out += [f"SP not engaged at step {i}: the attention sent no bytes" for i, m in enumerate(sp["metrics"])
            if not m["sp_comm_bytes"] > 0]
    expected = sp.get("sp_attention", SP_ATTENTION)  # an adapter names the attention its implementation registered
    if expected is None:
        out.append("SP not engaged: the implementation's SP attention is not registered")
    elif sp.get("attention") != expected:
        out.append(f"SP not engaged: the model runs attention {sp.get('attention')!r}, not {expected!r}")
    return out[:3]


def error_result(case: Case, message: str) -> dict:
    """The result of a case whose SP run crashed or timed out."""
    return {**case.fields(), "passed": False, "error": message, "failures": [], "ref_losses": [], "sp_losses": [],
            "ref_grad_norms": [], "sp_grad_norms": [], "metrics": {}, "tolerance": applied_tolerances(case)}


def run_reference(case: Case, device: str = "cpu") -> dict:
    trainer = Trainer(case.train_config(sp_on=False, device=device), separate_reference=True)
    metrics = trainer.train(capture_grads=True)
    return {"metrics": metrics, "grads": {k: v.double() for k, v in trainer.captured_grads.items()},
            "grad_step": trainer.grad_step, "eval": trainer.eval_history}


def run_cases(cases: list[Case], backend: str = "gloo", timeout: float = 600, log=print,
              pools: dict[int, RankPool] | None = None, refs: dict[str, dict] | None = None,
              sp_job: Callable = train_on_rank, fail_fast: bool = False) -> list[dict]:
    """Run every case (grouped by world size, one rank pool each); crashes become error results.

    `pools` (world → RankPool) and `refs` (reference cache) may be shared between calls. `sp_job(info,
    cfg_values, capture_grads)` is the rank job of the SP run (the fault catalogue passes one with a bug
    injected); the reference always runs the clean trainer in this process. `fail_fast`: stop after the first
    case that does not pass (the results then hold the cases run so far).
    """
    results: dict[str, dict] = {}
    refs = {} if refs is None else refs
    device = rank_device(backend)  # nccl / gloo-cuda ranks hold CUDA tensors
    with deepspeed_files() as deepspeed:
        for world in sorted({c.world for c in cases}):
            owned = pools is None or world not in pools
            pool = RankPool(world, backend=backend, timeout=timeout) if owned else pools[world]
            group = [c for c in cases if c.world == world]
            log(f"      {len(group)} case(s) on {world} {backend} ranks (starting them takes a few seconds) ...")
            with pool if owned else contextlib.nullcontext():
                for c in group:
                    if c.zero:  # DeepSpeed's start-up is the longest silence of the suite: say what it is
                        log(f"      {c.name}: DeepSpeed ZeRO-{c.zero} initialising on every rank ...")
                    t0 = time.perf_counter()
                    results[c.name] = res = _run_case(c, pool, device, deepspeed, refs, sp_job)
                    res["wall_s"] = round(time.perf_counter() - t0, 3)
                    _log_case(log, res, len(results), len(cases))
                    if fail_fast and not res["passed"]:
                        return [results[c.name] for c in cases if c.name in results]
    return [results[c.name] for c in cases]


def _run_case(c: Case, pool: RankPool, device: str, deepspeed, refs: dict, sp_job: Callable) -> dict:
    try:
        key = repr(sorted(c.train_config(sp_on=False, device=device).to_dict().items()))
        if key not in refs:
            refs[key] = run_reference(c, device)
        sp_cfg = c.train_config(sp_on=True, device=device, deepspeed=deepspeed).to_dict()
        t0 = time.perf_counter()  # the SP run alone (wall_s also holds the reference when it is not cached)
        sp = pool.run(sp_job, sp_cfg, not c.zero)[0]
        return {**judge_case(c, refs[key], sp), "sp_wall_s": round(time.perf_counter() - t0, 3)}
    except RankError as e:
        print(str(e), file=sys.stderr)
        return error_result(c, str(e).splitlines()[0] + raised_by(e) + " (see stderr)")


def raised_by(e: RankError) -> str:
    """": ExceptionType: message" of the first rank that raised (its traceback's last line), or "" if none raised."""
    for rank in sorted(e.errors):
        lines = [line.strip() for line in e.errors[rank].strip().splitlines() if line.strip()]
        raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]  # not a message's tail
        if raised or lines:
            return f": {(raised or lines)[-1]}"
    return ""


def _log_case(log, res: dict, done: int, total: int) -> None:
    verdict = "PASS" if res["passed"] else ("ERROR" if res["error"] else "FAIL")
    m = res["metrics"]
    grad = max(x for x in (m.get("max_grad_norm_rel_err"), m.get("max_param_grad_rel_err"), 0.0) if x is not None)
    log(f"[{done:>3}/{total}] {verdict:<5} {res['name']:<40} loss {m.get('max_loss_rel_err', float('nan')):.1e}"
        f"  grad {grad:.1e}  ({res['wall_s']:.1f} s)")
    for f in res["failures"] + ([res["error"]] if res["error"] else []):
        log(f"        {f}")


def noise_floor(dtype: str, steps: int = 3, model: str = "tiny", device: str = "cpu") -> dict:
    """Relative loss / grad-norm gaps between two SP-off runs of the same global batch that differ only
    in how the batch is split (so only in reduction order): the floor a dtype's tolerance must clear."""
    base = {"model_name_or_path": model, "dtype": dtype, "cutoff_len": 48, "max_samples": 16, "max_steps": steps,
            "learning_rate": 1e-3, "device": device}
    a = Trainer(from_dict({**base, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4})).train()
    b = Trainer(from_dict({**base, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})).train()
    return {"dtype": dtype, "model": model, "device": device,
            "loss_rel_gap": [rel_err(x["loss"], y["loss"]) for x, y in zip(a, b)],
            "grad_norm_rel_gap": [rel_err(x["grad_norm"], y["grad_norm"]) for x, y in zip(a, b)]}
