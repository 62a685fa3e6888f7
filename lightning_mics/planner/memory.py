"""Peak device memory of one rank: model states, activations and the transient buffers
of sharded training.

Per rank, for a strategy sharding the model states over ``p`` ranks (``p = 1`` for DDP),
``N`` parameters in units padded as FSDP pads them:

- **parameters, gradients, optimizer states** (sharded): ``N/p`` each of the stored
  parameters (``m`` bytes: 4 in fp32, 2 under ``*-true`` 16-bit precision), their
  gradients (``m``) and AdamW's two moments (``2m``): the 16 (or 8) bytes per parameter.
- **gathered parameters**: the root unit (embeddings and head: gathered first in forward
  and kept until its gradients are reduced) and two blocks (the one computing and the
  prefetched next one), in the gather dtype ``g`` (``param_dtype``).
- **gradient buffers**: the root's unsharded gradients (computed first in backward, kept
  to the end), one block's unsharded gradients (``g``) and the previous block's
  reduce-scatter input (reduce dtype ``r``, still in flight). Under
  ``last_micro_step_only`` every unsharded gradient lives across micro-steps. DDP keeps
  its full gradients in its buckets (counted under gradients).
- **communication buffers**: hierarchical collectives stage ``1/k`` of each all-gather
  output (two blocks in flight) and of the reduce-scatter input.
- **activations** per micro-batch of ``b`` sequences of ``s`` tokens, hidden size ``h``,
  ``a`` heads, ``L`` blocks, ``c`` bytes per activation (2 in 16-bit compute), from
  Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer
  Models": a block stores ``34 s b h`` bytes at ``c = 2`` (scaled by ``c/2``), plus
  ``5 a s^2 b`` when attention materialises its scores (no flash attention). With
  activation checkpointing a block keeps only its input (``s b h c``) and one block's
  activations are recomputed at a time. The output layer adds its logits (``s b V c``)
  and the fp32 log-softmax and its gradient (``8 s b V``).

The total is compared with the device's usable memory (`specs.ClusterSpec.usable_memory_bytes`:
capacity minus ``reserved_gib`` for the CUDA context, NCCL and cuBLAS workspaces, minus a
``fragmentation`` share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_mics.planner import specs
from lightning_mics.planner.cost_model import padded_numel
from lightning_mics.topology import staging_bytes

#: Korthikanti et al.'s activation bytes per token per hidden unit of one block (16-bit).
BLOCK_ACTIVATION_FACTOR = 34


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak bytes per rank, by kind. ``capacity``: usable bytes (``None``: unknown)."""

    shard_size: int
    parameters: float
    gradients: float
    optimizer_states: float
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    activation_checkpointing: bool
    gathered_parameters: float
    gradient_buffers: float
    communication_buffers: float
    reserved: float
    capacity: float | None

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def activations(self) -> float:
        return (
            self.activations_with_checkpointing
            if self.activation_checkpointing
            else self.activations_without_checkpointing
        )

    @property
    def buffers(self) -> float:
        return self.gathered_parameters + self.gradient_buffers + self.communication_buffers

    @property
    def total(self) -> float:
        """Bytes the model needs (``reserved`` is already taken off ``capacity``)."""
        return self.model_states + self.activations + self.buffers

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def with_checkpointing(self, on: bool) -> MemoryBreakdown:
        from dataclasses import replace

        return replace(self, activation_checkpointing=on)

    def rows(self) -> list[tuple[str, float]]:
        """``(label, bytes)`` rows for a printed table."""
        ckpt = "with" if self.activation_checkpointing else "without"
        return [
            ("parameters (sharded)", self.parameters),
            ("gradients (sharded)", self.gradients),
            ("optimizer states (AdamW, sharded)", self.optimizer_states),
            (f"activations ({ckpt} checkpointing)", self.activations),
            ("gathered parameters (root + 2 blocks)", self.gathered_parameters),
            ("gradient buffers (unsharded + reduce-scatter)", self.gradient_buffers),
            ("communication buffers", self.communication_buffers),
        ]

    def describe(self) -> str:
        lines = [f"  {label:<48} {gib(v):>9}" for label, v in self.rows()]
        lines.append(f"  {'total':<48} {gib(self.total):>9}")
        if self.capacity is not None:
            lines.append(
                f"  {'usable per GPU':<48} {gib(self.capacity):>9}  "
                f"(after {gib(self.reserved)} reserved and fragmentation)"
            )
        lines.append(
            f"  activations: {gib(self.activations_without_checkpointing)} without "
            f"checkpointing, {gib(self.activations_with_checkpointing)} with"
        )
        return "\n".join(lines)


