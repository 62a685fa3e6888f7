"""One rank of ``benchmarks.strategies``: every strategy's training steps, interleaved.

Started once per rank by `benchmarks.emulated_cluster.EmulatedCluster.run` (which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` /
``MASTER_PORT`` = node 0, ``LIGHTNING_MICS_NODE_ID`` and ``GLOO_SOCKET_IFNAME``: what
``torchrun`` would set, without its agent process), or by ``torchrun`` on one machine.

    python -m benchmarks.strategy_worker --spec SPEC.json --out REPORT.json

The spec (written by ``benchmarks.strategies``) names the model, the data sizes, the
steps, repeats and the runs: each a *layout* (how the model is sharded: ``ddp``;
``fsdp`` = plain FSDP2 ``fully_shard`` on a 1-D mesh of the whole world; ``mics`` =
`lightning_mics.apply_mics` with a partition size and ``hierarchical``) plus an
accumulation (micro-steps per optimizer step and the `lightning_mics.micro_step` mode).
Each layout is built once (same seed) and shared by the runs that use it.

After one warm-up step per run, every repeat runs every run's ``steps`` optimizer steps
in turn (the order rotates by one run per repeat), each step closed by a barrier, so
the runs see the same machine load. Around each run's steps (between barriers) local
rank 0 of every node reads its veth and loopback counters (``/proc/net/dev``: the
node's inter-node traffic) and every rank its `CommStats`. Model-state bytes (local
shards of parameters, gradients and optimizer state) are counted after the warm-up
step. Rank 0 writes the raw numbers; ``benchmarks.strategies`` summarises them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from benchmarks.emulated_cluster import LINK_NAME, parse_net_dev
from lightning_mics import CommStats, MiCSConfig, MiCSTopology, apply_mics, comm_stats, micro_step
from lightning_mics.accounting import install_comm_stats
from recipes.gpt import GPT, GPTConfig


# --------------------------------------------------------------------------- layouts
@dataclass
class Built:
    """A sharded model, its optimizer and its collective recorder."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    stats: CommStats
    kind: str
    memory: dict[str, int] = field(default_factory=dict)


def layout_key(run: dict[str, Any]) -> str:
    if run["layout"] == "mics":
        key = f"mics-p{run['partition_size']}-{'hier' if run['hierarchical'] else 'flat'}"
        return key + ("-async" if run.get("overlap") else "")
    return run["layout"]


def _ddp_recording_hook(stats: CommStats) -> Callable:
    """DDP's default all-reduce, recorded (DDP has no `CommStats` of its own)."""

    # NOTE: no annotations: DDP checks them, and this module's are strings.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        buf = bucket.buffer()
        stats.record("all_reduce", buf.numel() * buf.element_size(), None)
        return default_hooks.allreduce_hook(None, bucket)

    return hook


