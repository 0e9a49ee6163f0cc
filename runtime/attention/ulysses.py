"""Ulysses: all-to-all from sequence shards to head shards, attend, all-to-all back.

With u ranks, each holding s = L/u tokens of all H heads, the all-to-all leaves each rank
with all L tokens of H/u heads; attention is then local (or, in the hybrid, a ring over
the other Ulysses groups). GQA (FAULTS.md F6): kv heads are split like query heads when
u | kv_heads; when kv_heads < u they are first replicated u/kv_heads times, so that rank
j, which holds query heads [j·H/u, (j+1)·H/u), receives exactly the kv head those query
heads use (h // (H/kv_heads)). Heads that split neither way are rejected by
topology.check_ulysses_heads with a pointer to the hybrid.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..comm import AllToAll, CommCounter, group_size
from ..topology import check_ulysses_heads
from .blockattn import LocalAttention, SeqMeta
from .kernels import Kernel


def seq_to_heads(x: torch.Tensor, group, counter: CommCounter | None) -> torch.Tensor:
    """[b, h, s, d] (my tokens, all heads) → [b, h/u, u·s, d] (group's tokens, my heads)."""
    u = group_size(group)
    b, h, s, d = x.shape
    x = x.reshape(b, u, h // u, s, d).permute(1, 0, 2, 3, 4)  # (u=dest rank, b, h/u, s, d)
    y = AllToAll.apply(x, group, counter)  # (u=source rank, b, h/u, s, d)
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // u, u * s, d)


def heads_to_seq(y: torch.Tensor, group, counter: CommCounter | None) -> torch.Tensor:
    """Inverse of seq_to_heads: [b, h/u, u·s, d] → [b, h, s, d]."""
    u = group_size(group)
    b, hu, n, d = y.shape
    y = y.reshape(b, hu, u, n // u, d).permute(2, 0, 1, 3, 4)  # (u=dest rank, b, h/u, s, d)
    x = AllToAll.apply(y, group, counter)  # (u=source head group, b, h/u, s, d)
    return x.permute(1, 0, 2, 3, 4).reshape(b, u * hu, n // u, d)


def replicate_kv(x: torch.Tensor, u: int) -> torch.Tensor:
    """[b, kv, s, d] → [b, max(kv, u), s, d]: repeat each kv head u/kv times when kv < u."""
    kv = x.shape[1]
    return x if kv >= u else x.repeat_interleave(u // kv, dim=1)


Inner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def ulysses_attention(q, k, v, group, meta: SeqMeta, kernel: Kernel, scale: float,
                      counter: CommCounter | None = None, inner: Inner | None = None, ring_idx: int = 0,
                      return_lse: bool = False):
    """Attention for q [b, H, s, d], k/v [b, KV, s, d] holding this rank's tokens.

    `inner(q, k, v) -> (out, lse)` attends over the gathered ring part; by default it is
    local attention over ring part `ring_idx` (the whole sequence for pure Ulysses).
    Returns out [b, H, s, d] and lse [b, H, s] (lse only when `return_lse`, else None).
    """
    u = group_size(group)
    check_ulysses_heads(u, q.shape[1], k.shape[1])
    if inner is None:
        segs = meta.plan.ring_part_segments(ring_idx)
        inner = lambda qh, kh, vh: LocalAttention.apply(qh, kh, vh, segs, segs, meta, kernel, scale)  # noqa: E731
    qh = seq_to_heads(q, group, counter)
    kh = seq_to_heads(replicate_kv(k, u), group, counter)
    vh = seq_to_heads(replicate_kv(v, u), group, counter)
    out, lse = inner(qh, kh, vh)
    out = heads_to_seq(out, group, counter)
    if not return_lse:
        return out, None
    return out, heads_to_seq(lse.unsqueeze(-1), group, counter).squeeze(-1)
