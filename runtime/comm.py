"""Every collective the runtime issues: autograd-aware wrappers, a ring communicator, byte counting.

Byte accounting counts what leaves *this* rank for the direct algorithm of each call
(g = group size, N = bytes of the local input):

    all_to_all      N·(g−1)/g      (the chunk for oneself stays)
    all_gather      N·(g−1)        (one's piece to each other rank)
    reduce_scatter  N·(g−1)/g      (the chunks that belong to others)
    all_reduce      2·N·(g−1)/g    (ring all-reduce: reduce-scatter + all-gather)
    send            N

A `CommCounter` is passed explicitly (never global) and records (op, bytes) per call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# The single-tensor collectives: torch 2.13 deprecates all_gather_into_tensor for all_gather_single (a
# FutureWarning per call); older torch (the GPU image) may have only the *_tensor names.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommCounter:
    """Bytes sent by this rank, one record per call: [(op, bytes), ...]."""

    records: list[tuple[str, int]] = field(default_factory=list)

    def add(self, op: str, nbytes: float) -> None:
        self.records.append((op, int(round(nbytes))))

    def total(self, op: str | None = None) -> int:
        return sum(b for o, b in self.records if op is None or o == op)


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all(x: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    """out[i] = rank i's x[my rank]; x is [g, ...] (chunk i goes to rank i). No autograd."""
    g = group_size(group)
    if g == 1:
        return x
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    if counter is not None:
        counter.add("all_to_all", _nbytes(x) * (g - 1) / g)
    return out


def all_gather(x: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    """[g, *x.shape]: every rank's x stacked in group-rank order. No autograd."""
    g = group_size(group)
    if g == 1:
        return x.unsqueeze(0)
    x = x.contiguous()
    flat = x.reshape(1, -1) if x.dim() == 0 else x
    out = x.new_empty((g * flat.shape[0], *flat.shape[1:]))  # gloo wants the pieces concatenated on dim 0
    _ALL_GATHER(out, flat, group=group)
    out = out.view(g, *x.shape)
    if counter is not None:
        counter.add("all_gather", _nbytes(x) * (g - 1))
    return out


def reduce_scatter(x: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    """x is [g, ...]; returns Σ over ranks of x[my rank]. No autograd."""
    g = group_size(group)
    if g == 1:
        return x[0]
    x = x.contiguous()
    flat = x.reshape(g, -1) if x.dim() == 1 else x.reshape(g * x.shape[1], *x.shape[2:])
    out = x.new_empty(flat.shape[0] // g, *flat.shape[1:])
    _REDUCE_SCATTER(out, flat, group=group)
    out = out.view(x.shape[1:])
    if counter is not None:
        counter.add("reduce_scatter", _nbytes(x) * (g - 1) / g)
    return out


def all_reduce_(x: torch.Tensor, group, op=dist.ReduceOp.SUM, counter: CommCounter | None = None) -> torch.Tensor:
    """In-place all-reduce (no autograd); returns x."""
    g = group_size(group)
    if g > 1:
        dist.all_reduce(x, op=op, group=group)
        if counter is not None:
            counter.add("all_reduce", 2 * _nbytes(x) * (g - 1) / g)
    return x


class AllToAll(torch.autograd.Function):
    """`all_to_all` with autograd. Backward: the same all-to-all of the gradient.

    Chunk i of rank r becomes chunk r of rank i, so the gradient of chunk r on rank i
    must travel back to chunk i on rank r: that is again an all-to-all.
    """

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return all_to_all(x, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.group, ctx.counter), None, None


class AllGather(torch.autograd.Function):
    """`all_gather` with autograd. Backward: reduce-scatter (sum) of the gradient.

    Every rank used every piece, so the gradient of my piece is the sum of all ranks'
    gradients for it.
    """

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return all_gather(x, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group, ctx.counter), None, None


class SumShards(torch.autograd.Function):
    """Sum of per-shard partial values over the SP group; backward hands each shard the
    gradient unchanged (no all-reduce, no factor P).

    Use it when every rank of the group computes the same loss from the reduced value
    (DPO sequence log-probs): each rank's backward then gives d loss / d its partial sum,
    and the later SP gradient *sum* assembles the true gradient. An all-reduce in the
    backward too would multiply gradients by P (FAULTS.md F10).
    """

    @staticmethod
    def forward(ctx, x, group, counter):
        return all_reduce_(x.clone(), group, counter=counter)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def sum_shards(x: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    return SumShards.apply(x, group, counter)


class RingCommError(RuntimeError):
    """The ring communicator was used out of order."""


class RingComm:
    """Send to the next rank of a ring group and receive from the previous one.

    Usage per step: ``buf = comm.send_recv(t)`` (any number), ``comm.commit()``, compute,
    ``comm.wait()``; then every `buf` holds what the previous rank sent. Misuse raises
    (commit twice, wait before commit, send after commit).

    gloo cannot send/recv CUDA tensors, so with a gloo group they are staged through CPU.
    """

    def __init__(self, group, counter: CommCounter | None = None):
        self.group, self.counter = group, counter
        self.size, self.rank = group_size(group), group_rank(group)
        if self.size > 1:
            self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
            self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)
            self.stage_cpu = dist.get_backend(group) == "gloo"
        self._ops: list = []
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._reqs = None

    def send_recv(self, t: torch.Tensor) -> torch.Tensor:
        """Queue sending `t` to the next rank; return the buffer the previous rank's tensor lands in."""
        if self._reqs is not None:
            raise RingCommError("send_recv after commit: call wait() first")
        if self.size == 1:
            return t
        t = t.contiguous()
        out = torch.empty_like(t)
        send, recv = t, out
        if self.stage_cpu and t.is_cuda:
            send, recv = t.cpu(), torch.empty(t.shape, dtype=t.dtype)
            self._copies.append((out, recv))
        self._ops += [dist.P2POp(dist.isend, send, self.next, self.group), dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        if self.counter is not None:
            self.counter.add("send", _nbytes(t))
        return out

    def commit(self) -> None:
        if self._reqs is not None:
            raise RingCommError("commit called twice without wait")
        self._reqs = dist.batch_isend_irecv(self._ops) if self._ops else []

    def wait(self) -> None:
        if self._reqs is None:
            raise RingCommError("wait before commit")
        for r in self._reqs:
            r.wait()
        for dst, src in self._copies:
            dst.copy_(src)
        self._ops, self._copies, self._reqs = [], [], None
