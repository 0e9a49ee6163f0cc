"""Which global tokens each SP rank holds: contiguous and zigzag layouts, padding, positions (pure).

A shard is a tuple of *segments*, half-open ranges ``(start, end)`` of global token
indices, concatenated in order along the sequence dimension. One description covers
every strategy:

* the sequence (padded to ``total_len``) is cut into ``ring`` ring-parts, either
  contiguously or zigzag (``2·ring`` chunks, ring part g = chunks g and 2·ring−1−g,
  which balances causal work);
* each ring part is cut contiguously into ``ulysses`` equal pieces;
* SP rank ``g·ulysses + j`` holds piece j of ring part g.

Ulysses is (ring=1, ulysses=P), ring is (P, 1), zigzag is (P, 1, zigzag), hybrid is
(P/u, u, zigzag). Example, total_len=8, ring=2, ulysses=1, zigzag: chunks of 2 tokens,
rank 0 holds ((0, 2), (6, 8)) and rank 1 holds ((2, 4), (4, 6)) = ((2, 6),) merged.

Segments of different ranks never partially overlap, which lets block attention
classify every (query segment, key segment) pair as full, causal-diagonal or skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

Segment = tuple[int, int]
Segments = tuple[Segment, ...]


class LayoutError(InputError):
    """A layout request that cannot be satisfied; the message names the numbers."""


def required_multiple(ring: int, ulysses: int, zigzag: bool) -> int:
    """The padded length must be a multiple of this (2·ring·ulysses for zigzag, ring·ulysses else)."""
    return (2 if zigzag else 1) * ring * ulysses


def padded_length(seq_len: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is ≥ seq_len (and ≥ multiple)."""
    if seq_len < 1:
        raise LayoutError(f"sequence length must be ≥ 1, got {seq_len}")
    return max(multiple, -(-seq_len // multiple) * multiple)


def merge_adjacent(segments: list[Segment]) -> Segments:
    """Join segments where one ends where the next starts: ((0,2),(2,4)) → ((0,4),)."""
    out: list[Segment] = []
    for s, e in segments:
        if e <= s:
            continue
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return tuple(out)


def ring_parts(total_len: int, ring: int, zigzag: bool) -> list[list[Segment]]:
    """Segments of each ring part (before the Ulysses split)."""
    if zigzag:
        c = total_len // (2 * ring)
        return [[(g * c, (g + 1) * c), ((2 * ring - 1 - g) * c, (2 * ring - g) * c)] for g in range(ring)]
    c = total_len // ring
    return [[(g * c, (g + 1) * c)] for g in range(ring)]


def cut(segments: list[Segment], offset: int, length: int) -> list[Segment]:
    """The sub-list of `segments` covering positions [offset, offset+length) of their concatenation."""
    out, pos = [], 0
    for s, e in segments:
        lo, hi = max(offset, pos), min(offset + length, pos + (e - s))
        if lo < hi:
            out.append((s + lo - pos, s + hi - pos))
        pos += e - s
    return out


@dataclass(frozen=True)
class ShardPlan:
    """Where every global token of a (padded) sequence lives across one SP group."""

    total_len: int
    ring: int
    ulysses: int
    zigzag: bool

    def __post_init__(self) -> None:
        m = required_multiple(self.ring, self.ulysses, self.zigzag)
        if self.total_len % m:
            raise LayoutError(
                f"total_len({self.total_len}) is not a multiple of {m} "
                f"(ring={self.ring}, ulysses={self.ulysses}, zigzag={self.zigzag}); pad with padded_length()"
            )

    @classmethod
    def for_length(cls, seq_len: int, ring: int, ulysses: int, zigzag: bool) -> "ShardPlan":
        """Plan for `seq_len` real tokens, padded to the multiple the layout needs."""
        return cls(padded_length(seq_len, required_multiple(ring, ulysses, zigzag)), ring, ulysses, zigzag)

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    @property
    def local_len(self) -> int:
        return self.total_len // self.sp

    def segments(self, sp_rank: int) -> Segments:
        """Global token ranges held by `sp_rank`, in storage order."""
        g, j = divmod(sp_rank, self.ulysses)
        part = ring_parts(self.total_len, self.ring, self.zigzag)[g]
        return merge_adjacent(cut(part, j * self.local_len, self.local_len))

    def group_segments(self, sp_ranks: list[int] | range) -> Segments:
        """Segments of several ranks' shards concatenated in the order given (a gathered tensor)."""
        return merge_adjacent([seg for r in sp_ranks for seg in self.segments(r)])

    def ring_part_segments(self, ring_idx: int) -> Segments:
        """What a Ulysses group holds after its all-to-all: ring part `ring_idx`."""
        return self.group_segments(range(ring_idx * self.ulysses, (ring_idx + 1) * self.ulysses))

    def indices(self, sp_rank: int) -> torch.Tensor:
        """Global token indices of `sp_rank`'s shard as a LongTensor [local_len]."""
        return segment_indices(self.segments(sp_rank))

    def shard(self, x: torch.Tensor, sp_rank: int, dim: int = 1) -> torch.Tensor:
        """`sp_rank`'s shard of a full tensor whose `dim` has length total_len."""
        if x.shape[dim] != self.total_len:
            raise LayoutError(f"tensor has {x.shape[dim]} tokens along dim {dim}, plan expects {self.total_len}")
        return torch.cat([x.narrow(dim, s, e - s) for s, e in self.segments(sp_rank)], dim=dim)

    def unshard(self, shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Inverse of `shard`: the full tensor from every rank's shard (in sp-rank order)."""
        if len(shards) != self.sp:
            raise LayoutError(f"got {len(shards)} shards, plan has sp={self.sp}")
        order = torch.cat([self.indices(r) for r in range(self.sp)])
        stacked = torch.cat(shards, dim=dim)
        return stacked.index_select(dim, torch.argsort(order).to(stacked.device))


def segment_indices(segments: Segments) -> torch.Tensor:
    """LongTensor of the global indices covered by `segments`, in order."""
    return torch.cat([torch.arange(s, e) for s, e in segments])


def pad_to(x: torch.Tensor, length: int, dim: int, value: float | int) -> torch.Tensor:
    """Pad `x` along `dim` at the end with `value` up to `length`."""
    extra = length - x.shape[dim]
    if extra < 0:
        raise LayoutError(f"cannot pad {x.shape[dim]} tokens down to {length}")
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def document_position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 in each document: [[0,0,0,1,1]] → [[0,1,2,0,1]].

    `doc_ids` is [b, L] with documents as consecutive runs (padding is a run too).
    """
    b, n = doc_ids.shape
    idx = torch.arange(n, device=doc_ids.device).expand(b, n)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx))
    return idx - torch.cummax(start_idx, dim=1).values
