"""MiCS through the Trainer vs a single-process reference on the same global batch."""

from __future__ import annotations

import os

from lightning.pytorch import LightningModule, Trainer

from lightning_mics import MiCSStrategy
from recipes.gpt import GPT
from tests.scripts import common


class LitGPT(LightningModule):
    def __init__(self, clip: float | None = None) -> None:
        super().__init__()
        self.model = common.make_model()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = GPT.loss(self.model(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return common.make_optimizer(self.parameters())


def main() -> None:
    p = common.parser()
    p.add_argument("--clip", type=float, default=None)
    args = p.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    strategy = MiCSStrategy(
        partition_size=common.partition_size(args.partition_size),
        ranks_per_node=args.ranks_per_node,
        accumulation=args.mode,
    )
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=world,
        max_steps=args.steps,
        accumulate_grad_batches=args.accum,
        gradient_clip_val=args.clip,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    module = LitGPT()
    data = common.make_loader(world, args.micro_batch, args.accum, args.steps)
    trainer.fit(module, data)
    losses = [common.mean_over_world(v) for v in module.losses]
    state = {k.removeprefix("model."): v for k, v in common.full_state(module).items()}
    if trainer.global_rank == 0:
        ref_losses, ref_state = common.reference_run(
            world, args.micro_batch, args.accum, args.steps, clip=args.clip
        )
        common.report(
            args.out,
            param_diff=common.max_abs_diff(state, ref_state),
            loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
            losses=losses,
            ref_losses=ref_losses,
            placements=str(next(module.parameters()).placements),
        )


if __name__ == "__main__":
    main()
