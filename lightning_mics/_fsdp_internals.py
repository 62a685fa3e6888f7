"""Every private PyTorch API that lightning-mics uses, in one place, checked at import.

FSDP2's public surface (``fully_shard`` and the ``FSDPModule`` setters) does not cover
everything MiCS needs. The rest is reached through this module only:

- the base classes of custom FSDP2 collectives (``AllGather`` / ``ReduceScatter`` in
  ``torch.distributed.fsdp._fully_shard._fsdp_api``), subclassed by the hierarchical and
  the recording comms;
- the parameter groups of an FSDP module and a few of their members (``post_backward``,
  ``finalize_backward``, ``_partial_reduce_output``, ``reduce_scatter_unused_params``,
  ``_training_state``, ``fsdp_params`` with ``unsharded_accumulated_grad`` and
  ``_unsharded_param``): ``flush_pending_gradients`` finishes a gradient reduction that
  FSDP parked, which no public API can do;
- ``FSDPModule._set_unshard_async_op`` (asynchronous pre-forward/pre-backward unshard,
  for `MiCSConfig.forward_prefetch`);
- ``DeviceMesh._flatten`` (one process group over a whole 2-D mesh);
- composable activation checkpointing (``torch.distributed._composable.checkpoint``);
- the default process group's timeout and the backend options that pass it on to new
  groups (``ProcessGroup._get_backend``, ``Options._timeout``, ``ProcessGroupGloo._Options``);
- ``TorchDispatchMode`` (``torch.utils._python_dispatch``) and an operator's schema
  (``OpOverload._schema``), which record the tensors an initialiser writes when a
  meta-device model is materialised;
- ``nn.Module._non_persistent_buffers_set`` (to say which buffers a checkpoint cannot
  restore);
- ``torch.distributed.checkpoint._traverse.set_element`` (used by the checkpoint
  package's safe load planner, ``checkpoint/safe_loading.py``).

NOTE: tested with torch 2.13 only. ``pyproject.toml`` allows ``>=2.13,<2.15`` (2.14 is
assumed compatible, not tested). At import, :func:`check_torch_internals` verifies that
every class, function and attribute listed here exists, including attributes that FSDP
only sets on instances (found in the bytecode of the class's methods), and raises an
``ImportError`` naming what is missing, the installed torch and the tested range: a torch
release that renamed one of them would otherwise make MiCS misbehave silently (e.g. a
flush that does nothing). Nothing else in the package may import a private torch module
or read a private torch attribute.
"""

from __future__ import annotations

import dis
import functools
import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

#: torch releases this package is tested with, and the range pyproject.toml allows.
TESTED_TORCH = "2.13"
SUPPORTED_TORCH = ">=2.13,<2.15"

_FSDP = "torch.distributed.fsdp._fully_shard"


@dataclass(frozen=True)
class Requirement:
    """One private name: ``attribute`` of ``owner`` (``"module:qualname"``).

    ``kind`` is ``"attr"`` (found with ``getattr`` on the owner) or ``"instance"`` (an
    attribute the owner class assigns to its instances: ``self.<attribute> = ...`` in one
    of its methods, or a class-level annotation).
    """

    owner: str
    attribute: str
    kind: str = "attr"

    def __str__(self) -> str:
        module, _, qualname = self.owner.partition(":")
        where = f"{module}.{qualname}" if qualname else module
        suffix = " (instance attribute)" if self.kind == "instance" else ""
        return f"{where}.{self.attribute}{suffix}"


