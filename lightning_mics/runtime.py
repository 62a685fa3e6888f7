"""`MiCSRuntime`: the state one MiCS run needs, shared by the Trainer and Fabric strategies.

It resolves the topology once the process group exists, checks the node layout, owns
the device mesh, and offers the per-step operations (shard, micro-step, flush, reshard).
The Lightning adapters only translate their hooks into these calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightning_mics import process_groups
from lightning_mics.config import MiCSConfig
from lightning_mics.grad_sync import flush_pending_gradients, micro_step
from lightning_mics.sharding import apply_mics
from lightning_mics.topology import MiCSTopology, MiCSTopologyError, use_hierarchical


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
        self._device: torch.device | None = None
        # Whether this runtime created the mesh and no module was sharded on it (see the
        # NOTE on lifetime in `lightning_mics.process_groups`).
        self._owns_mesh = False

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
        use_hierarchical(self.config.hierarchical, self._topology)  # raises if impossible
        return self._topology

    def setup(self, device: torch.device) -> DeviceMesh:
        """Collective: verify the node layout against the topology, then build the mesh."""
        process_groups.verify_topology(self.topology)
        self._owns_mesh = not process_groups.has_device_mesh(self.topology, device)
        self._device = device
        self._mesh = process_groups.get_device_mesh(self.topology, device)
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
        self._owns_mesh = False  # the module now depends on the mesh's groups
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
        if self._owns_mesh and self._device is not None:
            process_groups.destroy_device_mesh(self.topology, self._device)
            self._owns_mesh = False
        self._mesh = None
