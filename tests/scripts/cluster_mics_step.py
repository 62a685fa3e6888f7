"""Kernel-counted inter-node bytes of one MiCS training step, flat vs hierarchical.

Run on every rank by ``benchmarks.emulated_cluster`` (2 nodes x 2 ranks, partition 4
in the tests). For each configuration (``hierarchical`` False/True x blocks'
``reshard_after_forward`` True/False) it shards a GPT with `apply_mics`, runs one
warm-up step, then one measured step in two counter windows (see
``cluster_collectives.window``):

- ``forward``: exactly the forward's parameter all-gathers (root + every block);
- ``backward``: with ``reshard_after_forward=True`` the blocks' re-gathers plus the
  gradient reduce-scatters; with ``False`` the reduce-scatters only (parameters stay
  gathered). The difference of the two is the backward's all-gather traffic.

With ``partition_size == world_size`` there is one replica, so no all-reduce. For each
window rank 0 reports every node's veth/loopback deltas, every rank's `CommStats`
snapshot over the same window and the window's wall time.

Usage: ``cluster_mics_step.py --out REPORT.json [--n-embd 256] [--n-layer 2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_mics import MiCSConfig, MiCSTopology, apply_mics, comm_stats, destroy_meshes
from recipes.gpt import GPT, GPTConfig
from tests.scripts.cluster_collectives import node_counters

HAS_HIERARCHICAL = "hierarchical" in {f.name for f in dataclasses.fields(MiCSConfig)}


def all_ranks(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def measured(fn, stats) -> dict[str, Any]:
    """Run ``fn`` on every rank between barriers; this window's node counters (local
    rank 0 of each node), every rank's CommStats and the wall time."""
    dist.barrier()
    stats.reset()
    before = node_counters()
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    elapsed = time.perf_counter() - start
    after = node_counters()
    snap = stats.snapshot()
    dist.barrier()
    k = int(os.environ["LOCAL_WORLD_SIZE"])
    delta = {key: (after[key] - before[key]).as_dict() for key in after}
    return {
        "nodes": all_ranks(delta)[::k],
        "stats": all_ranks(snap),
        "seconds": max(all_ranks(elapsed)),
    }


def run_config(
    hierarchical: bool, reshard: bool, model_config: GPTConfig, micro_batch: int
) -> dict[str, Any]:
    world = dist.get_world_size()
    k = int(os.environ["LOCAL_WORLD_SIZE"])
    topology = MiCSTopology.create(world, ranks_per_node=k, partition_size=world)
    extra = {"hierarchical": hierarchical} if HAS_HIERARCHICAL else {}
    config = MiCSConfig(reshard_after_forward=reshard, **extra)
    torch.manual_seed(0)
    model = apply_mics(GPT(model_config), topology, config, device=torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = comm_stats(model)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randint(
        0, model_config.vocab_size, (micro_batch, model_config.block_size), generator=gen
    )
    y = torch.randint(
        0, model_config.vocab_size, (micro_batch, model_config.block_size), generator=gen
    )
    holder: dict[str, torch.Tensor] = {}

    def forward() -> None:
        holder["loss"] = GPT.loss(model(x), y)

    def backward() -> None:
        holder.pop("loss").backward()

    # warm-up step (lazy initialisation), not measured
    forward()
    backward()
    opt.step()
    opt.zero_grad()
    out = {"forward": measured(forward, stats), "backward": measured(backward, stats)}
    opt.step()
    opt.zero_grad()
    num_params = sum(p.numel() for p in model.parameters())
    out["num_params"] = num_params
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--configs", default="flat,hier", help="subset of flat,hier")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model_config = GPTConfig(
        vocab_size=args.vocab, block_size=16, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd
    )
    wanted = set(args.configs.split(","))
    if not HAS_HIERARCHICAL:
        wanted.discard("hier")
    results = {}
    for name, hierarchical in (("flat", False), ("hier", True)):
        if name not in wanted:
            continue
        for reshard in (True, False):
            results[f"{name}-rafw{int(reshard)}"] = run_config(
                hierarchical, reshard, model_config, args.micro_batch
            )
    if dist.get_rank() == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "has_hierarchical": HAS_HIERARCHICAL,
                    "world_size": dist.get_world_size(),
                    "ranks_per_node": int(os.environ["LOCAL_WORLD_SIZE"]),
                    "model": dataclasses.asdict(model_config),
                    "results": results,
                }
            )
        )
    dist.barrier()
    destroy_meshes()
    dist.destroy_process_group()
    # NOTE: skip interpreter teardown, where gloo's threads can abort a rank after all
    # work is done (seen under CPU load).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
