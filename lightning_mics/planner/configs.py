"""The planner's inputs from the recipes' Hydra configs (``conf/``).

`compose` builds the same config ``recipes/train.py`` runs (``conf/train.yaml`` with its
groups and overrides) with Hydra's compose API; `specs_from_config` turns it into the
cost model's `ModelSpec`, `ClusterSpec` and `TrainingSpec`. `choose_partition_size` is
what ``strategy.partition_size=auto`` in the recipes calls.

Needs ``hydra-core`` (the ``recipes`` extra) only for `compose`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_mics.planner.planner import PartitionChoice, choose_partition
from lightning_mics.planner.specs import ClusterSpec, ModelSpec, TrainingSpec

CONFIG_NAME = "train"


def default_config_dir() -> Path:
    """``./conf`` when it holds ``train.yaml``, else the repository's ``conf/`` next to
    the package (a source checkout or editable install)."""
    here = Path.cwd() / "conf"
    if (here / f"{CONFIG_NAME}.yaml").is_file():
        return here
    return Path(__file__).resolve().parents[2] / "conf"


def compose(config_dir: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """``conf/train.yaml`` composed with ``overrides`` (Hydra syntax: ``model=gpt_100b``,
    ``trainer.num_nodes=64``), without running anything. The result keeps Hydra's own
    ``hydra`` node (its ``runtime.choices`` name the chosen model and cluster)."""
    try:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
    except ImportError as err:  # pragma: no cover - hydra is a dev/recipes dependency
        raise ImportError(
            "the planner reads the recipes' Hydra configs: pip install 'lightning-mics[recipes]'"
        ) from err
    directory = Path(config_dir) if config_dir is not None else default_config_dir()
    if not (directory / f"{CONFIG_NAME}.yaml").is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME}.yaml in {directory}: pass --config-dir (the recipes' conf/)"
        )
    with initialize_config_dir(config_dir=str(directory.resolve()), version_base="1.3"):
        return hydra_compose(
            config_name=CONFIG_NAME, overrides=list(overrides or []), return_hydra_config=True
        )


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def _section(cfg: Any, key: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg[key], resolve=True)  # type: ignore[return-value]


def world_and_nodes(cfg: Any) -> tuple[int, int, int]:
    """``(world size, nodes, ranks per node)`` as MiCS sees them (emulated nodes count)."""
    devices = int(cfg.trainer.devices)
    world = devices * int(cfg.trainer.num_nodes)
    k = int(_get(cfg, "strategy.ranks_per_node") or _get(cfg, "cluster.ranks_per_node") or devices)
    return world, world // k, k


def accumulation(cfg: Any) -> int:
    """Micro-steps per optimizer step (``data.global_batch_size`` wins, as in the recipes)."""
    global_batch = _get(cfg, "data.global_batch_size")
    if global_batch is None:
        return int(cfg.trainer.accumulate_grad_batches)
    world, _, _ = world_and_nodes(cfg)
    return max(1, int(global_batch) // (int(cfg.data.micro_batch_size) * world))


def specs_from_config(
    cfg: Any, memory_only: bool = False, **cluster_overrides: Any
) -> tuple[ModelSpec, ClusterSpec, TrainingSpec]:
    """The cost model's inputs from a composed recipes config. ``memory_only``: the
    cluster config may lack the speeds (``peak_tflops``, bandwidths; e.g. CPU clusters):
    placeholders stand in, good for memory checks only."""
    model_cfg = _section(cfg, "model")
    model = ModelSpec.from_config(model_cfg, name=_model_name(cfg))
    _, nodes, k = world_and_nodes(cfg)
    cluster_cfg = _section(cfg, "cluster")
    cluster_cfg["ranks_per_node"] = k
    if memory_only:
        for key in ("peak_tflops", "intra_node_gbps", "inter_node_gbps"):
            cluster_cfg[key] = cluster_cfg.get(key) or 1.0
    cluster = ClusterSpec.from_config(cluster_cfg, nodes=nodes, **cluster_overrides)
    strategy = cfg.strategy
    name = str(strategy.name)
    sharded = name in ("mics", "hsdp", "fsdp")
    rafw = _get(cfg, "strategy.reshard_after_forward", True)
    training = TrainingSpec(
        micro_batch=int(cfg.data.micro_batch_size),
        seq_len=int(cfg.data.seq_len),
        accumulation=accumulation(cfg),
        precision=str(cfg.trainer.precision),
        param_dtype=_get(cfg, "strategy.param_dtype") if sharded else None,
        reduce_dtype=_get(cfg, "strategy.reduce_dtype", "fp32") if sharded else None,
        activation_checkpointing=bool(_get(cfg, "strategy.activation_checkpointing", False)),
        reshard_after_forward=rafw is not False,
        flash_attention=str(_get(cfg, "cluster.accelerator", "gpu")) == "gpu",
    )
    return model, cluster, training


def _model_name(cfg: Any) -> str:
    """The model group's option (``gpt_100b``), from Hydra's choices when available."""
    choice = _get(cfg, "hydra.runtime.choices.model")
    if choice:
        return str(choice)
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return str(HydraConfig.get().runtime.choices.get("model", ""))
    except Exception:  # pragma: no cover - outside a Hydra app
        pass
    return str(_get(cfg, "model.name", ""))


def choose_partition_size(cfg: Any) -> tuple[int, str, PartitionChoice]:
    """``strategy.partition_size=auto``: the smallest partition size whose memory fits a
    GPU, for the run ``cfg`` describes (its micro-batch, sequence length, precision and
    activation checkpointing exactly as configured). Returns ``(partition_size,
    explanation, choice)``; raises ``ValueError`` when nothing fits."""
    model, cluster, training = specs_from_config(cfg, memory_only=True)
    choice = choose_partition(
        model,
        cluster,
        training,
        micro_batch=training.micro_batch,
        activation_checkpointing=training.activation_checkpointing,
        hierarchical=_get(cfg, "strategy.hierarchical", "auto") is not False,
    )
    if choice.partition_size is None:
        raise ValueError(f"strategy.partition_size=auto: {choice.explanation}")
    return choice.partition_size, choice.explanation, choice
