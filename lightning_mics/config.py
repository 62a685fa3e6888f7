"""`MiCSConfig`: every MiCS option in one self-validating dataclass.

The Trainer strategy, the Fabric strategy and the plain-PyTorch API all take the same
options; they build one of these and hand it to the core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from lightning_mics.topology import Hierarchical, PartitionSize

#: Which modules get their own FSDP unit: a set of module classes, or a callable
#: ``(module) -> bool``. ``None`` picks every child of an ``nn.ModuleList`` (the
#: repeated blocks of a transformer).
WrapPolicy = Iterable[type[nn.Module]] | Callable[[nn.Module], bool] | None


class AccumulationMode(str, Enum):
    """How gradients are synchronised across micro-steps of one optimizer step."""

    #: MiCS: reduce-scatter inside the partition group every micro-step (memory stays
    #: sharded), all-reduce across replicas once, on the last micro-step.
    TWO_HOP = "two_hop"
    #: Reduce-scatter and all-reduce on every micro-step (what ZeRO-3/HSDP do by default).
    EVERY_MICRO_STEP = "every_micro_step"
    #: No communication until the last micro-step; unsharded gradients accumulate locally.
    LAST_MICRO_STEP_ONLY = "last_micro_step_only"


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "16": torch.float16,
}


def to_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {value!r}; use one of {sorted(_DTYPES)}.")
    return _DTYPES[key]


@dataclass
class MiCSConfig:
    """Options of a MiCS run.

    Args:
        partition_size: ranks that hold one replica of the model states; ``"node"``
            (default) uses the ranks of one node.
        ranks_per_node: ranks on one node; ``None`` takes it from the launcher. Set it to
            emulate ``n`` nodes of ``k`` ranks on one machine.
        accumulation: gradient synchronisation during accumulation, see
            :class:`AccumulationMode`.
        param_dtype: dtype of the gathered parameters used for compute (mixed precision);
            ``None`` keeps the parameters' dtype.
        reduce_dtype: dtype of gradient reduction, the cross-replica all-reduce included.
            ``float32`` by default so replicas never sum in low precision.
        reshard_after_forward: free gathered parameters after forward (``True``), keep
            them (``False``), or reshard to groups of this many ranks (``int``).
        activation_checkpointing: recompute the wrapped blocks' activations in backward.
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory.
        wrap_policy: which modules become FSDP units (see :data:`WrapPolicy`).
        sync_replicas: after sharding, copy replica 0's parameters and buffers to the
            other replicas so that they start identical whatever each rank's seed was.
        hierarchical: split each partition-group all-gather and reduce-scatter into an
            inter-node and an intra-node stage (see :mod:`lightning_mics.collectives`), so
            that every node receives other nodes' data once and inter-node collectives
            have ``partition_size / ranks_per_node`` participants instead of
            ``partition_size``. ``"auto"`` (default) turns it on exactly when a partition
            group spans nodes (``partition_size > ranks_per_node > 1``); ``True`` forces
            it on and raises when that is impossible (the partition fits in one node,
            one rank per node, or ``ranks_per_node`` is unknown for a ready-made mesh);
            ``False`` keeps FSDP's flat collectives. Gathered parameters are bitwise the
            same either way; reduced gradients may differ in the last bits (the sums are
            grouped differently).
        forward_prefetch: unshard asynchronously, each block's all-gather issued while
            the previous block computes: FSDP2 explicit forward prefetching (the root
            prefetches the first block, each block the next, in module order, the order a
            transformer runs its layers) with ``async_op=True`` unshards, also in
            backward (FSDP2's implicit backward prefetch). The hierarchical all-gather
            then runs its inter-node stage in the background too. Use it where FSDP2's
            implicit, stream-based prefetching does nothing: CPU/gloo runs (the emulated
            clusters, ``make train``). On GPUs the default already overlaps; this
            additionally allocates all-gather buffers on the default stream (no
            inter-stream fragmentation) but no longer overlaps the copy-in with compute.
            Uses FSDP2's private ``_set_unshard_async_op``.
        comm_stats: record every parameter all-gather, gradient reduce-scatter and
            cross-replica all-reduce (count, logical bytes, intra- or inter-node) in a
            :class:`~lightning_mics.accounting.CommStats`, read with
            :func:`~lightning_mics.accounting.comm_stats`. A few Python operations per
            collective.
        init_fn: initialiser of a model created on the meta device (e.g. with
            ``trainer.init_module(empty_init=True)``): ``init_fn(module)`` is called for
            every module that holds a meta tensor, children before parents (like
            ``model.apply(init_fn)``), under ``torch.no_grad()``, after MiCS has allocated
            each rank's shards and after the built-in initialisers (each module's
            ``reset_parameters()``, then the model's own Hugging Face style
            ``_init_weights(module)`` or torchtitan style ``init_weights()``), so it wins
            over them. It must write tensors in place (``copy_``, ``fill_``,
            ``nn.init.*_``); parameters are sharded ``DTensor``s (whole-tensor in-place ops
            work as on plain tensors). To initialise once from the root, test
            ``module is model``. MiCS raises a ``MetaInitError`` naming any meta tensor no
            initialiser wrote (see :mod:`lightning_mics.meta_init`). Not used for models
            created with values.
    """

    partition_size: PartitionSize = "node"
    ranks_per_node: int | None = None
    accumulation: AccumulationMode | str = AccumulationMode.TWO_HOP
    param_dtype: torch.dtype | str | None = None
    reduce_dtype: torch.dtype | str | None = torch.float32
    reshard_after_forward: bool | int = True
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    wrap_policy: WrapPolicy = field(default=None, repr=False)
    sync_replicas: bool = True
    comm_stats: bool = True
    hierarchical: Hierarchical = "auto"
    forward_prefetch: bool = False
    init_fn: Callable[[nn.Module], Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.partition_size != "node" and (
            isinstance(self.partition_size, bool)
            or not isinstance(self.partition_size, int)
            or self.partition_size < 1
        ):
            raise ValueError(
                f"partition_size must be a positive int or 'node', got {self.partition_size!r}."
            )
        if self.ranks_per_node is not None and (
            isinstance(self.ranks_per_node, bool)
            or not isinstance(self.ranks_per_node, int)
            or self.ranks_per_node < 1
        ):
            raise ValueError(
                f"ranks_per_node must be a positive int or None, got {self.ranks_per_node!r}."
            )
        try:
            self.accumulation = AccumulationMode(self.accumulation)
        except ValueError:
            choices = [m.value for m in AccumulationMode]
            raise ValueError(
                f"accumulation={self.accumulation!r} is not one of {choices}."
            ) from None
        self.param_dtype = to_dtype(self.param_dtype)
        self.reduce_dtype = to_dtype(self.reduce_dtype)
        for name in (
            "activation_checkpointing",
            "cpu_offload",
            "sync_replicas",
            "comm_stats",
            "forward_prefetch",
        ):
            # NOTE: a string such as "false" would otherwise silently mean True.
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.hierarchical != "auto" and not isinstance(self.hierarchical, bool):
            # NOTE: a string such as "false" would otherwise silently mean True.
            raise ValueError(
                f"hierarchical must be True, False or 'auto', got {self.hierarchical!r}."
            )
        rafw = self.reshard_after_forward
        if not isinstance(rafw, bool) and (not isinstance(rafw, int) or rafw < 1):
            raise ValueError(
                f"reshard_after_forward must be a bool or a positive int, got {rafw!r}."
            )
        if self.init_fn is not None and not callable(self.init_fn):
            raise ValueError(
                f"init_fn must be a callable (module) -> None or None, got {self.init_fn!r}."
            )
        if isinstance(self.wrap_policy, type):
            self.wrap_policy = (self.wrap_policy,)
        if self.wrap_policy is not None and not callable(self.wrap_policy):
            try:
                classes = tuple(self.wrap_policy)
            except TypeError:
                classes = (self.wrap_policy,)
            if not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
                raise ValueError(
                    "wrap_policy must be a set of nn.Module classes or a callable "
                    f"(module) -> bool, got {self.wrap_policy!r}."
                )
            self.wrap_policy = classes
