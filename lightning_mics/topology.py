"""Partition / replication / node arithmetic for MiCS, its validation, and device meshes.

Ranks are laid out node-major: node ``n`` holds ranks ``[n*k, (n+1)*k)`` where ``k`` is
``ranks_per_node``. A *partition group* is ``partition_size`` consecutive ranks and holds
one full replica of the model states; a *replication group* is the ranks at the same
position of every partition group.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_mics import _fsdp_internals as _internals

PartitionSize = int | Literal["node"]

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
def local_node_id() -> str:
    """This rank's node identity: ``$LIGHTNING_MICS_NODE_ID`` or the hostname."""
    return os.environ.get(NODE_ID_ENV) or socket.gethostname()


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


def gather_node_ids(group: dist.ProcessGroup | None = None) -> list[str]:
    """All ranks' node identities, gathered once over ``group``."""
    ids: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(ids, local_node_id(), group=group)
    return [str(i) for i in ids]


def verify_topology(topology: MiCSTopology) -> None:
    """Collective: check the running process group against ``topology``.

    Every rank reaches the same verdict (they all see the same gathered list), so an
    error is raised on all ranks together and no later collective can hang.
    """
    world = dist.get_world_size()
    if world != topology.world_size:
        raise MiCSTopologyError(
            f"The process group has {world} ranks but the topology expects {topology.world_size}."
        )
    check_node_layout(gather_node_ids(), topology.ranks_per_node)


# ---------------------------------------------------------------------------- meshes
def default_group_timeout(device: torch.device) -> timedelta | None:
    """The timeout the default process group was created with (``None`` if unknown).

    NOTE: ``dist.new_group`` and ``init_device_mesh`` default to the backend's global
    timeout (30 minutes for gloo), not the default group's: MiCS's own groups pass this
    one on, so that a hung rank fails every collective within the configured timeout.
    Read through c10d internals (see :mod:`lightning_mics._fsdp_internals`).
    """
    return _internals.default_group_timeout(device)


def _default_comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _backend_options(device: torch.device) -> tuple[str, Any] | None:
    timeout = default_group_timeout(device)
    if timeout is None:
        return None
    backend = dist.get_backend()
    options = _internals.backend_options(backend, timeout)
    return None if options is None else (backend, options)


def build_device_mesh(topology: MiCSTopology, device: torch.device) -> DeviceMesh:
    """The ``("replicate", "shard")`` mesh, or a 1-D ``("shard",)`` one when R == 1.

    NOTE: ``init_device_mesh`` lays ranks out row-major, so row ``i`` is the partition
    group ``[i*p, (i+1)*p)``, exactly our layout. Ranks are never permuted here: DTensor
    shard offsets must agree with process-group ranks or checkpoints silently corrupt.
    A (1, p) mesh is avoided because FSDP would issue pointless size-1 all-reduces. The
    mesh's groups inherit the default group's timeout.
    """
    if topology.replication_size == 1:
        shape, names = (topology.partition_size,), (SHARD_DIM,)
    else:
        shape = (topology.replication_size, topology.partition_size)
        names = (REPLICATE_DIM, SHARD_DIM)
    options = _backend_options(device)
    override = {dim: options for dim in range(len(shape))} if options else None
    return init_device_mesh(device.type, shape, mesh_dim_names=names, backend_override=override)


# ------------------------------------------------------------ hierarchical sub-groups
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


def check_hierarchical(topology: MiCSTopology) -> None:
    """Raise :class:`MiCSTopologyError` unless a partition group spans several whole nodes
    of more than one rank, the only layout where hierarchical collectives mean anything."""
    if not topology.spans_nodes:
        raise MiCSTopologyError(
            f"hierarchical=True needs a partition group that spans nodes, but "
            f"partition_size={topology.partition_size} fits in one node of "
            f"{topology.ranks_per_node} ranks: its collectives are already intra-node. "
            "Use hierarchical='auto' (or False), or a partition_size that is a multiple of "
            "ranks_per_node larger than it."
        )
    if topology.ranks_per_node == 1:
        raise MiCSTopologyError(
            "hierarchical=True needs nodes of several ranks, but ranks_per_node=1: there is "
            "no intra-node stage, the flat collectives already are the inter-node stage. "
            "Use hierarchical='auto' (or False), or set ranks_per_node."
        )


@dataclass(frozen=True)
class HierarchicalGroups:
    """This rank's sub-groups of its partition group, for two-stage collectives.

    ``partition_ranks`` is this rank's partition group (global ranks, partition-rank
    order); ``inter`` holds the ranks of it with this rank's local index (one per node,
    node order), ``intra`` the ranks of this rank's node (local-index order). Ranks are
    never permuted: position in ``partition_ranks`` = node_in_partition * k + local.
    """

    topology: MiCSTopology
    partition_ranks: tuple[int, ...]
    inter: dist.ProcessGroup
    intra: dist.ProcessGroup

    @property
    def nodes_per_partition(self) -> int:
        return self.topology.nodes_per_partition

    @property
    def ranks_per_node(self) -> int:
        return self.topology.ranks_per_node


def new_hierarchical_groups(
    topology: MiCSTopology, backend: str | None = None
) -> HierarchicalGroups:
    """Collective over the whole world: create the inter- and intra-node sub-groups.

    Every rank calls ``dist.new_group`` for *every* sub-group, in the same order (inter
    groups first, then node groups), as ``new_group`` requires; a rank keeps the two it
    belongs to. Prefer :func:`lightning_mics.collectives.get_hierarchical_groups`, which
    caches the result per layout.
    """
    if dist.get_world_size() != topology.world_size:
        raise MiCSTopologyError(
            f"The process group has {dist.get_world_size()} ranks but the topology expects "
            f"{topology.world_size}."
        )
    rank = dist.get_rank()
    timeout = default_group_timeout(_default_comm_device())
    inter = intra = None
    for ranks in inter_node_groups(topology):
        group = dist.new_group(ranks, backend=backend, timeout=timeout)
        if rank in ranks:
            inter = group
    for ranks in intra_node_groups(topology):
        group = dist.new_group(ranks, backend=backend, timeout=timeout)
        if rank in ranks:
            intra = group
    assert inter is not None and intra is not None
    partition = topology.partition_groups()[topology.partition_index(rank)]
    return HierarchicalGroups(topology, tuple(partition), inter, intra)
