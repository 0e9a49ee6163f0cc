"""What one training step costs per rank, counted by the code itself on CPU: the `spbench cost` numbers.

`step_cost(setup, length)` runs ONE `Trainer.step` of a memory-model `Setup` as SP rank 0 on fake tensors with a
fake process group (memory/step.py `fake_step`), and counts in that one run:

* memory: the traced peak (memory/trace.py's tracker; a ZeRO setup's static terms from the model, memory/traced.py)
  beside the analytic model's prediction; for blockwise attention also SP rank sp − 1's (a second trace: the
  ring's last place can peak higher), the larger counts and "rank" says whose;
* FLOPs: matmuls by `torch.utils.flop_counter`'s formulas (counted by the memory tracker), attention from the kernel calls (memory/flops.py), over the ideal
  (forward + one recompute + backward, + DPO's reference forward);
* bytes: what the runtime's byte counter saw the SP collectives send, over the analytic minimum
  (spbench/check/comm_bytes.py), and over minimum + the excess that file explains (ring's final hop, recompute);

and, in one cheaper fake step per SP rank (no tiling, no recompute: the attention work per rank is the same
multiple of each rank's kernel calls either way), the attention work imbalance max/mean over the SP ranks.
"""
from __future__ import annotations

import time
from dataclasses import replace

from runtime.memory import MemoryFeatures

from ..check.comm_bytes import AttentionShape, step_bytes
from ..common.schemas import COST
from .flops import AttentionTally, attention_balance, counting_kernel, ideal_flops
from .setup import Setup, shape_of
from .step import fake_step
from .trace import peak_record, traced_peak, traced_step
from .traced import peak_over_ranks, spec_for

KERNEL = {"attention_kernel": "cpu-flash-split"}  # = cpu-flash on unpacked rows; no masks, so pairs are counted


def step_cost(setup: Setup, length: int, balance: bool = True) -> dict:
    """The costs of one step of `setup` at `length` tokens per sequence (module doc), as one JSON-able dict."""
    t0 = time.perf_counter()
    spec = spec_for(setup, length)
    tally = AttentionTally()
    with fake_step(spec, 0, KERNEL) as (trainer, micro_batches):
        trainer.attention.kernel = counting_kernel(trainer.attention.kernel, tally)
        tracker, metrics = traced_step(trainer, micro_batches, count_flops=True)
        chunk = trainer.cfg.tiled_loss_chunk
    tokens = metrics["rank_tokens"]
    counted = {**peak_record(spec, 0, tracker, tokens), "trace_s": 0.0}
    # blockwise attention: the ring's last place can peak higher, traced beside this run (memory/traced.py)
    memory = peak_over_ranks(setup, length, lambda r: counted if r == 0 else traced_peak(spec, r))
    ideal = ideal_flops(spec, chunk is not None and tokens > chunk)
    matmul = int(tracker.flops)
    m = shape_of(setup.model)
    minimum = step_bytes(setup.sp_method, setup.sp, setup.ulysses, AttentionShape(m.heads, m.kv_heads, m.head_dim, 2, 4),
                         tokens, m.layers, recompute=setup.features.gradient_checkpointing)
    sent = metrics["sp_comm_bytes"]
    out = {
        "schema": COST, "model": setup.model, "stage": setup.stage, "length": length, "sp": setup.sp,
        "method": setup.sp_method, "ulysses": setup.ulysses, "attention_kernel": setup.attention_kernel,
        "gpus": setup.gpus, "gpu_mem_gib": setup.gpu_mem_gib,
        "zero": setup.zero, "offload": sorted(setup.offload), "features": setup.features.to_json(),
        "rank_tokens": tokens,
        "memory": {k: memory[k] for k in ("traced_gib", "model_gib", "error", "fits", "from_model", "peak_phase",
                                          "host_gib", "rank")} | {"where": memory["trace"]["state_free_where"]},
        "flops": {"counted": matmul + tally.flops, "ideal": ideal["total"], "ratio": (matmul + tally.flops) / ideal["total"],
                  "matmul_ratio": matmul / ideal["matmul"], "attention_ratio": tally.flops / ideal["attention"],
                  "early_stop_saving": ideal["early_stop_saving"]},
        "bytes": {"sent": sent, "minimum": minimum["minimum"], "explained_excess": minimum["excess"],
                  "ratio": sent / minimum["minimum"] if minimum["minimum"] else None,
                  "ratio_to_expected": sent / minimum["expected"] if minimum["expected"] else None},
    }
    if balance:
        out["attention_balance"] = balance_of(setup, length)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def balance_of(setup: Setup, length: int) -> dict:
    """Attention work per SP rank (query-key pairs × heads its kernel calls asked for) and max/mean, from one
    cheap fake step per rank (no tiling, no checkpointing: same per-rank multiples, far fewer ops)."""
    cheap = replace(setup, features=MemoryFeatures(tiled_loss_chunk=None, tiled_mlp_chunks=None,
                                                   gradient_checkpointing=False))
    return attention_balance(spec_for(cheap, length), KERNEL)

