import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from runtime.layout import LayoutError, ShardPlan, document_position_ids, padded_length, required_multiple

plans = st.builds(
    lambda n, ring, uly, zz: ShardPlan.for_length(n, ring, uly, zz),
    st.integers(1, 300), st.integers(1, 5), st.integers(1, 4), st.booleans(),
)


@given(plans)
def test_segments_partition_the_sequence(plan):
    idx = torch.cat([plan.indices(r) for r in range(plan.sp)])
    assert sorted(idx.tolist()) == list(range(plan.total_len))
    assert all(len(plan.indices(r)) == plan.local_len for r in range(plan.sp))


@given(plans)
def test_segments_never_partially_overlap(plan):
    segs = [s for r in range(plan.sp) for s in plan.segments(r)]
    segs += [s for g in range(plan.ring) for s in plan.ring_part_segments(g)]
    for a in segs:
        for b in segs:
            overlap = max(a[0], b[0]) < min(a[1], b[1])
            nested = (a[0] <= b[0] and b[1] <= a[1]) or (b[0] <= a[0] and a[1] <= b[1])
            assert not overlap or nested


@given(plans, st.integers(1, 3))
def test_shard_unshard_round_trip(plan, batch):
    x = torch.randn(batch, plan.total_len, 3)
    assert torch.equal(plan.unshard([plan.shard(x, r) for r in range(plan.sp)]), x)


@given(st.integers(1, 6), st.integers(1, 20))
def test_zigzag_rank_holds_chunks_r_and_mirror(p, chunk):
    plan = ShardPlan(2 * p * chunk, p, 1, True)
    for r in range(p):
        want = list(range(r * chunk, (r + 1) * chunk)) + list(range((2 * p - 1 - r) * chunk, (2 * p - r) * chunk))
        assert plan.indices(r).tolist() == want


def test_hybrid_ring_part_is_the_ulysses_groups_union():
    plan = ShardPlan(16, 2, 2, True)  # chunks of 4: ring part 0 = [0,4)+[12,16), ring part 1 = [4,12)
    assert plan.segments(0) == ((0, 4),) and plan.segments(1) == ((12, 16),)
    assert plan.ring_part_segments(1) == ((4, 12),)


@given(st.integers(1, 1000), st.integers(1, 16))
def test_padding_is_minimal(n, m):
    L = padded_length(n, m)
    assert L % m == 0 and L >= n and L - max(n, m) < m


def test_plan_rejects_unpadded_length():
    with pytest.raises(LayoutError, match=r"total_len\(10\) is not a multiple of 8"):
        ShardPlan(10, 4, 1, True)
    assert required_multiple(4, 2, True) == 16


def test_document_positions_restart_per_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert document_position_ids(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
