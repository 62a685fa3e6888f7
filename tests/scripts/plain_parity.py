"""MiCS through the plain-PyTorch API vs a single-process reference on the same global batch.

``--configs k:p:s[:mode],...`` runs one training per configuration (ranks per node,
partition size, accumulation steps, accumulation mode) in this one launch, each with a
fresh model, topology and device mesh.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from lightning_mics import MiCSConfig, MiCSTopology, apply_mics, micro_step
from recipes.gpt import GPT
from tests.scripts import common


def run(
    cfg: common.RunConfig, world: int, steps: int, micro_batch: int
) -> tuple[list[float], dict, dict]:
    model = common.make_model()
    topology = MiCSTopology.create(world, cfg.ranks_per_node, cfg.partition_size)
    apply_mics(model, topology, MiCSConfig(accumulation=cfg.mode))
    opt = common.make_optimizer(model.parameters())
    losses = []
    loader = common.make_loader(world, micro_batch, cfg.accum, steps)
    for i, (x, y) in enumerate(loader):
        m = i % cfg.accum
        with micro_step(model, is_last=(m == cfg.accum - 1), mode=cfg.mode):
            loss = GPT.loss(model(x), y)
            (loss / cfg.accum).backward()
        losses.append(common.mean_over_world(loss.item()))
        if m == cfg.accum - 1:
            opt.step()
            opt.zero_grad()
    param = next(model.parameters())
    info = {
        "mesh": list(param.device_mesh.mesh.shape),
        "placements": str(param.placements),
        "replication_size": topology.replication_size,
        "optimizer_steps": len(loader) // cfg.accum,
    }
    return losses, common.full_state(model), info


def main() -> None:
    args = common.parser().parse_args()
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for cfg in common.parse_configs(args.configs):
        losses, state, info = run(cfg, world, args.steps, args.micro_batch)
        result = common.compare_with_reference(
            losses, state, world, args.micro_batch, cfg.accum, args.steps
        )
        results[str(cfg)] = {**result, **info}
    dist.barrier()
    common.report(args.out, world_size=world, configs=results)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main()
    common.finish()
