"""Step-time model: every collective a strategy issues per optimizer step, the compute
between them, and how much of the communication the compute hides.

One optimizer step is ``s`` micro-steps (``TrainingSpec.accumulation``). Each micro-step
runs the FSDP units (the root: embeddings and head; then one unit per transformer block)
forward and backward; per unit and micro-step a sharded strategy issues

- a parameter **all-gather** before its forward, and another before its backward when it
  was resharded after forward (the blocks; the root only with
  ``StrategySpec.root_reshard_after_forward``: FSDP2 keeps the root gathered unless
  ``reshard_after_forward`` is passed to it explicitly, and MiCS keeps it);
- a gradient **reduce-scatter** after its backward (``two_hop``, ``every_micro_step``;
  ``last_micro_step_only`` only on the last micro-step);
- a cross-replica gradient **all-reduce** of its shard (``every_micro_step``: HSDP; MiCS's
  ``two_hop``: only on the last micro-step) when there is more than one replica.

DDP all-reduces every gradient once per optimizer step, in 25 MiB buckets, during the last
micro-step's backward. Then the optimizer updates the local shard (memory-bound: 28 bytes
of device memory traffic per parameter for AdamW in fp32) and the gradient norm is
all-reduced (a latency-only collective, for gradient clipping).

**Overlap** is modelled explicitly as a two-resource schedule: one compute stream and one
communication channel (the collectives of a rank share its links, so they run one at a
time, in issue order). With NCCL (GPUs) the all-gather of unit ``i+1`` is issued when unit
``i`` starts computing (FSDP2's one-deep prefetch, forward and backward), and a unit's
reduce-scatter/all-reduce when its backward ends; compute waits only for its own
all-gather. So per unit the time is ``max(compute, communication)`` once the pipeline is
full, plus the exposed first all-gather of each micro-step and the last reduce-scatter.
With gloo (CPU) FSDP2 issues every collective with ``async_op=False``, which blocks the
calling thread: nothing overlaps and the step is the plain sum (DDP's reducer is
asynchronous on both backends and keeps its overlap). ``StrategySpec.async_gathers``
models ``MiCSConfig(forward_prefetch=True)`` on gloo (FSDP2's asynchronous unshard, one
block ahead): all-gathers then overlap with compute, reduce-scatters still block.

FLOPs: :meth:`ModelSpec.hardware_flops` (with recomputation) at the cluster's achievable
rate; the reported TFLOPS per GPU are given both ways: *model* TFLOPS (no recomputation:
what MFU and Lightning's ThroughputMonitor count) and *hardware* TFLOPS (with it:
Megatron-LM's convention, which the MiCS paper's figures most likely follow).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from lightning_mics.planner.alpha_beta import (
    ZERO,
    CommCost,
    GroupLayout,
    Kind,
    hierarchical,
    ring,
    tree_all_reduce_latency,
)
from lightning_mics.planner.specs import (
    AccumulationMode,
    ClusterSpec,
    ModelSpec,
    StrategyKind,
    StrategySpec,
    TrainingSpec,
)

#: DDP's default gradient bucket (``bucket_cap_mb=25``).
DDP_BUCKET_BYTES = 25 * 2**20
#: Device-memory bytes per parameter the AdamW step moves (read parameter, gradient and
#: two moments, write parameter and two moments, fp32).
ADAM_BYTES_PER_PARAM = 28


def padded_numel(shapes: list[tuple[int, ...]], shards: int) -> int:
    """Elements FSDP2 communicates for a unit sharded ``shards`` ways: every parameter's
    dim 0 is padded to a multiple of ``shards``."""
    total = 0
    for shape in shapes:
        rest = math.prod(shape[1:])
        total += math.ceil(shape[0] / shards) * shards * rest
    return total


@dataclass(frozen=True)
class Collective:
    """A kind of collective in a step: ``count`` of them per optimizer step, costing
    ``total`` together."""

    name: str
    count: int
    total: CommCost

    @property
    def time(self) -> float:
        return self.total.time

    @property
    def inter_node_bytes_per_node(self) -> float:
        return self.total.inter_node_bytes_per_node


@dataclass(frozen=True)
class StepPrediction:
    """The cost model's prediction for one optimizer step of one strategy.

    Times in seconds, bytes per optimizer step, FLOP rates per GPU (1e12 FLOP/s).
    ``inter_node_bytes`` is what all nodes together send over their network links (the
    sum of the nodes' tx, what the emulated cluster's counters measure).
    """

    strategy: str
    shard_size: int
    replicas: int
    hierarchical: bool
    step_time: float
    compute_time: float
    communication_time: float
    collectives: tuple[Collective, ...]
    inter_node_bytes_per_node: float
    inter_node_bytes: float
    tokens_per_step: int
    model_flops_per_gpu: float
    hardware_flops_per_gpu: float
    peak_tflops: float
    world_size: int
    notes: tuple[str, ...] = field(default=())

    @property
    def exposed_communication_time(self) -> float:
        """Step time not spent computing: the communication compute did not hide."""
        return max(0.0, self.step_time - self.compute_time)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time

    @property
    def model_tflops_per_gpu(self) -> float:
        return self.model_flops_per_gpu / self.step_time / 1e12

    @property
    def hardware_tflops_per_gpu(self) -> float:
        return self.hardware_flops_per_gpu / self.step_time / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: model TFLOPS / peak."""
        return self.model_tflops_per_gpu / self.peak_tflops

    @property
    def hfu(self) -> float:
        """Hardware FLOPs utilisation (recomputation counted)."""
        return self.hardware_tflops_per_gpu / self.peak_tflops


