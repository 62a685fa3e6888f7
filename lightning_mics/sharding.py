"""`apply_mics`: shard a model over MiCS partition groups with FSDP2 ``fully_shard``.

`apply_mics` is the list of its steps, each a function of a module, a mesh (or
topology) and plain arguments that can be read, tested and reused alone:

1. :func:`resolve_layout`: the topology, its mesh, and whether collectives are
   hierarchical (decided once, by :func:`~lightning_mics.topology.use_hierarchical`);
2. :func:`select_blocks`: the modules that become FSDP units;
3. :func:`apply_activation_checkpointing` on the outermost of them;
4. :func:`apply_fully_shard`: ``fully_shard`` on every unit (children first), then the root;
5. :func:`apply_comms`: the hierarchical comms and the recording of every collective;
6. :func:`apply_forward_prefetch` (opt-in): asynchronous unshard, one block ahead;
7. :func:`apply_meta_init`: a meta-device model materialised shard by shard;
8. :func:`sync_replicas`: replica 0's values copied to the other replicas.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

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
from lightning_mics.accounting import CommStats, install_comm_stats
from lightning_mics.collectives import (
    HierarchicalAllGather,
    HierarchicalReduceScatter,
    hierarchical_comms,
    install_comms,
)
from lightning_mics.config import MiCSConfig, WrapPolicy
from lightning_mics.meta_init import MetaInitError, materialize_meta_module, post_order
from lightning_mics.process_groups import (
    build_device_mesh,
    comm_device,
    physical_ranks_per_node,
    verify_topology,
)
from lightning_mics.topology import REPLICATE_DIM, MiCSTopology, MiCSTopologyError, use_hierarchical

HierarchicalComms = tuple[HierarchicalAllGather, HierarchicalReduceScatter]


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
    "shard")`` / ``("shard",)`` :class:`DeviceMesh` laid out as
    :func:`~lightning_mics.build_device_mesh` lays one out (see :func:`resolve_layout`).
    With a :class:`MiCSTopology`, ``mesh`` may pass its ready mesh (built and verified
    earlier), which is then used as is. Idempotent: a model that is already sharded is
    returned unchanged.

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
    device = device or _infer_device(model)
    topology, mesh, hierarchical = resolve_layout(topology, config, device, mesh)
    # NOTE: the sub-groups are created (collectively) before the model is touched, so
    # that a failure leaves it unsharded.
    comms = hierarchical_comms(topology) if hierarchical else None
    blocks = select_blocks(model, config.wrap_policy)
    if config.activation_checkpointing:
        apply_activation_checkpointing(outermost(model, blocks))
    apply_fully_shard(model, blocks, mesh, config, device)
    apply_comms(model, topology, mesh, comms, record=config.comm_stats)
    if config.forward_prefetch:
        apply_forward_prefetch(model, outermost(model, blocks))
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):
        apply_meta_init(model, mesh, config, device)
    if config.sync_replicas:
        sync_replicas(model, mesh)
    return model


# ------------------------------------------------------------------------- the steps
def resolve_layout(
    layout: MiCSTopology | DeviceMesh,
    config: MiCSConfig,
    device: torch.device,
    mesh: DeviceMesh | None = None,
) -> tuple[MiCSTopology, DeviceMesh, bool]:
    """``(topology, mesh, hierarchical)`` of ``layout``: a topology (its mesh is ``mesh``
    or built here after checking the node layout, collectively) or a ready-made mesh
    (its topology is :meth:`MiCSTopology.from_mesh` on ``config.ranks_per_node`` nodes).

    A ready-made mesh without ``config.ranks_per_node`` leaves the nodes unknown:
    hierarchical collectives are then off (``hierarchical=True`` raises), and the
    communication statistics learn each rank's physical node (a collective over the mesh).
    Raises :class:`MiCSTopologyError` before the model is touched.
    """
    if isinstance(layout, MiCSTopology):
        if mesh is None:
            verify_topology(layout)
            mesh = build_device_mesh(layout, device)
        return layout, mesh, use_hierarchical(config.hierarchical, layout)
    mesh = layout
    nodes_known = config.ranks_per_node is not None
    if not nodes_known and config.hierarchical is True:
        raise MiCSTopologyError(
            "hierarchical=True is impossible here: the ranks per node are unknown for a "
            "ready-made mesh: pass MiCSConfig(ranks_per_node=...)."
        )
    if mesh.mesh.numel() != dist.get_world_size():
        # NOTE: `mesh.mesh` is the global layout, the same on every rank.
        raise MiCSTopologyError(
            f"The mesh holds {mesh.mesh.numel()} ranks but the process group has "
            f"{dist.get_world_size()}: MiCS shards over the whole world."
        )
    ranks_per_node = config.ranks_per_node or physical_ranks_per_node(
        _fsdp_internals.flat_group(mesh)
    )
    topology = MiCSTopology.from_mesh(mesh, ranks_per_node)
    return topology, mesh, nodes_known and use_hierarchical(config.hierarchical, topology)


def select_blocks(model: nn.Module, policy: WrapPolicy) -> list[nn.Module]:
    """The modules of ``model`` that become FSDP units, children before parents.

    NOTE: post-order: ``fully_shard`` on a parent takes every parameter below it that no
    unit owns yet, so a child sharded after its parent would be sharded twice and crash
    at the first forward.
    """
    should_wrap = _wrap_predicate(policy, model)
    return [m for m in post_order(model) if m is not model and should_wrap(m)]


def outermost(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
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


def apply_fully_shard(
    model: nn.Module,
    blocks: list[nn.Module],
    mesh: DeviceMesh,
    config: MiCSConfig,
    device: torch.device,
) -> None:
    """``fully_shard`` every block (in the given order), then ``model`` as the root, with
    the config's mixed precision, offload and ``reshard_after_forward``."""
    common = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(
            param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype
        ),
        offload_policy=(
            CPUOffloadPolicy(pin_memory=device.type == "cuda")
            if config.cpu_offload
            else OffloadPolicy()
        ),
    )
    for block in blocks:
        fully_shard(block, reshard_after_forward=config.reshard_after_forward, **common)
    # NOTE: the root's parameters (embeddings, head) are needed again right at the start
    # of backward, so torchtitan-style we keep them gathered after forward.
    fully_shard(model, reshard_after_forward=False, **common)
    # NOTE: gloo implements neither AVG nor PREMUL_SUM, which FSDP picks by default for
    # fp32/bf16 gradients; with sum-only reductions FSDP divides by the data-parallel
    # size itself after the reduction, which is exactly equivalent.
    if dist.get_backend(mesh.get_group(mesh.mesh_dim_names[-1])) == "gloo":
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)


