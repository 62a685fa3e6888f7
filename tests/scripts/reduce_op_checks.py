"""MiCS training with the reduce ops FSDP picks on NCCL (``AVG``, ``PREMUL_SUM``) vs the
single-process reference.

``--backend emulated`` (CPU) initialises the default group with the test-only backend of
``tests/scripts/emulated_nccl.py`` (gloo plus ``AVG`` / ``PREMUL_SUM``); ``--backend nccl``
runs on GPUs (``tests/gpu/``). ``--configs k:p:s:reduction,...``: ranks per node,
partition size, accumulation steps (two-hop) and ``default`` (FSDP's own ops: ``AVG``
for the reduce-scatter and the all-reduce) or ``divide`` (``set_gradient_divide_factor``
= world size on every FSDP module: ``PREMUL_SUM(1/world)`` for the reduce-scatter, ``SUM``
for the all-reduce).

Reported per configuration, for `tests/test_reduce_ops.py`: the differences from the
reference, the comms installed, and every reduce-scatter / all-reduce that FSDP and the
hierarchical stages issued on rank 0 during the training micro-steps, as
``"kind op [global ranks of the group] dtype"`` with a count (`comm_recorder`).
``--forward-prefetch`` trains with ``MiCSConfig(forward_prefetch=True)`` (asynchronous
unshard: on NCCL, FSDP's all-gathers then run on the current stream and the
hierarchical one's intra-node stage is issued in ``Work.wait()``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from lightning_mics import MiCSConfig, MiCSTopology, apply_mics, micro_step
from recipes.gpt import GPT
from tests.scripts import common, emulated_nccl
from tests.scripts.comm_recorder import Recorder

STEPS = 3
MICRO_BATCH = 2


@dataclass(frozen=True)
class Config:
    ranks_per_node: int
    partition_size: int
    accum: int
    reduction: str = "default"  # or "divide"

    def __str__(self) -> str:
        k, p, s = self.ranks_per_node, self.partition_size, self.accum
        return f"k{k}-p{p}-s{s}-{self.reduction}"


def parse(text: str) -> list[Config]:
    out = []
    for item in filter(None, text.split(",")):
        k, p, s, *reduction = item.split(":")
        out.append(Config(int(k), int(p), int(s), *reduction))
    return out


def expected_ops(world: int, cfg: Config, rank: int = 0) -> set[str]:
    """The reductions rank ``rank`` must see, from the semantics alone: FSDP divides the
    summed gradient by the data-parallel size (or the custom factor) exactly once; a
    hierarchical reduce-scatter averages in both stages (``AVG`` over ``k`` then over ``n``
    is the average over ``p``) and scales by a ``PREMUL_SUM`` factor in its first stage
    only; the all-reduce crosses the replication group."""
    k, p = cfg.ranks_per_node, cfg.partition_size
    replicas = world // p
    start = rank - rank % p
    partition = list(range(start, start + p))
    if cfg.reduction == "divide":
        rs_op = "AVG" if p == world else f"PREMUL_SUM({1 / world:g})"
        ar_op = "SUM"
    else:
        rs_op = ar_op = "AVG" if world > 1 else "SUM"
    ops = set()
    if p > 1:
        if p > k > 1:  # hierarchical: intra-node stage, then inter-node stage
            node_start = rank - rank % k
            intra = list(range(node_start, node_start + k))
            inter = [r for r in partition if r % k == rank % k]
            second = "SUM" if rs_op.startswith("PREMUL_SUM") else rs_op
            ops |= {f"reduce_scatter {rs_op} {intra} float32"}
            ops |= {f"reduce_scatter {second} {inter} float32"}
        else:
            ops.add(f"reduce_scatter {rs_op} {partition} float32")
    if replicas > 1:
        ops.add(f"all_reduce {ar_op} {list(range(rank % p, world, p))} float32")
    return ops


def mean_over_world(value: float, device: torch.device) -> float:
    """As `common.mean_over_world`, on the device NCCL needs."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def installed_comms(model: torch.nn.Module) -> list[str]:
    names = set()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                rs = group._reduce_scatter_comm
                names.add(type(getattr(rs, "inner", None) or rs).__name__)
    return sorted(names)


def run(
    cfg: Config,
    world: int,
    device: torch.device,
    recorder: Recorder,
    forward_prefetch: bool = False,
) -> dict[str, Any]:
    model = common.make_model().to(device)
    topology = MiCSTopology.create(world, cfg.ranks_per_node, cfg.partition_size)
    config = MiCSConfig(forward_prefetch=forward_prefetch)
    apply_mics(model, topology, config, device=device)
    if cfg.reduction == "divide":
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(float(world))
    opt = common.make_optimizer(model.parameters())
    recorder.ops.clear()
    emulated_before = Counter(emulated_nccl.EMULATED)
    losses = []
    for i, (x, y) in enumerate(common.make_loader(world, MICRO_BATCH, cfg.accum, STEPS)):
        is_last = (i + 1) % cfg.accum == 0
        with recorder.recording(), micro_step(model, is_last=is_last):
            loss = GPT.loss(model(x.to(device)), y.to(device))
            (loss / cfg.accum).backward()
        losses.append(mean_over_world(loss.item(), device))
        if is_last:
            opt.step()
            opt.zero_grad()
    emulated = Counter(emulated_nccl.EMULATED)
    emulated.subtract(emulated_before)
    state = {k: v.cpu() for k, v in common.full_state(model).items()}
    result = common.compare_with_reference(losses, state, world, MICRO_BATCH, cfg.accum, STEPS)
    return {
        **result,
        "ops": dict(sorted(recorder.ops.items())),
        "expected_ops": sorted(expected_ops(world, cfg, dist.get_rank())),
        "emulated": {f"{op} x{size}": n for (op, size), n in sorted(emulated.items()) if n},
        "comms": installed_comms(model),
    }


def main() -> None:
    p = common.parser()
    p.add_argument("--backend", choices=("emulated", "nccl"), default="emulated")
    args = p.parse_args()
    if args.backend == "nccl":
        device = common.init_nccl()
    else:
        device = torch.device("cpu")
        dist.init_process_group(emulated_nccl.register())
    torch.set_num_threads(1)
    recorder = Recorder()
    world = dist.get_world_size()
    results: dict[str, Any] = {"world": world, "backend": dist.get_backend()}
    for cfg in parse(args.configs):
        results[str(cfg)] = run(cfg, world, device, recorder, args.forward_prefetch)
    common.report(args.out, **results)
    common.finish()


if __name__ == "__main__":
    main()
