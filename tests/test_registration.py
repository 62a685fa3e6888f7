"""`import lightning_mics` registers "mics" with the Trainer and Fabric, idempotently."""

from __future__ import annotations

import importlib

from lightning.fabric import Fabric
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry

import lightning_mics
from lightning_mics.fabric import MiCSStrategy as FabricMiCSStrategy
from lightning_mics.pytorch import MiCSStrategy as TrainerMiCSStrategy


def test_registration_is_idempotent() -> None:
    importlib.reload(lightning_mics)  # registering twice must not raise
    assert StrategyRegistry["mics"]["strategy"] is lightning_mics.MiCSStrategy
    assert "mics" in STRATEGY_REGISTRY


def test_trainer_resolves_the_name() -> None:
    trainer = Trainer(strategy="mics", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, TrainerMiCSStrategy)
    assert trainer.strategy.mics.config.partition_size == "node"
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}


def test_fabric_resolves_the_name() -> None:
    fabric = Fabric(strategy="mics", accelerator="cpu", devices=2)
    assert isinstance(fabric.strategy, FabricMiCSStrategy)


def test_options_are_config_fields() -> None:
    strategy = TrainerMiCSStrategy(partition_size=2, accumulation="every_micro_step")
    assert strategy.mics.config.partition_size == 2
    assert strategy.mics.config.accumulation.value == "every_micro_step"
    try:
        TrainerMiCSStrategy(partition_sise=2)
    except TypeError as err:
        assert "partition_sise" in str(err)
    else:  # pragma: no cover
        raise AssertionError("a misspelt option must raise")