@dataclass
class _Unit:
    """One FSDP unit's turn in the schedule: the all-gather it waits for, its compute,
    and the reductions issued after it. ``prefetch``: its all-gather may be issued when
    the previous unit starts computing (False at a micro-step boundary)."""

    gather: float
    compute: float
    reduce: float = 0.0
    prefetch: bool = True


def _schedule(units: list[_Unit], overlap: bool, blocking_reduce: bool = False) -> float:
    """Finish time of ``units`` run in order on one compute stream and one FIFO
    communication channel (see the module docstring). ``blocking_reduce``: all-gathers
    overlap, but the compute waits for each reduction it issues (gloo with FSDP2's
    asynchronous unshard: its reduce-scatters stay blocking)."""
    if not overlap:
        return sum(u.gather + u.compute + u.reduce for u in units)
    t_compute = t_comm = 0.0
    gathered = 0.0  # when the current unit's all-gather ends
    if units:
        t_comm = gathered = units[0].gather
    for i, unit in enumerate(units):
        start = max(t_compute, gathered)
        t_compute = start + unit.compute
        nxt = units[i + 1] if i + 1 < len(units) else None
        if nxt is not None and nxt.prefetch:
            t_comm = max(start, t_comm) + nxt.gather
            gathered = t_comm
        if unit.reduce:
            t_comm = max(t_compute, t_comm) + unit.reduce
            if blocking_reduce:
                t_compute = t_comm
        if nxt is not None and not nxt.prefetch:
            t_comm = max(t_compute, t_comm) + nxt.gather
            gathered = t_comm
    return max(t_compute, t_comm)


