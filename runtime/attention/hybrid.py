"""Hybrid (USP-style): Ulysses inside a group of u ranks, ring across the sp/u groups.

The Ulysses all-to-all turns each group's shards into one ring part with H/u heads;
ring attention then runs between groups (ranks with the same Ulysses index), and the
all-to-all goes back. With `ulysses=auto` (topology.auto_ulysses) the largest valid u is
chosen, so any SP size works for any head count: u = 1 degenerates to a ring, u = sp to
Ulysses.
"""
from __future__ import annotations

from ..comm import CommCounter
from .blockattn import SeqMeta
from .kernels import Kernel
from .ring import ring_attention
from .ulysses import ulysses_attention


def hybrid_attention(q, k, v, ulysses_group, ring_group, meta: SeqMeta, kernel: Kernel, scale: float,
                     counter: CommCounter | None = None, return_lse: bool = False):
    """q [b,H,s,d], k/v [b,KV,s,d] (my shard) → (out [b,H,s,d], lse [b,H,s] or None)."""
    def inner(qh, kh, vh):
        return ring_attention(qh, kh, vh, ring_group, meta, kernel, scale, counter)

    return ulysses_attention(q, k, v, ulysses_group, meta, kernel, scale, counter, inner=inner, return_lse=return_lse)
