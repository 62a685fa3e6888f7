"""`apply_mics`: shard a model over MiCS partition groups with FSDP2 ``fully_shard``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from lightning_mics import _fsdp_internals
from lightning_mics.accounting import CommStats, install_comm_stats, node_map_for_mesh
from lightning_mics.collectives import (
    HierarchicalAllGather,
    HierarchicalReduceScatter,
    hierarchical_comms,
)
from lightning_mics.config import MiCSConfig, WrapPolicy
from lightning_mics.meta_init import MetaInitError, materialize_meta_module, post_order
from lightning_mics.topology import (
    REPLICATE_DIM,
    MiCSTopology,
    MiCSTopologyError,
    build_device_mesh,
    check_hierarchical,
    gather_node_ids,
    verify_topology,
)


def apply_mics(
    model: nn.Module,
    topology: MiCSTopology | DeviceMesh,
    config: MiCSConfig | None = None,
    *,
    device: torch.device | None = None,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Shard ``model`` in place with MiCS and return it.

    ``fully_shard`` is applied to every module that ``config.wrap_policy`` selects, then
    to ``model`` itself (the root). ``topology`` is either a :class:`MiCSTopology` (the
    mesh is built here, after checking the node layout) or a ready ``("replicate",
    "shard")`` / ``("shard",)`` :class:`DeviceMesh`. With a :class:`MiCSTopology`, ``mesh``
    may pass its ready mesh (built and verified earlier), which is then used as is.
    Idempotent: a model that is already sharded is returned unchanged.

    Unless ``config.comm_stats`` is off, every collective of the sharded model is
    recorded (see :mod:`lightning_mics.accounting`; read it with ``comm_stats(model)``).

    With ``config.hierarchical`` on (by default: when a partition group spans nodes),
    every FSDP module all-gathers and reduce-scatters in an inter- and an intra-node
    stage (:mod:`lightning_mics.collectives`).

    Modules are sharded bottom-up (a selected module's selected descendants first), as
    FSDP2 requires for nested units (e.g. a block holding a ``ModuleList`` of experts).

    A model created on the meta device is materialised on ``device`` after sharding (each
    rank allocates only its shards) and initialised by each module's
    ``reset_parameters()``, the model's own ``_init_weights(module)`` /
    ``init_weights()``, and ``config.init_fn``; a meta tensor that none of them wrote
    raises a :class:`~lightning_mics.meta_init.MetaInitError` on every rank (see
    :mod:`lightning_mics.meta_init`).
    """
    config = config or MiCSConfig()
    if isinstance(model, FSDPModule):
        return model
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError(
            "Part of the model is already sharded with fully_shard but its root is not. "
            "Either shard the whole model yourself (and let MiCS leave it) or none of it."
        )
    if device is None:
        device = _infer_device(model)
    if isinstance(topology, MiCSTopology):
        if mesh is None:
            verify_topology(topology)
            mesh = build_device_mesh(topology, device)
    else:
        mesh = topology
        topology = None
    # NOTE: decided (and the sub-groups created, collectively) before the model is
    # touched, so that an impossible hierarchical=True leaves it unsharded.
    comms = _hierarchical_comms(config, topology, mesh)

    mp_policy = MixedPrecisionPolicy(
        param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype
    )
    offload_policy: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=device.type == "cuda")
        if config.cpu_offload
        else OffloadPolicy()
    )
    should_wrap = _wrap_predicate(config.wrap_policy, model)
    # NOTE: post-order (children before parents): `fully_shard` on a parent takes every
    # parameter below it that no unit owns yet, so a child sharded after its parent would
    # be sharded twice and crash at the first forward.
    blocks = [m for m in post_order(model) if m is not model and should_wrap(m)]
    if config.activation_checkpointing:
        apply_activation_checkpointing(_outermost(model, blocks))
    common = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    for block in blocks:
        fully_shard(block, reshard_after_forward=config.reshard_after_forward, **common)
    # NOTE: the root's parameters (embeddings, head) are needed again right at the start
    # of backward, so torchtitan-style we keep them gathered after forward.
    fully_shard(model, reshard_after_forward=False, **common)
    _use_sum_reductions_if_needed(model, mesh)
    all_gather, reduce_scatter = comms or (None, None)
    if config.comm_stats:
        install_comm_stats(
            model,
            _new_comm_stats(topology, mesh, config.ranks_per_node),
            mesh.get_group(0) if mesh.ndim == 2 else None,  # FSDP: dim 0 replicates
            all_gather=all_gather,
            reduce_scatter=reduce_scatter,
        )
    elif comms is not None:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # NOTE: the setters act on this module's own parameter group only.
                module.set_custom_all_gather(all_gather)
                module.set_custom_reduce_scatter(reduce_scatter)

    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        materialize_meta_module(
            model,
            device,
            config.init_fn,
            group=_flat_group(mesh),
            param_device=torch.device("cpu") if config.cpu_offload else device,
        )
    if config.sync_replicas:
        sync_replicas(model, mesh)
    return model