def build(run: dict[str, Any], model_config: GPTConfig, lr: float) -> Built:
    world = dist.get_world_size()
    k = int(os.environ["LOCAL_WORLD_SIZE"])
    torch.manual_seed(0)
    net = GPT(model_config)
    kind = run["layout"]
    if kind == "ddp":
        stats = CommStats.for_ranks_per_node(world, k)
        model: nn.Module = DistributedDataParallel(net)
        model.register_comm_hook(None, _ddp_recording_hook(stats))
    elif kind == "fsdp":
        # ZeRO-3 as a plain FSDP2 user writes it: fully_shard per block, then the root,
        # on a 1-D mesh of the whole world (torch's defaults: blocks resharded after
        # forward, the root not). gloo has no AVG/PREMUL_SUM: sum-only reductions.
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
        for block in net.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)
        for module in net.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
        stats = install_comm_stats(net, CommStats.for_ranks_per_node(world, k), None)
        model = net
    elif kind == "mics":
        topology = MiCSTopology.create(
            world, ranks_per_node=k, partition_size=run["partition_size"]
        )
        config = MiCSConfig(
            hierarchical=bool(run["hierarchical"]), forward_prefetch=bool(run.get("overlap"))
        )
        model = apply_mics(net, topology, config, device=torch.device("cpu"))
        stats = comm_stats(model)
    else:
        raise ValueError(f"unknown layout {kind!r}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return Built(model, optimizer, stats, kind)


def _local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def model_state_bytes(built: Built) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (local shards)."""
    params = list(built.model.parameters())
    opt = sum(
        _local_bytes(v)
        for state in built.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    out = {
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params),
        "optimizer_state": opt,
    }
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- steps
def make_step(
    run: dict[str, Any], built: Built, x: torch.Tensor, y: torch.Tensor
) -> Callable[[bool], None]:
    """One optimizer step of ``run["accumulation"]`` micro-steps."""
    acc, mode = int(run["accumulation"]), run["mode"]
    model, opt = built.model, built.optimizer

    def context(last: bool) -> contextlib.AbstractContextManager:
        if built.kind == "ddp":
            return contextlib.nullcontext() if last else model.no_sync()
        if built.kind == "fsdp":  # ZeRO-3: reduce-scatter every micro-step (its default)
            return contextlib.nullcontext()
        return micro_step(model, is_last=last, mode=mode)

    def step(record_memory: bool = False) -> None:
        for i in range(acc):
            last = i == acc - 1
            with context(last):
                loss = GPT.loss(model(x), y) / acc
                loss.backward()
        opt.step()
        if record_memory:
            built.memory = model_state_bytes(built)
        opt.zero_grad(set_to_none=True)

    return step


def node_counters() -> dict[str, dict[str, int]]:
    devs = parse_net_dev(Path("/proc/net/dev").read_text())
    link = os.environ.get("GLOO_SOCKET_IFNAME", LINK_NAME)
    out = {"loopback": devs["lo"]}
    if link in devs:
        out["link"] = devs[link]
    return out


def _delta(after: dict, before: dict) -> dict[str, dict[str, int]]:
    return {key: (after[key] - before[key]).as_dict() for key in after}


def measure(
    step: Callable[[], None], stats: CommStats, steps: int, local_rank: int
) -> dict[str, Any]:
    """``steps`` optimizer steps between barriers: per-step wall times (each step ends
    with a barrier), this node's counter deltas (local rank 0) and this rank's
    `CommStats` over the window."""
    dist.barrier()
    stats.reset()
    before = node_counters() if local_rank == 0 else None
    dist.barrier()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    after = node_counters() if local_rank == 0 else None
    snap = stats.snapshot()
    dist.barrier()
    return {
        "times": times,
        "node": _delta(after, before) if local_rank == 0 else None,
        "stats": snap,
    }


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.strategy_worker")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(int(spec.get("threads", 1)))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    model_config = GPTConfig(**spec["model"])
    micro_batch, seq_len = int(spec["micro_batch"]), int(spec["seq_len"])
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randint(0, model_config.vocab_size, (micro_batch, seq_len), generator=gen)
    y = torch.randint(0, model_config.vocab_size, (micro_batch, seq_len), generator=gen)

    runs = spec["runs"]
    built: dict[str, Built] = {}
    setup_start = time.perf_counter()
    for run in runs:
        key = layout_key(run)
        if key not in built:
            built[key] = build(run, model_config, float(spec.get("lr", 1e-4)))
    steps_fns = [make_step(run, built[layout_key(run)], x, y) for run in runs]
    # warm-up: one step per run (lazy initialisation, optimizer state); model-state
    # bytes are counted during the first step of each layout
    counted: set[str] = set()
    for run, step in zip(runs, steps_fns, strict=True):
        key = layout_key(run)
        step(record_memory=key not in counted)
        counted.add(key)
    dist.barrier()
    setup_s = time.perf_counter() - setup_start

    results: list[dict[str, Any]] = [{"windows": []} for _ in runs]
    order = list(range(len(runs)))
    for repeat in range(int(spec["repeats"])):
        shift = repeat % len(order)
        for i in order[shift:] + order[:shift]:
            window = measure(
                steps_fns[i], built[layout_key(runs[i])].stats, int(spec["steps"]), local_rank
            )
            window["repeat"] = repeat
            results[i]["windows"].append(window)

    # gather everything once, after the measured windows (object collectives use the
    # network too)
    everyone: list[Any] = [None] * world
    mine = {
        "results": results,
        "memory": {key: b.memory for key, b in built.items()},
        "local_rank": local_rank,
    }
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        k = int(os.environ["LOCAL_WORLD_SIZE"])
        report = {"world_size": world, "ranks_per_node": k, "setup_s": setup_s, "runs": []}
        for i, run in enumerate(runs):
            windows = []
            for w, window in enumerate(results[i]["windows"]):
                windows.append(
                    {
                        "repeat": window["repeat"],
                        "times": window["times"],
                        "nodes": [
                            everyone[r]["results"][i]["windows"][w]["node"]
                            for r in range(0, world, k)
                        ],
                        "stats": [
                            everyone[r]["results"][i]["windows"][w]["stats"] for r in range(world)
                        ],
                    }
                )
            report["runs"].append(
                {
                    **run,
                    "windows": windows,
                    "memory_per_rank": [
                        everyone[r]["memory"][layout_key(run)] for r in range(world)
                    ],
                }
            )
        Path(args.out).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    # NOTE: skip interpreter teardown, where gloo's threads can abort a rank after all
    # work is done (seen under CPU load).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
