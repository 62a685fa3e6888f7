"""`MiCSStrategy` for ``lightning.fabric.Fabric``: a thin adapter over `MiCSRuntime`."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.fabric.strategies.parallel import ParallelStrategy
from lightning.fabric.strategies.strategy import TBroadcast, _BackwardSyncControl
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning.fabric.utilities.types import ReduceOp
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mics.config import MiCSConfig
from lightning_mics.runtime import MiCSRuntime


class _MiCSBackwardSyncControl(_BackwardSyncControl):
    def __init__(self, runtime: MiCSRuntime) -> None:
        self._runtime = runtime

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager:
        """``enabled=True`` marks a non-final micro-step of an accumulation window."""
        return self._runtime.micro_step(module, is_last=not enabled)


class MiCSStrategy(ParallelStrategy):
    """MiCS sharded data parallelism for Fabric.

    Takes the options of :class:`~lightning_mics.MiCSConfig` as keyword arguments.
    ``fabric.setup(model)`` shards the model; wrap non-final micro-steps of an
    accumulation window in ``fabric.no_backward_sync(model, enabled=True)``.
    """

    strategy_name = "mics"

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
        **options: Any,
    ) -> None:
        """``options`` are :class:`~lightning_mics.MiCSConfig` fields (``partition_size``,
        ``accumulation``, ``param_dtype``, ...); alternatively pass a ready ``config``."""
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

    @property
    def is_distributed(self) -> bool:
        # Read by Lightning's connector for custom strategies: enables the distributed
        # sampler so that every rank sees different data.
        return True

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def _configure_launcher(self) -> None:
        # NOTE: check the layout arithmetic here, when the Trainer/Fabric is built and
        # before any process is launched, so that bad input fails once, up front.
        self.mics.resolve_topology(self.num_nodes * self.num_processes, self.num_processes)
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )

    def setup_environment(self) -> None:
        self.mics.resolve_topology(self.num_nodes * self.num_processes, self.num_processes)
        super().setup_environment()
        self._set_world_ranks()
        self._process_group_backend = (
            self._process_group_backend
            or _get_default_process_group_backend_for_device(self.root_device)
        )
        assert self.cluster_environment is not None
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)
        self.mics.setup(self.root_device)
        rank_zero_info(self.mics.topology.describe())

    def _set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(
                self.node_rank * self.num_processes + self.local_rank
            )
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # --------------------------------------------------------------------- model
    def setup_module(self, module: nn.Module) -> nn.Module:
        if not any(t.is_meta for t in module.parameters()):
            module.to(self.root_device)
        module = self.mics.shard(module, self.root_device)
        if module not in self._modules:
            self._modules.append(module)
        return module

    def module_to_device(self, module: nn.Module) -> None:
        pass

    def module_init_context(self, empty_init: bool | None = None) -> AbstractContextManager:
        stack = ExitStack()
        if empty_init:
            # Materialised shard by shard in `setup_module`.
            stack.enter_context(torch.device("meta"))
        stack.enter_context(self.precision.module_init_context())
        return stack

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        # Finish reductions a window ended without (see `flush_pending_gradients`).
        for module in self._modules:
            self.mics.flush(module)
        return super().optimizer_step(optimizer, **kwargs)

    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: float | int,
        norm_type: float | int = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor:
        self.precision.unscale_gradients(optimizer)
        for m in self._modules:
            self.mics.flush(m)
        return self.mics.clip_grad_norm_(module, max_norm, norm_type)

    # ---------------------------------------------------------------- collectives
    def all_reduce(
        self, tensor: Tensor, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if not _distributed_is_initialized():
            return
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[self.root_device.index])
        else:
            torch.distributed.barrier()

    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not _distributed_is_initialized():
            return obj
        objs = [obj]
        torch.distributed.broadcast_object_list(objs, src, group=_group.WORLD)
        return objs[0]

    # --------------------------------------------------------- state dicts (full)
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=options)

    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        module = self._module_of(optimizer)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(module, optimizer, options=options)

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
        # Full states are gathered collectively on every rank; rank 0 writes.
        full = self._convert_stateful_objects_in_state(state, filter=filter or {})
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(full, path, storage_options)
        self.barrier()

    def load_checkpoint(
        self,
        path: Any,
        state: nn.Module | Optimizer | dict[str, nn.Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=True)
        if state is None:
            return checkpoint
        targets = state if isinstance(state, dict) else {"model": state}
        options = StateDictOptions(full_state_dict=True, strict=strict)
        for key, obj in list(targets.items()):
            if isinstance(obj, nn.Module):
                set_model_state_dict(obj, checkpoint.pop(key), options=options)
            elif isinstance(obj, Optimizer):
                set_optimizer_state_dict(
                    self._module_of(obj), obj, checkpoint.pop(key), options=options
                )
        if isinstance(state, dict):
            for key in list(targets):
                if key in checkpoint and not isinstance(targets[key], nn.Module | Optimizer):
                    state[key] = checkpoint.pop(key)
        return checkpoint

    def teardown(self) -> None:
        self._modules.clear()
        self.mics.teardown()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="MiCS: sharded data parallel over partition groups (FSDP2)",
            )