def _hierarchical_comms(
    config: MiCSConfig, topology: MiCSTopology | None, mesh: DeviceMesh
) -> tuple[HierarchicalAllGather, HierarchicalReduceScatter] | None:
    """The hierarchical comms that ``config.hierarchical`` asks for, or ``None`` (flat).

    Collective when it returns comms (the sub-groups are created on first use per
    layout). The decision depends only on the config and the global layout, never on
    the rank, so every rank creates the same groups in the same order or none.
    """
    wanted = config.hierarchical
    if wanted is False:
        return None
    forced = wanted is True
    if topology is None:
        topology = _topology_of_mesh(mesh, config.ranks_per_node, forced)
        if topology is None:
            return None
    if forced:
        check_hierarchical(topology)
    elif not (topology.spans_nodes and topology.ranks_per_node > 1):
        return None  # NOTE: the same answer as check_hierarchical, without raising
    return hierarchical_comms(topology)


def _topology_of_mesh(
    mesh: DeviceMesh, ranks_per_node: int | None, forced: bool
) -> MiCSTopology | None:
    """The node-major topology a ready-made mesh follows, or ``None`` (raising instead
    when hierarchical collectives are forced on) when it cannot be known."""
    world = dist.get_world_size()
    partition = mesh.size(mesh.ndim - 1)
    problem = None
    if ranks_per_node is None:
        problem = (
            "the ranks per node are unknown for a ready-made mesh: pass "
            "MiCSConfig(ranks_per_node=...)"
        )
    elif mesh.mesh.numel() != world or mesh.mesh.flatten().tolist() != list(range(world)):
        # NOTE: `mesh.mesh` is the global layout, the same on every rank.
        problem = (
            "the mesh is not the node-major layout of the whole world (rows of "
            "consecutive ranks); build it with lightning_mics.build_device_mesh"
        )
    else:
        try:
            return MiCSTopology.create(world, ranks_per_node, partition)
        except MiCSTopologyError as err:
            problem = str(err)
    if forced:
        raise MiCSTopologyError(f"hierarchical=True is impossible here: {problem}.")
    return None


def _new_comm_stats(
    topology: MiCSTopology | None, mesh: DeviceMesh, ranks_per_node: int | None
) -> CommStats:
    """A recorder that knows every rank's node: from the topology (node-major layout) or,
    for a bare mesh, from ``ranks_per_node`` or the physical node ids of the mesh's ranks
    (a collective over the mesh)."""
    if topology is not None:
        return CommStats.for_ranks_per_node(topology.world_size, topology.ranks_per_node)
    if ranks_per_node is not None:
        return CommStats.for_ranks_per_node(dist.get_world_size(), ranks_per_node)
    group = _flat_group(mesh)
    return CommStats(node_map_for_mesh(group, gather_node_ids(group)))


def _infer_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def _wrap_predicate(policy: WrapPolicy, model: nn.Module) -> Callable[[nn.Module], bool]:
    if policy is None:
        # Default: the repeated blocks of the model, i.e. the children of every ModuleList.
        blocks = {
            id(child)
            for module in model.modules()
            if isinstance(module, nn.ModuleList)
            for child in module
        }
        return lambda module: id(module) in blocks
    if callable(policy) and not isinstance(policy, tuple | list | set | frozenset):
        return policy
    classes = tuple(policy)
    return lambda module: isinstance(module, classes)


def _outermost(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The blocks that no other block contains (in ``model``'s module order)."""
    selected = {id(b) for b in blocks}
    inner: set[int] = set()
    for block in blocks:
        inner.update(id(m) for m in block.modules() if m is not block and id(m) in selected)
    return [m for m in model.modules() if id(m) in selected and id(m) not in inner]


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in backward (composable, keeps FQNs intact).

    Pass blocks that do not contain one another: a nested block would be recomputed twice.
    """
    for block in blocks:
        _fsdp_internals.checkpoint_module(block)


def _use_sum_reductions_if_needed(model: nn.Module, mesh: DeviceMesh) -> None:
    # NOTE: gloo implements neither AVG nor PREMUL_SUM, which FSDP picks by default for
    # fp32/bf16 gradients; with sum-only reductions FSDP divides by the data-parallel
    # size itself after the reduction, which is exactly equivalent.
    if dist.get_backend(mesh.get_group(mesh.mesh_dim_names[-1])) == "gloo":
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def sync_replicas(model: nn.Module, mesh: DeviceMesh) -> None:
    """Make all replicas identical: replica 0's shards and buffers win.

    FSDP2 has no ``sync_module_states``; ranks seeded differently would otherwise train
    diverging replicas. Shards are broadcast along the replication group only (each
    rank sends or receives ``1/partition_size`` of the model); buffers, which are not
    sharded, are broadcast over the whole mesh.
    """
    if mesh.ndim == 2:
        group = mesh.get_group(REPLICATE_DIM)
        for param in model.parameters():
            local = param.to_local() if isinstance(param, DTensor) else param.data
            _broadcast_inplace(local, group)
    world = _flat_group(mesh)
    for buffer in model.buffers():
        _broadcast_inplace(buffer.data, world)


def _flat_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    return _fsdp_internals.flat_group(mesh)


def _broadcast_inplace(tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
    comm_device = _comm_device(group)
    if tensor.device == comm_device:
        dist.broadcast(tensor, group=group, group_src=0)
    else:  # e.g. CPU-offloaded shards with an NCCL group
        staged = tensor.to(comm_device)
        dist.broadcast(staged, group=group, group_src=0)
        tensor.copy_(staged)


def _comm_device(group: dist.ProcessGroup) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = [
    "MetaInitError",
    "apply_activation_checkpointing",
    "apply_mics",
    "materialize_meta_module",
    "sync_replicas",
]
