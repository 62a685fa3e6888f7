"""Kernel-counted bytes of single gloo collectives on the emulated cluster.

Run on every rank by ``benchmarks.emulated_cluster`` (2 nodes x 2 ranks in the tests).
Each measurement reads the node's veth counters (``/proc/net/dev`` in the node's
namespace) around one collective, between barriers, and subtracts the same window with
no collective in it (the barriers' own traffic). Rank 0 writes, per measurement, each
node's tx/rx bytes and packets on the veth and on the loopback.

Usage: ``cluster_collectives.py --out REPORT.json [--numel N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.emulated_cluster import LinkCounters, parse_net_dev

# NOTE: the `*_single` names replace the deprecated `*_into_tensor` / `*_tensor` ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def node_counters() -> dict[str, LinkCounters]:
    """This node's veth and loopback counters."""
    devs = parse_net_dev(Path("/proc/net/dev").read_text())
    return {"link": devs[os.environ["GLOO_SOCKET_IFNAME"]], "loopback": devs["lo"]}


def window(fn: Callable[[], None], repeats: int = 1) -> dict[str, LinkCounters]:
    """Counter deltas of this node around ``repeats`` calls of ``fn`` on every rank."""
    dist.barrier()
    before = node_counters()
    dist.barrier()  # every rank has read before any rank starts
    for _ in range(repeats):
        fn()
    dist.barrier()  # every rank is done before any rank reads
    after = node_counters()
    dist.barrier()  # every rank has read before anyone goes on
    return {k: after[k] - before[k] for k in after}


def per_node(delta: dict[str, LinkCounters]) -> list[dict[str, dict[str, int]]]:
    """Every node's deltas (as seen by its local rank 0), on every rank."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: v.as_dict() for k, v in delta.items()})
    k = int(os.environ["LOCAL_WORLD_SIZE"])
    return everyone[::k]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--numel", type=int, default=1 << 20, help="float32 elements")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    k = int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = world // k
    # one group per node, one per local index (cross-node), created on every rank
    node_groups = [dist.new_group(list(range(n * k, (n + 1) * k))) for n in range(nodes)]
    local_groups = [dist.new_group(list(range(i, world, k))) for i in range(k)]
    my_node, my_local = node_groups[rank // k], local_groups[rank % k]

    n = args.numel
    t = torch.ones(n)
    gathered = torch.empty(n)
    shard = torch.empty(n // world)
    cross_gathered = torch.empty(n)
    cross_shard = torch.empty(n // nodes)

    def all_gather() -> None:
        all_gather_single(gathered, shard, group=None)

    def cross_all_gather() -> None:
        all_gather_single(cross_gathered, cross_shard, group=my_local)

    def reduce_scatter() -> None:
        reduce_scatter_single(shard, t)

    ops: dict[str, Callable[[], None]] = {
        "empty": lambda: None,
        "all_reduce_world": lambda: dist.all_reduce(t),
        "all_reduce_node_group": lambda: dist.all_reduce(t, group=my_node),
        "all_gather_world": all_gather,
        "all_gather_node_group": lambda: all_gather_single(
            torch.empty(n), torch.empty(n // k), group=my_node
        ),
        "all_gather_cross_node_group": cross_all_gather,
        "reduce_scatter_world": reduce_scatter,
    }
    results = {}
    for name, fn in ops.items():
        results[name] = per_node(window(fn, args.repeats))
    if rank == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "numel": n,
                    "bytes": n * 4,
                    "repeats": args.repeats,
                    "world_size": world,
                    "ranks_per_node": k,
                    "results": results,
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()
    # NOTE: skip interpreter teardown, where gloo's threads can abort a rank after all
    # work is done (seen under CPU load).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