REQUIREMENTS: tuple[Requirement, ...] = (
    # custom collectives
    Requirement(f"{_FSDP}._fsdp_api", "AllGather"),
    Requirement(f"{_FSDP}._fsdp_api", "ReduceScatter"),
    # parked gradients (grad_sync.flush_pending_gradients)
    Requirement(f"{_FSDP}._fsdp_common:TrainingState", "IDLE"),
    Requirement("torch.distributed.fsdp:FSDPModule", "_get_fsdp_state"),
    Requirement(f"{_FSDP}._fsdp_state:FSDPState", "_fsdp_param_groups", "instance"),
    Requirement(f"{_FSDP}._fsdp_param_group:FSDPParamGroup", "post_backward"),
    Requirement(f"{_FSDP}._fsdp_param_group:FSDPParamGroup", "finalize_backward"),
    Requirement(f"{_FSDP}._fsdp_param_group:FSDPParamGroup", "fsdp_params", "instance"),
    Requirement(f"{_FSDP}._fsdp_param_group:FSDPParamGroup", "_partial_reduce_output", "instance"),
    Requirement(
        f"{_FSDP}._fsdp_param_group:FSDPParamGroup", "reduce_scatter_unused_params", "instance"
    ),
    Requirement(f"{_FSDP}._fsdp_param_group:FSDPParamGroup", "_training_state", "instance"),
    Requirement(f"{_FSDP}._fsdp_param:FSDPParam", "unsharded_accumulated_grad", "instance"),
    Requirement(f"{_FSDP}._fsdp_param:FSDPParam", "_unsharded_param", "instance"),
    # forward prefetching
    Requirement("torch.distributed.fsdp:FSDPModule", "_set_unshard_async_op"),
    # meshes, activation checkpointing, process-group timeouts
    Requirement("torch.distributed.device_mesh:DeviceMesh", "_flatten"),
    Requirement("torch.distributed._composable", "checkpoint"),
    Requirement("torch.distributed:ProcessGroup", "_get_backend"),
    Requirement("torch._C._distributed_c10d:Backend.Options", "_timeout"),
    *(
        (Requirement("torch.distributed:ProcessGroupGloo", "_Options"),)
        if dist.is_gloo_available()
        else ()
    ),
    # meta-device materialisation
    Requirement("torch.utils._python_dispatch", "TorchDispatchMode"),
    Requirement("torch._ops:OpOverload", "_schema", "instance"),
    Requirement("torch.nn:Module", "_non_persistent_buffers_set", "instance"),
    # checkpoint/safe_loading.py
    Requirement("torch.distributed.checkpoint._traverse", "set_element"),
)


def _resolve(owner: str) -> Any:
    module_name, _, qualname = owner.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def _functions_of(cls: type) -> Iterator[Any]:
    for klass in cls.__mro__:
        for value in vars(klass).values():
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            elif isinstance(value, property):
                yield from (f for f in (value.fget, value.fset) if f is not None)
                continue
            if callable(value):
                yield inspect.unwrap(value)


def _code_objects(code: Any) -> Iterator[Any]:
    yield code
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _code_objects(const)


@functools.cache
def _instance_attribute_names(cls: type) -> frozenset[str]:
    """Attributes that ``cls`` (or a base) annotates or assigns on ``self``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(getattr(klass, "__annotations__", {}))
    for function in _functions_of(cls):
        code = getattr(function, "__code__", None)
        if code is None:
            continue
        for sub in _code_objects(code):
            names.update(
                ins.argval for ins in dis.get_instructions(sub) if ins.opname == "STORE_ATTR"
            )
            if code.co_name == "__init__":
                # NOTE: `super().__setattr__("name", value)` (as in nn.Module.__init__)
                # assigns by a string constant.
                names.update(c for c in sub.co_consts if isinstance(c, str) and c.isidentifier())
    return frozenset(names)


def missing_internals(requirements: tuple[Requirement, ...] = REQUIREMENTS) -> list[str]:
    """The requirements that this torch does not satisfy, described."""
    missing = []
    for req in requirements:
        try:
            owner = _resolve(req.owner)
        except (ImportError, AttributeError):
            missing.append(f"{req} ({req.owner.replace(':', '.')} is missing)")
            continue
        if req.kind == "instance":
            found = hasattr(owner, req.attribute) or (
                isinstance(owner, type) and req.attribute in _instance_attribute_names(owner)
            )
        else:
            found = hasattr(owner, req.attribute)
        if not found:
            missing.append(str(req))
    return missing


def check_torch_internals(requirements: tuple[Requirement, ...] = REQUIREMENTS) -> None:
    """Raise ``ImportError`` unless every private torch name MiCS uses exists."""
    missing = missing_internals(requirements)
    if missing:
        raise ImportError(
            f"lightning-mics cannot run on torch {torch.__version__}: it relies on private "
            "PyTorch (FSDP2 / c10d) internals that this release does not have:\n  "
            + "\n  ".join(missing)
            + f"\nlightning-mics is tested with torch {TESTED_TORCH} and supports torch "
            f"{SUPPORTED_TORCH}; install a torch in that range (e.g. pip install "
            f"'torch{SUPPORTED_TORCH}')."
        )


check_torch_internals()

# ------------------------------------------------------------------------ the names
# NOTE: imported only after the check, so that a missing one fails with the message above.
from torch.distributed._composable import checkpoint as _composable_checkpoint  # noqa: E402
from torch.distributed.checkpoint._traverse import set_element  # noqa: E402
from torch.distributed.fsdp._fully_shard._fsdp_api import (  # noqa: E402
    AllGather,
    ReduceScatter,
)
from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


# ----------------------------------------------------------------- FSDP param groups
def param_groups(model: nn.Module) -> Iterator[Any]:
    """Every FSDP parameter group (``FSDPParamGroup``) of every FSDP module in ``model``."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            yield from module._get_fsdp_state()._fsdp_param_groups


