"""Cost model and planner for MiCS and the strategies it is compared with.

- :mod:`~lightning_mics.planner.specs`: the inputs (model, cluster, training run,
  strategy), self-validating dataclasses with their units.
- :mod:`~lightning_mics.planner.alpha_beta`: alpha-beta costs of ring and hierarchical
  collectives, gloo's all-reduce-based reduce-scatter.
- :mod:`~lightning_mics.planner.cost_model`: every collective of an optimizer step and
  the compute/communication overlap: `predict_step`.
- :mod:`~lightning_mics.planner.memory`: peak memory per GPU: `memory_breakdown`.
- :mod:`~lightning_mics.planner.planner`: the smallest partition size that fits, MiCS vs
  ZeRO-3, weak scaling, published reference points: `make_plan`, `format_plan`.
- :mod:`~lightning_mics.planner.configs`: the same from the recipes' Hydra configs;
  `choose_partition_size` for ``strategy.partition_size=auto``.

Pure arithmetic (no torch, no process group); ``lightning-mics plan`` is its command line.
"""

from lightning_mics.planner.alpha_beta import CommCost, GroupLayout, Kind, hierarchical, ring
from lightning_mics.planner.cost_model import Collective, StepPrediction, predict_step
from lightning_mics.planner.memory import (
    MemoryBreakdown,
    activation_bytes,
    memory_breakdown,
    valid_partition_sizes,
)
from lightning_mics.planner.planner import (
    PartitionChoice,
    Plan,
    PlanError,
    choose_partition,
    format_plan,
    make_plan,
)
from lightning_mics.planner.reference import REFERENCES, Reference, find_reference
from lightning_mics.planner.specs import (
    AccumulationMode,
    Backend,
    ClusterSpec,
    ModelSpec,
    StrategyKind,
    StrategySpec,
    TrainingSpec,
)

__all__ = [
    "REFERENCES",
    "AccumulationMode",
    "Backend",
    "ClusterSpec",
    "Collective",
    "CommCost",
    "GroupLayout",
    "Kind",
    "MemoryBreakdown",
    "ModelSpec",
    "PartitionChoice",
    "Plan",
    "PlanError",
    "Reference",
    "StepPrediction",
    "StrategyKind",
    "StrategySpec",
    "TrainingSpec",
    "activation_bytes",
    "choose_partition",
    "find_reference",
    "format_plan",
    "hierarchical",
    "make_plan",
    "memory_breakdown",
    "predict_step",
    "ring",
    "valid_partition_sizes",
]
