"""Shared pieces of the multi-process test scripts: the tiny GPT, its data, the
single-process reference run, and rank 0's JSON report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
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
    p.add_argument("--configs", default="", help="k:p:s[:mode],... (see RunConfig)")
    p.add_argument("--clip", type=float, default=None, help="clip gradients to this norm")
    p.add_argument("--skip-last", action="store_true", help="skip each window's last backward")
    p.add_argument("--extra", type=int, default=0, help="micro-batches in a short last window")
    p.add_argument("--forward-prefetch", action="store_true", help="MiCS forward_prefetch=True")
    return p


def init_nccl() -> torch.device:
    """Join the NCCL default group on this rank's GPU (``LOCAL_RANK``), with TF32 off so
    that GPU results can be compared with the CPU fp32 reference."""
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl", device_id=device)
    return device


def check_forward_prefetch(model: torch.nn.Module, expected: bool) -> None:
    """Raise unless every FSDP unit of ``model`` unshards asynchronously exactly when
    ``expected`` (i.e. the strategy passed ``forward_prefetch`` on to MiCS)."""
    from lightning_mics._fsdp_internals import param_groups

    flags = {group.unshard_async_op for group in param_groups(model)}
    if flags != {expected}:
        raise RuntimeError(f"forward_prefetch={expected} but the units' async unshard: {flags}")


@dataclass(frozen=True)
class RunConfig:
    """One MiCS configuration of a parity run."""

    ranks_per_node: int
    partition_size: int | str
    accum: int
    mode: str = "two_hop"

    def __str__(self) -> str:
        return f"k{self.ranks_per_node}-p{self.partition_size}-s{self.accum}-{self.mode}"


def parse_configs(text: str) -> list[RunConfig]:
    """``"2:4:4,2:2:1:every_micro_step"`` -> RunConfigs."""
    configs = []
    for item in filter(None, text.split(",")):
        k, p, s, *mode = item.split(":")
        configs.append(RunConfig(int(k), partition_size(p), int(s), *mode))
    return configs


def compare_with_reference(
    losses: list[float],
    state: dict[str, torch.Tensor],
    world_size: int,
    micro_batch: int,
    accum: int,
    steps: int,
    clip: float | None = None,
    skip_last: bool = False,
    extra: int = 0,
) -> dict[str, Any]:
    """Max abs differences of parameters and per-micro-step losses vs the reference.

    Runs the reference on rank 0 only; other ranks return an empty dict.
    """
    if dist.get_rank() != 0:
        return {}
    ref_losses, ref_state = reference_run(
        world_size, micro_batch, accum, steps, clip=clip, skip_last=skip_last, extra=extra
    )
    return {
        "param_diff": max_abs_diff(state, ref_state),
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
        if len(losses) == len(ref_losses)
        else f"{len(losses)} losses vs {len(ref_losses)} in the reference",
        "num_losses": len(losses),
    }


def partition_size(value: str) -> int | str:
    return value if value == "node" else int(value)


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


def make_dataset(
    world_size: int, micro_batch: int, accum: int, steps: int, extra: int = 0
) -> SyntheticTokens:
    """``steps`` full accumulation windows plus ``extra`` micro-batches (a short last
    window at the end of the epoch)."""
    num_micro_batches = accum * steps + extra
    return SyntheticTokens(world_size * micro_batch * num_micro_batches, SEQ_LEN, TINY.vocab_size)


def make_loader(
    world_size: int, micro_batch: int, accum: int, steps: int, extra: int = 0
) -> DataLoader:
    """This rank's loader: a strided, unshuffled slice of the dataset (what a
    non-shuffling DistributedSampler yields), so that the union over ranks of each
    micro-batch is the reference's global micro-batch."""
    dataset = make_dataset(world_size, micro_batch, accum, steps, extra)
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
    world_size: int,
    micro_batch: int,
    accum: int,
    steps: int,
    clip: float | None = None,
    skip_last: bool = False,
    extra: int = 0,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, global batch ``world_size * micro_batch``: the ground truth.

    ``skip_last`` runs no backward for the last micro-step of each window (as when a
    ``training_step`` returns None) while the optimizer still steps. ``extra``
    micro-batches form a short last window that steps at the end of the epoch.
    """
    model = make_model()
    opt = make_optimizer(model.parameters())
    data = DataLoader(
        make_dataset(world_size, micro_batch, accum, steps, extra),
        batch_size=world_size * micro_batch,
    )
    losses = []
    for i, (x, y) in enumerate(data):
        loss = GPT.loss(model(x), y)
        is_last = (i + 1) % accum == 0 or i == len(data) - 1
        if not (skip_last and is_last):
            (loss / accum).backward()
        losses.append(loss.item())
        if is_last:
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


def finish() -> None:
    """Leave cleanly: free MiCS's meshes and the default group on every rank.

    NOTE: exiting with live gloo groups can abort a rank (SIGABRT) while its peers are
    still tearing down, which would fail a run that otherwise passed.
    """
    from lightning_mics import destroy_meshes

    if dist.is_initialized():
        dist.barrier()
        destroy_meshes()
        dist.destroy_process_group()
    # NOTE: skip interpreter teardown: gloo's threads can still abort a rank there
    # ("terminate called without an active exception") after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def parity_main(
    args: argparse.Namespace,
    run: Callable[[RunConfig, int, argparse.Namespace], tuple[list[float], dict]],
) -> None:
    """Run ``run(config, world_size, args) -> (losses, full_state)`` for every
    ``--configs`` entry, compare each with the reference and report on rank 0."""
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for cfg in parse_configs(args.configs):
        losses, state = run(cfg, world, args)
        results[str(cfg)] = compare_with_reference(
            losses,
            state,
            world,
            args.micro_batch,
            cfg.accum,
            args.steps,
            clip=args.clip,
            skip_last=args.skip_last,
            extra=args.extra,
        )
    report(args.out, **results)
    finish()
