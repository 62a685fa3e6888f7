"""Analytic inter-node bytes per optimizer step of each strategy (the wire model).

What every strategy of ``benchmarks.strategies`` puts on the inter-node links in one
optimizer step, computed from the model's parameter shapes and the cluster layout alone
(no run). The benchmark prints it next to the kernel's byte counters and `CommStats`.

The wire model (gloo on CPU, checked against the kernel counters in
``docs/emulated_cluster.md``): every collective runs a ring over its group's ranks in
group order. A group of ``g`` ranks whose ring crosses a node boundary ``x`` times
(consecutive ranks, cyclically, on different nodes; :func:`ring_crossings`) sends

- all-gather of an output of ``B`` bytes: ``x (g-1)/g B`` over the inter-node links;
- all-reduce of ``B`` bytes: ``2 x (g-1)/g B`` (ring reduce-scatter + ring all-gather);
- reduce-scatter of an input of ``B`` bytes: on gloo an all-reduce of the input,
  ``2 x (g-1)/g B`` (gloo has no native reduce-scatter); with a real ring reduce-scatter
  (NCCL) ``x (g-1)/g B``.

Bytes are TCP payload (no Ethernet/IP/TCP headers), summed over all nodes' uplinks.

FSDP2 facts the per-step counts rest on (torch 2.13; verified by the kernel counters):
each FSDP unit all-gathers one flat buffer per forward of ``p * sum(ceil(d0/p) * rest)``
elements (every parameter padded on dim 0 to a multiple of the shard count ``p``); the
blocks (``reshard_after_forward=True``) are gathered again in backward, the root (not
resharded after forward) is not; the reduce-scatter input has the same padded size as
the all-gather output; the cross-replica all-reduce (2-D mesh) moves the reduce-scatter
output, ``1/p`` of it, over the replication group. DDP all-reduces the unpadded
gradients once per optimizer step (``no_sync`` on the other micro-steps).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lightning_mics.topology import MiCSTopology

ELEMENT_BYTES = 4  # fp32 parameters and gradients throughout the benchmark

#: Accumulation modes (the values of ``lightning_mics.AccumulationMode``).
TWO_HOP = "two_hop"
EVERY_MICRO_STEP = "every_micro_step"


@dataclass(frozen=True)
class Unit:
    """One FSDP unit: its parameters' shapes and whether it is gathered again in
    backward (``reshard_after_forward``)."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    regathered_in_backward: bool

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def padded_numel(self, shards: int) -> int:
        """Elements of the all-gather output over ``shards`` ranks (dim 0 of every
        parameter padded to a multiple of ``shards``)."""
        return sum(
            math.ceil(s[0] / shards) * shards * math.prod(s[1:]) if s else shards
            for s in self.shapes
        )


@dataclass(frozen=True)
class Layout:
    """Where a strategy's collectives run: ``world = nodes * ranks_per_node`` ranks,
    node-major; partition groups of ``partition_size`` consecutive ranks."""

    nodes: int
    ranks_per_node: int
    partition_size: int
    hierarchical: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def topology(self) -> MiCSTopology:
        """The package's own layout arithmetic (validated: a bad layout raises)."""
        return MiCSTopology.create(self.world_size, self.ranks_per_node, self.partition_size)

    @property
    def replication_size(self) -> int:
        return self.topology.replication_size

    def node_of(self, rank: int) -> int:
        return self.topology.node_index(rank)

    def partition_groups(self) -> list[list[int]]:
        return self.topology.partition_groups()

    def replication_groups(self) -> list[list[int]]:
        return self.topology.replication_groups()

    def inter_node_groups(self) -> list[list[int]]:
        """The hierarchical stage-1 groups: per partition and local index, the ranks of
        the partition with that local index (node order)."""
        k, n = self.ranks_per_node, self.partition_size // self.ranks_per_node
        return [
            [base + m * k + local for m in range(n)]
            for base in range(0, self.world_size, self.partition_size)
            for local in range(k)
        ]

    def intra_node_groups(self) -> list[list[int]]:
        k = self.ranks_per_node
        return [list(range(i * k, (i + 1) * k)) for i in range(self.nodes)]


