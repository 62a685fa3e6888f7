"""MiCS through the Trainer vs a single-process reference on the same global batch.

``--configs k:p:s[:mode],...`` runs one fit per configuration (ranks per node, partition
size, accumulation, accumulation mode) in this one launch.
"""

from __future__ import annotations

from lightning.pytorch import Trainer

from lightning_mics import MiCSStrategy
from recipes.gpt import GPT
from tests.scripts import common
from tests.scripts.lit import LitGPT


class ParityLitGPT(LitGPT):
    def __init__(self, accum: int = 1, skip_last: bool = False) -> None:
        # NOTE: skip_last is honoured by manual optimization only: Lightning itself
        # refuses a training_step that returns None in distributed automatic optimization.
        super().__init__()
        self.accum = accum
        self.skip_last = skip_last


class ManualLitGPT(ParityLitGPT):
    """Manual optimization with hand-written accumulation."""

    def __init__(self, accum: int = 1, skip_last: bool = False) -> None:
        super().__init__(accum, skip_last)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        loss = GPT.loss(self.model(x), y)
        self.losses.append(loss.item())
        is_last = (batch_idx + 1) % self.accum == 0 or self.trainer.is_last_batch
        if not (self.skip_last and is_last):
            with optimizer.toggle_model(sync_grad=is_last):
                self.manual_backward(loss / self.accum)
        if is_last:
            optimizer.step()
            optimizer.zero_grad()


def run(cfg: common.RunConfig, world: int, args) -> tuple[list[float], dict]:
    steps, micro_batch = args.steps, args.micro_batch
    trainer = Trainer(
        strategy=MiCSStrategy(
            partition_size=cfg.partition_size,
            ranks_per_node=cfg.ranks_per_node,
            accumulation=cfg.mode,
            forward_prefetch=args.forward_prefetch,
        ),
        accelerator="cpu",
        devices=world,
        max_steps=-1,
        accumulate_grad_batches=1 if args.manual else cfg.accum,
        gradient_clip_val=args.clip,
        max_epochs=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    module = (ManualLitGPT if args.manual else ParityLitGPT)(cfg.accum, args.skip_last)
    trainer.fit(module, common.make_loader(world, micro_batch, cfg.accum, steps, args.extra))
    common.check_forward_prefetch(module, args.forward_prefetch)
    losses = [common.mean_over_world(v) for v in module.losses]
    state = {k.removeprefix("model."): v for k, v in common.full_state(module).items()}
    return losses, state


def main() -> None:
    p = common.parser()
    p.add_argument("--manual", action="store_true", help="manual optimization")
    common.parity_main(p.parse_args(), run)


if __name__ == "__main__":
    main()