class _Comms:
    """The collectives of one strategy on one cluster, per FSDP unit."""

    def __init__(
        self,
        model: ModelSpec,
        cluster: ClusterSpec,
        training: TrainingSpec,
        strategy: StrategySpec,
    ) -> None:
        self.cluster, self.training, self.strategy = cluster, training, strategy
        self.p = strategy.shard_size(cluster)
        if cluster.world_size % self.p:
            raise ValueError(
                f"shard size {self.p} does not divide the world size {cluster.world_size}"
            )
        self.replicas = cluster.world_size // self.p
        self.hier = strategy.uses_hierarchical(cluster)
        self.shard_layout = GroupLayout.strided(self.p, 1, cluster.ranks_per_node)
        self.replica_layout = GroupLayout.strided(self.replicas, self.p, cluster.ranks_per_node)
        self.world_layout = GroupLayout.strided(cluster.world_size, 1, cluster.ranks_per_node)

    def _split(self, numel: int) -> int:
        b = self.strategy.bucket_elements
        return 1 if b is None else max(1, math.ceil(numel / b))

    def _shard_collective(self, kind: Kind, buffer_bytes: float, numel: int) -> CommCost:
        if self.p <= 1:
            return ZERO
        pieces = self._split(numel)
        if self.hier:
            one = hierarchical(kind, buffer_bytes / pieces, self.p, self.cluster)
        else:
            one = ring(kind, buffer_bytes / pieces, self.shard_layout, self.cluster)
        return one.scaled(pieces)

    def all_gather(self, shapes: list[tuple[int, ...]]) -> CommCost:
        numel = padded_numel(shapes, self.p)
        return self._shard_collective(Kind.ALL_GATHER, numel * self.training.gather_bytes, numel)

    def reduce_scatter(self, shapes: list[tuple[int, ...]]) -> CommCost:
        numel = padded_numel(shapes, self.p)
        return self._shard_collective(
            Kind.REDUCE_SCATTER, numel * self.training.reduce_bytes, numel
        )

    def replica_all_reduce(self, shapes: list[tuple[int, ...]]) -> CommCost:
        if self.replicas <= 1:
            return ZERO
        shard_bytes = padded_numel(shapes, self.p) // self.p * self.training.reduce_bytes
        return ring(Kind.ALL_REDUCE, shard_bytes, self.replica_layout, self.cluster)

    def ddp_all_reduce(self, shapes: list[tuple[int, ...]]) -> CommCost:
        nbytes = sum(math.prod(s) for s in shapes) * self.training.reduce_bytes
        buckets = max(1, math.ceil(nbytes / DDP_BUCKET_BYTES))
        one = ring(Kind.ALL_REDUCE, nbytes / buckets, self.world_layout, self.cluster)
        return one.scaled(buckets)


