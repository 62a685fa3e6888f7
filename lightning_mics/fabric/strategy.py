"""`MiCSStrategy` for ``lightning.fabric.Fabric``: a thin adapter over `MiCSRuntime`."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.fabric.strategies.parallel import ParallelStrategy
from lightning.fabric.strategies.strategy import _apply_filter, _BackwardSyncControl
from lightning.fabric.utilities.distributed import (
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.types import ReduceOp, _Stateful
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_mics import checkpoint as ckpt
from lightning_mics._lightning import MiCSParallelMixin
from lightning_mics.checkpoint import StateDictType
from lightning_mics.config import MiCSConfig
from lightning_mics.optim import clip_grad_norm_
from lightning_mics.runtime import MiCSRuntime


class _MiCSBackwardSyncControl(_BackwardSyncControl):
    def __init__(self, runtime: MiCSRuntime) -> None:
        self._runtime = runtime

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager:
        """``enabled=True`` marks a non-final micro-step of an accumulation window."""
        return self._runtime.micro_step(module, is_last=not enabled)


class MiCSStrategy(MiCSParallelMixin, ParallelStrategy):
    """MiCS sharded data parallelism for Fabric.

    Takes the options of :class:`~lightning_mics.MiCSConfig` as keyword arguments.
    ``fabric.setup(model)`` shards the model; wrap non-final micro-steps of an
    accumulation window in ``fabric.no_backward_sync(model, enabled=True)``.
    """

    _launcher_cls = _SubprocessScriptLauncher

    def __init__(
        self,
        config: MiCSConfig | None = None,
        *,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        accelerator: Any | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any | None = None,
        checkpoint_io: Any | None = None,
        precision: Any | None = None,
        state_dict_type: StateDictType = "sharded",
        **options: Any,
    ) -> None:
        """``options`` are :class:`~lightning_mics.MiCSConfig` fields (``partition_size``,
        ``accumulation``, ``param_dtype``, ...); alternatively pass a ready ``config``.
        ``state_dict_type``: ``"sharded"`` (default) or ``"full"`` checkpoints."""
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
        )
        if config is not None and options:
            raise TypeError("Pass either a MiCSConfig or MiCS options as keywords, not both.")
        self.mics = MiCSRuntime(config or MiCSConfig(**options))
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._num_nodes = 1
        self._backward_sync_control = _MiCSBackwardSyncControl(self.mics)
        self._modules: list[nn.Module] = []
        self.state_dict_type = state_dict_type

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    def setup_environment(self) -> None:
        super().setup_environment()
        self._connect()

    # --------------------------------------------------------------------- model
    def setup_module(self, module: nn.Module) -> nn.Module:
        module = self.mics.shard(module, self.root_device)
        self.mics.reshard(module)  # a reused module: optimizers need the shards
        if module not in self._modules:
            self._modules.append(module)
        return module

    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer], scheduler: Any | None = None
    ) -> tuple[nn.Module, list[Optimizer], Any | None]:
        """``fabric.setup(model, optimizer, ...)``: shard the model, then point each
        optimizer at the sharded parameters.

        Sharding replaces every parameter of the model with a new (DTensor) parameter; an
        optimizer created before would otherwise keep updating the old tensors, which the
        model no longer uses. Parameters are matched by name; an optimizer parameter that
        is not part of the model is left as it is. The optimizer must not have state yet.
        """
        for index, optimizer in enumerate(optimizers):
            with_state = sum(1 for param_state in optimizer.state.values() if param_state)
            if with_state:
                raise RuntimeError(
                    f"fabric.setup(model, optimizer) got an optimizer ({type(optimizer).__name__}"
                    f", position {index}) that already has state for {with_state} "
                    "parameters (from an earlier step, a loaded state dict, or an optimizer "
                    "such as Adagrad that creates its state in its constructor). MiCS shards "
                    "the parameters, and that state would not match the shards. Set up the "
                    "model first and create the optimizer from the sharded parameters: "
                    "model = fabric.setup_module(model); optimizer = "
                    "fabric.setup_optimizers(MyOptimizer(model.parameters())); then load its "
                    "state with fabric.load(path, {'model': model, 'optimizer': optimizer})."
                )
        # NOTE: fully_shard keeps the parameters' names (FQNs), so the name is the link
        # from an old parameter to its sharded replacement; shared parameters map to the
        # one parameter they remain.
        names = {id(param): name for name, param in module.named_parameters(remove_duplicate=False)}
        module = self.setup_module(module)
        sharded = dict(module.named_parameters(remove_duplicate=False))
        for optimizer in optimizers:
            # NOTE: only empty entries (`state` is a defaultdict); dropping them releases
            # the old, unsharded parameters they are keyed by.
            optimizer.state.clear()
            for group in optimizer.param_groups:
                group["params"] = [
                    sharded[names[id(param)]] if id(param) in names else param
                    for param in group["params"]
                ]
        optimizers = [self.setup_optimizer(optimizer) for optimizer in optimizers]
        return module, optimizers, scheduler

    def module_to_device(self, module: nn.Module) -> None:
        pass

    def module_init_context(self, empty_init: bool | None = None) -> AbstractContextManager:
        stack = ExitStack()
        if empty_init:
            # Materialised shard by shard in `setup_module`.
            stack.enter_context(torch.device("meta"))
        stack.enter_context(self.precision.module_init_context())
        return stack

    def _flush(self) -> None:
        # Finish reductions a window ended without (see `flush_pending_gradients`).
        for module in self._modules:
            self.mics.flush(module)

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        self._flush()
        return super().optimizer_step(optimizer, **kwargs)

    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: float | int,
        norm_type: float | int = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor:
        """Clip the optimizer's gradients by their true global norm over the shards.

        Parked gradients are flushed first, so that the gradient scaler (``16-mixed``)
        unscales them with the others; ``error_if_nonfinite`` (Fabric's default: True)
        raises on every rank when the norm is NaN or infinite."""
        self._flush()
        self.precision.unscale_gradients(optimizer)
        return clip_grad_norm_(
            self.precision.main_params(optimizer),
            max_norm,
            norm_type,
            error_if_nonfinite=error_if_nonfinite,
        )

    def clip_gradients_value(
        self, module: nn.Module, optimizer: Optimizer, clip_val: float | int
    ) -> None:
        """Clamp every gradient element to ``[-clip_val, clip_val]`` (each rank its shards:
        element-wise, so no communication), after flushing and unscaling."""
        self._flush()
        self.precision.unscale_gradients(optimizer)
        for param in self.precision.main_params(optimizer):
            if param.grad is not None:
                grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
                grad.clamp_(min=-clip_val, max=clip_val)

    # ---------------------------------------------------------------- collectives
    def all_reduce(
        self, tensor: Tensor, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # ------------------------------------------------------------------ checkpoints
    @property
    def state_dict_type(self) -> StateDictType:
        """``"sharded"`` (distributed-checkpoint directory, each shard written once) or
        ``"full"`` (one file of unsharded state dicts written by rank 0)."""
        return self._state_dict_type

    @state_dict_type.setter
    def state_dict_type(self, value: StateDictType) -> None:
        self._state_dict_type = ckpt._validate_type(value)

    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        return ckpt.model_state_dict(module, full=self._state_dict_type == "full")

    def load_module_state_dict(
        self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True
    ) -> None:
        full = not any(isinstance(v, DTensor) for v in state_dict.values())
        ckpt.set_model_state(module, state_dict, full=full, strict=strict)

    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        module = self._module_of(optimizer)
        return ckpt.optimizer_state_dict(module, optimizer, full=self._state_dict_type == "full")

    def _module_of(self, optimizer: Optimizer) -> nn.Module:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for module in self._modules:
            if any(id(p) in ids for p in module.parameters()):
                return module
        raise ValueError("The optimizer's parameters belong to no module set up with MiCS.")

    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, nn.Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Any] | None = None,
    ) -> None:
        """Collective: save modules, optimizers and plain data under a temporary name and
        publish atomically once every rank has finished."""
        if storage_options is not None:
            raise TypeError("MiCSStrategy writes checkpoints itself and takes no storage_options.")
        path = self.broadcast(str(path))
        full = self._state_dict_type == "full"
        modules = [key for key, obj in state.items() if isinstance(obj, nn.Module)]
        if len(modules) != 1:
            raise ValueError(
                "Pass exactly one model in the state to save, e.g. "
                f"fabric.save(path, {{'model': model, 'optimizer': optimizer, ...}}); got {modules}."
            )
        tensors: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        for key, obj in state.items():
            if isinstance(obj, nn.Module):
                _apply_filter(key, filter or {}, self.get_module_state_dict(obj), tensors)
            elif isinstance(obj, Optimizer):
                _apply_filter(key, filter or {}, self.get_optimizer_state(obj), tensors)
            else:
                value = obj.state_dict() if isinstance(obj, _Stateful) else obj
                _apply_filter(key, filter or {}, value, metadata)
        if full:
            ckpt.save_full(path, {**tensors, **metadata})
        else:
            topology = self.mics.topology
            info = {
                "partition_size": topology.partition_size,
                "replication_size": topology.replication_size,
                "ranks_per_node": topology.ranks_per_node,
            }
            ckpt.save_sharded(path, tensors, metadata, model_key=modules[0], info=info)

    def load_checkpoint(
        self,
        path: Any,
        state: nn.Module | Optimizer | dict[str, nn.Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Collective: load a checkpoint of either format, saved under any topology (or a
        directory of checkpoints: its newest complete one). Always ``weights_only``."""
        path = self.broadcast(str(path))
        if isinstance(state, nn.Module):  # fabric.load_raw: a full model file
            ckpt.load_model_weights(state, path, strict=strict)
            return {}
        if isinstance(state, Optimizer):
            checkpoint = ckpt.load_full(ckpt.resolve_checkpoint(path)[0])
            ckpt.set_optimizer_state(self._module_of(state), state, checkpoint, full=True)
            return {}
        resolved, kind = ckpt.resolve_checkpoint(path)
        targets = state or {}
        modules = {k: v for k, v in targets.items() if isinstance(v, nn.Module)}
        optimizers = {k: v for k, v in targets.items() if isinstance(v, Optimizer)}
        if kind == "full":
            checkpoint = ckpt.load_full(resolved)
            if state is None:
                return checkpoint
            for key, module in modules.items():
                state_dict = self._pop(checkpoint, key, resolved, strict)
                if state_dict is not None:
                    ckpt.set_model_state(module, state_dict, full=True, strict=strict)
            for key, optimizer in optimizers.items():
                optim_state = self._pop(checkpoint, key, resolved, strict)
                if optim_state is not None:
                    ckpt.set_optimizer_state(
                        self._module_of(optimizer), optimizer, optim_state, full=True
                    )
            metadata = checkpoint
        else:
            if state is None:
                raise ValueError(
                    f"{resolved} is a sharded checkpoint: pass the objects to load into, e.g. "
                    "fabric.load(path, {'model': model, 'optimizer': optimizer})."
                )
            keys = ckpt.checkpoint_keys(resolved)
            tensors: dict[str, Any] = {}
            for key, module in modules.items():
                if self._present(key, keys, resolved, strict):
                    tensors[key] = ckpt.model_state_dict(module)
            for key, optimizer in optimizers.items():
                if self._present(key, keys, resolved, strict):
                    tensors[key] = ckpt.optimizer_state_dict(self._module_of(optimizer), optimizer)
            metadata = ckpt.load_sharded(resolved, tensors, strict=strict)
            for key, module in modules.items():
                if key in tensors:
                    ckpt.set_model_state(module, tensors[key], full=False, strict=strict)
            for key, optimizer in optimizers.items():
                if key in tensors:
                    ckpt.set_optimizer_state(
                        self._module_of(optimizer), optimizer, tensors[key], full=False
                    )
        for key in targets.keys() - modules.keys() - optimizers.keys():
            if key in metadata:
                # As Lightning's own strategies do: an object with `load_state_dict` (LR
                # scheduler, precision plugin, user object) is restored in place; a plain
                # value is written into the state dict.
                target = targets[key]
                if isinstance(target, _Stateful):
                    target.load_state_dict(metadata.pop(key))
                else:
                    state[key] = metadata.pop(key)  # type: ignore[index]
            elif strict:
                raise KeyError(
                    f"The requested state contains a key {key!r} that does not exist in the "
                    f"checkpoint {resolved}. To disable strict loading, set strict=False."
                )
        return metadata

    @staticmethod
    def _present(key: str, keys: set[str], path: Any, strict: bool) -> bool:
        if key in keys:
            return True
        if strict:
            raise KeyError(f"Checkpoint {path} has no entry {key!r} (has {sorted(keys)}).")
        return False

    @staticmethod
    def _pop(checkpoint: dict[str, Any], key: str, path: Any, strict: bool) -> Any:
        if key in checkpoint:
            return checkpoint.pop(key)
        if strict:
            raise KeyError(f"Checkpoint {path} has no entry {key!r} (has {sorted(checkpoint)}).")
        return None

    def teardown(self) -> None:
        self._modules.clear()
        self.mics.teardown()
        super().teardown()
