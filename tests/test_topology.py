"""MiCSTopology arithmetic and validation, and the physical node-layout check (no processes)."""

from __future__ import annotations

import pytest

from lightning_mics import MiCSTopology, MiCSTopologyError
from lightning_mics.topology import check_node_layout


# ------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize(
    ("world", "k", "p", "replication", "nodes", "nodes_per_partition", "spans"),
    [
        (8, 2, 4, 2, 4, 2, True),  # a partition spans two nodes
        (8, 4, 2, 4, 2, 1, False),  # two partitions per node
        (8, 4, "node", 2, 2, 1, False),  # one partition per node
        (8, 4, 4, 2, 2, 1, False),  # "node" written out
        (8, 8, "node", 1, 1, 1, False),  # one node, one replica
        (8, 1, 8, 1, 8, 8, True),  # ZeRO-3: shard over everything
        (8, 2, 1, 8, 4, 1, False),  # DDP: every rank holds a full replica
        (1, 1, "node", 1, 1, 1, False),
    ],
)
def test_derived_sizes(world, k, p, replication, nodes, nodes_per_partition, spans):
    t = MiCSTopology.create(world, k, p)
    assert t.world_size == world
    assert t.ranks_per_node == k
    assert t.partition_size == (k if p == "node" else p)
    assert t.replication_size == replication
    assert t.num_nodes == nodes
    assert t.nodes_per_partition == nodes_per_partition
    assert t.spans_nodes is spans
    assert t.partition_size * t.replication_size == world


def test_default_partition_size_is_a_node():
    assert MiCSTopology.create(8, 4).partition_size == 4


def test_groups_partition_spans_nodes():
    t = MiCSTopology.create(8, 2, 4)
    assert t.partition_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert t.replication_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_groups_partition_smaller_than_node():
    t = MiCSTopology.create(8, 4, 2)
    assert t.partition_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t.replication_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_groups_partition_is_a_node():
    t = MiCSTopology.create(8, 4, "node")
    assert t.partition_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert t.replication_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize(("world", "k", "p"), [(8, 2, 4), (8, 4, 2), (8, 4, "node"), (12, 4, 2)])
def test_groups_are_consistent_with_rank_maths(world, k, p):
    t = MiCSTopology.create(world, k, p)
    partitions, replications = t.partition_groups(), t.replication_groups()
    # Each family of groups covers every rank exactly once.
    assert sorted(r for g in partitions for r in g) == list(range(world))
    assert sorted(r for g in replications for r in g) == list(range(world))
    assert len(partitions) == t.replication_size
    assert len(replications) == t.partition_size
    for i, group in enumerate(partitions):
        for j, rank in enumerate(group):
            assert t.partition_index(rank) == i
            assert t.partition_rank(rank) == j
            # Replication group j holds the j-th shard of every replica, in replica order.
            assert replications[j][i] == rank
    for group in partitions:
        nodes = {t.node_index(r) for r in group}
        # A partition group lies inside one node, or covers whole nodes.
        assert len(nodes) == t.nodes_per_partition
        if not t.spans_nodes:
            assert len(nodes) == 1


