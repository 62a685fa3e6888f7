"""Hierarchical parameter all-gather and gradient reduce-scatter as FSDP2 comm hooks.

When a partition group of ``p`` ranks spans ``n = p / k`` nodes of ``k`` ranks, MiCS
splits each partition-group collective in two stages (MiCS paper, Sec. 3.3):

- all-gather: an *inter-node* all-gather among the ``n`` ranks of the partition that
  share a local index (all ``k`` local indices in parallel), then an *intra-node*
  all-gather into partition-rank order;
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
never waited on. The reduce-scatter is always called with ``async_op=False``; the
all-gather with ``async_op=True`` when the unshard is asynchronous (the public
``FSDPModule.unshard(async_op=True)`` that explicit prefetching uses, or every
pre-forward/pre-backward unshard with `MiCSConfig.forward_prefetch`), and then FSDP
calls the returned ``Work``'s ``wait()`` right before the parameters are used.

Asynchronous all-gather: stage 1 (the slow inter-node one) is issued with
``async_op=True`` and a `StagedWork` is returned whose ``wait()`` waits for it and then
runs stage 2 (the fast intra-node all-gathers). So the inter-node transfer overlaps
whatever runs before FSDP waits, exactly like FSDP's flat asynchronous all-gather.
NOTE: every stage is issued from the calling thread, in program order; all ranks run
the same FSDP program, so they issue the same sequence of collectives on each sub-group
(a helper thread issuing stage 2 could interleave differently with a reduce-scatter's
stages on the same groups on different ranks, and hang).

NOTE (streams): with ``async_op=False`` FSDP calls the comm inside its all-gather /
reduce-scatter stream; each stage is a blocking-style collective, which on NCCL makes
that stream wait for the collective (the CPU does not wait), so the stages, the stage
buffer's reuse by the caching allocator and FSDP's completion event are all ordered on
that stream. With ``async_op=True`` FSDP issues on the current stream; ``Work.wait()``
makes the current stream wait for stage 1 and stage 2 is then ordered on it.

Accounting: with a `CommStats` attached (``attach_stats``, done by
`~lightning_mics.accounting.install_comm_stats`), every stage is recorded on its own,
with its own buffer's logical bytes and the reach of its own group. Per all-gather of
a ``p*c`` buffer: one inter-node entry of ``n*c`` bytes (``1/k`` of the flat figure,
which counts the whole buffer as inter-node) and intra-node entries totalling ``p*c``:
one of ``p*c`` when the stage is batched, else ``n`` of ``k*c`` (see
`~lightning_mics.topology.intra_stage_calls`); reduce-scatters mirror this. Of an inter-node entry, ``(n-1)/n`` arrives from other
nodes, so a node of ``k`` ranks takes in ``(p-k)*c``: the ``(p-k)/p`` of the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ReduceOp
from torch.distributed.fsdp import FSDPModule

from lightning_mics._fsdp_internals import AllGather, ReduceScatter
from lightning_mics.process_groups import HierarchicalGroups, get_hierarchical_groups
from lightning_mics.topology import MiCSTopology, intra_stage_calls

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


class StagedWork(dist.Work):
    """The ``dist.Work`` of a collective run in two stages: ``wait()`` waits for the
    first stage's work, then runs the second stage (once), on the calling thread."""

    def __init__(self, first: dist.Work, then: Callable[[], None]) -> None:
        super().__init__()
        self._first: dist.Work | None = first
        self._then = then

    def wait(self, timeout: Any = None) -> bool:
        if self._first is not None:
            first, self._first = self._first, None
            first.wait()
            self._then()
        return True

    def is_completed(self) -> bool:
        return self._first is None


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
            return self.gather_in_stages(output_tensor, input_tensor, async_op)
        self.flat_calls += 1
        self._record("all_gather", output_tensor, group)
        return all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)

    def gather_in_stages(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, async_op: bool
    ) -> dist.Work | None:
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
    ``stage[m']``. Stage 2 (intra-node): the ``k`` ranks of this node all-gather
    ``stage``; the output wants partition-rank order ``[m'][l]``, the collective yields
    ``[l][m']``. Up to `~lightning_mics.topology.BATCHED_INTRA_STAGE_MAX_BYTES` of output
    that is one all-gather into a full-size temporary plus one strided copy; above it,
    one all-gather per node ``m'`` of ``stage[m']`` straight into the output slots
    ``[m'*k, (m'+1)*k)`` (contiguous and already in order).

    NOTE (memory): ``stage`` is ``n * c`` elements (``c`` = chunk), ``1/k`` of the
    gathered size; the batched stage 2 adds a full-size temporary, only for buffers small
    enough that the ``n - 1`` saved calls matter more (latency-bound). Gathering
    intra-node first would not help: every rank would then have to fetch every other
    node's data itself, ``k`` times the inter-node traffic.
    """

    def gather_in_stages(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, async_op: bool
    ) -> dist.Work | None:
        chunk = input_tensor.numel()
        if output_tensor.numel() != chunk * self.p:
            raise ValueError(
                f"All-gather output has {output_tensor.numel()} elements, expected "
                f"{self.p} x {chunk} (partition size x input)."
            )
        if chunk == 0:  # same on every rank: no rank communicates
            return None
        n, k = self.n, self.k
        dtype, device = input_tensor.dtype, input_tensor.device
        batched = intra_stage_calls(output_tensor.numel() * output_tensor.element_size(), n) == 1
        stage = torch.empty(n * chunk, dtype=dtype, device=device)
        inter, intra = self.groups.inter, self.groups.intra
        # NOTE: input_tensor is a view into output_tensor; the stages only read it before
        # any write to its slot (stage 1 writes `stage`; stage 2 rewrites the slot with
        # the same values, since stage[m] == input for this rank's own node m).
        self._record("all_gather", stage, inter)
        first = all_gather_single(stage, input_tensor, group=inter, async_op=async_op)

        def second() -> None:
            if batched:
                by_local = torch.empty(k * n * chunk, dtype=dtype, device=device)
                self._record("all_gather", by_local, intra)
                all_gather_single(by_local, stage, group=intra)
                output_tensor.view(n, k, chunk).copy_(by_local.view(k, n, chunk).transpose(0, 1))
                return
            out, staged = output_tensor.view(n, k * chunk), stage.view(n, chunk)
            for node in range(n):
                self._record("all_gather", out[node], intra)
                all_gather_single(out[node], staged[node], group=intra)

        if async_op:
            return StagedWork(first, second)
        second()
        return None


class HierarchicalReduceScatter(_HierarchicalComm, RecordingReduceScatter):
    """Two-stage reduce-scatter over a partition group that spans nodes.

    Stage 1 (intra-node): the ``k`` ranks of this node reduce-scatter the input so that
    rank ``(m, l)`` holds its node's partial sum of chunk ``(m', l)`` in ``stage[m']``
    for every node ``m'`` of the partition: up to
    `~lightning_mics.topology.BATCHED_INTRA_STAGE_MAX_BYTES` of input, one collective
    over a copy of the input regrouped by local index; above it, one per node ``m'`` over
    input slots ``[m'*k, (m'+1)*k)`` (contiguous, rank-major over the local index).
    Stage 2 (inter-node): the ``n`` ranks with local index ``l`` reduce-scatter ``stage``
    (rank-major over the node) into the output.

    NOTE (memory): ``stage`` is ``n * c`` elements, plus a full-size temporary for the
    batched stage 1, as in `HierarchicalAllGather`. The reduce op is split across the
    stages by `_stage_ops` (``PREMUL_SUM`` scales once, ``AVG`` averages twice or, on
    gloo, sums twice and divides once). The sums are grouped differently from a flat
    reduce-scatter, so floating-point results can differ in the last bits.
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
        n, k = self.n, self.k
        first_op, second_op, divide = _stage_ops(op, self._backend)
        stage = torch.empty(n, chunk, dtype=output_tensor.dtype, device=output_tensor.device)
        inter, intra = self.groups.inter, self.groups.intra
        if intra_stage_calls(input_tensor.numel() * input_tensor.element_size(), n) == 1:
            by_local = input_tensor.view(n, k, chunk).transpose(0, 1).contiguous()
            self._record("reduce_scatter", by_local, intra)
            reduce_scatter_single(stage.view(-1), by_local.view(-1), op=first_op, group=intra)
        else:
            inp = input_tensor.view(n, k * chunk)
            for node in range(n):
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
    "StagedWork",
    "all_gather_single",
    "hierarchical_comms",
    "install_comms",
    "reduce_scatter_single",
]
