"""Every process group MiCS creates, the collectives that check the layout, and their lifetime.

- the node layout: every rank's node identity, gathered once and checked against a
  :class:`~lightning_mics.topology.MiCSTopology` before any other collective can hang;
- the device mesh of a topology (``("replicate", "shard")``, or 1-D ``("shard",)``);
- the inter- and intra-node sub-groups of hierarchical collectives;
- the two per-process caches of them (meshes per layout and device type, sub-groups per
  layout and backend), destroyed together by :func:`destroy_meshes`, once at exit.

NOTE (lifetime): a sharded module keeps references to its mesh's process groups and to
its comm objects' sub-groups, and Lightning reuses one LightningModule across
fit/validate/test (often across Trainers), so once a module is sharded on them the
groups must outlive the strategy: they live until exit (or ``destroy_meshes()``). A
strategy destroys at teardown only a mesh it created and that no module was sharded on
(e.g. a run that failed before sharding), see :func:`destroy_device_mesh`.

MiCS's own groups inherit the default group's timeout (``dist.new_group`` and
``init_device_mesh`` default to the backend's global timeout, 30 minutes for gloo), so
that a hung rank fails every collective within the configured timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_mics import _fsdp_internals
from lightning_mics.topology import (
    NODE_ID_ENV,
    REPLICATE_DIM,
    SHARD_DIM,
    MiCSTopology,
    MiCSTopologyError,
    check_node_layout,
    inter_node_groups,
    intra_node_groups,
)


# ------------------------------------------------------------------------ helpers
def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors of a collective over ``group`` (default: the world) must live:
    this rank's current GPU on NCCL, host memory otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_flag(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Collective: ``True`` on every rank if ``flag`` is ``True`` on any rank (``flag``
    itself without a process group)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device=comm_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())


# ---------------------------------------------------------------------- node layout
def local_node_id() -> str:
    """This rank's node identity: ``$LIGHTNING_MICS_NODE_ID`` or the hostname."""
    return os.environ.get(NODE_ID_ENV) or socket.gethostname()


def gather_node_ids(group: dist.ProcessGroup | None = None) -> list[str]:
    """Collective: all ranks' node identities over ``group``, in group-rank order."""
    ids: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(ids, local_node_id(), group=group)
    return [str(i) for i in ids]


def verify_topology(topology: MiCSTopology) -> None:
    """Collective: check the running process group against ``topology``.

    Every rank reaches the same verdict (they all see the same gathered list), so an
    error is raised on all ranks together and no later collective can hang.
    """
    _check_world(topology)
    check_node_layout(gather_node_ids(), topology.ranks_per_node)


def physical_ranks_per_node(group: dist.ProcessGroup) -> int:
    """Collective over ``group``: the ranks each physical node runs, checked to be
    node-contiguous and equal on every node (:class:`MiCSTopologyError` otherwise)."""
    node_ids = gather_node_ids(group)
    check_node_layout(node_ids, 1)
    return node_ids.count(node_ids[0])


def _check_world(topology: MiCSTopology) -> None:
    world = dist.get_world_size()
    if world != topology.world_size:
        raise MiCSTopologyError(
            f"The process group has {world} ranks but the topology expects {topology.world_size}."
        )


# ---------------------------------------------------------------------------- meshes
def _group_options(device: torch.device) -> tuple[str, Any] | None:
    """(backend, options carrying the default group's timeout), or ``None`` if unknown."""
    timeout = _fsdp_internals.default_group_timeout(device)
    if timeout is None:
        return None
    backend = dist.get_backend()
    options = _fsdp_internals.backend_options(backend, timeout)
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
    options = _group_options(device)
    override = {dim: options for dim in range(len(shape))} if options else None
    return init_device_mesh(device.type, shape, mesh_dim_names=names, backend_override=override)


# ------------------------------------------------------------ hierarchical sub-groups
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
    belongs to. Prefer :func:`get_hierarchical_groups`, which caches the result.
    """
    _check_world(topology)
    rank = dist.get_rank()
    timeout = _fsdp_internals.default_group_timeout(comm_device())
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


# ------------------------------------------------------------- the process's caches
_Layout = tuple[str, int, int, int]
_MESHES: dict[_Layout, DeviceMesh] = {}
_GROUPS: dict[_Layout, HierarchicalGroups] = {}
_registered_at_exit = False


def _key(kind: str, topology: MiCSTopology) -> _Layout:
    return (kind, topology.world_size, topology.partition_size, topology.ranks_per_node)


def _register_at_exit() -> None:
    # NOTE: exiting with live gloo subgroups can abort a rank (SIGABRT) while its peers
    # tear down; destroying them first is local and cheap.
    global _registered_at_exit
    if not _registered_at_exit:
        atexit.register(destroy_meshes)
        _registered_at_exit = True


def has_device_mesh(topology: MiCSTopology, device: torch.device) -> bool:
    """Whether :func:`get_device_mesh` already created this mesh in this process."""
    return _key(device.type, topology) in _MESHES


def get_device_mesh(topology: MiCSTopology, device: torch.device) -> DeviceMesh:
    """Collective on first use: the mesh of ``topology`` on ``device.type``, created once
    per process and shared (see the NOTE on lifetime above)."""
    key = _key(device.type, topology)
    if key not in _MESHES:
        _register_at_exit()
        _MESHES[key] = build_device_mesh(topology, device)
    return _MESHES[key]


def get_hierarchical_groups(
    topology: MiCSTopology, backend: str | None = None
) -> HierarchicalGroups:
    """Collective on first use per layout: this rank's inter-/intra-node sub-groups.

    Every rank must call it at the same point (``apply_mics`` does, before sharding, on
    every rank); later calls for the same layout are local.
    """
    key = _key(str(backend or dist.get_backend()), topology)
    if key not in _GROUPS:
        _register_at_exit()
        _GROUPS[key] = new_hierarchical_groups(topology, backend)
    return _GROUPS[key]


def destroy_device_mesh(topology: MiCSTopology, device: torch.device) -> None:
    """Destroy the groups of one cached mesh (local; nothing may be sharded on it)."""
    mesh = _MESHES.pop(_key(device.type, topology), None)
    if mesh is not None:
        _destroy_mesh_groups(mesh)


def destroy_meshes() -> None:
    """Destroy the process groups of every mesh and hierarchical sub-group MiCS created in
    this process.

    Local (no collective). Sharded modules built on those meshes are unusable afterwards.
    Runs at interpreter exit; call it earlier on every rank to free the groups sooner.
    """
    while _MESHES:
        _destroy_mesh_groups(_MESHES.popitem()[1])
    while _GROUPS:
        groups = _GROUPS.popitem()[1]
        for group in (groups.inter, groups.intra):
            _destroy_group(group)


def _destroy_mesh_groups(mesh: DeviceMesh) -> None:
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        if group is not dist.GroupMember.WORLD:
            _destroy_group(group)


def _destroy_group(group: dist.ProcessGroup) -> None:
    if not dist.is_initialized():
        return
    # NOTE: already gone when the default group was destroyed first
    with contextlib.suppress(ValueError, RuntimeError):
        dist.destroy_process_group(group)


__all__ = [
    "HierarchicalGroups",
    "all_reduce_flag",
    "build_device_mesh",
    "comm_device",
    "destroy_device_mesh",
    "destroy_meshes",
    "gather_node_ids",
    "get_device_mesh",
    "get_hierarchical_groups",
    "has_device_mesh",
    "local_node_id",
    "new_hierarchical_groups",
    "physical_ranks_per_node",
    "verify_topology",
]
