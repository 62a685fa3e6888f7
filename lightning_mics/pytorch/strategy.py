"""`MiCSStrategy` for ``lightning.pytorch.Trainer``: a thin adapter over `MiCSRuntime`."""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.strategies.strategy import TBroadcast
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mics.config import MiCSConfig
from lightning_mics.runtime import MiCSRuntime

_ROOT_ATTR = "_mics_root"


class _MiCSRoot(nn.Module):
    """The FSDP root around a LightningModule.

    NOTE: the Trainer calls ``training_step``, not ``forward``, so a sharded
    LightningModule's own forward hooks (FSDP's root lazy-init, root unshard and the
    end-of-backward callback) would never fire. Lightning's forward redirection calls
    the strategy's ``model`` and reroutes its forward to the step method; making this
    wrapper the FSDP root puts FSDP's root hooks around every step.
    """

    def __init__(self, module: LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class MiCSStrategy(ParallelStrategy):
    """MiCS sharded data parallelism for the Trainer.

    Model states are sharded over partition groups of ``partition_size`` consecutive
    ranks and replicated across them; see :class:`~lightning_mics.MiCSConfig` for the
    options, which this strategy takes as keyword arguments. ``ranks_per_node`` defaults
    to the Trainer's ``devices``.
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
        precision_plugin: Any | None = None,
        **options: Any,
    ) -> None:
        """``options`` are :class:`~lightning_mics.MiCSConfig` fields (``partition_size``,
        ``accumulation``, ``param_dtype``, ...); alternatively pass a ready ``config``."""
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        if config is not None and options:
            raise TypeError("Pass either a MiCSConfig or MiCS options as keywords, not both.")
        self.mics = MiCSRuntime(config or MiCSConfig(**options))
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self.num_nodes = 1

    # ------------------------------------------------------------------ properties
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
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank sees different data: MiCS is data parallel over the whole world.
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False

    # ------------------------------------------------------------------ processes
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
        # NOTE: validate the arithmetic before any process group exists, so that a bad
        # partition size fails fast on every rank instead of hanging a collective.
        self.mics.resolve_topology(self.num_nodes * self.num_processes, self.num_processes)
        super().setup_environment()
        self._setup_distributed()
        self.mics.setup(self.root_device)
        rank_zero_info(self.mics.topology.describe())

    def _setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = (
            self._process_group_backend
            or _get_default_process_group_backend_for_device(self.root_device)
        )
        assert self.cluster_environment is not None
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(
                self.node_rank * self.num_processes + self.local_rank
            )
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # --------------------------------------------------------------------- model
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.model = self._sharded_root(self.lightning_module)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _sharded_root(self, module: LightningModule) -> _MiCSRoot:
        # NOTE: Lightning calls configure_model and setup on every fit/validate/test,
        # possibly with a new Trainer: the root is created once and kept on the module.
        root = module.__dict__.get(_ROOT_ATTR)
        if root is None:
            if not _has_meta(module):
                module.to(self.root_device)
            root = _MiCSRoot(module)
            module.__dict__[_ROOT_ATTR] = root
        self.mics.shard(root, self.root_device)  # idempotent; checks the layout
        return root

    def model_to_device(self) -> None:
        # Sharded parameters already live on their device.
        pass

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # Meta-device modules are materialised shard by shard in `setup()`.
        ctx = torch.device("meta") if empty_init else nullcontext()
        with ctx, self.precision_plugin.tensor_init_context():
            yield

    # ------------------------------------------------------- gradient accumulation
    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Non-final micro-steps of an accumulation window (Lightning's only signal)."""
        if isinstance(self.model, _MiCSRoot):
            with self.mics.micro_step(self.model, is_last=False):
                yield
        else:
            yield

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        # NOTE: run the closure (the window's last forward/backward) first, then finish
        # any reduction a skipped last micro-step left parked, so the step never misses
        # earlier micro-steps' gradients and none leak into the next window.
        def closure_then_flush() -> Any:
            result = closure()
            if isinstance(self.model, _MiCSRoot):
                self.mics.flush(self.model)
            return result

        return super().optimizer_step(optimizer, closure_then_flush, model, **kwargs)

    # ---------------------------------------------------------------- collectives
    def barrier(self, name: str | None = None) -> None:
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

    def reduce(
        self,
        tensor: Tensor | Any,
        group: Any | None = None,
        reduce_op: ReduceOp | str | None = "mean",
    ) -> Tensor | Any:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # --------------------------------------------------------- state dicts (full)
    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self._reshard()
        return get_model_state_dict(self.lightning_module, options=options)

    def _reshard(self) -> None:
        # NOTE: FSDP's state-dict hooks sit on the root wrapper, not on the
        # LightningModule; reshard explicitly so the root's parameters (kept gathered
        # after an eval forward) are registered as shards again.
        if isinstance(self.model, _MiCSRoot):
            self.model.reshard()

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=strict)
        set_model_state_dict(self.lightning_module, checkpoint["state_dict"], options=options)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self._reshard()
        return get_optimizer_state_dict(self.lightning_module, optimizer, options=options)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            set_optimizer_state_dict(self.lightning_module, optimizer, state, options=options)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        # Full state dicts are gathered on every rank by the calls above (collectives);
        # only rank 0 writes.
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(filepath)

    def teardown(self) -> None:
        assert self.cluster_environment is not None
        self.mics.teardown()
        self.cluster_environment.teardown()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="MiCS: sharded data parallel over partition groups (FSDP2)",
            )


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())
