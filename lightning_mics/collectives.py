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

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ReduceOp
from torch.distributed.fsdp import FSDPModule

from lightning_mics._fsdp_internals import AllGather, ReduceScatter
from lightning_mics.process_groups import HierarchicalGroups, get_hierarchical_groups
from lightning_mics.topology import MiCSTopology

# NOTE: `all_gather_into_tensor` / `reduce_scatter_tensor` are deprecated in favour of the
# `*_single` names (what FSDP's defaults call); fall back on torch versions without them.
# Looked up on every call, as FSDP does, so that wrappers of `torch.distributed`
# functions (profilers, the tests' collective counters) see every call.
_AG_NAME = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
_RS_NAME = (
    "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
)


def all_gather_single(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> Any:
    """``dist.all_gather_single`` (FSDP's default all-gather), looked up at call time."""
    return getattr(dist, _AG_NAME)(output, input, **kwargs)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> Any:
    """``dist.reduce_scatter_single`` (FSDP's default reduce-scatter), looked up at call
    time."""
    return getattr(dist, _RS_NAME)(output, input, **kwargs)


def install_comms(
    model: nn.Module, all_gather: AllGather | None, reduce_scatter: ReduceScatter | None
) -> None:
    """Make every FSDP module of ``model`` run these comms (``None``: FSDP's own).

    NOTE: ``set_custom_all_gather`` / ``set_custom_reduce_scatter`` act on one module's
    own parameter group only, so they are set on every FSDP module.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            if all_gather is not None:
                module.set_custom_all_gather(all_gather)
            if reduce_scatter is not None:
                module.set_custom_reduce_scatter(reduce_scatter)


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
    """Optional recording of every collective into a `CommStats` (see `accounting`)."""

    stats: Any = None  # lightning_mics.accounting.CommStats | None
    #: Calls that ran the flat collective.
    flat_calls = 0

    def attach_stats(self, stats: Any) -> None:
        """Record every collective issued from now on into ``stats``: each with its own
        buffer's logical bytes, classified intra- or inter-node by its group."""
        self.stats = stats

    def _record(self, kind: str, tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
        if self.stats is not None:
            self.stats.record(kind, tensor.numel() * tensor.element_size(), group)

    def in_stages(self, group: dist.ProcessGroup) -> bool:
        """Whether a collective over ``group`` runs in stages (else: flat)."""
        return False

    def allocate(
        self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class RecordingAllGather(_Recorder, AllGather):
    """FSDP's flat all-gather, recorded once a `CommStats` is attached.

    Issues the collective FSDP's ``DefaultAllGather`` does (``dist.all_gather_single``
    with the same ``async_op``) and returns its result unchanged. Records the output
    buffer's bytes over the group FSDP passes, which is the smaller post-forward group
    when ``reshard_after_forward`` is an int. `HierarchicalAllGather` runs its stages
    instead over a partition group that spans nodes, each recorded on its own.
    """

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        if self.in_stages(group):
            return self.gather_in_stages(output_tensor, input_tensor)
        self.flat_calls += 1
        self._record("all_gather", output_tensor, group)
        return all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)

    def gather_in_stages(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor) -> None:
        raise NotImplementedError


class RecordingReduceScatter(_Recorder, ReduceScatter):
    """FSDP's flat reduce-scatter (``dist.reduce_scatter_single``), recorded by its
    input buffer's bytes once a `CommStats` is attached; `HierarchicalReduceScatter`
    runs its stages instead over a partition group that spans nodes."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> dist.Work | None:
        if self.in_stages(group):
            return self.reduce_in_stages(output_tensor, input_tensor, op)
        self.flat_calls += 1
        self._record("reduce_scatter", input_tensor, group)
        return reduce_scatter_single(
            output_tensor, input_tensor, op=op, group=group, async_op=async_op
        )

    def reduce_in_stages(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, op: Any
    ) -> None:
        raise NotImplementedError


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
        self.flat_calls = 0

    def in_stages(self, group: dist.ProcessGroup) -> bool:
        """Whether ``group`` is this rank's whole partition group (else: flat path, e.g.
        the post-forward group of an int ``reshard_after_forward``)."""
        cached = self._is_partition.get(id(group))
        if cached is None:
            ranks = tuple(dist.get_process_group_ranks(group))
            cached = (group, ranks == self.groups.partition_ranks)
            self._is_partition[id(group)] = cached
        return cached[1]


class HierarchicalAllGather(_HierarchicalComm, RecordingAllGather):
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

    def gather_in_stages(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor) -> None:
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
        all_gather_single(stage, input_tensor, group=inter)
        stage = stage.view(self.n, chunk)
        for node in range(self.n):
            self._record("all_gather", out[node], intra)
            all_gather_single(out[node], stage[node], group=intra)
        return None


class HierarchicalReduceScatter(_HierarchicalComm, RecordingReduceScatter):
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

    def reduce_in_stages(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, op: Any
    ) -> None:
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
            reduce_scatter_single(stage[node], inp[node], op=first_op, group=intra)
        stage = stage.view(-1)
        self._record("reduce_scatter", stage, inter)
        reduce_scatter_single(output_tensor, stage, op=second_op, group=inter)
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
    "RecordingAllGather",
    "RecordingReduceScatter",
    "all_gather_single",
    "hierarchical_comms",
    "install_comms",
    "reduce_scatter_single",
]