def test_partition_index_and_rank():
    t = MiCSTopology.create(8, 2, 4)
    assert [t.partition_index(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [t.partition_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [t.node_index(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    t = MiCSTopology.create(8, 4, 2)
    assert [t.partition_index(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [t.partition_rank(r) for r in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]


def test_describe_names_the_sizes():
    text = MiCSTopology.create(8, 2, 4).describe()
    assert "8 ranks" in text and "4 nodes x 2" in text
    assert "partition_size=4" in text and "replication_size=2" in text


# ----------------------------------------------------------------------------- errors
def test_partition_size_must_divide_world():
    with pytest.raises(MiCSTopologyError) as err:
        MiCSTopology.create(8, 8, 3)
    msg = str(err.value)
    assert "partition_size=3 does not divide world_size=8" in msg
    assert "[1, 2, 4, 8]" in msg  # how to fix: the valid choices


def test_partition_smaller_than_node_must_divide_it():
    # 3 divides 12 (so the divide check passes) but not the node's 4 ranks.
    with pytest.raises(MiCSTopologyError) as err:
        MiCSTopology.create(12, 4, 3)
    msg = str(err.value)
    assert "smaller than a node (4 ranks)" in msg
    assert "straddle two nodes" in msg
    assert "[1, 2, 4]" in msg and "multiple of 4" in msg
    assert "does not divide world_size" not in msg


def test_partition_larger_than_node_must_be_a_multiple():
    # 6 divides 12 but is not a multiple of the node's 4 ranks.
    with pytest.raises(MiCSTopologyError) as err:
        MiCSTopology.create(12, 4, 6)
    msg = str(err.value)
    assert "larger than a node (4 ranks)" in msg
    assert "not a multiple" in msg
    assert "multiple of 4 that divides 12" in msg
    assert "does not divide world_size" not in msg


def test_world_must_be_a_multiple_of_ranks_per_node():
    with pytest.raises(MiCSTopologyError) as err:
        MiCSTopology.create(10, 4, 2)
    msg = str(err.value)
    assert "world_size=10 is not a multiple of ranks_per_node=4" in msg
    assert "same number of ranks on every node" in msg


@pytest.mark.parametrize("world", [0, -4, 4.0, "8", None, True])
def test_bad_world_size(world):
    with pytest.raises(MiCSTopologyError, match="world_size must be a positive int"):
        MiCSTopology.create(world, 1, 1)


@pytest.mark.parametrize("k", [0, -2, 2.0, "2", None, True])
def test_bad_ranks_per_node(k):
    with pytest.raises(MiCSTopologyError, match="ranks_per_node must be a positive int"):
        MiCSTopology.create(8, k, 2)


@pytest.mark.parametrize("p", [2.0, "2", "nodes", None, True, False, [2]])
def test_partition_size_wrong_type(p):
    with pytest.raises(MiCSTopologyError, match="partition_size must be a positive int or 'node'"):
        MiCSTopology.create(8, 2, p)


@pytest.mark.parametrize("p", [0, -2])
def test_partition_size_not_positive(p):
    with pytest.raises(MiCSTopologyError, match="partition_size must be positive"):
        MiCSTopology.create(8, 2, p)


def test_topology_error_is_a_value_error():
    with pytest.raises(ValueError):
        MiCSTopology.create(8, 8, 3)


# ------------------------------------------------------------------------ node layout
def test_node_layout_contiguous_ok():
    check_node_layout(["a", "a", "b", "b", "c", "c", "d", "d"], 2)


def test_node_layout_single_node_ok():
    check_node_layout(["a"], 1)


def test_node_layout_one_host_emulating_smaller_nodes_ok():
    # One big machine (every rank reports the same id) stands in for 4 nodes of 2.
    check_node_layout(["host"] * 8, 2)


def test_node_layout_big_hosts_emulating_smaller_nodes_ok():
    # Two machines of 4 ranks emulate four nodes of 2.
    check_node_layout(["a"] * 4 + ["b"] * 4, 2)


def test_node_layout_not_contiguous():
    with pytest.raises(MiCSTopologyError) as err:
        check_node_layout(["a", "b", "a", "b"], 2)
    msg = str(err.value)
    assert "not node-contiguous" in msg
    assert "'a' holds ranks [0] and [2]" in msg
    assert "--distribution=cyclic" in msg
    assert "--distribution=block" in msg


def test_node_layout_not_contiguous_later_block():
    with pytest.raises(MiCSTopologyError) as err:
        check_node_layout(["a", "a", "b", "b", "a", "a"], 2)
    assert "'a' holds ranks [0, 1] and [4, 5]" in str(err.value)


def test_node_layout_unequal_nodes():
    with pytest.raises(MiCSTopologyError) as err:
        check_node_layout(["a", "a", "a", "b"], 2)
    msg = str(err.value)
    assert "different numbers of ranks" in msg
    assert "'a': 3" in msg and "'b': 1" in msg
    assert "same number of processes on every node" in msg


def test_node_layout_ranks_per_node_must_divide_node():
    # Three physical nodes of 2 ranks, but the topology thinks nodes hold 4: a logical
    # node would straddle two physical ones.
    with pytest.raises(MiCSTopologyError) as err:
        check_node_layout(["a", "a", "b", "b", "c", "c"], 4)
    msg = str(err.value)
    assert "Each node runs 2 ranks but ranks_per_node=4" in msg
    assert "Set ranks_per_node to 2" in msg


def test_node_layout_one_host_ranks_per_node_must_divide_it():
    with pytest.raises(MiCSTopologyError, match="Each node runs 6 ranks but ranks_per_node=4"):
        check_node_layout(["host"] * 6, 4)


def test_node_layout_empty():
    with pytest.raises(MiCSTopologyError, match="no ranks"):
        check_node_layout([], 2)
