"""`MiCSRuntime`: the state one MiCS run needs, shared by the Trainer and Fabric strategies.

It resolves the topology once the process group exists, checks the node layout, owns
the device mesh, and offers the per-step operations (shard, micro-step, clip, flush).
The Lightning adapters only translate their hooks into these calls.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightning_mics.config import MiCSConfig
from lightning_mics.grad_sync import flush_pending_gradients, micro_step
from lightning_mics.optim import clip_grad_norm_
from lightning_mics.sharding import apply_mics
from lightning_mics.topology import (
    MiCSTopology,
    MiCSTopologyError,
    build_device_mesh,
    check_hierarchical,
    verify_topology,
)

# NOTE: meshes are shared per layout for the life of the process. A sharded module keeps
# references to its mesh's process groups, and Lightning reuses one LightningModule
# across fit/validate/test (often across Trainers), so once a module is sharded on a mesh
# its groups must outlive the strategy: they are destroyed at exit (or by
# `destroy_meshes()`). A strategy destroys at teardown only a mesh it created and that no
# module was sharded on (e.g. a run that failed before sharding).
_MeshKey = tuple[str, int, int, int]
_MESHES: dict[_MeshKey, DeviceMesh] = {}


def _mesh_key(topology: MiCSTopology, device: torch.device) -> _MeshKey:
    return (device.type, topology.world_size, topology.partition_size, topology.ranks_per_node)


def get_device_mesh(topology: MiCSTopology, device: torch.device) -> DeviceMesh:
    """The mesh for ``topology`` on ``device.type``, created once per process."""
    key = _mesh_key(topology, device)
    if key not in _MESHES:
        if not _MESHES:
            # NOTE: exiting with live gloo subgroups can abort a rank (SIGABRT) while its
            # peers tear down; destroying them first is local and cheap.
            atexit.register(destroy_meshes)
        _MESHES[key] = build_device_mesh(topology, device)
    return _MESHES[key]


def destroy_meshes() -> None:
    """Destroy the process groups of every mesh MiCS created in this process.

    Local (no collective). Sharded modules built on those meshes are unusable afterwards.
    Runs at interpreter exit; call it earlier on every rank to free the groups sooner.
    """
    from lightning_mics.collectives import destroy_hierarchical_groups

    while _MESHES:
        _destroy_mesh_groups(_MESHES.popitem()[1])
    destroy_hierarchical_groups()


def _destroy_mesh_groups(mesh: DeviceMesh) -> None:
    if not dist.is_initialized():
        return
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        if group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)


def _sharded_mesh(module: nn.Module) -> DeviceMesh | None:
    for param in module.parameters():
        if isinstance(param, DTensor):
            return param.device_mesh
    return None


class MiCSRuntime:
    """Topology, mesh and per-step operations of one MiCS run."""

    def __init__(self, config: MiCSConfig) -> None:
        self.config = config
        self._topology: MiCSTopology | None = None
        self._mesh: DeviceMesh | None = None
        # The mesh key if this runtime created the mesh and no module was sharded on it.
        self._owned_mesh: _MeshKey | None = None

    @property
    def topology(self) -> MiCSTopology:
        if self._topology is None:
            raise RuntimeError("The MiCS topology is resolved once the processes are set up.")
        return self._topology

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("The MiCS device mesh is created once the processes are set up.")
        return self._mesh

    def resolve_topology(self, world_size: int, ranks_per_node: int) -> MiCSTopology:
        """Arithmetic check only (no communication): safe before the process group exists."""
        self._topology = MiCSTopology.create(
            world_size,
            self.config.ranks_per_node or ranks_per_node,
            self.config.partition_size,
        )
        if self.config.hierarchical is True:
            check_hierarchical(self._topology)
        return self._topology

    def setup(self, device: torch.device) -> DeviceMesh:
        """Collective: verify the node layout against the topology, then build the mesh."""
        verify_topology(self.topology)
        key = _mesh_key(self.topology, device)
        self._owned_mesh = None if key in _MESHES else key
        self._mesh = get_device_mesh(self.topology, device)
        return self._mesh

    def shard(self, module: nn.Module, device: torch.device) -> nn.Module:
        """Shard ``module`` on this run's mesh; a module sharded earlier (Lightning reuses
        modules across fit/validate/test) must have been sharded on an equal layout."""
        existing = _sharded_mesh(module)
        if existing is not None and existing != self.mesh:
            raise MiCSTopologyError(
                f"The model is already sharded on a mesh of layout {existing.mesh.tolist()} "
                f"but this run uses {self.mesh.mesh.tolist()} ({self.topology.describe()}). "
                "Re-create the model (or load it from a checkpoint) for the new layout."
            )
        self._owned_mesh = None  # the module now depends on the mesh's groups
        return apply_mics(module, self.topology, self.config, device=device, mesh=self.mesh)

    @contextmanager
    def micro_step(self, module: nn.Module, *, is_last: bool) -> Iterator[None]:
        with micro_step(module, is_last=is_last, mode=self.config.accumulation):
            yield

    def flush(self, module: nn.Module) -> bool:
        return flush_pending_gradients(module)

    @staticmethod
    def reshard(module: nn.Module) -> None:
        """Register every FSDP unit's sharded parameters again.

        NOTE: units that keep their parameters gathered after forward (the root, or all of
        them with ``reshard_after_forward=False``) expose unsharded tensors through
        ``module.parameters()`` until the next backward; an optimizer or a state dict
        created then would hold tensors FSDP overwrites at the next all-gather.
        """
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()

    def teardown(self) -> None:
        """Destroy the mesh's process groups if this runtime created them and no module
        was sharded on them. Local, identical on every rank."""
        if self._owned_mesh is not None:
            _destroy_mesh_groups(_MESHES.pop(self._owned_mesh))
            self._owned_mesh = None
        self._mesh = None

    def clip_grad_norm_(
        self, module: nn.Module, max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        return clip_grad_norm_(module.parameters(), max_norm, norm_type)
