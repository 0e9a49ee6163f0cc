import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.topology import TopologyError, auto_ulysses, check_ulysses_heads, rank_grid


def test_documented_example():
    g = rank_grid(8, 4, 2)
    assert g.sp_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert g.ulysses_groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert g.ring_groups == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert g.dp_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert g.coords(6) == (1, 1, 0)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
def test_every_rank_in_exactly_one_group_of_each_kind(dp, ring, uly):
    world, sp = dp * ring * uly, ring * uly
    g = rank_grid(world, sp, uly)
    for groups, size in ((g.sp_groups, sp), (g.ulysses_groups, uly), (g.ring_groups, ring), (g.dp_groups, dp)):
        flat = sorted(r for grp in groups for r in grp)
        assert flat == list(range(world))
        assert all(len(grp) == size for grp in groups)
    for r in range(world):
        d, ri, u = g.coords(r)
        assert g.sp_groups[d][ri * uly + u] == r
        assert g.ulysses_groups[d * ring + ri][u] == r
        assert g.ring_groups[d * uly + u][ri] == r
        assert g.dp_groups[ri * uly + u][d] == r


@pytest.mark.parametrize("world,sp,uly,msg", [
    (6, 4, 1, r"sp\(4\) does not divide world\(6\)"),
    (8, 4, 3, r"ulysses\(3\) does not divide sp\(4\)"),
    (0, 1, 1, "must be positive"),
])
def test_bad_sizes_name_the_numbers(world, sp, uly, msg):
    with pytest.raises(TopologyError, match=msg):
        rank_grid(world, sp, uly)


@given(st.sampled_from([1, 2, 3, 4, 6, 8, 16]), st.sampled_from([(4, 4), (12, 2), (14, 2), (28, 4), (40, 8), (7, 7), (64, 8)]))
def test_auto_ulysses_is_the_largest_valid_degree(sp, heads_kv):
    heads, kv = heads_kv
    u = auto_ulysses(sp, heads, kv)
    assert sp % u == 0
    check_ulysses_heads(u, heads, kv)  # valid
    for bigger in range(u + 1, sp + 1):
        if sp % bigger == 0:
            with pytest.raises(TopologyError, match="hybrid"):
                check_ulysses_heads(bigger, heads, kv)


def test_ulysses_error_points_to_hybrid():
    with pytest.raises(TopologyError, match=r"heads\(14\) are not divisible by the ulysses degree\(4\); use method 'hybrid'"):
        check_ulysses_heads(4, 14, 2)
    with pytest.raises(TopologyError, match=r"kv_heads\(2\) and the ulysses degree\(3\)"):
        check_ulysses_heads(3, 12, 2)
