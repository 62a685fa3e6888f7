"""Optimizer-side helpers that must see the whole (sharded) model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Clip gradients by the true global norm over sharded (DTensor) gradients.

    Each rank holds ``1/partition_size`` of every gradient; the local norms are combined
    over the partition group (replicas hold identical shards after the all-reduce, so
    they need no communication). Returns the total norm as a plain tensor, identical on
    every rank. Collective over the partition group: call it on every rank.
    """
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads, norm_type)
    if isinstance(total, DTensor):
        # NOTE: the norm of a Shard(0) DTensor is Partial over the shard dim; full_tensor()
        # reduces it with the right op for `norm_type` (sum of powers, or max for inf).
        total = total.full_tensor()
    # NOTE: checked on the reduced norm, identical on every rank, so that all ranks raise
    # together (a NaN in one rank's shard makes every rank's total NaN).
    if error_if_nonfinite and not torch.isfinite(total).item():
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} of the gradients is non-finite "
            f"({total.item()}), so they cannot be clipped. Find where the NaN/inf comes from "
            "(loss, learning rate, inputs), or pass error_if_nonfinite=False to scale the "
            "gradients by the non-finite norm anyway."
        )
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