def apply_comms(
    model: nn.Module,
    topology: MiCSTopology,
    mesh: DeviceMesh,
    comms: HierarchicalComms | None,
    *,
    record: bool,
) -> None:
    """Install the hierarchical ``comms`` (``None``: FSDP's flat collectives) on every
    FSDP module of the sharded ``model`` and, with ``record``, the recording of every
    collective into a `CommStats` that knows the nodes of ``topology``'s ranks."""
    all_gather, reduce_scatter = comms or (None, None)
    if not record:
        install_comms(model, all_gather, reduce_scatter)
        return
    install_comm_stats(
        model,
        CommStats.for_topology(topology),
        mesh.get_group(0) if mesh.ndim == 2 else None,  # FSDP: dim 0 replicates
        all_gather=all_gather,
        reduce_scatter=reduce_scatter,
    )


def apply_forward_prefetch(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Asynchronous unshard with explicit forward prefetching on the sharded ``model``:
    the root prefetches the first of ``blocks``, each block the next one (``blocks`` in
    the order forward runs them).

    NOTE: with ``async_op=True`` an all-gather returns at once and runs while the
    current block computes; FSDP waits for it in the prefetched block's pre-forward.
    Backward prefetching stays FSDP2's implicit one (by reverse post-forward order),
    which then is asynchronous too. A block that runs out of this order is still
    correct (its prefetched all-gather is waited for when it runs or at the end of
    backward); only the overlap is lost.
    """
    assert isinstance(model, FSDPModule)
    _fsdp_internals.set_unshard_async_op(model, True)
    sharded = [b for b in blocks if isinstance(b, FSDPModule)]
    for module, nxt in zip([model, *sharded], sharded, strict=False):
        module.set_modules_to_forward_prefetch([nxt])


def apply_meta_init(
    model: nn.Module, mesh: DeviceMesh, config: MiCSConfig, device: torch.device
) -> None:
    """Materialise the meta tensors of the sharded ``model`` on ``device`` (parameters in
    host memory with CPU offload) and initialise them (see :mod:`lightning_mics.meta_init`),
    with the same verdict on every rank of ``mesh``."""
    materialize_meta_module(
        model,
        device,
        config.init_fn,
        group=_fsdp_internals.flat_group(mesh),
        param_device=torch.device("cpu") if config.cpu_offload else device,
    )


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
    world = _fsdp_internals.flat_group(mesh)
    for buffer in model.buffers():
        _broadcast_inplace(buffer.data, world)


# ------------------------------------------------------------------------ helpers
def _infer_device(model: nn.Module) -> torch.device:
    for tensor in chain(model.parameters(), model.buffers()):
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


def _broadcast_inplace(tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
    device = comm_device(group)
    if tensor.device == device:
        dist.broadcast(tensor, group=group, group_src=0)
    else:  # e.g. CPU-offloaded shards with an NCCL group
        staged = tensor.to(device)
        dist.broadcast(staged, group=group, group_src=0)
        tensor.copy_(staged)


__all__ = [
    "MetaInitError",
    "apply_activation_checkpointing",
    "apply_comms",
    "apply_fully_shard",
    "apply_meta_init",
    "apply_mics",
    "materialize_meta_module",
    "outermost",
    "resolve_layout",
    "select_blocks",
    "sync_replicas",
]
