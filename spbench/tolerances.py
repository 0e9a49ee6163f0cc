"""Parity tolerances per dtype (relative errors), in one place, each with its reason."""

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
ZERO = {"grad_norm": 1e-6, "dpo": 1e-5}
