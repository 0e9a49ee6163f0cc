"""FLOPs of one `Trainer.step` per rank, counted on fake tensors, against the analytic ideal.

`counted_step(spec, rank)` runs ONE step of the trainer (memory/step.py's StepSpec: the step `spbench train` runs)
as SP rank `rank` of `spec.sp`, in one process: a fake process group (`torch.testing._internal.distributed.
fake_pg`: collectives return at once) and `FakeTensorMode` (shapes only: a 7B model at 1M tokens allocates
nothing). Two counts are taken:

* matmuls: `torch.utils.flop_counter.FlopCounterMode` over the whole step (forward, every recompute, backward,
  DPO's reference forward): aten mm / addmm / bmm at 2·m·n·k. On CPU, attention is the runtime's kernel
  (`cpu-flash`: aten's `_scaled_dot_product_flash_attention_for_cpu`), which the counter has no formula for,
  so it counts no attention at all.
* attention: counted analytically in both the measurement and the ideal. Every call of the local attention
  kernel (runtime/attention/kernels.py) is recorded; a call on q [b, H, sq, d] over sk keys computes
  `pairs` = b·sq·sk query-key pairs, or b·Σ_i min(i + 1, sk) for a causal (top-left) block, and costs
  4·H·d·pairs (QKᵀ and PV) forward and 8·H·d·pairs (dV, dP, dQ, dK) backward. That is exactly what the
  strategy asks the kernel for (padding, a ring step's full blocks, causal diagonals), not what the kernel
  does inside (flash backward also recomputes S; masked entries of a dense mask are not counted).

ideal (per rank, full fine-tuning): the model's matmuls on this rank's share of the tokens, T = rows·length/P:
forward F = T·(layers·(2h(H + 2K)d + 2Hd·h + 3·2h·I) + 2h·V), plus one recompute of the decoder layers when
gradient checkpointing is on, plus one of lm_head when the tiled loss splits the shard (each loss chunk is
checkpointed), plus one of the MLP when it is tiled without checkpointing (the tiled MLP recomputes its chunks in
its backward), plus backward 2·F (dX and dW of every linear), plus DPO's reference forward F (no recompute);
and causal attention: pairs = rows·length(length + 1)/2 / P, at the same forward/recompute/backward multiples.
The ratio counted/ideal is 1.00 up to counting noise (rotary's small bmm; padding to the layout's multiple),
but for one saving below the ideal: with an untiled MLP the layer recompute (non-reentrant, early stop) ends when
down_proj saves its input, before its matmul runs; `early_stop_saving` is that matmul, T·layers·2h·I. (With the
tiled MLP the recompute ends at the MLP's input and the MLP is recomputed piecewise in its own backward.)

The table over strategies, lengths and feature sets, with provenance: `python -m spbench.memory.flopsreport`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.attention.kernels import Kernel
from runtime.models import model_config

from .step import StepSpec, fake_step


def causal_pairs(sq: int, sk: int) -> int:
    """Query-key pairs a top-left causal block of sq queries over sk keys sees: Σ_i min(i + 1, sk).
    E.g. (4, 4) → 10, (2, 4) → 3, (4, 2) → 7."""
    full = min(sq, sk)
    return full * (full + 1) // 2 + max(0, sq - sk) * sk


@dataclass
class AttentionTally:
    """Attention work this rank's kernel calls asked for: FLOPs forward / backward and query-key pairs × heads."""

    forward_flops: int = 0
    backward_flops: int = 0
    head_pairs: int = 0
    calls: int = 0

    @property
    def flops(self) -> int:
        return self.forward_flops + self.backward_flops


def _pairs(q: torch.Tensor, k: torch.Tensor, causal: bool, mask) -> int:
    b, _, sq, _ = q.shape
    if mask is not None:
        raise ValueError("the FLOP count needs kernels without masks (a dense mask's pairs are data); use "
                         "attention_kernel cpu-flash-split, which splits packed blocks by document")
    return b * (causal_pairs(sq, k.shape[2]) if causal else sq * k.shape[2])


def counting_kernel(kernel: Kernel, tally: AttentionTally) -> Kernel:
    """`kernel` with every call's analytic FLOPs added to `tally` (module doc)."""

    def forward(q, k, v, *, causal: bool, mask=None, scale: float):
        pairs = _pairs(q, k, causal, mask)
        tally.forward_flops += 4 * q.shape[1] * q.shape[3] * pairs
        tally.head_pairs += q.shape[1] * pairs
        tally.calls += 1
        return kernel.forward(q, k, v, causal=causal, mask=mask, scale=scale)

    def backward(dout, q, k, v, out, lse, *, causal: bool, mask=None, scale: float):
        tally.backward_flops += 8 * q.shape[1] * q.shape[3] * _pairs(q, k, causal, mask)
        return kernel.backward(dout, q, k, v, out, lse, causal=causal, mask=mask, scale=scale)

    return Kernel(kernel.name, forward, backward, kernel.supports_mask)


