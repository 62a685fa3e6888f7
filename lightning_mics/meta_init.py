"""Materialise a model created on the meta device, and prove that it was initialised.

``trainer.init_module(empty_init=True)``, ``fabric.init_module(empty_init=True)`` and
``with torch.device("meta")`` create modules whose tensors have shapes but no memory.
:func:`~lightning_mics.sharding.apply_mics` shards such a model first (each rank then
allocates only its shards) and calls :func:`materialize_meta_module`, which

1. allocates every meta tensor on the device (``to_empty``: *uninitialised* memory).
   Tensors that were created with values (outside the meta device) keep them;
2. runs the initialisers, each on every module that holds a meta tensor (directly or
   below it), children before parents (the order of ``model.apply``), a later one
   overriding an earlier one:

   a. ``reset_parameters()`` of every module that has one (``_reset_parameters()`` for
      ``torch.nn`` built-ins that only have that, such as ``nn.MultiheadAttention``);
   b. the model's own initialisation, found by duck typing: a Hugging Face style
      ``_init_weights(module)`` (of the nearest module above that has one, as
      ``PreTrainedModel.init_weights`` applies it), or a torchtitan style
      ``init_weights()`` without arguments, called once on the outermost module that
      has it;
   c. ``MiCSConfig.init_fn``, called with every module;

3. checks that the initialisers wrote every meta tensor, and raises
   :class:`MetaInitError` naming the ones they did not, before any training step, with
   the same verdict on every rank. A buffer computed in ``__init__`` (a rotary
   embedding's ``inv_freq``, BERT's ``position_ids``) has no value on the meta device:
   ``reset_parameters()`` rarely recomputes it and no checkpoint holds a non-persistent
   buffer, so an initialiser must re-create it.

Writes are tracked, not values (``to_empty`` memory can hold anything, zeros included):
a ``TorchDispatchMode`` sees every operator the initialisers run, on the sharded
``DTensor`` parameters (or their local shards) and on the buffers, and records how many
elements each one wrote into each tensor's storage. A tensor counts as initialised when
its writes add up to its size, or, for a buffer, when an initialiser replaced it with a
new tensor. Replacing a *parameter* (``p.data = ...``, a new ``nn.Parameter``,
``to_empty()`` again) is an error: FSDP keeps training the storage it sharded.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightning_mics import _fsdp_internals as fsdp
from lightning_mics.process_groups import comm_device

#: A user initialiser: called with each module, children first (see `MiCSConfig.init_fn`).
InitFn = Callable[[nn.Module], Any]

# Verdict per tensor (the maximum over ranks wins).
_OK, _NOT_WRITTEN, _STILL_META, _PARAM_REPLACED = 0, 1, 2, 3
_MAX_LISTED = 20


class MetaInitError(RuntimeError):
    """A model created on the meta device was not completely initialised."""


@dataclass
class _Slot:
    """One parameter or buffer that was on the meta device, after ``to_empty``."""

    name: str  # fully qualified
    module: nn.Module
    attr: str
    is_param: bool
    tensor: torch.Tensor
    key: tuple[Any, int]
    numel: int  # global (a DTensor's full size)
    local_numel: int


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _storage_key(tensor: torch.Tensor) -> tuple[Any, int]:
    local = _local(tensor)
    return (local.device, local.untyped_storage().data_ptr())


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    for name, param in module.named_parameters(recurse=False):
        yield name, param, True
    for name, buffer in module.named_buffers(recurse=False):
        yield name, buffer, False


def _own_tensor(module: nn.Module, attr: str, is_param: bool) -> torch.Tensor | None:
    named = module.named_parameters if is_param else module.named_buffers
    return dict(named(recurse=False)).get(attr)


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool, torch.Tensor]]:
    """(qualified name, owning module, attribute, is_param, tensor), each tensor once."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for attr, tensor, is_param in _own_tensors(module):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield (f"{prefix}.{attr}" if prefix else attr), module, attr, is_param, tensor


def post_order(model: nn.Module) -> list[nn.Module]:
    """Every module once, children before their parent (the order of ``model.apply``)."""
    order: list[nn.Module] = []
    seen: set[int] = set()
    stack: list[tuple[nn.Module, bool]] = [(model, False)]
    while stack:
        module, expanded = stack.pop()
        if expanded:
            order.append(module)
            continue
        if id(module) in seen:
            continue
        seen.add(id(module))
        stack.append((module, True))
        stack.extend((child, False) for child in reversed(list(module.children())))
    return order


