"""Rank jobs used by tests (importable by spawned ranks: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import math

import torch

from runtime.attention import SPAttention, resolve_ulysses, shard_plan
from runtime.blockattn import SeqMeta
from runtime.comm import CommCounter
from runtime.kernels import select_kernel
from runtime.topology import build_parallel_context


def count_attention_bytes(info, method: str, sp: int, heads: int, kv: int, seq: int, dim: int):
    """Bytes this rank sends for one attention forward, then for its backward."""
    u = resolve_ulysses(method, sp, heads, kv)
    pc = build_parallel_context(sp, u)
    plan = shard_plan(method, seq, sp, u)
    meta = SeqMeta.build(plan, seq, causal=True)
    s = plan.local_len
    q = torch.randn(1, heads, s, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv, s, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv, s, dim, dtype=torch.float64, requires_grad=True)
    counter = CommCounter()
    attn = SPAttention(method, pc, select_kernel("reference", q.device, q.dtype), counter)
    out, _ = attn(q, k, v, meta, 1 / math.sqrt(dim))
    fwd = counter.total()
    out.sum().backward()
    return fwd, counter.total() - fwd, s
