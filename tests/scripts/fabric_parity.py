"""MiCS through Fabric vs a single-process reference on the same global batch."""

from __future__ import annotations

from lightning.fabric import Fabric

import lightning_mics  # noqa: F401  (registers "mics")
from lightning_mics.fabric import MiCSStrategy
from recipes.gpt import GPT
from tests.scripts import common


def run(cfg: common.RunConfig, world: int, args) -> tuple[list[float], dict]:
    steps, micro_batch, clip = args.steps, args.micro_batch, args.clip
    if args.by_name:
        # The registered name: one node of `devices` ranks, partition = the node.
        assert (cfg.ranks_per_node, cfg.partition_size) == (world, "node"), cfg
        strategy = "mics"
    else:
        strategy = MiCSStrategy(
            partition_size=cfg.partition_size,
            ranks_per_node=cfg.ranks_per_node,
            accumulation=cfg.mode,
            forward_prefetch=args.forward_prefetch,
        )
    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=world)
    fabric.launch()
    model = fabric.setup_module(common.make_model())
    optimizer = fabric.setup_optimizers(common.make_optimizer(model.parameters()))
    loader = common.make_loader(world, micro_batch, cfg.accum, steps, args.extra)
    losses = []
    for i, (x, y) in enumerate(loader):
        is_last = (i + 1) % cfg.accum == 0 or i == len(loader) - 1
        with fabric.no_backward_sync(model, enabled=not is_last):
            loss = GPT.loss(model(x), y)
            if not (args.skip_last and is_last):
                fabric.backward(loss / cfg.accum)
        losses.append(common.mean_over_world(loss.item()))
        if is_last:
            if clip is not None:
                fabric.clip_gradients(model, optimizer, max_norm=clip)
            optimizer.step()
            optimizer.zero_grad()
    common.check_forward_prefetch(model.module, args.forward_prefetch)
    return losses, common.full_state(model)


def main() -> None:
    p = common.parser()
    p.add_argument("--by-name", action="store_true", help='use strategy="mics"')
    common.parity_main(p.parse_args(), run)


if __name__ == "__main__":
    main()
