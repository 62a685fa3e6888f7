"""What the Trainer and Fabric adapters share: options, process set-up, collectives,
checkpoint settings, registration.

Lightning's Trainer and Fabric each have their own ``ParallelStrategy`` base class with
the same hooks; this mixin goes first in both adapters' bases so that neither repeats it.
"""

from __future__ import annotations

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
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

from lightning_mics.checkpoint import StateDictType, validate_state_dict_type
from lightning_mics.config import MiCSConfig
from lightning_mics.runtime import MiCSRuntime

#: Arguments that both frameworks' strategy classes take (besides the precision plugin).
_STRATEGY_ARGS = ("accelerator", "parallel_devices", "cluster_environment", "checkpoint_io")

_SUPPORTED_PRECISION = (
    '"32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true" or "64-true" (or MiCS\'s '
    'own mixed precision: MiCSStrategy(param_dtype="bf16"))'
)


def check_precision(plugin: Any) -> None:
    """Refuse the precision plugins MiCS cannot honour, saying what to use instead.

    Supported: ``32-true``, ``64-true``, ``16-true``, ``bf16-true`` (the module is
    converted before sharding), ``bf16-mixed`` and ``16-mixed`` (autocast; the gradient
    scaler's inf/NaN check runs on the sharded gradients and DTensor combines it over the
    shards, so every rank skips or takes the same steps).
    """
    from lightning.fabric.plugins.precision import (
        BitsandbytesPrecision,
        DeepSpeedPrecision,
        FSDPPrecision,
        TransformerEnginePrecision,
        XLAPrecision,
    )
    from lightning.pytorch.plugins import precision as trainer

    # NOTE: the Trainer's TransformerEngine and bitsandbytes plugins subclass Fabric's;
    # its DeepSpeed, FSDP and XLA plugins do not.
    refused: list[tuple[tuple[type, ...], str]] = [
        (
            (TransformerEnginePrecision,),
            "it replaces layers with TransformerEngine modules and runs them under FP8 "
            "autocast, whose per-layer scaling state MiCS's sharding (FSDP2 fully_shard) "
            "neither shards nor synchronises",
        ),
        ((BitsandbytesPrecision,), "its quantized weights cannot be sharded by fully_shard"),
        (
            (FSDPPrecision, trainer.FSDPPrecision),
            "it configures FSDP1's mixed precision, which MiCS (built on FSDP2) never applies",
        ),
        ((DeepSpeedPrecision, trainer.DeepSpeedPrecision), "it is DeepSpeed's own plugin"),
        ((XLAPrecision, trainer.XLAPrecision), "MiCS does not run on XLA devices"),
    ]
    for classes, why in refused:
        if isinstance(plugin, classes):
            name = getattr(plugin, "precision", type(plugin).__name__)
            raise ValueError(
                f"MiCSStrategy does not support precision {name!r} "
                f"({type(plugin).__name__}): {why}. Use precision={_SUPPORTED_PRECISION}."
            )


class MiCSParallelMixin:
    """Shared part of both ``MiCSStrategy`` adapters (needs ``self.mics``)."""

    strategy_name = "mics"
    mics: MiCSRuntime
    #: the package's subprocess launcher class, set by each adapter
    _launcher_cls: Any
    #: the name of the precision plugin argument of the framework's own strategy class
    _precision_arg: str

    def __init__(
        self,
        config: MiCSConfig | None = None,
        *,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        state_dict_type: StateDictType = "sharded",
        **options: Any,
    ) -> None:
        """``options`` are :class:`~lightning_mics.MiCSConfig` fields (``partition_size``,
        ``accumulation``, ``param_dtype``, ...), or pass a ready ``config``; and the
        arguments of Lightning's own strategies (``accelerator``, ``parallel_devices``,
        ``cluster_environment``, ``checkpoint_io``, and the precision plugin:
        ``precision_plugin`` for the Trainer, ``precision`` for Fabric).
        ``state_dict_type``: ``"sharded"`` (default) or ``"full"`` checkpoints."""
        names = (*_STRATEGY_ARGS, self._precision_arg)
        super().__init__(**{name: options.pop(name) for name in names if name in options})
        if config is not None and options:
            raise TypeError("Pass either a MiCSConfig or MiCS options as keywords, not both.")
        self.mics = MiCSRuntime(config or MiCSConfig(**options))
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self.state_dict_type = state_dict_type

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
        # MiCS is data parallel over the whole world.
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def _configure_launcher(self) -> None:
        # NOTE: check the layout arithmetic and the precision here, when the Trainer/Fabric
        # is built (after Lightning set the plugins) and before any process is launched,
        # so that bad input fails once, up front.
        self.mics.resolve_topology(self.num_nodes * self.num_processes, self.num_processes)
        # The Trainer's strategies call the plugin `precision_plugin`, Fabric's `precision`.
        check_precision(getattr(self, "precision_plugin", None) or self.precision)
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = self._launcher_cls(
                self.cluster_environment, self.num_processes, self.num_nodes
            )

    def _connect(self) -> None:
        """Join the process group, then verify the node layout and build the mesh."""
        self.mics.resolve_topology(self.num_nodes * self.num_processes, self.num_processes)
        assert self.cluster_environment is not None
        self.cluster_environment.set_global_rank(
            self.node_rank * self.num_processes + self.local_rank
        )
        self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank
        self._process_group_backend = (
            self._process_group_backend
            or _get_default_process_group_backend_for_device(self.root_device)
        )
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)
        self.mics.setup(self.root_device)
        rank_zero_info(self.mics.topology.describe())

    # ---------------------------------------------------------------- collectives
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if not _distributed_is_initialized():
            return
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[self.root_device.index])
        else:
            torch.distributed.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        objs = [obj]
        torch.distributed.broadcast_object_list(objs, src, group=_group.WORLD)
        return objs[0]

    @staticmethod
    def _all_reduce(tensor: Any, group: Any | None, reduce_op: Any) -> Any:
        """Lightning's all-reduce of a tensor over the world (``reduce_op``: ``"mean"``,
        ``"sum"``, ...); anything else is returned as it is."""
        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # ---------------------------------------------------------------- checkpoints
    @property
    def state_dict_type(self) -> StateDictType:
        """``"sharded"``: checkpoints are distributed-checkpoint directories (each shard
        written once); ``"full"``: one file with unsharded state dicts, written by rank 0."""
        return self._state_dict_type

    @state_dict_type.setter
    def state_dict_type(self, value: StateDictType) -> None:
        self._state_dict_type = validate_state_dict_type(value)

    @property
    def _full(self) -> bool:
        return self._state_dict_type == "full"

    def _checkpoint_path(self, path: Any, storage_options: Any | None) -> str:
        """Collective: rank 0's checkpoint path, on every rank."""
        if storage_options is not None:
            raise TypeError("MiCSStrategy writes checkpoints itself and takes no storage_options.")
        return self.broadcast(str(path))

    def _checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint's marker records about the layout it was saved under."""
        return self.mics.topology.sizes()

    # --------------------------------------------------------------- registration
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="MiCS: sharded data parallel over partition groups (FSDP2)",
            )
