"""`MiCSStrategy` for ``lightning.pytorch.Trainer``: a thin adapter over `MiCSRuntime`."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.optim import Optimizer

from lightning_mics import checkpoint as ckpt
from lightning_mics._lightning import MiCSParallelMixin
from lightning_mics.checkpoint import StateDictType
from lightning_mics.config import MiCSConfig
from lightning_mics.runtime import MiCSRuntime

#: Checkpoint entries of our own: every rank's RNG states; "state dicts are sharded".
_RNG_KEY = "mics_rng_states"
_SHARDED_KEY = "mics_sharded"


class MiCSStrategy(MiCSParallelMixin, ParallelStrategy):
    """MiCS sharded data parallelism for the Trainer.

    Model states are sharded over partition groups of ``partition_size`` consecutive
    ranks and replicated across them; see :class:`~lightning_mics.MiCSConfig` for the
    options, which this strategy takes as keyword arguments. ``ranks_per_node`` defaults
    to the Trainer's ``devices``.
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
        precision_plugin: Any | None = None,
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
            precision_plugin=precision_plugin,
        )
        if config is not None and options:
            raise TypeError("Pass either a MiCSConfig or MiCS options as keywords, not both.")
        self.mics = MiCSRuntime(config or MiCSConfig(**options))
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self.num_nodes = 1
        self.state_dict_type = state_dict_type
        self._rng_to_restore: dict[str, Any] | None = None
        self._requeue_handler: Callable[[Any, Any], None] | None = None

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        # Optimizer states are restored by `load_optimizer_state_dict` below.
        return True

    # ------------------------------------------------------------------ processes
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self._connect()

    # --------------------------------------------------------------------- model
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.model = self._shard(self.lightning_module)
        self.mics.reshard(self.model)  # a reused module: the optimizer needs the shards
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _shard(self, module: LightningModule) -> LightningModule:
        """Shard the LightningModule itself: it becomes the FSDP root.

        NOTE: the root's hooks (lazy init, unsharding the root's own parameters, the
        end-of-backward callback) then fire whenever the module is called: around every
        ``*_step`` (see `_run_step`) and for ``self(x)`` from any hook or callback, and
        for inference after ``fit``, as under DDP. Lightning calls ``configure_model`` and
        ``setup`` on every fit/validate/test, possibly with a new Trainer: the module is
        converted and sharded once, later calls only check the layout.
        """
        if not isinstance(module, FSDPModule):
            # NOTE: what Lightning's own DDP/FSDP strategies do to the module, done before
            # sharding: afterwards it would replace or convert tensors behind FSDP's back.
            # No `module.to(device)`: `fully_shard` moves one unit at a time and keeps
            # only its shard, so the unsharded model never has to fit on one device.
            if self._layer_sync is not None:  # Trainer(sync_batchnorm=True)
                module = self._layer_sync.apply(module)
                _check_sync_batchnorm(module, self.root_device)
            module = self.precision_plugin.convert_module(module)
        self.mics.shard(module, self.root_device)  # idempotent; checks the layout
        return module

    def model_to_device(self) -> None:
        # Sharded parameters already live on their device.
        pass

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # Meta-device modules are materialised shard by shard in `setup()`.
        ctx = torch.device("meta") if empty_init else nullcontext()
        with ctx, self.precision_plugin.tensor_init_context():
            yield

    # ------------------------------------------------------------------- steps
    def _run_step(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # NOTE: Lightning calls `training_step` & co. directly when the strategy's model
        # is the LightningModule, which would bypass the FSDP root's hooks. Routing the
        # call through the module's `__call__` (Lightning's forward redirection) runs
        # them around the step; a `self(x)` inside the step is then a nested call that
        # FSDP treats as part of the same forward.
        return self._forward_redirection(self.model, self.lightning_module, method, *args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        with self.precision_plugin.train_step_context():
            return self._run_step("training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        with self.precision_plugin.val_step_context():
            return self._run_step("validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        with self.precision_plugin.test_step_context():
            return self._run_step("test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._run_step("predict_step", *args, **kwargs)

    # ------------------------------------------------------- gradient accumulation
    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Non-final micro-steps of an accumulation window (Lightning's only signal)."""
        if isinstance(self.model, FSDPModule):
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
            if isinstance(self.model, FSDPModule):
                self.mics.flush(self.model)
            return result

        return super().optimizer_step(optimizer, closure_then_flush, model, **kwargs)

    # ---------------------------------------------------------------- collectives
    def reduce(
        self,
        tensor: Tensor | Any,
        group: Any | None = None,
        reduce_op: ReduceOp | str | None = "mean",
    ) -> Tensor | Any:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # ------------------------------------------------------------------ checkpoints
    @property
    def state_dict_type(self) -> StateDictType:
        """``"sharded"``: checkpoints are distributed-checkpoint directories (each shard
        written once); ``"full"``: one file with unsharded state dicts, written by rank 0."""
        return self._state_dict_type

    @state_dict_type.setter
    def state_dict_type(self, value: StateDictType) -> None:
        self._state_dict_type = ckpt._validate_type(value)

    @property
    def _full(self) -> bool:
        return self._state_dict_type == "full"

    def _reshard(self) -> None:
        if isinstance(self.model, FSDPModule):
            self.mics.reshard(self.model)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Keyed like the LightningModule's own state dict (no wrapper prefix): DTensor
        shards (sharded) or unsharded CPU tensors on rank 0 (full; collective)."""
        self._reshard()
        return ckpt.model_state_dict(self.lightning_module, full=self._full)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        self._reshard()
        full = not checkpoint.get(_SHARDED_KEY, False)
        ckpt.set_model_state(
            self.lightning_module, checkpoint["state_dict"], full=full, strict=strict
        )

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        self._reshard()
        return ckpt.optimizer_state_dict(self.lightning_module, optimizer, full=self._full)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self._reshard()
        full = not checkpoint.get(_SHARDED_KEY, False)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            if isinstance(optimizer, LightningOptimizer):
                optimizer = optimizer._optimizer
            ckpt.set_optimizer_state(self.lightning_module, optimizer, state, full=full)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Collective: write ``checkpoint`` under a temporary name and publish it
        atomically once every rank has finished (see :mod:`lightning_mics.checkpoint`)."""
        if storage_options is not None:
            raise TypeError("MiCSStrategy writes checkpoints itself and takes no storage_options.")
        path = self.broadcast(str(filepath))
        self._warn_if_mid_accumulation_window()
        checkpoint = dict(checkpoint)
        checkpoint[_RNG_KEY] = ckpt.gather_rng_states()
        if self._full:
            ckpt.save_full(path, checkpoint)
            return
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
            tensors[f"optimizer_{i}"] = state
        ckpt.save_sharded(
            path, tensors, checkpoint, model_key="state_dict", info=self._topology_info()
        )

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Collective: read a checkpoint of either format, saved under any topology.

        ``checkpoint_path`` may also be a directory of checkpoints: its newest complete
        one is loaded. Files are read with ``weights_only=True`` whatever is passed.
        """
        path, kind = ckpt.resolve_checkpoint(self.broadcast(str(checkpoint_path)))
        self._reshard()
        if kind == "full":
            checkpoint = ckpt.load_full(path)
        else:
            module = self.lightning_module
            keys = ckpt.checkpoint_keys(path)
            tensors: dict[str, Any] = {"state_dict": ckpt.model_state_dict(module)}
            optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
            fitting = module.trainer is not None and module.trainer.state.fn == TrainerFn.FITTING
            names = [f"optimizer_{i}" for i in range(len(optimizers))]
            if fitting and all(name in keys for name in names):
                for name, optimizer in zip(names, optimizers, strict=True):
                    tensors[name] = ckpt.optimizer_state_dict(module, optimizer)
            else:
                names = []
            checkpoint = ckpt.load_sharded(path, tensors, strict=module.strict_loading)
            checkpoint["state_dict"] = tensors["state_dict"]
            if names:
                checkpoint["optimizer_states"] = [tensors[name] for name in names]
            checkpoint[_SHARDED_KEY] = True
        states = checkpoint.pop(_RNG_KEY, None)
        world = self.num_nodes * self.num_processes
        # Exact only under the same world size; restored right before the next batch.
        self._rng_to_restore = states[self.global_rank] if states and len(states) == world else None
        return checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            ckpt.remove_checkpoint(filepath)

    def _topology_info(self) -> dict[str, Any]:
        topology = self.mics.topology
        return {
            "partition_size": topology.partition_size,
            "replication_size": topology.replication_size,
            "ranks_per_node": topology.ranks_per_node,
        }

    def _warn_if_mid_accumulation_window(self) -> None:
        trainer = self.lightning_module.trainer if self._lightning_module is not None else None
        if trainer is None or not trainer.training or trainer.accumulate_grad_batches == 1:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        processed = epoch_loop.batch_progress.current.processed
        if (
            processed % trainer.accumulate_grad_batches
            and not epoch_loop.batch_progress.is_last_batch
        ):
            rank_zero_warn(
                "Saving a checkpoint in the middle of a gradient accumulation window "
                f"({processed % trainer.accumulate_grad_batches} of "
                f"{trainer.accumulate_grad_batches} micro-batches done): the gradients "
                "accumulated so far are not saved, so after resuming the window's "
                "optimizer step sees only its remaining micro-batches."
            )

    # ------------------------------------------------ resume: RNG and Slurm requeue
    def on_train_start(self) -> None:
        super().on_train_start()
        self._defer_requeue_signal()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._rng_to_restore is not None:
            # NOTE: restored here, not at load time: Lightning draws from the global RNG
            # when it creates the dataloader iterator after loading, which the
            # uninterrupted run did not do at this point.
            ckpt.set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if self._requeue_handler is not None:
            self._maybe_run_requeue()

    def _defer_requeue_signal(self) -> None:
        """Under Slurm auto-requeue, make the requeue signal only set a flag.

        NOTE: Lightning's handler saves ``hpc_ckpt_<n>.ckpt`` inside the signal handler,
        wherever each rank happens to be; a sharded save is collective, so ranks
        interrupted at different points would deadlock or mix collectives. Instead the
        ranks agree at the next batch boundary (one small all-reduce per batch, only
        under Slurm auto-requeue) and run Lightning's handler there together.
        """
        import signal

        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = self.cluster_environment
        self._requeue_handler = None
        if not isinstance(env, SLURMEnvironment) or not env.auto_requeue or os.name == "nt":
            return
        trainer = self.lightning_module.trainer
        signum = env.requeue_signal or signal.SIGUSR1
        self._requeue_signum = signum
        self._requeue_requested = False
        self._requeue_handler = trainer._signal_connector._slurm_sigusr_handler_fn

        def request(signum: int, frame: Any) -> None:
            self._requeue_requested = True

        signal.signal(signum, request)

    def _maybe_run_requeue(self) -> None:
        flag = torch.tensor([1.0 if self._requeue_requested else 0.0], device=self.root_device)
        if _distributed_is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            self._requeue_requested = False
            assert self._requeue_handler is not None
            self._requeue_handler(self._requeue_signum, None)

    def teardown(self) -> None:
        # NOTE: unlike `Strategy.teardown`, neither `lightning_module.cpu()` nor moving
        # the optimizer state: FSDP owns where the shards live, and a move behind its back
        # leaves its sharded storage stale for the next fit/test on this module (Lightning's
        # own FSDP strategies skip the move too).
        assert self.cluster_environment is not None
        assert self.accelerator is not None
        self.mics.teardown()
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def _check_sync_batchnorm(module: nn.Module, device: torch.device) -> None:
    if device.type == "cpu" and any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        raise RuntimeError(
            "Trainer(sync_batchnorm=True) converted the model's BatchNorm layers to "
            "torch.nn.SyncBatchNorm, which has no CPU implementation (it fails at the first "
            "training forward, under DDP too). Train on GPUs, or drop sync_batchnorm=True "
            "on CPU."
        )