def gib(nbytes: float) -> str:
    return f"{nbytes / specs.GIB:.2f} GiB"


def activation_bytes(
    model: specs.ModelSpec, training: specs.TrainingSpec, checkpointing: bool
) -> float:
    """Activations of one micro-batch kept for backward, at their peak."""
    b, s, h = training.micro_batch, training.seq_len, model.n_embd
    c = training.compute_bytes
    per_block = BLOCK_ACTIVATION_FACTOR * s * b * h * c / 2
    if not training.flash_attention:
        per_block += 5 * model.n_head * s * s * b * c / 2
    head = s * b * model.vocab_size * (c + 8) + s * b * h * c
    if checkpointing:
        return model.n_layer * s * b * h * c + per_block + head
    return model.n_layer * per_block + head


def memory_breakdown(
    model: specs.ModelSpec,
    cluster: specs.ClusterSpec,
    training: specs.TrainingSpec,
    strategy: specs.StrategySpec,
    activation_checkpointing: bool | None = None,
) -> MemoryBreakdown:
    """Peak memory of one rank (see the module docstring). ``activation_checkpointing``
    defaults to the training spec's."""
    p = strategy.shard_size(cluster)
    k = cluster.ranks_per_node
    m, g, r = training.master_bytes, training.gather_bytes, training.reduce_bytes
    block, root = model.block_shapes(), model.root_shapes()
    L = model.n_layer
    if strategy.kind is specs.StrategyKind.DDP:
        n_local = model.num_params
        gathered = grad_buffers = comm = 0.0
        if g != m:  # autocast keeps 16-bit copies of the weights in use
            gathered = 2 * model.block_params * g + model.root_params * g
    else:
        block_numel, root_numel = padded_numel(block, p), padded_numel(root, p)
        n_local = (L * block_numel + root_numel) / p
        gathered = (root_numel + 2 * block_numel) * g if p > 1 or g != m else 0.0
        if strategy.accumulation is specs.AccumulationMode.LAST_MICRO_STEP_ONLY:
            grad_buffers = (L * block_numel + root_numel) * g + block_numel * r
        else:
            grad_buffers = root_numel * g + block_numel * (g + r)
        comm = 0.0
        if strategy.uses_hierarchical(cluster):
            # two gathered blocks (this one and the prefetched next) and one block's
            # reduce-scatter input in flight, each with its staging temporaries
            n = p // k
            comm = 2 * staging_bytes(block_numel * g, k, n) + staging_bytes(block_numel * r, k, n)
    with_ckpt = activation_bytes(model, training, True)
    without = activation_bytes(model, training, False)
    return MemoryBreakdown(
        shard_size=p,
        parameters=n_local * m,
        gradients=n_local * m,
        optimizer_states=2 * n_local * m,
        activations_without_checkpointing=without,
        activations_with_checkpointing=with_ckpt,
        activation_checkpointing=(
            training.activation_checkpointing
            if activation_checkpointing is None
            else activation_checkpointing
        ),
        gathered_parameters=gathered,
        gradient_buffers=grad_buffers,
        communication_buffers=comm,
        reserved=cluster.reserved_gib * specs.GIB,
        capacity=cluster.usable_memory_bytes,
    )


def valid_partition_sizes(world_size: int, ranks_per_node: int) -> list[int]:
    """Partition sizes MiCS accepts on this cluster, smallest first: divisors of a node,
    and multiples of a node that divide the world (`MiCSTopology.create`'s rules)."""
    k = ranks_per_node
    sizes = {p for p in range(1, k + 1) if k % p == 0 and world_size % p == 0}
    sizes |= {p for p in range(k, world_size + 1, k) if world_size % p == 0}
    return sorted(sizes)


def minimum_shards(model: specs.ModelSpec, training: specs.TrainingSpec, capacity: float) -> float:
    """Lower bound on the partition size from the model states alone."""
    return math.ceil(model.num_params * training.state_bytes_per_param / capacity)