# ------------------------------------------------------------------------------------------------ the ideal
def ideal_flops(spec: StepSpec, recompute_head: bool) -> dict:
    """The analytic ideal of one step of `spec` per rank (module doc): {"matmul", "attention", "total"}.

    `recompute_head`: the tiled loss splits this rank's shard into more than one checkpointed chunk."""
    if spec.finetuning != "full":
        raise ValueError("the ideal is written for full fine-tuning (LoRA skips the frozen weights' dW)")
    c = model_config(spec.model)
    h, heads, kv, layers = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers
    d = getattr(c, "head_dim", None) or h // heads
    per_token_layer = 2 * h * (heads + 2 * kv) * d + 2 * heads * d * h + 3 * 2 * h * c.intermediate_size
    tokens = spec.rows * spec.length / spec.sp
    f_layers, f_head = tokens * layers * per_token_layer, tokens * 2 * h * c.vocab_size
    ckpt = int(spec.features.gradient_checkpointing)
    reference = int(spec.stage == "dpo")  # the frozen reference's forward (sigmoid loss; simpo has none)
    tiled_mlp = spec.features.tiled_mlp_chunks is not None
    f_mlp = tokens * layers * 3 * 2 * h * c.intermediate_size  # recomputed by the tiled MLP's own backward
    matmul = (f_layers * (1 + ckpt + 2 + reference) + f_head * (1 + int(recompute_head) + 2 + reference)
              + f_mlp * (tiled_mlp and not ckpt))
    pairs = spec.rows * spec.length * (spec.length + 1) / 2 / spec.sp
    attention = layers * heads * d * pairs * (4 * (1 + ckpt + reference) + 8)
    # an untiled MLP's down_proj is the layer's last saved input: the recompute's early stop skips its matmul
    saving = ckpt * (not tiled_mlp) * tokens * layers * 2 * h * c.intermediate_size
    return {"matmul": matmul, "attention": attention, "total": matmul + attention, "early_stop_saving": saving}


# ------------------------------------------------------------------------------------------------ the count
@dataclass
class StepCount:
    """What one rank's step was counted at: FLOPs by source, the ideal, and the attention tally."""

    rank: int
    matmul_flops: int
    attention: AttentionTally
    ideal: dict
    local_tokens: int
    by_op: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.matmul_flops + self.attention.flops

    def to_json(self) -> dict:
        return {"rank": self.rank, "local_tokens": self.local_tokens, "matmul_flops": self.matmul_flops,
                "attention_flops": self.attention.flops, "attention_head_pairs": self.attention.head_pairs,
                "attention_calls": self.attention.calls, "total_flops": self.total, "ideal": self.ideal,
                "ratio": self.total / self.ideal["total"],
                "matmul_ratio": self.matmul_flops / self.ideal["matmul"],
                "attention_ratio": self.attention.flops / self.ideal["attention"], "by_op": self.by_op}


def counted_step(spec: StepSpec, rank: int = 0, overrides: dict | None = None, fake: bool = True) -> StepCount:
    """ONE `Trainer.step` of `spec` as SP rank `rank`, FLOPs counted (module doc). `overrides`: extra train
    config keys (e.g. packing); `fake=False` runs real tensors (small shapes: packed rows, whose document
    split reads the data)."""
    from torch.utils.flop_counter import FlopCounterMode

    tally = AttentionTally()
    counter = FlopCounterMode(display=False)
    overrides = {"attention_kernel": "cpu-flash-split", **(overrides or {})}
    with fake_step(spec, rank, overrides, fake) as (trainer, micro_batches):
        trainer.attention.kernel = counting_kernel(trainer.attention.kernel, tally)
        with counter:
            metrics = trainer.step(0, micro_batches=micro_batches, read_back=False)
    chunk = trainer.cfg.tiled_loss_chunk
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    ideal = ideal_flops(spec, chunk is not None and metrics["rank_tokens"] > chunk)
    return StepCount(rank, int(counter.get_total_flops()), tally, ideal, metrics["rank_tokens"], by_op)


def attention_balance(spec: StepSpec, overrides: dict | None = None, fake: bool = True) -> dict:
    """Per-rank attention work (query-key pairs × heads its kernel calls asked for, forward + recompute +
    backward of one step) over every SP rank: {"per_rank": [...], "max_over_mean"}. 1.00 = balanced."""
    work = [counted_step(spec, r, overrides, fake).attention.flops for r in range(spec.sp)]
    return {"per_rank": work, "max_over_mean": max(work) / (sum(work) / len(work))}
