"""Alpha-beta costs of the collectives FSDP and MiCS issue.

A collective is charged ``overhead + steps x alpha + bytes / bandwidth`` where
``overhead`` is a fixed cost per collective call (launch, the framework's bookkeeping),, for a ring over
``g`` ranks, ``steps`` is ``g - 1`` (all-gather, reduce-scatter) or ``2 (g - 1)``
(all-reduce) and ``alpha`` is the latency of one hop (the inter-node one when the ring
crosses nodes: every step waits for its slowest hop). The bandwidth term is the larger of

- the **inter-node** term: the bytes a node sends over its network link divided by the
  node's bandwidth, and
- the **intra-node** term: the bytes one rank sends to a neighbour on the same node
  divided by one device's intra-node bandwidth,

since both kinds of hops of a ring run at once. Ranks are node-contiguous (rank ``r`` is
on node ``r // k``), so a ring over a group whose members sit ``j`` to a node on ``m``
nodes crosses each node boundary once: each node sends ``f x B`` over the network per
ring, where ``B`` is the buffer (all-gather output, reduce-scatter input, all-reduce
buffer) and ``f`` is ``(g-1)/g`` for an all-gather or reduce-scatter and ``2 (g-1)/g``
for an all-reduce. When ``c`` groups of the same collective share a node (for example the
``k`` inter-node groups of a hierarchical all-gather, one per local index) the node sends
``c x f x B``.

Backend facts: gloo has no reduce-scatter; ``reduce_scatter_tensor`` runs a full
all-reduce of the input and keeps a slice, so it costs an all-reduce (``2 (g-1)/g``,
measured at 2.00x in ``docs/emulated_cluster.md``). NCCL's reduce-scatter is a ring.

Hierarchical (MiCS) all-gather of a partition of ``p = n k`` ranks over ``n`` nodes:
an inter-node all-gather among the ``n`` ranks of each local index (``k`` groups per node,
output ``B / k`` each), then ``n`` intra-node all-gathers (output ``B / n`` each). A node sends
``(n-1)/n B = (p-k)/p B``, the paper's figure, instead of a flat ring's ``(p-1)/p B``.
The reduce-scatter mirrors it (intra-node first). The stages run one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lightning_mics.planner.specs import Backend, ClusterSpec
from lightning_mics.topology import intra_stage_calls


class Kind(str, Enum):
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_REDUCE = "all_reduce"


@dataclass(frozen=True)
class GroupLayout:
    """How a process group's ``size`` ranks sit on nodes of ``ranks_per_node`` ranks.

    ``members_per_node``: members of one group on each node it touches;
    ``nodes``: nodes one group spans; ``groups_per_node``: groups of this family (the
    same collective issued by every group at once) with members on each node.
    """

    size: int
    members_per_node: int
    nodes: int
    groups_per_node: int

    @classmethod
    def strided(cls, size: int, stride: int, ranks_per_node: int) -> GroupLayout:
        """The groups ``{j + i * stride : i < size}`` for every offset ``j < stride``.

        ``stride=1``: consecutive ranks (a partition group, the world);
        ``stride=p``: a replication group of partitions of ``p`` ranks;
        ``stride=k``: the inter-node stage of a hierarchical collective.
        Needs ``stride`` and ``ranks_per_node`` to divide one another (MiCS's layouts).
        """
        k = ranks_per_node
        if stride >= k:
            if stride % k:
                raise ValueError(f"stride {stride} is not a multiple of ranks_per_node {k}")
            return cls(size=size, members_per_node=1, nodes=size, groups_per_node=k)
        if k % stride:
            raise ValueError(f"stride {stride} does not divide ranks_per_node {k}")
        per_node = min(size, k // stride)
        return cls(
            size=size,
            members_per_node=per_node,
            nodes=max(1, size // per_node),
            groups_per_node=stride * max(1, (k // stride) // size),
        )

    @property
    def spans_nodes(self) -> bool:
        return self.nodes > 1


@dataclass(frozen=True)
class CommCost:
    """The cost of one collective (all groups of its family at once).

    ``time``: seconds; ``inter_node_bytes_per_node``: bytes each node it touches sends
    over its network link (``tx``; equal to what it receives); ``intra_node_bytes_per_rank``:
    bytes one rank sends to a neighbour inside its node; ``steps``: ring steps.
    """

    time: float
    inter_node_bytes_per_node: float
    intra_node_bytes_per_rank: float
    steps: int

    def __add__(self, other: CommCost) -> CommCost:
        return CommCost(
            self.time + other.time,
            self.inter_node_bytes_per_node + other.inter_node_bytes_per_node,
            self.intra_node_bytes_per_rank + other.intra_node_bytes_per_rank,
            self.steps + other.steps,
        )

    def scaled(self, factor: float) -> CommCost:
        return CommCost(
            self.time * factor,
            self.inter_node_bytes_per_node * factor,
            self.intra_node_bytes_per_rank * factor,
            round(self.steps * factor),
        )


ZERO = CommCost(0.0, 0.0, 0.0, 0)


def wire_factor(kind: Kind, group_size: int, backend: Backend) -> float:
    """Bytes each rank sends, per byte of the collective's buffer, in a ring."""
    g = group_size
    if g <= 1:
        return 0.0
    if kind is Kind.ALL_GATHER or (kind is Kind.REDUCE_SCATTER and backend is Backend.NCCL):
        return (g - 1) / g
    return 2 * (g - 1) / g  # all-reduce, and gloo's all-reduce-based reduce-scatter


def ring_steps(kind: Kind, group_size: int, backend: Backend) -> int:
    g = group_size
    if g <= 1:
        return 0
    if kind is Kind.ALL_GATHER or (kind is Kind.REDUCE_SCATTER and backend is Backend.NCCL):
        return g - 1
    return 2 * (g - 1)


def ring(kind: Kind, buffer_bytes: float, layout: GroupLayout, cluster: ClusterSpec) -> CommCost:
    """One ring collective over every group of ``layout`` at once (``buffer_bytes``: the
    all-gather output, reduce-scatter input or all-reduce buffer of one rank)."""
    g = layout.size
    if g <= 1 or buffer_bytes <= 0:
        return ZERO
    f = wire_factor(kind, g, cluster.backend)
    steps = ring_steps(kind, g, cluster.backend)
    inter = layout.groups_per_node * f * buffer_bytes if layout.spans_nodes else 0.0
    intra = f * buffer_bytes if layout.members_per_node > 1 else 0.0
    alpha = (
        cluster.inter_node_latency_us if layout.spans_nodes else cluster.intra_node_latency_us
    ) * 1e-6
    bandwidth_time = max(
        inter / cluster.inter_bytes_per_s if inter else 0.0,
        intra / cluster.intra_bytes_per_s if intra else 0.0,
    )
    overhead = cluster.collective_overhead_us * 1e-6
    return CommCost(overhead + steps * alpha + bandwidth_time, inter, intra, steps)


def hierarchical(
    kind: Kind, buffer_bytes: float, partition_size: int, cluster: ClusterSpec
) -> CommCost:
    """MiCS's two-stage all-gather (inter-node, then intra-node) or reduce-scatter
    (intra-node, then inter-node) over a partition of ``partition_size`` ranks spanning
    ``n = partition_size / k`` nodes; the stages run one after the other. As
    `lightning_mics.collectives` issues them: one inter-node collective of ``B / k``, and
    one intra-node collective of ``B`` or, above
    `~lightning_mics.topology.BATCHED_INTRA_STAGE_MAX_BYTES`, ``n`` of ``B / n`` (one
    per node's block of the buffer). The batched stage's strided copy is not modelled."""
    k = cluster.ranks_per_node
    n = partition_size // k
    if kind is Kind.ALL_REDUCE or partition_size <= k or partition_size % k:
        raise ValueError("hierarchical collectives are all-gathers/reduce-scatters over >1 node")
    inter = ring(kind, buffer_bytes / k, GroupLayout.strided(n, k, k), cluster)
    calls = intra_stage_calls(buffer_bytes, n)
    intra = ring(kind, buffer_bytes / calls, GroupLayout.strided(k, 1, k), cluster).scaled(calls)
    return inter + intra


def tree_all_reduce_latency(group_size: int, cluster: ClusterSpec) -> float:
    """Latency of a small all-reduce (a scalar: the gradient norm) over ``group_size``
    ranks with NCCL's tree (``2 log2 g`` hops) or gloo's ring (``2 (g-1)`` hops)."""
    import math

    if group_size <= 1:
        return 0.0
    nodes = max(1, group_size // cluster.ranks_per_node)
    alpha = (cluster.inter_node_latency_us if nodes > 1 else cluster.intra_node_latency_us) * 1e-6
    hops = (
        2 * math.ceil(math.log2(group_size))
        if cluster.backend is Backend.NCCL
        else 2 * (group_size - 1)
    )
    return hops * alpha
