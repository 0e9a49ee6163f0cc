"""Shared fixtures: one pool of gloo ranks per world size, reused by every multi-rank test."""
from __future__ import annotations

import pytest
import torch

from spbench.common.pool import RankPool


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny float64 models run ~30x faster on one thread than on two contended ones (2-core CI boxes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
