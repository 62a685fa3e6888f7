"""From a composed Hydra config (``conf/train.yaml``) to checked settings and components.

`validate_config` checks a config before anything is launched and raises `ConfigError`
with a message that names the keys to change. It reads only the config (and the text
source's files): it runs the same on a login node without GPUs, where Slurm scripts are
rendered. The ``*_from_config`` helpers turn config sections into the objects that
``recipes/train.py`` (Trainer) and ``recipes/fabric_train.py`` (Fabric) use.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_mics import MiCSConfig, MiCSTopology, MiCSTopologyError
from recipes.data import BYTE_VOCAB_SIZE
from recipes.datamodules import SyntheticDataModule, TextDataModule
from recipes.lit import ARCHS, build_network

STRATEGIES = ("mics", "hsdp", "fsdp", "ddp")
#: Strategy-config keys that are not MiCSConfig fields.
MICS_EXTRA_KEYS = {"name", "state_dict_type"}
FSDP_KEYS = {
    "name",
    "save_distributed_checkpoint",
    "reshard_after_forward",
    "activation_checkpointing",
    "param_dtype",
    "reduce_dtype",
}
DDP_KEYS = {"name", "find_unused_parameters", "gradient_as_bucket_view", "static_graph"}
_GIB = 2**30


class ConfigError(ValueError):
    """A recipe configuration that cannot run; the message says which keys to change."""


def _section(cfg: DictConfig, key: str) -> dict[str, Any]:
    return OmegaConf.to_container(cfg[key], resolve=True)  # type: ignore[return-value]


# ---------------------------------------------------------------------- derived settings
#: cfg.model keys that are not network (GPTConfig / BERTConfig) fields.
MODULE_KEYS = {
    "_target_",
    "arch",
    "optimizer",
    "scheduler",
    "micro_batch_size",
    "seq_len",
    "nominal_params",
}
#: The data objective each architecture trains on, and the data configs that provide it.
OBJECTIVES = {
    "gpt": ("next_token", "text or synthetic"),
    "bert": ("mlm", "text_mlm or synthetic_mlm"),
}


def model_config(cfg: DictConfig) -> Any:
    """The network's `GPTConfig` / `BERTConfig` from ``cfg.model``."""
    arch = cfg.model.get("arch")
    if arch not in ARCHS:
        raise ConfigError(f"model.arch={arch!r} is not one of {sorted(ARCHS)}.")
    fields = {k: v for k, v in _section(cfg, "model").items() if k not in MODULE_KEYS}
    config_cls = ARCHS[arch][1]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]} is not a {config_cls.__name__} field (model.arch={arch}); "
            f"the fields are {sorted(known)}."
        )
    return config_cls(**fields)


def accumulation(cfg: DictConfig) -> int:
    """Micro-steps per optimizer step: from ``data.global_batch_size`` when it is set,
    else ``trainer.accumulate_grad_batches``."""
    global_batch = cfg.data.get("global_batch_size")
    if global_batch is None:
        return int(cfg.trainer.accumulate_grad_batches)
    per_micro_step = int(cfg.data.micro_batch_size) * world_size(cfg)
    return int(global_batch) // per_micro_step


@lru_cache(maxsize=64)
def _count_parameters(arch: str, fields: tuple[tuple[str, Any], ...]) -> int:
    with torch.device("meta"):
        network = build_network(arch, ARCHS[arch][1](**dict(fields)))
        return sum(p.numel() for p in network.parameters())


def count_parameters(cfg: DictConfig) -> int:
    """Parameters of the configured network (built on the meta device: no memory)."""
    fields = tuple(sorted(dataclasses.asdict(model_config(cfg)).items()))
    return _count_parameters(cfg.model.arch, fields)


def world_size(cfg: DictConfig) -> int:
    return int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)


def ranks_per_node(cfg: DictConfig) -> int:
    """Node size as the strategy sees it (``strategy.ranks_per_node`` or ``trainer.devices``)."""
    return int(cfg.strategy.get("ranks_per_node") or cfg.trainer.devices)


def shard_size(cfg: DictConfig) -> int:
    """Ranks over which one replica of the model states is sharded."""
    name = cfg.strategy.name
    if name in ("mics", "hsdp"):
        p = cfg.strategy.partition_size
        return ranks_per_node(cfg) if p == "node" else int(p)
    if name == "fsdp":
        return world_size(cfg)
    return 1


