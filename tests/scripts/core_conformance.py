"""Nested FSDP units and the flush's respect for user settings, on several ranks.

- ``nested``: models whose repeated blocks hold a ``ModuleList`` themselves (MoE experts,
  T5-style ``block[i].layer``), sharded with the default wrap policy, and with a class-set
  policy that names a parent and its child (also under activation checkpointing), trained
  with two-hop accumulation vs a single-process reference on the same global batch.
- ``flush``: ``set_reduce_scatter_unused_params(True)`` survives
  ``flush_pending_gradients`` (an accumulation window whose last micro-step has no
  backward), and the flushed step matches the reference.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lightning_mics import (
    MiCSConfig,
    MiCSTopology,
    apply_mics,
    flush_pending_gradients,
    micro_step,
)
from lightning_mics import _fsdp_internals as fsdp
from tests.scripts import common

DIM, IN, MICRO_BATCH, ACCUM, STEPS, LR = 8, 4, 2, 2, 2, 0.1


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class MoEBlock(nn.Module):
    """A block holding a ModuleList of experts (Mixtral / DeepSeek style)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.gate = nn.Linear(DIM, 2)
        self.experts = nn.ModuleList([Expert() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        weights = torch.softmax(self.gate(h), dim=-1)
        return x + sum(weights[..., i : i + 1] * e(h) for i, e in enumerate(self.experts))


class T5Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.dense = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.dense(self.norm(x)))


class T5Block(nn.Module):
    """T5's ``block[i].layer[j]`` layout."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5Layer() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class Nested(nn.Module):
    def __init__(self, block_cls: type[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, DIM)
        self.blocks = nn.ModuleList([block_cls() for _ in range(2)])
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make(block_cls: type[nn.Module]) -> Nested:
    torch.manual_seed(0)
    return Nested(block_cls)


def global_batches(world: int, steps: int, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(world * MICRO_BATCH, IN, generator=g),
            torch.randn(world * MICRO_BATCH, 1, generator=g),
        )
        for _ in range(steps * accum)
    ]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def reference(block_cls, world: int, skip_last: bool = False) -> dict[str, torch.Tensor]:
    model = make(block_cls)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for i, (x, y) in enumerate(global_batches(world, STEPS, ACCUM)):
        is_last = (i + 1) % ACCUM == 0
        if not (skip_last and is_last):
            (loss_fn(model, x, y) / ACCUM).backward()
        if is_last:
            opt.step()
            opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    model: nn.Module, world: int, skip_last: bool = False
) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Two-hop accumulation on this rank's slice of every global batch; returns the full
    state and, per window, whether the flush found pending gradients."""
    rank = dist.get_rank()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    flushed = []
    for i, (x, y) in enumerate(global_batches(world, STEPS, ACCUM)):
        x, y = x[rank::world], y[rank::world]
        is_last = (i + 1) % ACCUM == 0
        with micro_step(model, is_last=is_last):
            loss = loss_fn(model, x, y)
            if not (skip_last and is_last):
                (loss / ACCUM).backward()
        if is_last:
            flushed.append(flush_pending_gradients(model))
            opt.step()
            opt.zero_grad()
    return common.full_state(model), flushed


def units(model: nn.Module) -> list[str]:
    return sorted(
        name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule)
    )


def nested_case(topology: MiCSTopology, world: int, block_cls, **options: Any) -> dict[str, Any]:
    model = apply_mics(make(block_cls), topology, MiCSConfig(**options))
    state, _ = train(model, world)
    ref = reference(block_cls, world) if dist.get_rank() == 0 else state
    return {"units": units(model), "param_diff": common.max_abs_diff(state, ref)}


def flush_case(topology: MiCSTopology, world: int, user_setting: bool) -> dict[str, Any]:
    model = apply_mics(make(MoEBlock), topology)
    model.set_reduce_scatter_unused_params(user_setting)
    state, flushed = train(model, world, skip_last=True)
    ref = reference(MoEBlock, world, skip_last=True) if dist.get_rank() == 0 else state
    return {
        "flushed": flushed,
        "flags_after": sorted(
            {fsdp.reduce_scatter_unused_params(g) for g in fsdp.param_groups(model)}
        ),
        "num_groups": sum(1 for _ in fsdp.param_groups(model)),
        "param_diff": common.max_abs_diff(state, ref),
    }


def main() -> None:
    args = common.parser().parse_args()
    dist.init_process_group("gloo")
    world = int(os.environ["WORLD_SIZE"])
    topology = MiCSTopology.create(
        world, args.ranks_per_node, common.partition_size(args.partition_size)
    )
    results = {
        "moe_default": nested_case(topology, world, MoEBlock),
        "t5_default": nested_case(topology, world, T5Block),
        "moe_class_set": nested_case(topology, world, MoEBlock, wrap_policy={Expert, MoEBlock}),
        "moe_class_set_ac": nested_case(
            topology,
            world,
            MoEBlock,
            wrap_policy={MoEBlock, Expert},
            activation_checkpointing=True,
        ),
        "flush_user_true": flush_case(topology, world, True),
        "flush_user_false": flush_case(topology, world, False),
    }
    common.report(args.out, **results)
    common.finish()


if __name__ == "__main__":
    main()
