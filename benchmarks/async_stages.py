"""Prototype (benchmark only): an asynchronous hierarchical all-gather for FSDP2 on gloo.

`lightning_mics.collectives.HierarchicalAllGather` runs its two stages as blocking
collectives and returns ``None``. With FSDP2's defaults that costs nothing on CPU/gloo:
FSDP2 calls every collective with ``async_op=False`` there (its implicit prefetching
relies on accelerator streams, which are no-ops on CPU), so the flat path blocks the
calling thread just the same. It does cost the overlap once a user turns on FSDP2's
asynchronous unshard (``FSDPModule._set_unshard_async_op(True)``, plus explicit
forward prefetching): the flat all-gather then becomes a gloo ``Work`` that runs on
gloo's threads while the previous block computes, but the hierarchical comm still
blocks, so the hierarchical path is leaner but no longer faster.

`DeferredStageAllGather` is the proposal, measurable here without touching
``lightning_mics``: when FSDP asks for ``async_op=True`` it issues stage 1 (the slow
inter-node all-gather) asynchronously and returns a ``dist.Work`` whose ``wait()``
(called by FSDP right before the block needs its parameters) waits for stage 1 and then
runs stage 2 (the fast intra-node all-gathers). Every collective is still issued from
the calling thread in program order, so all ranks issue the same sequence on the inter-
and intra-node process groups (a helper thread issuing stage 2 would race with the
reduce-scatter stages on the same groups and could mismatch across ranks). With
``async_op=False`` it behaves exactly like its parent.

`enable_async_unshard` switches a sharded model to asynchronous unshard with explicit
forward prefetching (each block prefetches the next; backward prefetching is FSDP2's
implicit one, which then also runs asynchronously), and with ``hierarchical`` swaps in
`DeferredStageAllGather` on every FSDP module. Uses FSDP2 private API
(``_set_unshard_async_op``): benchmark only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lightning_mics.collectives import HierarchicalAllGather, all_gather_single


class DeferredStageWork(dist.Work):
    """A ``dist.Work`` that finishes a two-stage collective on ``wait()``: waits for the
    first stage's work, then runs ``then()`` (once)."""

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


class DeferredStageAllGather(HierarchicalAllGather):
    """`HierarchicalAllGather` whose inter-node stage runs asynchronously when FSDP
    passes ``async_op=True`` (see the module docstring)."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        if not async_op or not self.in_stages(group):
            return super().__call__(output_tensor, input_tensor, group, async_op)
        chunk = input_tensor.numel()
        if chunk == 0 or output_tensor.numel() != chunk * self.p:
            return super().__call__(output_tensor, input_tensor, group, async_op)
        out = output_tensor.view(self.n, self.k * chunk)
        stage = torch.empty(self.n * chunk, dtype=input_tensor.dtype, device=input_tensor.device)
        inter, intra = self.groups.inter, self.groups.intra
        self._record("all_gather", stage, inter)
        first = all_gather_single(stage, input_tensor, group=inter, async_op=True)

        def second() -> None:
            staged = stage.view(self.n, chunk)
            for node in range(self.n):
                self._record("all_gather", out[node], intra)
                all_gather_single(out[node], staged[node], group=intra)

        return DeferredStageWork(first, second)


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def enable_async_unshard(model: nn.Module, blocks: list[nn.Module], hierarchical: bool) -> None:
    """Asynchronous unshard + explicit forward prefetch on a model sharded by
    `apply_mics`; with ``hierarchical``, the deferred-stage all-gather on every unit."""
    if hierarchical:
        from lightning_mics.accounting import find_comm_stats

        current = _fsdp_modules(model)[0]._get_fsdp_state()._fsdp_param_group._all_gather_comm
        if not isinstance(current, HierarchicalAllGather):
            raise TypeError(f"the model's all-gather is {type(current).__name__}, not hierarchical")
        comm = DeferredStageAllGather(current.groups)
        stats = find_comm_stats(model)
        if stats is not None:
            comm.attach_stats(stats)
        for module in _fsdp_modules(model):
            module.set_custom_all_gather(comm)
    root = model
    assert isinstance(root, FSDPModule)
    root._set_unshard_async_op(True)
    sharded = [b for b in blocks if isinstance(b, FSDPModule)]
    if sharded:
        root.set_modules_to_forward_prefetch([sharded[0]])
    for block, nxt in itertools.pairwise(sharded):
        block.set_modules_to_forward_prefetch([nxt])
