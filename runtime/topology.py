"""The dp × sp rank grid (sp = ring × ulysses) and the process groups built from it.

Every group is a slice of one grid, ``torch.arange(world).view(dp, ring, ulysses)``:
ulysses is the innermost (fastest-varying) axis so a Ulysses group is a run of
consecutive ranks (intra-node in a usual launch), the ring axis links Ulysses groups,
and the SP group of one data-parallel replica is ``grid[d].flatten()``.

Worked example, world=8, dp=2, ring=2, ulysses=2::

    grid[0] = [[0, 1], [2, 3]]   grid[1] = [[4, 5], [6, 7]]
    sp groups      [0,1,2,3] [4,5,6,7]
    ulysses groups [0,1] [2,3] [4,5] [6,7]
    ring groups    [0,2] [1,3] [4,6] [5,7]
    dp groups      [0,4] [1,5] [2,6] [3,7]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import InputError


class TopologyError(InputError):
    """A parallel layout that cannot be built; the message names the numbers and the fix."""


@dataclass(frozen=True)
class Grid:
    """Rank lists of every group of a dp × ring × ulysses grid (pure data, no processes)."""

    world: int
    dp: int
    ring: int
    ulysses: int
    sp_groups: tuple[tuple[int, ...], ...]
    ulysses_groups: tuple[tuple[int, ...], ...]
    ring_groups: tuple[tuple[int, ...], ...]
    dp_groups: tuple[tuple[int, ...], ...]

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp index, ring index, ulysses index) of a global rank."""
        if not 0 <= rank < self.world:
            raise TopologyError(f"rank {rank} is outside world({self.world})")
        dp_idx, rest = divmod(rank, self.sp)
        ring_idx, uly_idx = divmod(rest, self.ulysses)
        return dp_idx, ring_idx, uly_idx


def check_sizes(world: int, sp: int, ulysses: int) -> None:
    """Raise TopologyError unless world = dp × sp and sp = ring × ulysses for whole numbers."""
    if world < 1 or sp < 1 or ulysses < 1:
        raise TopologyError(f"sizes must be positive: world={world}, sp={sp}, ulysses={ulysses}")
    if world % sp:
        raise TopologyError(f"sp({sp}) does not divide world({world}); choose sp from {divisors(world)}")
    if sp % ulysses:
        raise TopologyError(f"ulysses({ulysses}) does not divide sp({sp}); choose ulysses from {divisors(sp)}")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rank_grid(world: int, sp: int, ulysses: int = 1) -> Grid:
    """All group rank lists for world = dp × sp, sp = ring × ulysses (see module doc)."""
    check_sizes(world, sp, ulysses)
    dp, ring = world // sp, sp // ulysses
    g = torch.arange(world).view(dp, ring, ulysses)

    def rows(t: torch.Tensor) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(x) for x in row) for row in t)

    return Grid(
        world=world,
        dp=dp,
        ring=ring,
        ulysses=ulysses,
        sp_groups=rows(g.reshape(dp, sp)),
        ulysses_groups=rows(g.reshape(dp * ring, ulysses)),
        ring_groups=rows(g.permute(0, 2, 1).reshape(dp * ulysses, ring)),
        dp_groups=rows(g.permute(1, 2, 0).reshape(ring * ulysses, dp)),
    )


def auto_ulysses(sp: int, heads: int, kv_heads: int) -> int:
    """Largest Ulysses degree u with u | sp, u | heads, and (u | kv_heads or kv_heads | u).

    The rest of the SP degree (sp / u) becomes the ring, so any SP size works for any
    head count (u = 1 always qualifies). Example: sp=8, heads=12, kv=2 → u=4 (ring 2).
    """
    best = 1
    for u in divisors(sp):
        if heads % u == 0 and (kv_heads % u == 0 or u % kv_heads == 0):
            best = max(best, u)
    return best


def check_ulysses_heads(ulysses: int, heads: int, kv_heads: int) -> None:
    """Raise TopologyError if `ulysses` cannot split these heads (F6 rules)."""
    if heads % kv_heads:
        raise TopologyError(f"heads({heads}) is not a multiple of kv_heads({kv_heads})")
    if heads % ulysses:
        raise TopologyError(
            f"heads({heads}) are not divisible by the ulysses degree({ulysses}); "
            f"use method 'hybrid' (ulysses=auto picks {auto_ulysses(ulysses, heads, kv_heads)})"
        )
    if kv_heads % ulysses and ulysses % kv_heads:
        raise TopologyError(
            f"kv_heads({kv_heads}) and the ulysses degree({ulysses}) do not divide one another; "
            f"use method 'hybrid' (ulysses=auto picks {auto_ulysses(ulysses, heads, kv_heads)})"
        )


@dataclass
class ParallelContext:
    """This rank's place in the grid and the process groups it belongs to.

    Built once by `build_parallel_context`; passed as an argument wherever a group is needed.
    With world=1 every group is None and every collective is skipped.
    """

    grid: Grid
    rank: int
    sp_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    world_group: dist.ProcessGroup | None = field(default=None)
    owned: tuple = field(default=(), repr=False)
    """The groups `build_parallel_context` created for this rank (what `destroy` releases)."""

    def destroy(self) -> None:
        """Release the groups this context created (every rank of a job calls it when the job is done), so a
        process that runs many jobs does not accumulate communicators."""
        for group in self.owned:
            dist.destroy_process_group(group)
        self.owned = ()

    @property
    def sp_rank(self) -> int:
        _, r, u = self.grid.coords(self.rank)
        return r * self.grid.ulysses + u

    @property
    def dp_rank(self) -> int:
        return self.grid.coords(self.rank)[0]

    @property
    def ring_rank(self) -> int:
        return self.grid.coords(self.rank)[1]

    @property
    def ulysses_rank(self) -> int:
        return self.grid.coords(self.rank)[2]


def single_process_context() -> ParallelContext:
    """The trivial context of a run without torch.distributed (SP off, DP off)."""
    return ParallelContext(rank_grid(1, 1, 1), 0, None, None, None, None, None)


def build_parallel_context(sp: int, ulysses: int = 1) -> ParallelContext:
    """Create every group of the grid (all ranks must call this, in the same order)."""
    if not dist.is_initialized():
        if sp != 1:
            raise TopologyError(f"sp({sp}) needs torch.distributed; launch with spbench or torchrun")
        return single_process_context()
    world, rank = dist.get_world_size(), dist.get_rank()
    grid = rank_grid(world, sp, ulysses)
    mine: dict[str, dist.ProcessGroup | None] = {}
    for name in ("sp_groups", "ulysses_groups", "ring_groups", "dp_groups"):
        for ranks in getattr(grid, name):
            group = dist.new_group(list(ranks))  # collective: every rank creates every group
            if rank in ranks:
                mine[name] = group
    return ParallelContext(
        grid=grid,
        rank=rank,
        sp_group=mine["sp_groups"],
        ulysses_group=mine["ulysses_groups"],
        ring_group=mine["ring_groups"],
        dp_group=mine["dp_groups"],
        world_group=dist.group.WORLD,
        owned=tuple(mine.values()),
    )

