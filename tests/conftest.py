"""Shared fixtures: one pool of gloo ranks per world size, reused by every multi-rank test."""
from __future__ import annotations

import pytest

from spbench.launch import RankPool


class Pools:
    """world size → RankPool, started on first use, all closed at session end."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def __call__(self, world: int) -> RankPool:
        if world not in self._pools:
            self._pools[world] = RankPool(world, timeout=240)
        return self._pools[world]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools():
    p = Pools()
    yield p
    p.close()
