"""Partition / replication / node arithmetic for MiCS, and its validation.

Ranks are laid out node-major: node ``n`` holds ranks ``[n*k, (n+1)*k)`` where ``k`` is
``ranks_per_node``. A *partition group* is ``partition_size`` consecutive ranks and holds
one full replica of the model states; a *replication group* is the ranks at the same
position of every partition group.

Pure arithmetic, testable without processes: what needs the process group (gathering
node identities, meshes, sub-groups) is in :mod:`lightning_mics.process_groups`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

PartitionSize = int | Literal["node"]
Hierarchical = bool | Literal["auto"]

#: Environment variable that overrides a rank's node identity (default: its hostname).
#: The emulated cluster sets it so that ranks in different network namespaces of one
#: machine count as different nodes.
NODE_ID_ENV = "LIGHTNING_MICS_NODE_ID"

REPLICATE_DIM = "replicate"
SHARD_DIM = "shard"


class MiCSTopologyError(ValueError):
    """The requested MiCS layout does not fit the cluster."""


@dataclass(frozen=True)
class MiCSTopology:
    """A validated MiCS layout of ``world_size`` ranks.

    Build it with :meth:`create`, which checks every constraint and raises
    :class:`MiCSTopologyError` with a message that says how to fix the input.
    """

    world_size: int
    partition_size: int
    ranks_per_node: int

    @classmethod
    def create(
        cls,
        world_size: int,
        ranks_per_node: int,
        partition_size: PartitionSize = "node",
    ) -> MiCSTopology:
        if not _is_positive_int(world_size):
            raise MiCSTopologyError(f"world_size must be a positive int, got {world_size!r}.")
        if not _is_positive_int(ranks_per_node):
            raise MiCSTopologyError(
                f"ranks_per_node must be a positive int, got {ranks_per_node!r}."
            )
        if world_size % ranks_per_node != 0:
            raise MiCSTopologyError(
                f"world_size={world_size} is not a multiple of ranks_per_node={ranks_per_node}: "
                "MiCS needs nodes of equal size. Launch the same number of ranks on every node "
                "(Lightning: `devices` is the ranks per node)."
            )
        if partition_size == "node":
            partition_size = ranks_per_node
        if isinstance(partition_size, bool) or not isinstance(partition_size, int):
            raise MiCSTopologyError(
                f"partition_size must be a positive int or 'node', got {partition_size!r}."
            )
        if partition_size < 1:
            raise MiCSTopologyError(f"partition_size must be positive, got {partition_size}.")
        if world_size % partition_size != 0:
            raise MiCSTopologyError(
                f"partition_size={partition_size} does not divide world_size={world_size}. "
                f"Choose one of {_divisors(world_size)}."
            )
        if partition_size < ranks_per_node and ranks_per_node % partition_size != 0:
            raise MiCSTopologyError(
                f"partition_size={partition_size} is smaller than a node ({ranks_per_node} ranks) "
                "but does not divide it, so a partition group would straddle two nodes. "
                f"Choose one of {_divisors(ranks_per_node)}, or a multiple of {ranks_per_node}."
            )
        if partition_size > ranks_per_node and partition_size % ranks_per_node != 0:
            raise MiCSTopologyError(
                f"partition_size={partition_size} is larger than a node ({ranks_per_node} ranks) "
                f"but not a multiple of it. Use a multiple of {ranks_per_node} that divides "
                f"{world_size}."
            )
        return cls(world_size, partition_size, ranks_per_node)

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh, ranks_per_node: int) -> MiCSTopology:
        """The topology of a ready-made ``mesh`` on nodes of ``ranks_per_node`` ranks.

        The mesh must be laid out as :func:`~lightning_mics.build_device_mesh` lays out
        a topology: ranks ``0 .. n-1`` in order, row ``i`` of the last (shard) dimension
        being partition group ``i``. Reads the mesh's global layout (the same on every
        rank); no communication. Raises :class:`MiCSTopologyError` otherwise.
        """
        ranks = mesh.mesh.flatten().tolist()
        if ranks != list(range(len(ranks))):
            raise MiCSTopologyError(
                "the mesh is not the node-major layout of the whole world (rows of "
                "consecutive ranks); build it with lightning_mics.build_device_mesh"
            )
        return cls.create(len(ranks), ranks_per_node, mesh.size(mesh.ndim - 1))

    # ---------------------------------------------------------------- derived sizes
    @property
    def replication_size(self) -> int:
        """Number of partition groups, i.e. model replicas."""
        return self.world_size // self.partition_size

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @property
    def nodes_per_partition(self) -> int:
        """Nodes one partition group spans (1 when it fits in a node)."""
        return max(1, self.partition_size // self.ranks_per_node)

    @property
    def spans_nodes(self) -> bool:
        return self.partition_size > self.ranks_per_node

    # ------------------------------------------------------------------ rank maths
    def partition_index(self, rank: int) -> int:
        """Which partition group (= replica) ``rank`` belongs to."""
        return rank // self.partition_size

    def partition_rank(self, rank: int) -> int:
        """Position of ``rank`` inside its partition group (= which shard it holds)."""
        return rank % self.partition_size

    def node_index(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def partition_groups(self) -> list[list[int]]:
        p = self.partition_size
        return [list(range(i * p, (i + 1) * p)) for i in range(self.replication_size)]

    def replication_groups(self) -> list[list[int]]:
        p = self.partition_size
        return [list(range(j, self.world_size, p)) for j in range(p)]

    def sizes(self) -> dict[str, int]:
        """The sizes a checkpoint records about the layout it was saved under."""
        return {
            "partition_size": self.partition_size,
            "replication_size": self.replication_size,
            "ranks_per_node": self.ranks_per_node,
        }

    def describe(self) -> str:
        return (
            f"MiCS: {self.world_size} ranks = {self.num_nodes} nodes x {self.ranks_per_node}; "
            f"partition_size={self.partition_size} ({self.nodes_per_partition} node(s) per "
            f"partition), replication_size={self.replication_size}"
        )


def _is_positive_int(value: object) -> bool:
    # NOTE: bool is an int subclass; True must not silently mean 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------- node layout
def check_node_layout(node_ids: Sequence[str], ranks_per_node: int) -> None:
    """Check that the physical nodes match the logical layout.

    ``node_ids[r]`` is rank ``r``'s node identity. Every physical node must hold one
    contiguous block of ranks, all nodes the same number, and that number a multiple of
    ``ranks_per_node`` (a multiple, so that one big machine may emulate several small
    nodes). Raises :class:`MiCSTopologyError` naming the offending ranks.
    """
    if not node_ids:
        raise MiCSTopologyError("No node identities given: the process group has no ranks.")
    blocks: list[tuple[str, list[int]]] = []
    for rank, node in enumerate(node_ids):
        if blocks and blocks[-1][0] == node:
            blocks[-1][1].append(rank)
        else:
            blocks.append((node, [rank]))
    seen: dict[str, list[int]] = {}
    for node, ranks in blocks:
        if node in seen:
            raise MiCSTopologyError(
                f"Ranks are not node-contiguous: node {node!r} holds ranks {seen[node]} and "
                f"{ranks} with other nodes' ranks in between. MiCS needs each node's ranks "
                "to be consecutive so that partition groups stay inside nodes. Likely cause: "
                "a cyclic rank distribution (Slurm `--distribution=cyclic`); use "
                "`--distribution=block` or let torchrun / Lightning assign ranks per node."
            )
        seen[node] = ranks
    sizes = {node: len(ranks) for node, ranks in seen.items()}
    if len(set(sizes.values())) > 1:
        raise MiCSTopologyError(
            f"Nodes hold different numbers of ranks: {sizes}. MiCS needs nodes of equal size; "
            "launch the same number of processes on every node."
        )
    per_node = next(iter(sizes.values()))
    if per_node % ranks_per_node != 0:
        raise MiCSTopologyError(
            f"Each node runs {per_node} ranks but ranks_per_node={ranks_per_node}, which does "
            f"not divide it. Set ranks_per_node to {per_node} (or a divisor of it to emulate "
            "smaller nodes)."
        )


# ------------------------------------------------------------ hierarchical layout
def inter_node_groups(topology: MiCSTopology) -> list[list[int]]:
    """Ranks of each partition group that share a local index, one list per (partition
    group, local index): the ``nodes_per_partition`` participants of an inter-node stage.

    Rank ``i*p + m*k + l`` (partition ``i``, node ``m`` of it, local index ``l``) is in
    list ``i*k + l`` at position ``m``.
    """
    p, k, n = topology.partition_size, topology.ranks_per_node, topology.nodes_per_partition
    return [
        [i * p + m * k + local for m in range(n)]
        for i in range(topology.replication_size)
        for local in range(k)
    ]


def intra_node_groups(topology: MiCSTopology) -> list[list[int]]:
    """The ranks of each node, in rank order: the participants of an intra-node stage."""
    k = topology.ranks_per_node
    return [list(range(node * k, (node + 1) * k)) for node in range(topology.num_nodes)]


def _hierarchical_problem(topology: MiCSTopology) -> str | None:
    """Why hierarchical collectives cannot apply to ``topology`` (``None``: they can).

    They need a partition group that spans several whole nodes of more than one rank.
    """
    if not topology.spans_nodes:
        return (
            f"hierarchical=True needs a partition group that spans nodes, but "
            f"partition_size={topology.partition_size} fits in one node of "
            f"{topology.ranks_per_node} ranks: its collectives are already intra-node. "
            "Use hierarchical='auto' (or False), or a partition_size that is a multiple of "
            "ranks_per_node larger than it."
        )
    if topology.ranks_per_node == 1:
        return (
            "hierarchical=True needs nodes of several ranks, but ranks_per_node=1: there is "
            "no intra-node stage, the flat collectives already are the inter-node stage. "
            "Use hierarchical='auto' (or False), or set ranks_per_node."
        )
    return None


#: Largest buffer (bytes) of a hierarchical all-gather or reduce-scatter whose intra-node
#: stage runs as one collective (through a full-size temporary and one strided copy);
#: larger buffers run it as one collective per node of the partition (temporary: 1/k).
#: NOTE: below it the stage is latency-bound, so a call costs more than the copy (gloo,
#: 2 x 2 ranks on 2 cores: one call takes 0.4-0.75x the time of two at 0.4-0.8 MB
#: buffers, 0.85-1.3x at 1.6-4 MB), and the temporary stays small; above it the
#: transfer dominates and memory matters more. NCCL launches are cheaper, copies too.
BATCHED_INTRA_STAGE_MAX_BYTES = 1 << 20


def intra_stage_calls(buffer_bytes: float, nodes_per_partition: int) -> int:
    """Collectives that the intra-node stage of a hierarchical all-gather or
    reduce-scatter of ``buffer_bytes`` (the gathered / unreduced size) issues."""
    return 1 if buffer_bytes <= BATCHED_INTRA_STAGE_MAX_BYTES else nodes_per_partition


def staging_bytes(buffer_bytes: float, ranks_per_node: int, nodes_per_partition: int) -> float:
    """Temporary memory of one hierarchical all-gather or reduce-scatter of
    ``buffer_bytes``: the inter-node stage's ``1/k`` of it, plus a full-size buffer when
    the intra-node stage runs as one collective."""
    batched = intra_stage_calls(buffer_bytes, nodes_per_partition) == 1
    return buffer_bytes / ranks_per_node + (buffer_bytes if batched else 0.0)


def use_hierarchical(setting: Hierarchical, topology: MiCSTopology) -> bool:
    """Whether ``topology`` runs hierarchical collectives under ``MiCSConfig.hierarchical``
    = ``setting``: the one place where that option is decided.

    ``"auto"``: exactly when a partition group spans several nodes of more than one rank;
    ``True``: the same, and :class:`MiCSTopologyError` where it cannot apply; ``False``:
    never. Depends only on the global layout, never on the rank, so that every rank
    creates the same sub-groups or none.
    """
    if setting is False:
        return False
    problem = _hierarchical_problem(topology)
    if problem is not None and setting is True:
        raise MiCSTopologyError(problem)
    return problem is None


def check_hierarchical(topology: MiCSTopology) -> None:
    """Raise :class:`MiCSTopologyError` unless hierarchical collectives apply to
    ``topology`` (see :func:`use_hierarchical`)."""
    use_hierarchical(True, topology)
