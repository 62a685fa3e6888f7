"""Shared pieces of the multi-process test scripts: the tiny GPT, its data, the
single-process reference run, and rank 0's JSON report."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from recipes.data import SyntheticTokens
from recipes.gpt import GPT, GPTConfig

SEQ_LEN = 16
TINY = GPTConfig(vocab_size=96, block_size=SEQ_LEN, n_layer=2, n_head=2, n_embd=32)
LR = 0.1
MOMENTUM = 0.9


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--partition-size", default="node")
    p.add_argument("--ranks-per-node", type=int, default=None)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--mode", default="two_hop")
    return p


def partition_size(value: str) -> int | str:
    return value if value == "node" else int(value)


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


def make_dataset(world_size: int, micro_batch: int, accum: int, steps: int) -> SyntheticTokens:
    return SyntheticTokens(world_size * micro_batch * accum * steps, SEQ_LEN, TINY.vocab_size)


def make_loader(world_size: int, micro_batch: int, accum: int, steps: int) -> DataLoader:
    """This rank's loader: a strided, unshuffled slice of the dataset (what a
    non-shuffling DistributedSampler yields), so that the union over ranks of each
    micro-batch is the reference's global micro-batch."""
    dataset = make_dataset(world_size, micro_batch, accum, steps)
    sampler = DistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"]),
        shuffle=False,
    )
    return DataLoader(dataset, batch_size=micro_batch, sampler=sampler)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def reference_run(
    world_size: int, micro_batch: int, accum: int, steps: int, clip: float | None = None
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, global batch ``world_size * micro_batch``: the ground truth."""
    model = make_model()
    opt = make_optimizer(model.parameters())
    data = DataLoader(
        make_dataset(world_size, micro_batch, accum, steps), batch_size=world_size * micro_batch
    )
    losses = []
    for i, (x, y) in enumerate(data):
        loss = GPT.loss(model(x), y)
        (loss / accum).backward()
        losses.append(loss.item())
        if (i + 1) % accum == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers (collective: call on every rank)."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def mean_over_world(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def report(out: str, **data: Any) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(data))
