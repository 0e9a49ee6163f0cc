"""Ring attention (contiguous or zigzag layout): K/V travel around the ring, partial
results merge into fp32 accumulators with the stable LSE form (blockattn.merge_into).

Forward, rank r of P, step t = 0..P−1: attend my queries to the K/V block of rank
(r − t) mod P while sending it on to r + 1. Backward: the K/V blocks travel again, each
with a dK/dV accumulator that every rank adds its share to; one last hop brings each
accumulator home. Block gradients use the merged out/lse (kernels.py), so they are exact.

Which tokens a block holds comes from the layout (meta.plan.ring_part_segments), so the
same code serves contiguous rings, zigzag rings, and the ring level of the hybrid.
Causal pairs that are fully invisible are skipped, which is where zigzag's balance comes
from: every rank does the same number of visible pairs.
"""
from __future__ import annotations

import torch

from ..comm import CommCounter, RingComm, group_rank, group_size
from .blockattn import SeqMeta, block_backward_into, block_forward_into
from .kernels import Kernel


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ring_forward(q, k, v, group, meta: SeqMeta, kernel: Kernel, scale: float, counter: CommCounter | None):
    """(out [b,H,s,d] in q.dtype, lse [b,H,s]) of my queries over every rank's keys."""
    size, rank = group_size(group), group_rank(group)
    segs = meta.plan.ring_part_segments
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    comm = RingComm(group, counter)
    for step in range(size):
        if step < size - 1:
            k_next, v_next = comm.send_recv(k), comm.send_recv(v)
            comm.commit()
        block_forward_into(out, lse, q, k, v, segs(rank), segs((rank - step) % size), meta, kernel, scale)
        if step < size - 1:
            comm.wait()
            k, v = k_next, v_next
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, group, meta: SeqMeta, kernel: Kernel, scale: float,
                  counter: CommCounter | None):
    """(dq, dk, dv) for my shard; dk/dv accumulators ride the ring with their K/V block."""
    size, rank = group_size(group), group_rank(group)
    segs = meta.plan.ring_part_segments
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    kv_comm, grad_comm = RingComm(group, counter), RingComm(group, counter)
    for step in range(size):
        last = step == size - 1
        if not last:
            k_next, v_next = kv_comm.send_recv(k), kv_comm.send_recv(v)
            kv_comm.commit()
        block_backward_into((dq, dk, dv), dout, q, k, v, out, lse, segs(rank), segs((rank - step) % size), meta,
                            kernel, scale)
        # After the last step the accumulators belong to rank+1's block: the final hop takes them home.
        dk_next, dv_next = grad_comm.send_recv(dk), grad_comm.send_recv(dv)
        grad_comm.commit()
        grad_comm.wait()
        dk, dv = dk_next, dv_next
        if not last:
            kv_comm.wait()
            k, v = k_next, v_next
    return dq, dk, dv


class RingAttention(torch.autograd.Function):
    """Thin autograd wrapper: saves context, delegates to ring_forward / ring_backward."""

    @staticmethod
    def forward(ctx, q, k, v, group, meta, kernel, scale, counter):
        # saved contiguous (RoPE's q is a transposed view): else every backward step's kernel call copies them
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = ring_forward(q, k, v, group, meta, kernel, scale, counter)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, meta, kernel, scale, counter)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention(q, k, v, group, meta: SeqMeta, kernel: Kernel, scale: float, counter: CommCounter | None = None):
    """Ring attention over `group`; returns (out [b,H,s,d], lse [b,H,s])."""
    return RingAttention.apply(q, k, v, group, meta, kernel, scale, counter)
