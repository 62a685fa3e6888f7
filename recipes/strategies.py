"""The strategies of ``conf/strategy/``, for the Trainer and for Fabric.

- ``mics``: ``lightning_mics.MiCSStrategy`` with the config's MiCSConfig fields.
- ``hsdp``: the same strategy with partition = one node, flat collectives and an all-reduce
  on every micro-step (what HSDP does), set in ``conf/strategy/hsdp.yaml``.
- ``fsdp``: ZeRO-3 over the whole world with Lightning's ``ModelParallelStrategy`` (FSDP2
  ``fully_shard`` on a 1-D data-parallel mesh); `fully_shard_network` shards each block,
  then the network.
- ``ddp``: Lightning's ``DDPStrategy``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from lightning_mics.config import to_dtype


def blocks_of(network: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a recipe network (GPT's ``transformer.h``, BERT's ``encoder``)."""
    lists = [m for m in network.modules() if isinstance(m, nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(f"expected one nn.ModuleList of blocks in {type(network).__name__}")
    return lists[0]


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def fully_shard_network(
    network: nn.Module,
    mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    param_dtype: Any = None,
    reduce_dtype: Any = "float32",
) -> nn.Module:
    """ZeRO-3: ``fully_shard`` each block, then the network, over all ranks of ``mesh``.

    A network created on the meta device is then allocated shard by shard and initialised
    with its own ``reset_parameters()`` (the GPT-2 / BERT init).
    """
    if isinstance(network, FSDPModule):
        return network
    if mesh.ndim > 1:
        mesh = mesh["data_parallel"]
    policy = MixedPrecisionPolicy(
        param_dtype=to_dtype(param_dtype), reduce_dtype=to_dtype(reduce_dtype)
    )
    blocks = blocks_of(network)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if any(t.is_meta for t in [*network.parameters(), *network.buffers()]):
        network.to_empty(device=_mesh_device(mesh))
        with torch.no_grad():
            network.reset_parameters()
    return network


def parallelize_fn(options: dict[str, Any]) -> Callable[[nn.Module, DeviceMesh], nn.Module]:
    """``fn(network, mesh)`` for Fabric's ``ModelParallelStrategy`` and `LanguageModel`."""
    return partial(fully_shard_network, **options)


def trainer_strategy(name: str, options: dict[str, Any], world_size: int) -> Any:
    """The Trainer strategy for ``conf/strategy/<name>.yaml``'s ``options``."""
    if name in ("mics", "hsdp"):
        from lightning_mics import MiCSStrategy

        return MiCSStrategy(**options)
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            data_parallel_size=world_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=options.get("save_distributed_checkpoint", True),
        )
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**options)
    raise ValueError(f"unknown strategy {name!r}")


def fabric_strategy(
    name: str, options: dict[str, Any], world_size: int, fsdp: dict[str, Any]
) -> Any:
    """The Fabric strategy for ``conf/strategy/<name>.yaml``'s ``options``."""
    if name in ("mics", "hsdp"):
        from lightning_mics.fabric import MiCSStrategy

        return MiCSStrategy(**options)
    if name == "fsdp":
        from lightning.fabric.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            parallelize_fn=parallelize_fn(fsdp),
            data_parallel_size=world_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=options.get("save_distributed_checkpoint", True),
        )
    if name == "ddp":
        from lightning.fabric.strategies import DDPStrategy

        return DDPStrategy(**options)
    raise ValueError(f"unknown strategy {name!r}")
