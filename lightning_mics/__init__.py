"""lightning-mics: MiCS sharded data parallelism for PyTorch Lightning, Fabric and PyTorch.

``import lightning_mics`` registers the strategy name ``"mics"`` with both the Trainer
and Fabric (when Lightning is installed), so ``Trainer(strategy="mics")`` and
``Fabric(strategy="mics")`` work. The core (`apply_mics`, `micro_step`, ...) needs only
torch.
"""

from lightning_mics.accounting import CommStats, comm_stats
from lightning_mics.checkpoint import (
    CheckpointError,
    consolidate_checkpoint,
    find_latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from lightning_mics.config import AccumulationMode, MiCSConfig
from lightning_mics.grad_sync import flush_pending_gradients, micro_step
from lightning_mics.meta_init import MetaInitError
from lightning_mics.optim import clip_grad_norm_
from lightning_mics.process_groups import build_device_mesh, destroy_meshes
from lightning_mics.sharding import apply_mics, sync_replicas
from lightning_mics.topology import MiCSTopology, MiCSTopologyError

__version__ = "0.1.0"

__all__ = [
    "AccumulationMode",
    "CheckpointError",
    "CommStats",
    "MetaInitError",
    "MiCSConfig",
    "MiCSTopology",
    "MiCSTopologyError",
    "apply_mics",
    "build_device_mesh",
    "clip_grad_norm_",
    "comm_stats",
    "consolidate_checkpoint",
    "destroy_meshes",
    "find_latest_checkpoint",
    "flush_pending_gradients",
    "load_checkpoint",
    "load_model_weights",
    "micro_step",
    "save_checkpoint",
    "sync_replicas",
]


def _register_with_lightning() -> bool:
    """Register ``"mics"`` in the Trainer's and Fabric's strategy registries (idempotent)."""
    try:
        from lightning.fabric.strategies import STRATEGY_REGISTRY
        from lightning.pytorch.strategies import StrategyRegistry
    except ImportError:  # Lightning is optional for the plain-PyTorch API
        return False
    from lightning_mics.fabric.strategy import MiCSStrategy as FabricMiCSStrategy
    from lightning_mics.pytorch.strategy import MiCSStrategy as TrainerMiCSStrategy

    TrainerMiCSStrategy.register_strategies(StrategyRegistry)
    FabricMiCSStrategy.register_strategies(STRATEGY_REGISTRY)
    return True


if _register_with_lightning():
    from lightning_mics.callbacks import CommStatsMonitor
    from lightning_mics.pytorch.strategy import MiCSStrategy

    __all__ += ["CommStatsMonitor", "MiCSStrategy"]