class _WriteTracker(fsdp.TorchDispatchMode):
    """Counts the elements every operator writes into the watched storages."""

    def __init__(self, keys: set[tuple[Any, int]]) -> None:
        super().__init__()
        self.keys = keys
        self.global_writes: dict[tuple[Any, int], int] = defaultdict(int)
        self.local_writes: dict[tuple[Any, int], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor in fsdp.written_tensors(func, args, kwargs):
            if tensor.is_meta:
                continue
            key = _storage_key(tensor)
            if key in self.keys:
                # NOTE: a DTensor write counts its global size; a write into a local shard
                # (`p.to_local().normal_()`) counts against the shard's size.
                writes = self.global_writes if isinstance(tensor, DTensor) else self.local_writes
                writes[key] += tensor.numel()
        return func(*args, **kwargs)

    def written(self, slot: _Slot) -> bool:
        return (
            self.global_writes[slot.key] >= slot.numel
            or self.local_writes[slot.key] >= slot.local_numel
        )


def _meta_holders(model: nn.Module) -> set[int]:
    """ids of the modules that hold a meta tensor, directly or below them."""
    holders: set[int] = set()
    for module in post_order(model):
        if any(t.is_meta for _, t, _ in _own_tensors(module)) or any(
            id(c) in holders for c in module.children()
        ):
            holders.add(id(module))
    return holders


def _callable_with(fn: Callable[..., Any], nargs: int) -> bool:
    try:
        inspect.signature(fn).bind(*([None] * nargs))
    except TypeError:
        return False
    except ValueError:  # no signature (builtins): try it
        return True
    return True


class _Initialisers:
    """Runs the initialisers in order and remembers what it ran, for the error message."""

    def __init__(self, model: nn.Module, init_fn: InitFn | None) -> None:
        self.model = model
        self.init_fn = init_fn
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def run(self, modules: list[nn.Module]) -> None:
        self._reset_parameters(modules)
        self._model_init(modules)
        if self.init_fn is not None:
            for module in modules:
                self.init_fn(module)
            self.ran.append(f"init_fn {_describe_callable(self.init_fn)}")

    def _reset_parameters(self, modules: list[nn.Module]) -> None:
        count = 0
        for module in modules:
            reset = getattr(module, "reset_parameters", None)
            if not callable(reset) and _is_torch_builtin(module):
                # e.g. nn.MultiheadAttention, nn.Transformer: their __init__ calls this
                reset = getattr(module, "_reset_parameters", None)
            if callable(reset):
                reset()
                count += 1
        self.ran.append(f"reset_parameters() of {count} module(s)")

    def _model_init(self, modules: list[nn.Module]) -> None:
        wanted = {id(m) for m in modules}
        owners: dict[int, nn.Module] = {}  # module -> nearest `_init_weights` owner
        roots: list[nn.Module] = []  # outermost torchtitan-style `init_weights()`

        def visit(module: nn.Module, owner: nn.Module | None, claimed: bool) -> None:
            if callable(getattr(module, "_init_weights", None)):
                owner, claimed = module, True
            elif not claimed and callable(getattr(module, "init_weights", None)):
                roots.append(module)
                claimed = True
            if owner is not None:
                owners[id(module)] = owner
            for child in module.children():
                visit(child, owner, claimed)

        visit(self.model, None, False)
        usable: dict[int, bool] = {}
        used: dict[int, nn.Module] = {}
        for module in modules:
            owner = owners.get(id(module))
            if owner is None:
                continue
            if id(owner) not in usable:
                usable[id(owner)] = _callable_with(owner._init_weights, 1)
                if not usable[id(owner)]:
                    self.skipped.append(
                        f"{_class_name(owner)}._init_weights (it does not take one module)"
                    )
            if usable[id(owner)]:
                owner._init_weights(module)
                used[id(owner)] = owner
        self.ran.extend(f"{_class_name(o)}._init_weights(module)" for o in used.values())
        for root in roots:
            if id(root) not in wanted:
                continue
            if _callable_with(root.init_weights, 0):
                root.init_weights()
                self.ran.append(f"{_class_name(root)}.init_weights()")
            else:
                self.skipped.append(
                    f"{_class_name(root)}.init_weights (it needs arguments; call it from init_fn)"
                )


def _is_torch_builtin(module: nn.Module) -> bool:
    # NOTE: the MRO, not the class: fully_shard swaps in a subclass (FSDP<Name>)
    return _user_class(module).__module__.startswith("torch.nn.")


def _user_class(module: nn.Module) -> type:
    """The module's own class, under the FSDP<Name> subclass that fully_shard swaps in."""
    return next(k for k in type(module).__mro__ if not issubclass(k, FSDPModule))


def _class_name(module: nn.Module) -> str:
    return _user_class(module).__name__


def _describe_callable(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def materialize_meta_module(
    model: nn.Module,
    device: torch.device,
    init_fn: InitFn | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    param_device: torch.device | None = None,
) -> None:
    """Allocate ``model``'s meta tensors on ``device``, initialise them, and check it.

    See the module docstring for the order of the initialisers. Call it after
    ``fully_shard`` (each rank then allocates only its shards). With ``group`` (every
    rank of the model's mesh), the verdict is agreed over it, so that every rank raises
    the same :class:`MetaInitError` or none does (one small all-reduce); an exception in
    an initialiser on one rank is likewise raised on all of them. ``param_device``
    (default ``device``) holds the parameters, e.g. host memory with CPU offload, while
    buffers go to ``device``.
    """
    holders = _meta_holders(model)
    with torch.no_grad():
        kept = {
            name: _local(tensor).clone()
            for name, _, _, _, tensor in _named_tensors(model)
            if not tensor.is_meta
        }
    meta_names = {name for name, *_ in _named_tensors(model) if name not in kept}
    param_device = param_device or device
    # NOTE: only the modules that hold meta tensors, each without recursing: `to_empty`
    # goes through `Module._apply`, which some modules extend to state that is neither a
    # parameter nor a buffer (torchmetrics' `Metric` states), and that state must keep its
    # values.
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(tensor.is_meta for tensor in own):
            module.to_empty(device=param_device, recurse=False)
    if param_device != device:
        # NOTE: CPU offload: FSDP keeps sharded parameters in host memory (and refuses
        # them elsewhere at its lazy init), buffers live on the compute device.
        for module in model.modules():
            for attr, buffer in list(module.named_buffers(recurse=False)):
                if buffer.device != device:
                    setattr(module, attr, torch.empty_like(buffer, device=device))

    slots: list[_Slot] = []
    with torch.no_grad():
        for name, module, attr, is_param, tensor in _named_tensors(model):
            if name in meta_names:
                local = _local(tensor)
                slots.append(
                    _Slot(
                        name,
                        module,
                        attr,
                        is_param,
                        tensor,
                        _storage_key(tensor),
                        tensor.numel(),
                        local.numel(),
                    )
                )
    modules = [m for m in post_order(model) if id(m) in holders]
    initialisers = _Initialisers(model, init_fn)
    tracker = _WriteTracker({s.key for s in slots})
    failure: BaseException | None = None
    try:
        with torch.no_grad(), tracker:
            initialisers.run(modules)
    except Exception as err:  # agreed on below, then re-raised
        failure = err

    verdicts = [] if failure is not None else [_verdict(slot, tracker, device) for slot in slots]
    failed_ranks, verdicts = _agree(failure is not None, verdicts, len(slots), group)
    if failure is not None:
        raise failure
    if failed_ranks:
        raise MetaInitError(
            f"An initialiser of the meta-device model failed on rank(s) {failed_ranks} "
            "(see their error); this rank stops too."
        )
    with torch.no_grad():
        # Tensors created with values keep them, whatever the initialisers did.
        for name, _, _, _, tensor in _named_tensors(model):
            if name in kept:
                _local(tensor).copy_(kept[name])
    problems = [(slot, v) for slot, v in zip(slots, verdicts, strict=True) if v != _OK]
    if problems:
        raise MetaInitError(_message(problems, initialisers))


def _verdict(slot: _Slot, tracker: _WriteTracker, device: torch.device) -> int:
    current = _own_tensor(slot.module, slot.attr, slot.is_param)
    if current is None:  # removed by an initialiser: nothing left to initialise
        return _OK
    replaced = current is not slot.tensor or (
        not current.is_meta and _storage_key(current) != slot.key
    )
    if slot.is_param:
        if replaced:
            return _PARAM_REPLACED
        return _OK if slot.numel == 0 or tracker.written(slot) else _NOT_WRITTEN
    if replaced:
        if current.is_meta:
            return _STILL_META
        if current.device != device and not isinstance(current, DTensor):
            setattr(slot.module, slot.attr, current.to(device))
        return _OK
    return _OK if slot.numel == 0 or tracker.written(slot) else _NOT_WRITTEN


def _agree(
    failed: bool, verdicts: list[int], count: int, group: dist.ProcessGroup | None
) -> tuple[list[int], list[int]]:
    """(ranks whose initialisers raised, worst verdict per tensor over all ranks)."""
    if group is None:  # an initialiser's exception is raised by the caller
        return [], verdicts or [_OK] * count
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    flags = torch.zeros(world + count, dtype=torch.int32)
    flags[rank] = int(failed)
    if verdicts:
        flags[world:] = torch.tensor(verdicts, dtype=torch.int32)
    flags = flags.to(comm_device(group))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    flags = flags.cpu()
    ranks = dist.get_process_group_ranks(group)
    failed_ranks = [ranks[r] for r in range(world) if flags[r]]
    return failed_ranks, flags[world:].tolist()


def _describe(slot: _Slot, verdict: int) -> str:
    owner = _class_name(slot.module)
    if slot.is_param:
        if verdict == _PARAM_REPLACED:
            return f"parameter {slot.name!r} of {owner} (replaced, not written in place)"
        has_reset = callable(getattr(slot.module, "reset_parameters", None))
        why = "" if has_reset else ", which has no reset_parameters()"
        return f"parameter {slot.name!r} of {owner}{why}"
    if verdict == _STILL_META:
        return f"buffer {slot.name!r} of {owner} (re-created on the meta device)"
    persistent = slot.attr not in fsdp.non_persistent_buffer_names(slot.module)
    kind = "buffer" if persistent else "non-persistent buffer"
    why = (
        ""
        if persistent
        else " (the value its __init__ computed does not exist on the meta device, and no "
        "checkpoint holds it)"
    )
    return f"{kind} {slot.name!r} of {owner}{why}"


def _message(problems: list[tuple[_Slot, int]], initialisers: _Initialisers) -> str:
    listed = [f"  - {_describe(slot, v)}" for slot, v in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        listed.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    ran = "; ".join(initialisers.ran) or "none"
    skipped = f" Not called: {'; '.join(initialisers.skipped)}." if initialisers.skipped else ""
    lines = [
        "The model was created on the meta device (trainer.init_module(empty_init=True), "
        "fabric.init_module(empty_init=True) or torch.device('meta')), so after sharding "
        "MiCS allocates each tensor with uninitialised memory and runs the model's "
        "initialisers, but these tensors got no value from them, so training would use "
        "garbage (NaN losses, out-of-range indices):",
        *listed,
        f"Initialisers that ran (children before parents, later ones win): {ran}.{skipped}",
    ]
    if any(v == _PARAM_REPLACED for _, v in problems):
        lines.append(
            "A replaced parameter (`p.data = ...`, a new nn.Parameter, to_empty() or .to() "
            "inside an initialiser) is no longer the tensor FSDP sharded: write into it in "
            "place instead (p.copy_(...), nn.init.normal_(p), ...). MiCS allocates the "
            "memory itself before any initialiser runs."
        )
    lines += [
        "Fix: initialise them in place (copy_, fill_, nn.init.*_) in one of:",
        "  - a reset_parameters() method of their module, which MiCS calls;",
        "  - init_fn=fn (MiCSConfig(init_fn=...), or lightning_mics.MiCSStrategy(init_fn=...) "
        "/ lightning_mics.fabric.MiCSStrategy(init_fn=...)): fn(module) is called under "
        "torch.no_grad() for every module, children first like model.apply(fn), after the "
        "initialisers above;",
        "  - or create these modules outside the meta device (no empty_init=True), so that "
        "they keep the values their __init__ computes.",
        "A buffer on the meta device has no value: one computed in __init__ (rotary "
        "inv_freq, position_ids, ...) must be re-created by an initialiser. Parameters and "
        "persistent buffers that a checkpoint loaded right after sharding overwrites only "
        "need an init_fn that fills them (e.g. with zeros); a checkpoint never holds a "
        "non-persistent buffer.",
    ]
    return "\n".join(lines)


__all__ = ["InitFn", "MetaInitError", "materialize_meta_module", "post_order"]
