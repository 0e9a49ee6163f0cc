"""All-gather-KV ("llama3-style"): gather every rank's K/V, attend locally, reduce-scatter dK/dV.

Memory for K/V grows with the full sequence (kv heads only, so GQA keeps it small), but
there is no ring schedule: the mask between local queries and all keys comes straight
from global token indices and document ids, which makes packed documents (F7) simple.
The default layout is zigzag so causal work is balanced across ranks.
"""
from __future__ import annotations

import torch

from ..comm import AllGather, CommCounter, group_rank, group_size
from .blockattn import LocalAttention, SeqMeta
from .kernels import Kernel


def gather_seq(x: torch.Tensor, group, counter: CommCounter | None) -> torch.Tensor:
    """[b, h, s, d] per rank → [b, h, P·s, d] in group-rank order (backward: reduce-scatter)."""
    p = group_size(group)
    b, h, s, d = x.shape
    g = AllGather.apply(x, group, counter)  # (P, b, h, s, d)
    return g.permute(1, 2, 0, 3, 4).reshape(b, h, p * s, d)


def allgather_attention(q, k, v, group, meta: SeqMeta, kernel: Kernel, scale: float,
                        counter: CommCounter | None = None):
    """q [b,H,s,d], k/v [b,KV,s,d] (my shard) → (out [b,H,s,d], lse [b,H,s])."""
    p, rank = group_size(group), group_rank(group)
    k_all, v_all = gather_seq(k, group, counter), gather_seq(v, group, counter)
    plan = meta.plan
    return LocalAttention.apply(q, k_all, v_all, plan.segments(rank), plan.group_segments(range(p)), meta, kernel, scale)