def state_bytes_per_param(cfg: DictConfig) -> int:
    """Bytes of weights + gradients + AdamW moments per parameter: 16 in fp32 (also for
    ``*-mixed`` precision and MiCS's ``param_dtype``: the sharded master weights stay fp32),
    8 for ``bf16-true`` / ``16-true``."""
    precision = str(cfg.trainer.precision)
    return 8 if precision in ("bf16-true", "16-true", "bf16", "16") else 16


@dataclass
class Plan:
    """What a config will run: sizes derived from it, for the start-of-run printout."""

    arch: str
    params: int
    world_size: int
    nodes: int
    ranks_per_node: int
    emulated: bool
    shard_size: int
    replicas: int
    state_gib_per_rank: float
    global_batch: int
    tokens_per_step: int

    def describe(self, cfg: DictConfig) -> str:
        m = cfg.model
        where = (
            f"{self.world_size} CPU processes = {self.nodes} emulated nodes x "
            f"{self.ranks_per_node} ranks"
            if self.emulated
            else f"{self.nodes} node(s) x {self.ranks_per_node} {cfg.trainer.accelerator} ranks"
        )
        strategy = cfg.strategy.name
        if strategy in ("mics", "hsdp"):
            spans = self.shard_size > self.ranks_per_node
            sharding = (
                f"partition_size {self.shard_size} "
                f"({'spans ' + str(self.shard_size // self.ranks_per_node) + ' nodes' if spans else 'inside a node'})"
                f" -> {self.replicas} replica(s), accumulation {cfg.strategy.accumulation}"
            )
        elif strategy == "fsdp":
            sharding = f"full shard over all {self.world_size} ranks (ZeRO-3)"
        else:
            sharding = "a full replica per rank"
        return "\n".join(
            [
                f"recipe {cfg.task_name}",
                f"  model      {self.arch} {m.n_layer} layers x {m.n_embd} ({m.n_head} heads), "
                f"{self.params / 1e6:,.2f}M parameters",
                f"  cluster    {cfg.cluster.name}: {where}",
                f"  strategy   {strategy}: {sharding}",
                f"  memory     model states {_size(self.state_gib_per_rank)} per rank "
                f"({state_bytes_per_param(cfg)} B/parameter sharded over {self.shard_size})",
                f"  batch      {cfg.data.micro_batch_size} x {cfg.data.seq_len} tokens x "
                f"{self.world_size} ranks x {accumulation(cfg)} micro-steps = "
                f"{self.global_batch} sequences ({self.tokens_per_step:,} tokens) per optimizer step",
            ]
        )


def _size(gib: float) -> str:
    return f"{gib:.3g} GiB" if gib >= 1 else f"{gib * 1024:.3g} MiB"


def plan(cfg: DictConfig) -> Plan:
    world = world_size(cfg)
    k = ranks_per_node(cfg)
    params = count_parameters(cfg)
    shard = shard_size(cfg)
    global_batch = int(cfg.data.micro_batch_size) * world * accumulation(cfg)
    return Plan(
        arch=cfg.model.arch,
        params=params,
        world_size=world,
        nodes=world // k,
        ranks_per_node=k,
        emulated=int(cfg.trainer.num_nodes) == 1 and k < int(cfg.trainer.devices),
        shard_size=shard,
        replicas=world // shard,
        state_gib_per_rank=params * state_bytes_per_param(cfg) / shard / _GIB,
        global_batch=global_batch,
        tokens_per_step=global_batch * int(cfg.data.seq_len),
    )


# ---------------------------------------------------------------------------- validation
def _positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}.")
    return value


