"""What checkpoint operations need from the process group (none in one process): this
rank, broadcasting rank 0's choices, agreeing on rank 0's failure, logging on rank 0."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch.distributed as dist

from lightning_mics.checkpoint.format import CheckpointError

# NOTE: one logger for the whole package, named after it (`lightning_mics.checkpoint`).
log = logging.getLogger(__package__)
if not logging.getLogger().handlers and not log.handlers:
    # NOTE: as Lightning does for its own loggers: INFO is shown unless the application
    # configured logging itself.
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler())


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def info(message: str) -> None:
    """Log on the global rank 0 only (also before the process group exists)."""
    if (dist.get_rank() if is_dist() else int(os.environ.get("RANK", "0"))) == 0:
        log.info(message)


def broadcast_object(obj: Any) -> Any:
    if not is_dist():
        return obj
    objs = [obj]
    dist.broadcast_object_list(objs, src=0)
    return objs[0]


def barrier() -> None:
    if is_dist():
        dist.barrier()


def agree(error: BaseException | None) -> None:
    """Collective: raise on every rank if rank 0 failed (its error, by message)."""
    message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"Rank 0 failed to publish the checkpoint: {message}")