def has_partial_reduce_output(group: Any) -> bool:
    """Whether ``group`` holds a reduce-scattered gradient that was not all-reduced yet
    (``set_requires_all_reduce(False)`` micro-steps)."""
    return group._partial_reduce_output is not None


def has_unsharded_grads(group: Any) -> bool:
    """Whether ``group`` holds unsharded gradients that were never reduce-scattered
    (``set_requires_gradient_sync(False)`` micro-steps, or a backward not yet reduced)."""
    for fsdp_param in group.fsdp_params:
        if fsdp_param.unsharded_accumulated_grad is not None:
            return True
        # NOTE: `_unsharded_param` exists only after the group's first all-gather (the
        # requirement check guarantees the name itself still exists).
        unsharded = fsdp_param.__dict__.get("_unsharded_param")
        if unsharded is not None and unsharded.grad is not None:
            return True
    return False


def reduce_scatter_unused_params(group: Any) -> bool:
    """The group's ``reduce_scatter_unused_params`` flag (set publicly by
    ``FSDPModule.set_reduce_scatter_unused_params``; there is no public getter)."""
    return group.reduce_scatter_unused_params


def set_reduce_scatter_unused_params(group: Any, value: bool) -> None:
    """Set one group's flag (the public setter acts on modules, not on one group)."""
    group.reduce_scatter_unused_params = value


def run_post_backward(group: Any) -> None:
    """Run the group's post-backward (gradient reduction), outside any backward pass,
    and leave the group idle, as after a normal backward."""
    try:
        group.post_backward()
    finally:
        group._training_state = TrainingState.IDLE


def finalize_backward(group: Any) -> None:
    """Wait for the group's pending reductions and clear its per-backward state."""
    group.finalize_backward()


def set_unshard_async_op(module: FSDPModule, async_op: bool) -> None:
    """Make every pre-forward and pre-backward unshard of ``module`` and its FSDP
    descendants use ``async_op`` (FSDP2 has no public setter)."""
    module._set_unshard_async_op(async_op)


# ------------------------------------------------------------------------ meshes, AC
def flat_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """One process group over every rank of ``mesh``."""
    if mesh.ndim == 1:
        return mesh.get_group()
    # NOTE: DeviceMesh._flatten is private; it caches the flattened mesh per mesh.
    return mesh._flatten().get_group()


def checkpoint_module(module: nn.Module) -> None:
    """Composable activation checkpointing (keeps parameter names unchanged)."""
    _composable_checkpoint(module)


# -------------------------------------------------------------- process-group options
def default_group_timeout(device: torch.device) -> timedelta | None:
    """The timeout the default process group was created with, ``None`` when it has no
    backend for ``device`` (e.g. CPU tensors on an NCCL-only group)."""
    if not dist.is_initialized():
        return None
    try:
        backend = dist.group.WORLD._get_backend(device)
    except RuntimeError:
        return None
    return backend.options._timeout


def backend_options(backend: str, timeout: timedelta) -> Any | None:
    """Options for ``dist.new_group`` / ``init_device_mesh`` on ``backend`` carrying
    ``timeout``; ``None`` for a backend whose options are not known here."""
    if backend == "gloo" and dist.is_gloo_available():
        options = dist.ProcessGroupGloo._Options()
    elif backend == "nccl" and dist.is_nccl_available():
        options = dist.ProcessGroupNCCL.Options()
    else:
        return None
    options._timeout = timeout
    return options


# ------------------------------------------------------------------ dispatch, nn.Module
def written_tensors(func: Any, args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensors that the operator call ``func(*args, **kwargs)`` writes (its
    ``Tensor(a!)`` arguments, ``out=`` included), as seen by a ``TorchDispatchMode``."""
    schema = func._schema
    for index, argument in enumerate(schema.arguments):
        alias = argument.alias_info
        if alias is None or not alias.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, torch.Tensor):
                yield item


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """Names of ``module``'s own buffers registered with ``persistent=False``."""
    return set(module._non_persistent_buffers_set)


__all__ = [
    "SUPPORTED_TORCH",
    "TESTED_TORCH",
    "AllGather",
    "ReduceScatter",
    "Requirement",
    "TorchDispatchMode",
    "TrainingState",
    "backend_options",
    "check_torch_internals",
    "checkpoint_module",
    "default_group_timeout",
    "finalize_backward",
    "flat_group",
    "has_partial_reduce_output",
    "has_unsharded_grads",
    "missing_internals",
    "non_persistent_buffer_names",
    "param_groups",
    "reduce_scatter_unused_params",
    "run_post_backward",
    "set_element",
    "set_reduce_scatter_unused_params",
    "set_unshard_async_op",
    "written_tensors",
]