def _strategy_options(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.strategy`` without ``name`` and, for fsdp/ddp, without the MiCS-only keys an
    experiment may have set (``partition_size``, ...): the same experiment runs under every
    strategy."""
    options = _section(cfg, "strategy")
    name = options.pop("name", None)
    if name in ("fsdp", "ddp"):
        allowed = FSDP_KEYS if name == "fsdp" else DDP_KEYS
        options = {k: v for k, v in options.items() if k in allowed}
    return options


def ignored_strategy_keys(cfg: DictConfig) -> list[str]:
    """MiCS options in ``cfg.strategy`` that strategy=fsdp/ddp does not use."""
    name = cfg.strategy.get("name")
    if name not in ("fsdp", "ddp"):
        return []
    allowed = FSDP_KEYS if name == "fsdp" else DDP_KEYS
    return sorted(set(cfg.strategy.keys()) - allowed)


def _check_strategy(cfg: DictConfig) -> None:
    name = cfg.strategy.get("name")
    if name not in STRATEGIES:
        raise ConfigError(
            f"strategy.name={name!r} is not one of {list(STRATEGIES)} (strategy=...)."
        )
    keys = set(cfg.strategy.keys())
    mics_fields = {f.name for f in dataclasses.fields(MiCSConfig)}
    if name in ("fsdp", "ddp"):
        allowed = FSDP_KEYS if name == "fsdp" else DDP_KEYS
        unknown = sorted(keys - allowed - mics_fields - MICS_EXTRA_KEYS)
        if unknown:
            raise ConfigError(
                f"strategy.{unknown[0]} is not an option of strategy={name}; its options are "
                f"{sorted(allowed - {'name'})}."
            )
        return
    unknown = sorted(keys - mics_fields - MICS_EXTRA_KEYS)
    if unknown:
        raise ConfigError(
            f"strategy.{unknown[0]} is not a MiCS option. The options are "
            f"{sorted(mics_fields - {'wrap_policy', 'init_fn'})} and state_dict_type."
        )
    try:
        MiCSConfig(**mics_kwargs(cfg, with_state_dict_type=False))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"strategy: {err}") from None
    if cfg.strategy.get("state_dict_type", "sharded") not in ("sharded", "full"):
        raise ConfigError(
            f"strategy.state_dict_type must be 'sharded' or 'full', got "
            f"{cfg.strategy.state_dict_type!r}."
        )
    k = ranks_per_node(cfg)
    devices = int(cfg.trainer.devices)
    if devices % k != 0:
        raise ConfigError(
            f"strategy.ranks_per_node={k} does not divide trainer.devices={devices}: an "
            "emulated node would straddle two machines. Use a divisor of trainer.devices."
        )
    partition = cfg.strategy.partition_size
    try:
        MiCSTopology.create(world_size(cfg), k, partition)
    except MiCSTopologyError as err:
        raise ConfigError(
            f"strategy.partition_size={partition!r} with {world_size(cfg)} ranks "
            f"({cfg.trainer.num_nodes} node(s) x {devices} devices, {k} ranks per node): {err}"
        ) from None
    if name == "hsdp" and partition not in ("node", k):
        raise ConfigError(
            f"strategy=hsdp shards inside one node, but strategy.partition_size={partition}: "
            "use strategy.partition_size=node, or strategy=mics for partitions of another size."
        )


def _check_memory(cfg: DictConfig, params: int) -> None:
    memory = cfg.cluster.get("gpu_memory_gb")
    if not memory or cfg.strategy.get("cpu_offload"):
        return
    per_param = state_bytes_per_param(cfg)
    shard = shard_size(cfg)
    need = params * per_param / shard
    if need <= memory * _GIB:
        return
    world = world_size(cfg)
    k = ranks_per_node(cfg)
    minimum = params * per_param / (memory * _GIB)
    fits = [
        p
        for p in range(1, world + 1)
        if world % p == 0 and (p % k == 0 or k % p == 0) and p >= minimum
    ]
    if cfg.strategy.name in ("mics", "hsdp") and fits:
        fix = f"strategy.partition_size={fits[0]}"
        if cfg.strategy.name == "hsdp":
            fix = f"strategy=mics {fix}"
    else:
        fix = (
            f"at least {math.ceil(minimum)} GPUs per replica: more nodes (trainer.num_nodes) "
            "with a larger strategy.partition_size"
        )
    raise ConfigError(
        f"The model states do not fit: {params / 1e9:.3g}B parameters x {per_param} bytes "
        f"(weights, gradients, AdamW) sharded over {shard} GPU(s) need {need / _GIB:.1f} GiB "
        f"per GPU, but cluster.gpu_memory_gb is {memory} (cluster={cfg.cluster.name}), before "
        f"any activations. Use {fix}, or strategy.cpu_offload=true (host memory permitting)."
    )


def _check_data(cfg: DictConfig) -> None:
    data, model = cfg.data, cfg.model
    if data.get("name") not in ("text", "synthetic"):
        raise ConfigError(
            f"data.name={data.get('name')!r} is not 'text' or 'synthetic' (data=text, "
            "text_mlm, synthetic or synthetic_mlm)."
        )
    objective, options = OBJECTIVES[model.arch]
    if data.get("objective") != objective:
        kind = "a BERT (masked-LM)" if model.arch == "bert" else "a GPT (next-token)"
        raise ConfigError(
            f"model.arch={model.arch} is {kind} model but the data's objective is "
            f"{data.get('objective')!r}: use data={options}."
        )
    _positive_int(cfg, "data.vocab_size")
    if data.name == "text":
        if data.tokenizer not in ("byte", "bpe"):
            raise ConfigError(f"data.tokenizer={data.tokenizer!r} is not 'byte' or 'bpe'.")
        if data.tokenizer == "byte" and data.vocab_size != BYTE_VOCAB_SIZE:
            raise ConfigError(
                f"data.tokenizer=byte has a fixed vocabulary of {BYTE_VOCAB_SIZE} ids, but "
                f"data.vocab_size={data.vocab_size}: set data.vocab_size={BYTE_VOCAB_SIZE}, or "
                "use data.tokenizer=bpe for a vocabulary of another size."
            )
        if data.tokenizer == "bpe":
            if importlib.util.find_spec("tokenizers") is None:
                raise ConfigError(
                    "data.tokenizer=bpe needs the `tokenizers` library: pip install "
                    "'lightning-mics[recipes]' (or tokenizers), or use data.tokenizer=byte."
                )
            if data.vocab_size < 300:
                raise ConfigError(
                    f"data.tokenizer=bpe with data.vocab_size={data.vocab_size}: a byte-level "
                    "BPE needs 256 bytes + special tokens + merges; set data.vocab_size to the "
                    "size you want, e.g. data.vocab_size=8192."
                )
        source = data.source
        if source is not None and not glob.glob(os.path.expanduser(source)):
            raise ConfigError(f"data.source={source!r} does not exist.")
        if not 0.0 < float(data.val_fraction) < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {data.val_fraction}.")
    if not 0.0 < float(data.mlm_probability) < 1.0:
        raise ConfigError(f"data.mlm_probability must be in (0, 1), got {data.mlm_probability}.")
    if data.vocab_size > model.vocab_size:
        raise ConfigError(
            f"The data has {data.vocab_size} token ids but model.vocab_size={model.vocab_size}: "
            f"set model.vocab_size>={data.vocab_size} (e.g. model.vocab_size=${{data.vocab_size}})."
        )
    if data.seq_len > model.block_size:
        raise ConfigError(
            f"data.seq_len={data.seq_len} exceeds model.block_size={model.block_size}: "
            "lower data.seq_len or raise model.block_size."
        )
    if model.arch == "bert" and data.seq_len < 3:
        raise ConfigError("BERT sequences are [CLS] text [SEP]: data.seq_len must be >= 3.")
    global_batch = data.get("global_batch_size")
    if global_batch is not None:
        _positive_int(cfg, "data.global_batch_size")
        per_micro_step = int(data.micro_batch_size) * world_size(cfg)
        if global_batch % per_micro_step != 0:
            raise ConfigError(
                f"data.global_batch_size={global_batch} is not a multiple of "
                f"data.micro_batch_size x world size = {data.micro_batch_size} x "
                f"{world_size(cfg)} = {per_micro_step}: the micro-batch does not divide the "
                "global batch. Change data.micro_batch_size or data.global_batch_size."
            )
        accumulate = int(cfg.trainer.accumulate_grad_batches)
        if accumulate not in (1, global_batch // per_micro_step):
            raise ConfigError(
                f"trainer.accumulate_grad_batches={accumulate} disagrees with "
                f"data.global_batch_size={global_batch} (which needs "
                f"{global_batch // per_micro_step}): set only one of them "
                "(data.global_batch_size=null to use accumulate_grad_batches)."
            )


def resolve_partition_size(cfg: DictConfig) -> str | None:
    """``strategy=mics strategy.partition_size=auto``: the planner's choice, the smallest
    partition whose memory fits a GPU for this run (`lightning_mics.planner`), written into
    the config and logged. Pure arithmetic, so every rank resolves it alike. Returns the
    explanation (``None`` when there is nothing to resolve)."""
    if cfg.strategy.get("name") != "mics" or cfg.strategy.get("partition_size") != "auto":
        return None
    from lightning.fabric.utilities.rank_zero import rank_zero_info

    from lightning_mics.planner.configs import choose_partition_size

    try:
        partition_size, why, _ = choose_partition_size(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg.strategy.partition_size = partition_size
    rank_zero_info(f"strategy.partition_size=auto -> {partition_size}: {why}")
    return why


def validate_config(cfg: DictConfig) -> Plan:
    """Check a composed config before anything is launched; return its `Plan`.

    Raises `ConfigError` with a message that names the keys to change. Reads only the config
    and the text source's files, never the hardware: it gives the same verdict on a login
    node without GPUs.
    """
    for key in ("trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches"):
        _positive_int(cfg, key)
    for key in ("data.micro_batch_size", "data.seq_len", "model.n_layer", "model.n_head"):
        _positive_int(cfg, key)
    model = cfg.model
    if model.get("arch") not in ARCHS:
        raise ConfigError(f"model.arch={model.get('arch')!r} is not one of {sorted(ARCHS)}.")
    model_config(cfg)  # unknown network keys
    if model.n_embd % model.n_head != 0:
        raise ConfigError(
            f"model.n_embd={model.n_embd} is not divisible by model.n_head={model.n_head}."
        )
    _positive_int(cfg, "model.vocab_size")
    _check_data(cfg)
    resolve_partition_size(cfg)
    _check_strategy(cfg)

    cluster = cfg.cluster
    precision = str(cfg.trainer.precision)
    if not cluster.get("bf16", True):
        uses_bf16 = "bf16" in precision or (
            cfg.strategy.name in ("mics", "hsdp", "fsdp")
            and str(cfg.strategy.get("param_dtype")) in ("bf16", "bfloat16", "torch.bfloat16")
        )
        if uses_bf16:
            raise ConfigError(
                f"cluster={cluster.name} ({cluster.instance_type}) has no bf16: use "
                "trainer.precision=16-mixed and strategy.param_dtype=null."
            )
    if cluster.name == "local_cpu" and int(cfg.trainer.num_nodes) > 1:
        raise ConfigError(
            "cluster=local_cpu runs every rank on this machine: keep trainer.num_nodes=1 and "
            "emulate nodes with cluster.devices_per_node (processes) and cluster.ranks_per_node "
            "(ranks per emulated node), or use cluster=cpu_nodes for real CPU machines."
        )
    if cfg.trainer.accelerator == "cpu" and precision in ("16-true", "16"):
        raise ConfigError(
            "trainer.precision=16-true does not run on CPU: use 32-true or bf16-mixed."
        )
    window = OmegaConf.select(cfg, "callbacks.throughput.window_size")
    if window is not None and window < 2:
        raise ConfigError(f"callbacks.throughput.window_size must be >= 2, got {window}.")
    if "tensorboard" in (cfg.get("logger") or {}) and (
        importlib.util.find_spec("tensorboard") is None
        and importlib.util.find_spec("tensorboardX") is None
    ):
        raise ConfigError(
            "logger=tensorboard needs TensorBoard: pip install 'lightning-mics[tensorboard]' "
            "(or tensorboard), or use logger=csv."
        )
    run_plan = plan(cfg)
    _check_memory(cfg, run_plan.params)
    return run_plan


# ------------------------------------------------------------------------ components
def datamodule_from_config(cfg: DictConfig) -> TextDataModule | SyntheticDataModule:
    data = cfg.data
    common = dict(
        objective=data.objective,
        seq_len=int(data.seq_len),
        micro_batch_size=int(data.micro_batch_size),
        mlm_probability=float(data.mlm_probability),
        num_workers=int(data.num_workers),
        seed=int(cfg.seed),
    )
    if data.name == "text":
        return TextDataModule(
            cache_dir=data.cache_dir,
            source=data.source,
            pattern=data.pattern,
            recursive=bool(data.recursive),
            tokenizer=data.tokenizer,
            vocab_size=int(data.vocab_size),
            val_fraction=float(data.val_fraction),
            **common,
        )
    return SyntheticDataModule(
        vocab_size=int(data.vocab_size),
        num_samples=int(data.num_samples),
        branching=int(data.branching),
        **common,
    )


def mics_kwargs(cfg: DictConfig, with_state_dict_type: bool = True) -> dict[str, Any]:
    """``MiCSStrategy`` keyword arguments: MiCSConfig fields (+ ``state_dict_type``)."""
    options = _strategy_options(cfg)
    state_dict_type = options.pop("state_dict_type", "sharded")
    if with_state_dict_type:
        options["state_dict_type"] = state_dict_type
    return options


def strategy_options(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of the Trainer/Fabric strategy of ``cfg.strategy``."""
    if cfg.strategy.name in ("mics", "hsdp"):
        return mics_kwargs(cfg)
    options = _strategy_options(cfg)
    if cfg.strategy.name == "fsdp":
        return {"save_distributed_checkpoint": options.get("save_distributed_checkpoint", True)}
    return options


def fsdp_options(cfg: DictConfig) -> dict[str, Any]:
    """strategy=fsdp: the options of `recipes.strategies.fully_shard_network`."""
    options = _strategy_options(cfg)
    options.pop("save_distributed_checkpoint", None)
    return options
