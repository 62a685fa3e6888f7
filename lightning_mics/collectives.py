"""Hierarchical parameter all-gather and gradient reduce-scatter as FSDP2 comm hooks.

When a partition group of ``p`` ranks spans ``n = p / k`` nodes of ``k`` ranks, MiCS
splits each partition-group collective in two stages (MiCS paper, Sec. 3.3):

- all-gather: an *inter-node* all-gather among the ``n`` ranks of the partition that
  share a local index (all ``k`` local indices in parallel), then an *intra-node*
  all-gather, written straight into partition-rank order;
- reduce-scatter (not in the paper or DeepSpeed): an intra-node reduce-scatter, then an
  inter-node one among the ranks with the same local index.

Each node then receives every other node's data once (``(p-k)/p`` of a full buffer per
node instead of a flat ring's ``(p-1)/p``), and each inter-node collective has ``n``
participants instead of ``p``.

Partition rank ``j = m*k + l`` is local index ``l`` on node ``m`` of the partition; FSDP's
buffers are rank-major, ``p`` equal chunks of ``c`` elements (padding included).

FSDP2 contract (torch 2.13, ``_fsdp_collectives.py``) that these objects follow:
``set_custom_all_gather`` / ``set_custom_reduce_scatter`` act on one FSDP module only
(install on every module); the all-gather ``input_tensor`` is a view *into*
``output_tensor`` (chunk ``j`` of it); the dtype may be ``uint8`` (mixed-dtype parameter
groups are gathered as bytes), so nothing here depends on the dtype; the group FSDP
passes may be the smaller post-forward group when ``reshard_after_forward`` is an int,
and then the flat collective runs; a returned object that is not a ``dist.Work`` is
never waited on, so the stages run synchronously (stream-ordered on accelerators) and
``None`` is returned.

NOTE (streams): FSDP calls the comm inside its all-gather / reduce-scatter stream; each
stage is a blocking-style (``async_op=False``) collective, which on NCCL makes that
stream wait for the collective, so the stages, the stage buffer's reuse by the caching
allocator and FSDP's completion event are all ordered on that stream.

Accounting: with a `CommStats` attached (``attach_stats``, done by
`~lightning_mics.accounting.install_comm_stats`), every stage is recorded on its own,
with its own buffer's logical bytes and the reach of its own group. Per all-gather of
a ``p*c`` buffer: one inter-node entry of ``n*c`` bytes (``1/k`` of the flat figure,
which counts the whole buffer as inter-node) and ``n`` intra-node entries of ``k*c``;
reduce-scatters mirror this. Of an inter-node entry, ``(n-1)/n`` arrives from other
nodes, so a node of ``k`` ranks takes in ``(p-k)*c``: the ``(p-k)/p`` of the paper.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from lightning_mics._fsdp_internals import AllGather, ReduceScatter
from lightning_mics.topology import HierarchicalGroups, MiCSTopology, new_hierarchical_groups

# NOTE: `all_gather_into_tensor` / `reduce_scatter_tensor` are deprecated in favour of the
# `*_single` names (what FSDP's defaults call); fall back on torch versions without them.
# Looked up on every call, as FSDP does, so that wrappers of `torch.distributed`
# functions (profilers, the tests' collective counters) see every stage.
_AG_NAME = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
_RS_NAME = (
    "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
)


def _all_gather_single(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> Any:
    return getattr(dist, _AG_NAME)(output, input, **kwargs)


def _reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> Any:
    return getattr(dist, _RS_NAME)(output, input, **kwargs)


# ------------------------------------------------------------------- group cache
# NOTE: like the meshes in `runtime`, sub-groups are created once per layout and kept
# for the life of the process: sharded modules hold on to their comm objects.
_GROUPS: dict[tuple[str, int, int, int], HierarchicalGroups] = {}


def get_hierarchical_groups(
    topology: MiCSTopology, backend: str | None = None
) -> HierarchicalGroups:
    """Collective on first use per layout: this rank's inter-/intra-node sub-groups.

    Every rank must call it at the same point (``apply_mics`` does, right after
    ``fully_shard``, on every rank); later calls for the same layout are local.
    """
    key = (
        str(backend or dist.get_backend()),
        topology.world_size,
        topology.partition_size,
        topology.ranks_per_node,
    )
    groups = _GROUPS.get(key)
    if groups is None:
        if not _GROUPS:
            atexit.register(destroy_hierarchical_groups)
        groups = _GROUPS[key] = new_hierarchical_groups(topology, backend)
    return groups


def destroy_hierarchical_groups() -> None:
    """Destroy the sub-groups created by :func:`get_hierarchical_groups` (local)."""
    while _GROUPS:
        _, groups = _GROUPS.popitem()
        if not dist.is_initialized():
            continue
        for group in (groups.inter, groups.intra):
            # NOTE: already gone when the default group was destroyed first
            with contextlib.suppress(ValueError, RuntimeError):
                dist.destroy_process_group(group)


# -------------------------------------------------------------------- helpers
def _stage_ops(op: Any, backend: str) -> tuple[Any, Any, bool]:
    """Reduce ops of the (first, second) reduce-scatter stage, and whether the result
    must still be divided by the partition size.

    ``SUM``/``MIN``/``MAX``/``PRODUCT`` compose stage by stage. ``AVG`` over ``k`` then
    over ``n`` is the average over ``p``; gloo has no ``AVG``, so there it becomes ``SUM``
    twice and one division by ``p``.
    ``PREMUL_SUM(f)`` scales every input once: in the first stage only, the second sums.
    """
    if op == ReduceOp.PREMUL_SUM:
        return op, ReduceOp.SUM, False
    if op == ReduceOp.AVG and "gloo" in backend:
        return ReduceOp.SUM, ReduceOp.SUM, True
    return op, op, False


class _Recorder:
    """Optional per-sub-collective recording into a `CommStats` (see `accounting`)."""

    stats: Any = None  # lightning_mics.accounting.CommStats | None

    def attach_stats(self, stats: Any) -> None:
        """Record every collective issued from now on into ``stats``: each stage with its
        own buffer's logical bytes, classified intra- or inter-node by its group."""
        self.stats = stats

    def _record(self, kind: str, tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
        if self.stats is not None:
            self.stats.record(kind, tensor.numel() * tensor.element_size(), group)


class _HierarchicalComm(_Recorder):
    def __init__(self, groups: HierarchicalGroups) -> None:
        self.groups = groups
        self.n = groups.nodes_per_partition
        self.k = groups.ranks_per_node
        self.p = self.n * self.k
        self._backend = str(dist.get_backend(groups.intra))
        # id(group) -> (group, is this rank's partition group); the group is kept alive
        # so that its id cannot be reused by another group.
        self._is_partition: dict[int, tuple[dist.ProcessGroup, bool]] = {}
        #: Calls that ran the flat collective (a group other than the partition group).
        self.flat_calls = 0

    def is_partition_group(self, group: dist.ProcessGroup) -> bool:
        """Whether ``group`` is this rank's whole partition group (else: flat path)."""
        cached = self._is_partition.get(id(group))
        if cached is None:
            ranks = tuple(dist.get_process_group_ranks(group))
            cached = (group, ranks == self.groups.partition_ranks)
            self._is_partition[id(group)] = cached
        return cached[1]

    def allocate(
        self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class HierarchicalAllGather(_HierarchicalComm, AllGather):
    """Two-stage all-gather over a partition group that spans nodes.

    Stage 1 (inter-node): rank ``(m, l)`` gathers chunk ``(m', l)`` of every node ``m'``
    of its partition from the ``n`` ranks with local index ``l`` into a small buffer
    ``stage[m']``. Stage 2 (intra-node): for each node ``m'``, the ``k`` ranks of this node
    all-gather ``stage[m']`` straight into the output slots ``[m'*k, (m'+1)*k)``, which
    are contiguous and already in partition-rank order, so no reorder pass is needed.

    NOTE (memory): the only temporary is ``stage``, ``n * c`` elements (``c`` = chunk,
    ``n`` = nodes per partition), i.e. ``1/k`` of the gathered size. The alternative, one
    intra-node all-gather of the whole ``stage`` into a ``[k][n]``-ordered buffer, needs a
    full-size temporary plus a transposing copy; the price here is ``n`` intra-node calls
    of ``k*c`` elements instead of one of ``p*c`` (same bytes, ``n-1`` more launches).
    Gathering intra-node first would not help: every rank would then have to fetch every
    other node's data itself, ``k`` times the inter-node traffic.
    """

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        if not self.is_partition_group(group):
            # e.g. the post-forward group of an int reshard_after_forward
            self.flat_calls += 1
            self._record("all_gather", output_tensor, group)
            return _all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)
        chunk = input_tensor.numel()
        if output_tensor.numel() != chunk * self.p:
            raise ValueError(
                f"All-gather output has {output_tensor.numel()} elements, expected "
                f"{self.p} x {chunk} (partition size x input)."
            )
        if chunk == 0:  # same on every rank: no rank communicates
            return None
        out = output_tensor.view(self.n, self.k * chunk)
        stage = torch.empty(self.n * chunk, dtype=input_tensor.dtype, device=input_tensor.device)
        inter, intra = self.groups.inter, self.groups.intra
        # NOTE: input_tensor is a view into output_tensor; the stages only read it before
        # any write to its slot (stage 1 writes `stage`; stage 2 rewrites the slot with
        # the same values, since stage[m] == input for this rank's own node m).
        self._record("all_gather", stage, inter)
        _all_gather_single(stage, input_tensor, group=inter)
        stage = stage.view(self.n, chunk)
        for node in range(self.n):
            self._record("all_gather", out[node], intra)
            _all_gather_single(out[node], stage[node], group=intra)
        return None


class HierarchicalReduceScatter(_HierarchicalComm, ReduceScatter):
    """Two-stage reduce-scatter over a partition group that spans nodes.

    Stage 1 (intra-node): for each node ``m'`` of the partition, the ``k`` ranks of this
    node reduce-scatter input slots ``[m'*k, (m'+1)*k)`` (contiguous, rank-major over the
    local index), so rank ``(m, l)`` holds its node's partial sum of chunk ``(m', l)`` in
    ``stage[m']``. Stage 2 (inter-node): the ``n`` ranks with local index ``l``
    reduce-scatter ``stage`` (rank-major over the node) into the output.

    NOTE (memory): one temporary of ``n * c`` elements, as in `HierarchicalAllGather`.
    The reduce op is split across the stages by `_stage_ops` (``PREMUL_SUM`` scales
    once, ``AVG`` averages twice or, on gloo, sums twice and divides once). The sums are
    grouped differently from a flat reduce-scatter, so floating-point results can differ
    in the last bits.
    """

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> dist.Work | None:
        if not self.is_partition_group(group):
            self.flat_calls += 1
            self._record("reduce_scatter", input_tensor, group)
            return _reduce_scatter_single(
                output_tensor, input_tensor, op=op, group=group, async_op=async_op
            )
        chunk = output_tensor.numel()
        if input_tensor.numel() != chunk * self.p:
            raise ValueError(
                f"Reduce-scatter input has {input_tensor.numel()} elements, expected "
                f"{self.p} x {chunk} (partition size x output)."
            )
        if chunk == 0:
            return None
        first_op, second_op, divide = _stage_ops(op, self._backend)
        inp = input_tensor.view(self.n, self.k * chunk)
        stage = torch.empty(self.n, chunk, dtype=output_tensor.dtype, device=output_tensor.device)
        inter, intra = self.groups.inter, self.groups.intra
        for node in range(self.n):
            self._record("reduce_scatter", inp[node], intra)
            _reduce_scatter_single(stage[node], inp[node], op=first_op, group=intra)
        stage = stage.view(-1)
        self._record("reduce_scatter", stage, inter)
        _reduce_scatter_single(output_tensor, stage, op=second_op, group=inter)
        if divide:
            output_tensor.div_(self.p)
        return None


def hierarchical_comms(
    topology: MiCSTopology, backend: str | None = None
) -> tuple[HierarchicalAllGather, HierarchicalReduceScatter]:
    """Collective on first use per layout: a hierarchical all-gather and reduce-scatter
    for ``topology`` (partition groups must span nodes)."""
    groups = get_hierarchical_groups(topology, backend)
    return HierarchicalAllGather(groups), HierarchicalReduceScatter(groups)


__all__ = [
    "HierarchicalAllGather",
    "HierarchicalReduceScatter",
    "destroy_hierarchical_groups",
    "get_hierarchical_groups",
    "hierarchical_comms",
]
