"""`MiCSStrategy` for ``lightning.fabric.Fabric``: a thin adapter over `MiCSRuntime`."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.fabric.strategies.parallel import ParallelStrategy
from lightning.fabric.strategies.strategy import _BackwardSyncControl
from lightning.fabric.utilities.types import ReduceOp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_mics import checkpoint as ckpt
from lightning_mics._lightning import MiCSParallelMixin
from lightning_mics.checkpoint.state_dicts import (
    model_state_dict,
    module_of,
    optimizer_state_dict,
    set_model_state,
    set_optimizer_state,
)
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
    _precision_arg = "precision"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._num_nodes = 1
        self._backward_sync_control = _MiCSBackwardSyncControl(self.mics)
        self._modules: list[nn.Module] = []

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
        return self._all_reduce(tensor, group, reduce_op)

    # ------------------------------------------------------------------ checkpoints
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        return model_state_dict(module, full=self._full)

    def load_module_state_dict(
        self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True
    ) -> None:
        full = not any(isinstance(v, DTensor) for v in state_dict.values())
        set_model_state(module, state_dict, full=full, strict=strict)

    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        module = module_of(optimizer, self._modules)
        return optimizer_state_dict(module, optimizer, full=self._full)

    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, nn.Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Any] | None = None,
    ) -> None:
        """Collective: save modules, optimizers and plain data under a temporary name and
        publish atomically once every rank has finished."""
        path = self._checkpoint_path(path, storage_options)
        ckpt.save(
            path,
            state,
            full=self._full,
            info=self._checkpoint_info(),
            filter=filter,
            modules=self._modules,
        )

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
        if isinstance(state, Optimizer):  # fabric.load_raw: a full optimizer state dict
            optimizer_state = ckpt.load(path)
            set_optimizer_state(module_of(state, self._modules), state, optimizer_state, full=True)
            return {}
        return ckpt.load(path, state, strict=strict, modules=self._modules)

    def teardown(self) -> None:
        self._modules.clear()
        self.mics.teardown()
        super().teardown()
