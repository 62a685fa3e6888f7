"""Sharding options through the plain API vs the single-process reference.

Each ``--options`` entry is a Python dict literal of MiCSConfig keyword arguments; all
run in this one launch on 2 emulated nodes x 2 ranks, partition 2 (two replicas).
"""

from __future__ import annotations

import ast

import torch.distributed as dist

from lightning_mics import MiCSConfig, MiCSTopology, apply_mics
from recipes.gpt import GPT
from tests.scripts import common


def main() -> None:
    p = common.parser()
    p.add_argument("--options", nargs="+", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = {}
    for text in args.options:
        options = ast.literal_eval(text)
        model = common.make_model()
        apply_mics(model, MiCSTopology.create(world, 2, 2), MiCSConfig(**options))
        optimizer = common.make_optimizer(model.parameters())
        losses = []
        for x, y in common.make_loader(world, args.micro_batch, 1, args.steps):
            loss = GPT.loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(common.mean_over_world(loss.item()))
        results[text] = common.compare_with_reference(
            losses, common.full_state(model), world, args.micro_batch, 1, args.steps
        )
    common.report(args.out, **results)
    common.finish()


if __name__ == "__main__":
    main()
