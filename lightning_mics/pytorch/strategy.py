"""`MiCSStrategy` for ``lightning.pytorch.Trainer``: a thin adapter over `MiCSRuntime`."""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
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
from lightning_mics.checkpoint import StateDict
from lightning_mics.checkpoint.state_dicts import (
    model_state_dict,
    optimizer_state_dict,
    set_model_state,
    set_optimizer_state,
)
from lightning_mics.pytorch.requeue import DeferredRequeue
from lightning_mics.pytorch.rng import RNG_KEY, gather_rng_states, set_rng_state, this_ranks_state

#: Checkpoint entry of our own, set on loading: "the state dicts are sharded".
_SHARDED_KEY = "mics_sharded"


def _redirected_step(method: str, context: str) -> Callable[..., STEP_OUTPUT]:
    """The strategy's ``method`` (``"training_step"``, ...): the LightningModule's, run
    under the precision plugin's ``context`` through the module's ``__call__``."""

    def step(self: MiCSStrategy, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        with getattr(self.precision_plugin, context)():
            return self._forward_redirection(
                self.model, self.lightning_module, method, *args, **kwargs
            )

    step.__name__ = step.__qualname__ = method
    return step


class MiCSStrategy(MiCSParallelMixin, ParallelStrategy):
    """MiCS sharded data parallelism for the Trainer.

    Model states are sharded over partition groups of ``partition_size`` consecutive
    ranks and replicated across them; see :class:`~lightning_mics.MiCSConfig` for the
    options, which this strategy takes as keyword arguments. ``ranks_per_node`` defaults
    to the Trainer's ``devices``.
    """

    _launcher_cls = _SubprocessScriptLauncher
    _precision_arg = "precision_plugin"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_nodes = 1
        self._rng_to_restore: dict[str, Any] | None = None
        self._requeue = DeferredRequeue()

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
    # NOTE: Lightning calls `training_step` & co. directly when the strategy's model is
    # the LightningModule, which would bypass the FSDP root's hooks. Routing the call
    # through the module's `__call__` (Lightning's forward redirection) runs them around
    # the step; a `self(x)` inside the step is then a nested call that FSDP treats as part
    # of the same forward.
    training_step = _redirected_step("training_step", "train_step_context")
    validation_step = _redirected_step("validation_step", "val_step_context")
    test_step = _redirected_step("test_step", "test_step_context")
    predict_step = _redirected_step("predict_step", "predict_step_context")

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
        return self._all_reduce(tensor, group, reduce_op)

    # ------------------------------------------------------------------ checkpoints
    def _reshard(self) -> None:
        if isinstance(self.model, FSDPModule):
            self.mics.reshard(self.model)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Keyed like the LightningModule's own state dict (no wrapper prefix): DTensor
        shards (sharded) or unsharded CPU tensors on rank 0 (full; collective)."""
        self._reshard()
        return model_state_dict(self.lightning_module, full=self._full)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        self._reshard()
        full = not checkpoint.get(_SHARDED_KEY, False)
        set_model_state(self.lightning_module, checkpoint["state_dict"], full=full, strict=strict)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        self._reshard()
        return optimizer_state_dict(self.lightning_module, optimizer, full=self._full)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self._reshard()
        full = not checkpoint.get(_SHARDED_KEY, False)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            if isinstance(optimizer, LightningOptimizer):
                optimizer = optimizer._optimizer
            set_optimizer_state(self.lightning_module, optimizer, state, full=full)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Collective: write ``checkpoint`` under a temporary name and publish it
        atomically once every rank has finished (see :mod:`lightning_mics.checkpoint`)."""
        path = self._checkpoint_path(filepath, storage_options)
        self._warn_if_mid_accumulation_window()
        state = {**checkpoint, RNG_KEY: gather_rng_states()}
        if not self._full:
            # NOTE: Lightning hands over the state dicts it took; a sharded checkpoint
            # stores them with the tensors, one entry per optimizer (as Lightning's own
            # ModelParallelStrategy does), and the rest as plain data.
            state["state_dict"] = StateDict(state["state_dict"])
            for i, optimizer_state in enumerate(state.pop("optimizer_states", [])):
                state[f"optimizer_{i}"] = StateDict(optimizer_state)
        ckpt.save(
            path, state, full=self._full, info=self._checkpoint_info(), model_key="state_dict"
        )

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Collective: read a checkpoint of either format, saved under any topology.

        ``checkpoint_path`` may also be a directory of checkpoints: its newest complete
        one is loaded. Files are read with ``weights_only=True`` whatever is passed. The
        state dicts are applied afterwards, by Lightning's calls of
        `load_model_state_dict` and `load_optimizer_state_dict`.
        """
        path, kind = ckpt.resolve_checkpoint(self.broadcast(str(checkpoint_path)))
        self._reshard()
        if kind == "full":
            checkpoint = ckpt.load(path)
        else:
            module = self.lightning_module
            state: dict[str, Any] = {"state_dict": StateDict(model_state_dict(module))}
            optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
            names = [f"optimizer_{i}" for i in range(len(optimizers))]
            fitting = module.trainer is not None and module.trainer.state.fn == TrainerFn.FITTING
            if not (fitting and set(names) <= ckpt.checkpoint_keys(path)):
                names = []
            for name, optimizer in zip(names, optimizers, strict=False):
                state[name] = StateDict(optimizer_state_dict(module, optimizer))
            checkpoint = ckpt.load(path, state, strict=module.strict_loading)
            checkpoint["state_dict"] = state["state_dict"]
            if names:
                checkpoint["optimizer_states"] = [state[name] for name in names]
            checkpoint[_SHARDED_KEY] = True
        # Restored right before the next batch (see `on_train_batch_start`).
        world = self.num_nodes * self.num_processes
        self._rng_to_restore = this_ranks_state(
            checkpoint.pop(RNG_KEY, None), self.global_rank, world
        )
        return checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            ckpt.remove_checkpoint(filepath)

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
        self._requeue.install(self.lightning_module.trainer, self.cluster_environment)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._rng_to_restore is not None:
            # NOTE: restored here, not at load time: Lightning draws from the global RNG
            # when it creates the dataloader iterator after loading, which the
            # uninterrupted run did not do at this point.
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self._requeue.at_batch_boundary()

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
