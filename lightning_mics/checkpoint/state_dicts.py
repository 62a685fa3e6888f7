"""State dicts of sharded models and their optimizers (``torch.distributed.checkpoint``'s
state-dict API): DTensor shards, or unsharded tensors (``full``), keyed by parameter
names so that they load under any other topology."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer


def model_state_dict(model: nn.Module, *, full: bool = False) -> dict[str, Any]:
    """The model's state dict: DTensor shards, or (``full``) unsharded CPU tensors on
    rank 0 and an empty dict on the other ranks. Collective for ``full``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    return get_model_state_dict(model, options=options)


def optimizer_state_dict(
    model: nn.Module, optimizer: Optimizer, *, full: bool = False
) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter names (so it survives resharding)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    return get_optimizer_state_dict(model, optimizer, options=options)


def set_model_state(
    model: nn.Module, state: Mapping[str, Any], *, full: bool, strict: bool = True
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=full, strict=strict)
    set_model_state_dict(model, dict(state), options=options)


def set_optimizer_state(
    model: nn.Module, optimizer: Optimizer, state: Mapping[str, Any], *, full: bool
) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    state = dict(state)
    if full and not _has_tensor_state(state):
        # NOTE: nothing to distribute (e.g. SGD without momentum keeps no state): the
        # full state dict is also this rank's, and DCP's full path cannot load it
        # ("Expected device to be set": it infers the device from tensor state).
        full = False
    options = StateDictOptions(full_state_dict=full)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def _has_tensor_state(state: Mapping[str, Any]) -> bool:
    """An optimizer state dict holds a per-parameter tensor that is not a scalar."""
    found = False

    def visit(value: Any) -> None:
        nonlocal found
        if isinstance(value, torch.Tensor):
            found = found or value.dim() > 0
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, list | tuple):
            for v in value:
                visit(v)

    visit(state.get("state", {}))
    return found


def module_of(optimizer: Optimizer, modules: Iterable[nn.Module]) -> nn.Module:
    """The module (one of ``modules``) whose parameters ``optimizer`` updates: optimizer
    state dicts are keyed by that module's parameter names."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules:
        if any(id(p) in ids for p in module.parameters()):
            return module
    raise ValueError("The optimizer's parameters belong to no module set up with MiCS.")


def unwrap_module(model: nn.Module) -> nn.Module:
    """The module itself behind a Fabric wrapper (``fabric.setup_module``)."""
    return getattr(model, "_original_module", None) or model


def unwrap_optimizer(optimizer: Optimizer | None) -> Optimizer | None:
    """The optimizer itself behind a Fabric wrapper (``fabric.setup_optimizers``)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, Optimizer) else optimizer