def ring_crossings(ranks: Sequence[int], ranks_per_node: int) -> int:
    """Hops of a ring over ``ranks`` (in this order, cyclically) that cross nodes."""
    g = len(ranks)
    if g < 2:
        return 0
    return sum(ranks[i] // ranks_per_node != ranks[(i + 1) % g] // ranks_per_node for i in range(g))


def all_gather_wire(output_bytes: float, ranks: Sequence[int], ranks_per_node: int) -> float:
    """Inter-node bytes of a ring all-gather of an output of ``output_bytes``."""
    g = len(ranks)
    return ring_crossings(ranks, ranks_per_node) * (g - 1) / g * output_bytes if g > 1 else 0.0


def all_reduce_wire(nbytes: float, ranks: Sequence[int], ranks_per_node: int) -> float:
    """Inter-node bytes of a ring all-reduce of ``nbytes``."""
    return 2 * all_gather_wire(nbytes, ranks, ranks_per_node)


def reduce_scatter_wire(
    input_bytes: float, ranks: Sequence[int], ranks_per_node: int, backend: str = "gloo"
) -> float:
    """Inter-node bytes of a reduce-scatter of an input of ``input_bytes``: gloo runs an
    all-reduce of the input; a ring reduce-scatter (``backend="nccl"``) half of that."""
    ring = all_gather_wire(input_bytes, ranks, ranks_per_node)
    return 2 * ring if backend == "gloo" else ring


def wire_factor(
    kind: str, ranks: Sequence[int], ranks_per_node: int, backend: str = "gloo"
) -> float:
    """Inter-node wire bytes per logical byte that `CommStats` records, summed over the
    group's ranks (each of the ``g`` ranks records the collective's whole buffer)."""
    g = len(ranks)
    if g < 2:
        return 0.0
    per_buffer = {
        "all_gather": all_gather_wire(1.0, ranks, ranks_per_node),
        "all_reduce": all_reduce_wire(1.0, ranks, ranks_per_node),
        "reduce_scatter": reduce_scatter_wire(1.0, ranks, ranks_per_node, backend),
    }[kind]
    return per_buffer / g


@dataclass
class StepBytes:
    """Inter-node wire bytes of one optimizer step, by collective kind."""

    all_gather: float = 0.0
    reduce_scatter: float = 0.0
    all_reduce: float = 0.0
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.all_gather + self.reduce_scatter + self.all_reduce

    def as_dict(self) -> dict[str, float]:
        return {
            "all_gather": self.all_gather,
            "reduce_scatter": self.reduce_scatter,
            "all_reduce": self.all_reduce,
            "total": self.total,
        }


def _all_gather_layout(nbytes: float, layout: Layout) -> float:
    """One partition-group all-gather of output ``nbytes`` on every partition group."""
    k = layout.ranks_per_node
    if layout.hierarchical:
        # stage 1 on the inter-node groups (output n*c = nbytes/k), stage 2 intra-node
        return sum(all_gather_wire(nbytes / k, g, k) for g in layout.inter_node_groups())
    return sum(all_gather_wire(nbytes, g, k) for g in layout.partition_groups())


def _reduce_scatter_layout(nbytes: float, layout: Layout, backend: str) -> float:
    k = layout.ranks_per_node
    if layout.hierarchical:
        # stage 1 intra-node, stage 2 on the inter-node groups (input n*c = nbytes/k)
        return sum(
            reduce_scatter_wire(nbytes / k, g, k, backend) for g in layout.inter_node_groups()
        )
    return sum(reduce_scatter_wire(nbytes, g, k, backend) for g in layout.partition_groups())


def fsdp_step_bytes(
    units: Iterable[Unit],
    layout: Layout,
    accumulation: int = 1,
    mode: str = TWO_HOP,
    backend: str = "gloo",
    element_bytes: int = ELEMENT_BYTES,
) -> StepBytes:
    """Inter-node bytes of one optimizer step of ``accumulation`` micro-steps for an
    FSDP2 / MiCS layout (ZeRO-3 is ``partition_size = world``, HSDP ``partition_size =
    ranks_per_node`` with ``mode=every_micro_step``).

    Per micro-step: every unit's forward all-gather, the blocks' backward re-gathers,
    every unit's gradient reduce-scatter (``two_hop`` and ``every_micro_step`` both
    reduce-scatter every micro-step); the cross-replica all-reduce of the sharded
    gradients on every micro-step (``every_micro_step``) or once (``two_hop``), only
    when there are replicas.
    """
    if mode not in (TWO_HOP, EVERY_MICRO_STEP):
        raise ValueError(f"mode must be {TWO_HOP!r} or {EVERY_MICRO_STEP!r}, got {mode!r}")
    p, k = layout.partition_size, layout.ranks_per_node
    out = StepBytes()
    all_reduces = 0
    if layout.replication_size > 1:
        all_reduces = accumulation if mode == EVERY_MICRO_STEP else 1
    for unit in units:
        full = unit.padded_numel(p) * element_bytes
        gathers = accumulation * (2 if unit.regathered_in_backward else 1)
        ag = gathers * _all_gather_layout(full, layout)
        rs = accumulation * _reduce_scatter_layout(full, layout, backend)
        ar = all_reduces * sum(all_reduce_wire(full / p, g, k) for g in layout.replication_groups())
        out.all_gather += ag
        out.reduce_scatter += rs
        out.all_reduce += ar
        out.detail[unit.name] = ag + rs + ar
    return out


def ddp_step_bytes(
    units: Iterable[Unit], nodes: int, ranks_per_node: int, element_bytes: int = ELEMENT_BYTES
) -> StepBytes:
    """DDP: one all-reduce of all (unpadded) gradients over the world per optimizer step,
    whatever the accumulation (``no_sync`` on the other micro-steps)."""
    world = list(range(nodes * ranks_per_node))
    total = sum(u.numel for u in units) * element_bytes
    return StepBytes(all_reduce=all_reduce_wire(total, world, ranks_per_node))


def gpt_units(
    vocab_size: int,
    block_size: int,
    n_layer: int,
    n_embd: int,
    bias: bool = True,
    tie_weights: bool = False,
) -> list[Unit]:
    """The FSDP units of ``recipes.gpt.GPT`` as `apply_mics` (and plain ``fully_shard``
    per block + root) shards it: one unit per block (gathered again in backward) and the
    root with the embeddings, the final norm and the head (not resharded after
    forward). The shapes follow ``recipes/gpt.py``; ``tests/test_benchmark.py`` checks
    them against the module."""
    d = n_embd
    b = [(d,)] if bias else []

    def linear(n_out: int, n_in: int) -> list[tuple[int, ...]]:
        return [(n_out, n_in), *([(n_out,)] if bias else [])]

    layer_norm = [(d,), *b]
    block = [
        *layer_norm,  # ln_1
        *linear(3 * d, d),  # attn.c_attn
        *linear(d, d),  # attn.c_proj
        *layer_norm,  # ln_2
        *linear(4 * d, d),  # mlp.c_fc
        *linear(d, 4 * d),  # mlp.c_proj
    ]
    root = [(vocab_size, d), (block_size, d), (d,), *b]
    if not tie_weights:
        root.append((vocab_size, d))
    units = [Unit(f"block{i}", tuple(block), True) for i in range(n_layer)]
    return [*units, Unit("root", tuple(root), False)]


def model_state_bytes(
    units: Iterable[Unit],
    shards: int,
    optimizer_states: int = 2,
    element_bytes: int = ELEMENT_BYTES,
) -> dict[str, int]:
    """Bytes of one rank's sharded parameters, gradients and optimizer state (AdamW:
    two states per parameter; its scalar step counters are left out), unpadded: a rank
    holds ``numel / shards`` of every parameter on average (``shards = 1``: DDP)."""
    numel = sum(u.numel for u in units)
    params = math.ceil(numel / shards) * element_bytes
    return {
        "params": params,
        "grads": params,
        "optimizer_state": optimizer_states * params,
        "total": (2 + optimizer_states) * params,
    }
