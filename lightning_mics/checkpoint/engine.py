"""The checkpoint engine: :func:`save` and :func:`load` of a dict of modules,
optimizers, stateful objects and plain values.

Every checkpoint of lightning-mics goes through these two functions: the plain API
(`lightning_mics.save_checkpoint` / `load_checkpoint`), the Trainer strategy and the
Fabric strategy only build the dict. Modelled on Lightning's own helpers that both of
its adapters call (``_save_checkpoint`` / ``_load_checkpoint`` in
``lightning/fabric/strategies/model_parallel.py``), with this package's formats
(:mod:`~lightning_mics.checkpoint.storage`), atomic publishing and safe loading.

What each value of ``state`` becomes:

- an ``nn.Module``: its state dict (DTensor shards, or unsharded with ``full``), stored
  with the tensors; loaded in place;
- an ``Optimizer``: its state dict keyed by parameter names (so that it survives
  resharding), stored with the tensors; loaded in place. Its module is the one of
  ``state`` (or of ``modules``) that holds its parameters;
- a :class:`StateDict`: a state dict the caller took itself (the Trainer's, which
  Lightning builds), stored with the tensors; on loading a sharded checkpoint, a
  template filled in place (resharded);
- an object with ``state_dict()`` and ``load_state_dict()`` (an LR scheduler, ...): its
  state dict, stored with the plain data; restored in place;
- anything else: plain data (``meta.pt`` of a sharded checkpoint); on loading, the
  stored value is written into ``state``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_mics.checkpoint.discovery import resolve_checkpoint
from lightning_mics.checkpoint.format import MissingEntryError
from lightning_mics.checkpoint.state_dicts import (
    model_state_dict,
    module_of,
    optimizer_state_dict,
    set_model_state,
    set_optimizer_state,
)
from lightning_mics.checkpoint.storage import (
    checkpoint_keys,
    load_full,
    load_sharded,
    save_full,
    save_sharded,
)

#: ``{key: predicate(name, value)}``: keep only the entries of ``state[key]``'s state
#: dict that the predicate accepts (Fabric's ``fabric.save(..., filter=...)``).
Filter = Mapping[str, Callable[[str, Any], bool]]


class StateDict(dict):
    """A model's or an optimizer's state dict that the caller took itself: stored with
    the tensors, not with the plain data (see the module docstring)."""


def save(
    path: str | os.PathLike,
    state: Mapping[str, Any],
    *,
    full: bool,
    info: Mapping[str, Any] | None = None,
    model_key: str | None = None,
    filter: Filter | None = None,
    modules: Iterable[nn.Module] = (),
) -> Path:
    """Collective: save ``state`` to ``path``, sharded or (``full``) as one file written
    by rank 0, published atomically; returns the path.

    ``info`` (plain data: the layout's sizes) goes into the checkpoint's marker.
    ``model_key`` names the model's entry, for consolidation; by default ``state`` must
    hold exactly one module, whose key it is. ``modules``: other modules that an
    optimizer of ``state`` may belong to.
    """
    owners = [*(v for v in state.values() if isinstance(v, nn.Module)), *modules]
    if model_key is None:
        keys = [key for key, value in state.items() if isinstance(value, nn.Module)]
        if len(keys) != 1:
            raise ValueError(
                "Pass exactly one model in the state to save, e.g. "
                f"{{'model': model, 'optimizer': optimizer, ...}}; got {keys}."
            )
        model_key = keys[0]
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for key, value in state.items():
        target = tensors
        if isinstance(value, nn.Module):
            value = model_state_dict(value, full=full)
        elif isinstance(value, Optimizer):
            value = optimizer_state_dict(module_of(value, owners), value, full=full)
        elif isinstance(value, StateDict):
            value = dict(value)
        else:
            target = plain
            if _is_stateful(value):
                value = value.state_dict()
        _apply_filter(key, value, filter or {}, target)
    if full:
        return save_full(path, {**tensors, **plain}, model_key=model_key, info=dict(info or {}))
    return save_sharded(path, tensors, plain, model_key=model_key, info=dict(info or {}))


def load(
    path: str | os.PathLike,
    state: dict[str, Any] | None = None,
    *,
    strict: bool = True,
    modules: Iterable[nn.Module] = (),
) -> dict[str, Any]:
    """Collective: load the checkpoint ``path`` (of either format, saved under any
    topology, or a directory of checkpoints: its newest complete one) into ``state``;
    return the stored entries that ``state`` did not ask for.

    Modules, optimizers and stateful objects are restored in place, plain values are
    written into ``state``. ``strict``: a requested entry that the checkpoint lacks
    raises :class:`~lightning_mics.checkpoint.MissingEntryError` (otherwise it is
    skipped), and model state dicts must match exactly. ``state=None`` returns a full
    checkpoint's content as it is. ``modules``: other modules that an optimizer of
    ``state`` may belong to.
    """
    path, kind = resolve_checkpoint(path)
    if state is None:
        if kind == "full":
            return load_full(path)
        raise ValueError(
            f"{path} is a sharded checkpoint: pass the objects to load into, e.g. "
            "{'model': model, 'optimizer': optimizer}."
        )
    owners = [*(v for v in state.values() if isinstance(v, nn.Module)), *modules]
    wanted = [key for key, value in state.items() if _holds_tensors(value)]
    if kind == "full":
        stored = load_full(path)
        loaded = {k: stored.pop(k) for k in wanted if _has_entry(k, stored, path, strict)}
    else:
        available = checkpoint_keys(path)
        loaded = {
            key: _template(state[key], owners)
            for key in wanted
            if _has_entry(key, available, path, strict)
        }
        stored = load_sharded(path, loaded, strict=strict)
    # Modules first: an optimizer's state is set through its module.
    for key in sorted(loaded, key=lambda k: not isinstance(state[k], nn.Module)):
        _restore(state[key], loaded[key], full=kind == "full", strict=strict, owners=owners)
    for key in state:
        if key in wanted:
            continue
        if key in stored:
            # As Lightning's own strategies do: an object with `load_state_dict` (LR
            # scheduler, precision plugin, user object) is restored in place; a plain
            # value is written into the state dict.
            if _is_stateful(state[key]):
                state[key].load_state_dict(stored.pop(key))
            else:
                state[key] = stored.pop(key)
        elif strict:
            raise MissingEntryError(
                f"The requested state contains a key {key!r} that does not exist in the "
                f"checkpoint {path}. To disable strict loading, set strict=False."
            )
    return stored


# --------------------------------------------------------------------------- helpers
def _holds_tensors(value: Any) -> bool:
    return isinstance(value, nn.Module | Optimizer | StateDict)


def _is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def _has_entry(key: str, available: Iterable[str], path: Path, strict: bool) -> bool:
    if key in available:
        return True
    if strict:
        raise MissingEntryError(
            f"Checkpoint {path} has no entry {key!r} (has {sorted(available)})."
        )
    return False


def _template(value: Any, owners: list[nn.Module]) -> Any:
    """What DCP fills in place for ``value``: its current (sharded) state dict."""
    if isinstance(value, nn.Module):
        return model_state_dict(value)
    if isinstance(value, Optimizer):
        return optimizer_state_dict(module_of(value, owners), value)
    return value  # a StateDict


def _restore(value: Any, loaded: Any, *, full: bool, strict: bool, owners: list[nn.Module]) -> None:
    if isinstance(value, nn.Module):
        set_model_state(value, loaded, full=full, strict=strict)
    elif isinstance(value, Optimizer):
        set_optimizer_state(module_of(value, owners), value, loaded, full=full)
    elif loaded is not value:  # a StateDict of a full checkpoint
        value.clear()
        value.update(loaded)


def _apply_filter(key: str, value: Any, filter: Filter, target: dict[str, Any]) -> None:
    """``target[key] = value``, keeping only what ``filter[key]`` accepts (as Lightning's
    ``_apply_filter``)."""
    if key in filter and isinstance(value, dict):
        kept = {k: v for k, v in value.items() if filter[key](k, v)}
        if kept:
            target[key] = kept
    else:
        target[key] = value
