"""Two-hop gradient synchronisation across the micro-steps of one optimizer step.

FSDP2 flags do the work: ``set_requires_all_reduce(False)`` keeps the per-micro-step
reduce-scatter inside the partition group and defers the cross-replica all-reduce,
``set_requires_gradient_sync(False)`` defers both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lightning_mics import _fsdp_internals as fsdp
from lightning_mics.config import AccumulationMode


def fsdp_root(model: nn.Module) -> FSDPModule:
    if not isinstance(model, FSDPModule):
        raise TypeError(
            f"{type(model).__name__} is not sharded: call apply_mics(model, ...) first."
        )
    return model


@contextmanager
def micro_step(
    model: nn.Module,
    *,
    is_last: bool,
    mode: AccumulationMode | str = AccumulationMode.TWO_HOP,
) -> Iterator[None]:
    """Run one micro-step's forward and backward under the chosen accumulation mode.

    Wrap the forward *and* backward of every micro-step; ``is_last`` marks the micro-step
    after which the optimizer steps. Flags are restored on exit, also on error.
    """
    root = fsdp_root(model)
    mode = AccumulationMode(mode)
    if is_last or mode is AccumulationMode.EVERY_MICRO_STEP:
        yield
        return
    if mode is AccumulationMode.TWO_HOP:
        root.set_requires_all_reduce(False)
        try:
            yield
        finally:
            root.set_requires_all_reduce(True)
    else:
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)


def has_pending_gradients(model: nn.Module) -> bool:
    """Whether micro-steps left gradients that no synchronising backward has consumed."""
    return any(
        fsdp.has_partial_reduce_output(group) or fsdp.has_unsharded_grads(group)
        for group in fsdp.param_groups(model)
    )


@torch.no_grad()
def flush_pending_gradients(model: nn.Module) -> bool:
    """Finish the gradient synchronisation of an accumulation window that ended early.

    When the last micro-step of a window runs no synchronising backward (its
    ``training_step`` returned ``None``, or manual optimization stepped inside a no-sync
    block), earlier micro-steps' gradients are still parked in FSDP: reduce-scattered but
    not all-reduced (``two_hop``) or not reduced at all (``last_micro_step_only``). Left
    there they would leak into the next window. This completes their reduction into the
    sharded ``.grad`` so that the optimizer step sees them, and returns whether anything
    was pending. Collective over the whole mesh: call it on every rank.
    """
    root = fsdp_root(model)
    # NOTE: the decision must be identical on all ranks or the collectives below hang;
    # the flags are set identically everywhere, so the local view is the global one.
    if not has_pending_gradients(model):
        return False
    root.set_requires_gradient_sync(True)
    root.set_requires_all_reduce(True)
    for group in fsdp.param_groups(model):
        # NOTE: with only a parked partial sum (two_hop) there are no unsharded grads,
        # and FSDP's post-backward would return early. Feeding it zero gradients makes
        # its own reduction path add the partial sum, all-reduce it across replicas and
        # divide as usual, so the result matches a normal last micro-step exactly.
        # The user's own setting (`set_reduce_scatter_unused_params`) is restored after.
        user_setting = fsdp.reduce_scatter_unused_params(group)
        feed_zeros = fsdp.has_partial_reduce_output(group) and not fsdp.has_unsharded_grads(group)
        fsdp.set_reduce_scatter_unused_params(group, user_setting or feed_zeros)
        try:
            fsdp.run_post_backward(group)
        finally:
            fsdp.set_reduce_scatter_unused_params(group, user_setting)
    for group in fsdp.param_groups(model):
        fsdp.finalize_backward(group)
    return True
