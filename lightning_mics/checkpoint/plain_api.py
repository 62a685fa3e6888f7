"""The plain-PyTorch checkpoint API: one model and its optimizer, over the engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_mics.checkpoint import engine
from lightning_mics.checkpoint.discovery import resolve_checkpoint, stored_model_key
from lightning_mics.checkpoint.format import StateDictType, validate_state_dict_type
from lightning_mics.checkpoint.state_dicts import unwrap_module, unwrap_optimizer


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    *,
    state_dict_type: StateDictType = "sharded",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Collective: save ``model`` (and ``optimizer``) of a MiCS run.

    Keys: ``"model"``, ``"optimizer"``; ``extra`` (plain data: step counters, scheduler
    state, ...) is stored alongside and returned by :func:`load_checkpoint`.
    """
    full = validate_state_dict_type(state_dict_type) == "full"
    state: dict[str, Any] = {"model": unwrap_module(model)}
    if optimizer is not None:
        state["optimizer"] = unwrap_optimizer(optimizer)
    return engine.save(path, {**state, **(extra or {})}, full=full, model_key="model")


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    *,
    strict: bool = True,
    model_key: str | None = None,
    optimizer_key: str = "optimizer",
) -> dict[str, Any]:
    """Collective: load a checkpoint into ``model`` (sharded with MiCS under any
    topology, or unsharded in one process) and ``optimizer``; return the extra data.

    ``path`` may be a checkpoint or a directory of checkpoints (the newest complete one
    is loaded). ``model_key`` defaults to the key the checkpoint was saved with.
    """
    path, kind = resolve_checkpoint(path)
    state: dict[str, Any] = {model_key or stored_model_key(path, kind): unwrap_module(model)}
    if optimizer is not None:
        state[optimizer_key] = unwrap_optimizer(optimizer)
    return engine.load(path, state, strict=strict)
