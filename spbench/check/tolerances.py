"""Every tolerance spbench judges with (relative errors), in one place, each with its reason; and the one rule
for measuring a relative error.

  TOLERANCES  parity: SP run vs the SP-off reference, per dtype (loss, grad); ZERO adds DeepSpeed's float32 paths
  ATTENTION   attention check: each rank's out/lse/dq/dk/dv vs the dense float64 oracle, per dtype
  GATE        gate: a new curve vs the committed baseline curve, per dtype
"""
from __future__ import annotations

import math

TOLERANCES = {
    # float64 on CPU: SP and reference differ only in summation order (shards, ring merges, all-reduce),
    # observed ≤ 1e-14 on loss and grads; 1e-8 is the bar and leaves 6 orders of margin.
    "float64": {"loss": 1e-8, "grad": 1e-8},
    # float32: same reordering at eps 6e-8, amplified by AdamW steps on a random-init model. Measured noise
    # floor on CPU (`spbench parity --noise-floor float32`, reports/measurements/noise-floor-float32-cpu.json):
    # loss gap 1.3e-7 after 3 steps; the tolerance leaves ~100× margin.
    "float32": {"loss": 1e-5, "grad": 1e-4},
    # bfloat16 (eps 7.8e-3): measured CPU noise floor (reports/measurements/noise-floor-bfloat16-cpu.json) is
    # only 5e-6 on the loss because CPU bf16 matmuls accumulate in float32; SP vs reference on CPU measured
    # 7e-5 (loss) and 1.5e-2 (per-parameter grads: the SP-summed partial gradients round to bf16 separately).
    # GPU kernels round more: the tolerance stays at ~2 bf16 ulps until the noise floor is measured on a GPU
    # with the same command.
    "bfloat16": {"loss": 2e-2, "grad": 5e-2},
}
# DeepSpeed ZeRO computes the global grad norm in float32 whatever the parameter dtype (measured 6e-8
# relative at float64 on CPU), so ZeRO cases compare the grad norm at float32 precision; its update
# path moves float64 weights by float32-rounded steps, so DPO rewards β(π − ρ), which start at 0 and are
# differences of near-equal log-probs, drift ~3e-6 relative after one step (measured, ZeRO-3, CPU).
# The DPO loss drifts for the same reason: step 0 is exact (error 0.0 in every ZeRO case), later steps move
# because the float32-rounded update shifts each sequence's log-prob sum (|Σ log p| ≈ 300 on the tiny suite)
# and the loss sees β × their differences: measured 3.7e-9 and 9.7e-9 for the two DPO ZeRO-3 cases against
# 6e-10 for SFT (reports/parity/ci.json, 2026-12-01), so DPO under ZeRO is held to 1e-7 (10× the worst).
ZERO = {"grad_norm": 1e-6, "dpo": 1e-5, "dpo_loss": 1e-7}

ATTENTION = {
    # error = max |sp − oracle| / max(1, max |oracle|), per quantity (check/attention.py)
    "float64": 1e-10,  # exact up to rounding; observed ~1e-15
    "float32": 2e-5,   # inputs exact in float32, block outputs rounded to float32 (eps 6e-8) and merged over
                       # ≤ 8 blocks; sums over ≤ 4k keys
    "bfloat16": 5e-2,  # inputs are rounded to bf16 for the oracle too, but each block's out (and every gradient)
                       # is rounded to bf16 (eps 7.8e-3) before merging/summing
}

GATE = {
    # relative drift allowed between a baseline curve and a new one (check/gate.py)
    "float64": 1e-9,   # deterministic on one machine, but another machine or thread count may reduce in another
                       # order: rounding-level drift (eps 2e-16) grown over a few steps, far below any real bug
    "float32": 1e-5,   # eps 1.2e-7; reduction order and kernel choice move losses by ~1e-6 over a few steps
    "bfloat16": 2e-2,  # eps 7.8e-3: one rounding flip in a norm or loss already moves it by ~1e-2
}


def rel_err(got: float, want: float) -> float:
    """|got − want| / |want| (denominator at least 1e-30); 0 when equal. NaN or an infinity on either side is an
    infinite error (unless both are the same infinity): a diverged value never matches anything."""
    if got == want and not math.isinf(got):
        return 0.0
    if not (math.isfinite(got) and math.isfinite(want)):
        return 0.0 if got == want else math.inf
    return abs(got - want) / max(abs(want), 1e-30)


def rel_errors(got: list[float], want: list[float]) -> list[float]:
    """`rel_err` elementwise over two curves of equal length."""
    return [rel_err(g, w) for g, w in zip(got, want, strict=True)]
