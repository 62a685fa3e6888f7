"""Every rank's RNG states in a Trainer checkpoint, so that a resumed run draws exactly
the random numbers (dropout, ...) the uninterrupted run would have drawn."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

#: Checkpoint entry holding the list of every rank's RNG states, indexed by rank.
RNG_KEY = "mics_rng_states"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, Python, NumPy) in a form that loads with
    ``weights_only=True`` (tensors, tuples and ints only)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        with contextlib.suppress(ImportError):
            import numpy as np

            name, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def gather_rng_states() -> list[dict[str, Any]]:
    """Collective: every rank's :func:`rng_state`, indexed by rank."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def this_ranks_state(
    states: list[dict[str, Any]] | None, rank: int, world_size: int
) -> dict[str, Any] | None:
    """This rank's entry of a checkpoint's :data:`RNG_KEY` list; ``None`` unless the
    checkpoint was saved with the same world size (only then is resuming exact)."""
    return states[rank] if states and len(states) == world_size else None
