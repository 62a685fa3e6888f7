"""Train a GPT or BERT with the Lightning Trainer, configured by Hydra (``conf/``).

    python recipes/train.py experiment=laptop_gpt                       # what `make train` runs
    python recipes/train.py experiment=laptop_gpt strategy.partition_size=4
    python recipes/train.py experiment=laptop_bert strategy=hsdp
    python recipes/train.py experiment=gpt_175b_p4de dry_run=true       # check and print the plan
    python recipes/train.py --cfg job                                   # print the config

Any key can be overridden on the command line (``key=value``). The config is checked
(`validate_config`) before any process is started; Lightning's launcher then starts one
process per device, each re-running this command in the same run directory.

`build(cfg)` makes the LightningModule, the LightningDataModule and the Trainer from a
composed config without launching anything (tests and the Slurm tooling use it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `import recipes` work
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import warnings
from typing import Any

import hydra
import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from lightning_mics.callbacks import CommStatsMonitor
from recipes.config import (
    ConfigError,
    Plan,
    accumulation,
    datamodule_from_config,
    fsdp_options,
    ignored_strategy_keys,
    strategy_options,
    validate_config,
    world_size,
)
from recipes.lit import LanguageModel
from recipes.strategies import parallelize_fn, trainer_strategy

__all__ = ["ConfigError", "build", "build_callbacks", "build_strategy", "main", "validate_config"]

# NOTE: known, harmless noise: torch's DTensor init on a CPU mesh (the CPU emulation) and a
# deprecation inside Lightning 2.6 under torch 2.13.
warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

#: Strategies that shard the model: the network is created on the meta device and
#: materialised shard by shard (DDP needs it whole on every rank).
SHARDED = ("mics", "hsdp", "fsdp")


def build_strategy(cfg: DictConfig) -> Any:
    """The Trainer strategy of ``cfg.strategy`` (see recipes/strategies.py)."""
    return trainer_strategy(cfg.strategy.name, strategy_options(cfg), world_size(cfg))


def build_callbacks(cfg: DictConfig) -> list[Any]:
    callbacks = []
    for spec in (cfg.get("callbacks") or {}).values():
        if spec is None or "_target_" not in spec:
            continue
        callback = hydra.utils.instantiate(spec)
        if isinstance(callback, CommStatsMonitor) and cfg.strategy.name not in ("mics", "hsdp"):
            continue  # only MiCS records its collectives
        callbacks.append(callback)
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any] | bool:
    loggers = [
        hydra.utils.instantiate(spec)
        for spec in (cfg.get("logger") or {}).values()
        if spec is not None and "_target_" in spec
    ]
    return loggers or False


def build(
    cfg: DictConfig, validate: bool = True
) -> tuple[LanguageModel, LightningDataModule, Trainer]:
    """The LightningModule, LightningDataModule and Trainer of a composed config.

    Launches nothing: the Trainer starts its processes in ``fit``. With a sharding strategy
    the network is created on the meta device (``trainer.init_module(empty_init=True)``)
    and materialised shard by shard when ``fit`` shards it.
    """
    if validate:
        validate_config(cfg)
    trainer: Trainer = hydra.utils.instantiate(
        cfg.trainer,
        strategy=build_strategy(cfg),
        callbacks=build_callbacks(cfg),
        logger=build_loggers(cfg),
        accumulate_grad_batches=accumulation(cfg),
        _convert_="all",
    )
    with trainer.init_module(empty_init=cfg.strategy.name in SHARDED):
        module: LanguageModel = hydra.utils.instantiate(cfg.model)
    if cfg.strategy.name == "fsdp":
        module.parallelize = parallelize_fn(fsdp_options(cfg))
    return module, datamodule_from_config(cfg), trainer


def _check_launch(cfg: DictConfig) -> None:
    """What only the running process can know (Hydra's mode, Slurm)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if not HydraConfig.initialized():
        return
    external = SLURMEnvironment.detect() or TorchElasticEnvironment.detect()
    if HydraConfig.get().mode == RunMode.MULTIRUN and not external and world_size(cfg) > 1:
        raise ConfigError(
            "Hydra multirun (-m) with several devices: Lightning's launcher cannot start the "
            "ranks of a multirun job. Run the configurations one by one, or submit them to "
            "Slurm (hydra/launcher=..., one task per rank)."
        )


def _print_hint(cfg: DictConfig) -> None:
    """After a run on emulated nodes: how to try the other side (a partition per node, or
    one spanning nodes)."""
    if cfg.cluster.name != "local_cpu" or cfg.strategy.name != "mics":
        return
    k = int(cfg.strategy.ranks_per_node or cfg.trainer.devices)
    world = world_size(cfg)
    p = k if cfg.strategy.partition_size == "node" else int(cfg.strategy.partition_size)
    if world <= k or p < k:
        return
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    if cfg.task_name == "laptop_gpt":
        extra = [o for o in overrides if o != "experiment=laptop_gpt"]
        command = 'make train ARGS="{}"'
    else:
        extra = overrides
        command = "python -m recipes.train {}"
    if p > k:
        partition = [o for o in extra if not o.startswith("strategy.partition_size=")]
        print(
            "\nThe partitions here span emulated nodes, so parameter all-gathers and gradient\n"
            "reduce-scatters crossed nodes (inter-node MB above). Compare with one partition\n"
            f"per node: {command.format(' '.join([*partition, 'strategy.partition_size=node']))}",
            flush=True,
        )
        return
    try_span = command.format(" ".join([*extra, f"strategy.partition_size={world}"]))
    try_hsdp = command.format(" ".join([*extra, "strategy=hsdp"]))
    print(
        "\nEach partition here is one emulated node: parameter all-gathers and gradient\n"
        "reduce-scatters stayed inside a node, and only the once-per-step all-reduce crossed\n"
        "nodes (inter-node MB above). To shard over both nodes (hierarchical all-gathers), try\n"
        f"  {try_span}\n"
        f"or compare with HSDP (an all-reduce on every micro-step):\n  {try_hsdp}",
        flush=True,
    )


def run(cfg: DictConfig) -> Trainer:
    """Validate, build and fit; returns the Trainer."""
    plan: Plan = validate_config(cfg)
    _check_launch(cfg)
    if rank_zero_only.rank == 0:  # the launcher re-runs this in every process
        print(plan.describe(cfg) + f"\n  output     {cfg.paths.output_dir}", flush=True)
        if ignored_strategy_keys(cfg):
            print(f"strategy={cfg.strategy.name} ignores {ignored_strategy_keys(cfg)}", flush=True)
    if cfg.get("dry_run"):
        return None  # type: ignore[return-value]
    if cfg.trainer.accelerator == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # NOTE: share the cores among the processes on this machine (oversubscribed
        # threads make CPU training several times slower).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(cfg.trainer.devices)))
    seed_everything(int(cfg.seed), workers=True)
    module, datamodule, trainer = build(cfg, validate=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.is_global_zero:
        _print_hint(cfg)
    return trainer


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        # NOTE: a config error is the user's to fix: the message, not a traceback.
        print(f"\nConfig error: {err}\n", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