def predict_step(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    strategy: StrategySpec,
) -> StepPrediction:
    """Predict one optimizer step of ``strategy`` (see the module docstring)."""
    comms = _Comms(model, cluster, training, strategy)
    kind, s, L = strategy.kind, training.accumulation, model.n_layer
    b, t = training.micro_batch, training.seq_len
    rate = cluster.flops_per_s
    ckpt = training.activation_checkpointing

    block_f = model.block_forward_flops(b, t) / rate
    block_b = 2 * block_f + (block_f if ckpt else 0.0)
    head_f = model.root_forward_flops(b, t) / rate
    head_b = 2 * head_f
    # host-side FSDP hook cost of each unit's forward / backward (sharded strategies)
    hook = cluster.unit_overhead_us * 1e-6 if kind is not StrategyKind.DDP else 0.0

    block, root = model.block_shapes(), model.root_shapes()
    sharded = kind is not StrategyKind.DDP
    ag_block = comms.all_gather(block) if sharded else ZERO
    ag_root = comms.all_gather(root) if sharded else ZERO
    rs_block = comms.reduce_scatter(block) if sharded else ZERO
    rs_root = comms.reduce_scatter(root) if sharded else ZERO
    ar_block = comms.replica_all_reduce(block) if sharded else comms.ddp_all_reduce(block)
    ar_root = comms.replica_all_reduce(root) if sharded else comms.ddp_all_reduce(root)
    regather_block = training.reshard_after_forward and sharded
    regather_root = strategy.root_reshard_after_forward and sharded

    counts: dict[str, list] = defaultdict(lambda: [0, ZERO])

    def note(name: str, cost: CommCost) -> float:
        """Record one collective (of ``cost``); returns its time."""
        if cost.steps or cost.time:
            counts[name][0] += 1
            counts[name][1] = counts[name][1] + cost
        return cost.time

    units: list[_Unit] = []
    for micro in range(s):
        last = micro == s - 1
        if strategy.accumulation is AccumulationMode.LAST_MICRO_STEP_ONLY:
            reduce_scatter, all_reduce = last, last
        elif strategy.accumulation is AccumulationMode.TWO_HOP:
            reduce_scatter, all_reduce = True, last
        else:
            reduce_scatter, all_reduce = True, True
        # forward: root (embedding), blocks, head (root params still gathered)
        units.append(
            _Unit(gather=note("all-gather root (forward)", ag_root), compute=hook, prefetch=False)
        )
        for _ in range(L):
            units.append(
                _Unit(gather=note("all-gather block (forward)", ag_block), compute=block_f + hook)
            )
        units.append(_Unit(gather=0.0, compute=head_f))
        # backward: head, blocks in reverse, then the root's gradients are complete
        gather = note("all-gather root (backward)", ag_root) if regather_root else 0.0
        units.append(_Unit(gather=gather, compute=head_b))
        for _ in range(L):
            gather = note("all-gather block (backward)", ag_block) if regather_block else 0.0
            reduce = 0.0
            if sharded and reduce_scatter:
                reduce += note("reduce-scatter block", rs_block)
            if all_reduce:
                reduce += note(
                    "all-reduce block (replicas)" if sharded else "all-reduce block (DDP)",
                    ar_block,
                )
            units.append(_Unit(gather=gather, compute=block_b + hook, reduce=reduce))
        reduce = 0.0
        if sharded and reduce_scatter:
            reduce += note("reduce-scatter root", rs_root)
        if all_reduce:
            reduce += note(
                "all-reduce root (replicas)" if sharded else "all-reduce root (DDP)", ar_root
            )
        units.append(_Unit(gather=0.0, compute=hook, reduce=reduce))

    async_gathers = cluster.overlap if strategy.async_gathers is None else strategy.async_gathers
    overlap = cluster.overlap or async_gathers or kind is StrategyKind.DDP
    blocking_reduce = not cluster.overlap and kind is not StrategyKind.DDP
    step = _schedule(units, overlap, blocking_reduce)
    # optimizer: AdamW over this rank's shard (memory-bound), after every gradient arrived
    shard_params = (
        model.num_params
        if kind is StrategyKind.DDP
        else (padded_numel(block, comms.p) * L + padded_numel(root, comms.p)) / comms.p
    )
    optimizer_time = shard_params * ADAM_BYTES_PER_PARAM / cluster.memory_bytes_per_s
    norm_time = tree_all_reduce_latency(cluster.world_size, cluster)
    step += optimizer_time + norm_time
    compute = s * (L * (block_f + block_b) + head_f + head_b + 2 * (L + 1) * hook)
    compute += optimizer_time

    collectives = tuple(Collective(name, n, cost) for name, (n, cost) in counts.items())
    per_node = sum(c.inter_node_bytes_per_node for c in collectives)
    notes = []
    if comms.hier:
        notes.append(
            f"hierarchical all-gathers/reduce-scatters: {comms.p // cluster.ranks_per_node} "
            f"nodes x {cluster.ranks_per_node} ranks per partition"
        )
    if not overlap:
        notes.append("gloo: collectives block the compute thread (no overlap)")
    elif blocking_reduce:
        notes.append("gloo with asynchronous unshard: all-gathers overlap, reductions block")
    return StepPrediction(
        strategy=strategy.name(),
        shard_size=comms.p,
        replicas=comms.replicas,
        hierarchical=comms.hier,
        step_time=step,
        compute_time=compute,
        communication_time=sum(c.time for c in collectives) + norm_time,
        collectives=collectives,
        inter_node_bytes_per_node=per_node,
        inter_node_bytes=per_node * cluster.nodes,
        tokens_per_step=s * b * t * cluster.world_size,
        model_flops_per_gpu=s * model.model_flops(b, t),
        hardware_flops_per_gpu=s * model.hardware_flops(b, t, ckpt),
        peak_tflops=cluster.peak_tflops,
        world_size=cluster.world_size,
        notes=tuple(notes),
    )
