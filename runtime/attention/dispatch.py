"""The SP attention entry point: method → layout and degrees, and one call that dispatches.

    method     layout (ring, ulysses, zigzag)     notes
    ulysses    (1, P, no)                         heads must split (F6 rules)
    ring       (P, 1, no)                         contiguous ring
    zigzag     (P, 1, yes)                        load-balanced ring
    hybrid     (P/u, u, yes)                      u given, or "auto" (topology.auto_ulysses)
    allgather  (P, 1, yes)                        gather K/V, local attention
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm import CommCounter
from ..layout import ShardPlan
from ..topology import ParallelContext, TopologyError, auto_ulysses, check_ulysses_heads
from .allgather import allgather_attention
from .blockattn import LocalAttention, SeqMeta
from .hybrid import hybrid_attention
from .kernels import Kernel
from .ring import ring_attention
from .ulysses import ulysses_attention

METHODS = ("ulysses", "ring", "zigzag", "hybrid", "allgather")


def resolve_ulysses(method: str, sp: int, heads: int, kv_heads: int, ulysses: int | str = "auto") -> int:
    """The Ulysses degree a method uses at SP size `sp` (raises TopologyError if impossible)."""
    if method not in METHODS:
        raise TopologyError(f"unknown sequence_parallel_mode {method!r}; choose from {', '.join(METHODS)}")
    if method == "ulysses":
        check_ulysses_heads(sp, heads, kv_heads)
        return sp
    if method != "hybrid":
        return 1
    if ulysses == "auto":
        return auto_ulysses(sp, heads, kv_heads)
    u = int(ulysses)
    if u < 1 or sp % u:
        raise TopologyError(f"ulysses({u}) does not divide sp({sp}); choose from {[d for d in range(1, sp + 1) if sp % d == 0]}")
    check_ulysses_heads(u, heads, kv_heads)
    return u


def shard_plan(method: str, seq_len: int, sp: int, ulysses: int) -> ShardPlan:
    """The layout `method` uses for `seq_len` real tokens over sp ranks (padded as needed)."""
    zigzag = method in ("zigzag", "hybrid", "allgather")
    return ShardPlan.for_length(seq_len, sp // ulysses, ulysses, zigzag)


@dataclass
class SPAttention:
    """Everything an SP attention call needs besides the tensors.

    method  : one of METHODS
    pc      : this rank's process groups (topology.ParallelContext)
    kernel  : the local attention kernel (kernels.select_kernel)
    counter : optional byte counter for every collective (comm.CommCounter)
    """

    method: str
    pc: ParallelContext
    kernel: Kernel
    counter: CommCounter | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: SeqMeta, scale: float,
                 return_lse: bool = False):
        """q [b,H,s,d], k/v [b,KV,s,d] hold this rank's shard (meta.plan) → (out [b,H,s,d], lse or None)."""
        pc, m = self.pc, self.method
        if meta.plan.sp != pc.grid.sp:
            raise TopologyError(f"shard plan is for sp={meta.plan.sp} but the process grid has sp={pc.grid.sp}")
        if pc.sp_group is None:  # SP off: plain local attention over the whole sequence
            segs = meta.plan.segments(0)
            out, lse = LocalAttention.apply(q, k, v, segs, segs, meta, self.kernel, scale)
        elif m == "ulysses":
            return ulysses_attention(q, k, v, pc.ulysses_group, meta, self.kernel, scale, self.counter, return_lse=return_lse)
        elif m == "hybrid":
            return hybrid_attention(q, k, v, pc.ulysses_group, pc.ring_group, meta, self.kernel, scale, self.counter,
                                    return_lse=return_lse)
        elif m in ("ring", "zigzag"):
            out, lse = ring_attention(q, k, v, pc.ring_group, meta, self.kernel, scale, self.counter)
        else:
            out, lse = allgather_attention(q, k, v, pc.sp_group, meta, self.kernel, scale, self.counter)
        return out, (lse if return_lse else None)
