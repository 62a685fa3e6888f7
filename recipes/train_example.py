"""`make train`: a small GPT trained with MiCS on CPU processes emulating 2 nodes x 2 ranks.

Lightning's launcher starts ``nodes * ranks_per_node`` processes on this machine; the
strategy is told that every ``ranks_per_node`` consecutive ranks form a node, so a
``partition_size`` of 4 spans both emulated nodes (two replicas with 2 would each fit in
one). Run ``python -m recipes.train_example --help`` for the knobs.

`CommStatsMonitor` logs every optimizer step's collectives (counts, logical bytes,
inter- vs intra-node); the progress bar shows the inter-node MB per step and a summary
is printed at the end. Compare ``--partition-size 4`` (parameters gathered across
nodes) with ``--partition-size node`` (gathers stay in a node, one all-reduce per step
crosses).
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_mics import CommStatsMonitor, MiCSStrategy
from recipes.data import SyntheticTokens
from recipes.gpt import GPT, GPTConfig


class LitGPT(LightningModule):
    def __init__(self, config: GPTConfig, lr: float) -> None:
        super().__init__()
        self.config = config
        self.lr = lr
        self.model = GPT(config)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = GPT.loss(self.model(x), y)
        self.log("loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


class LossSummary(Callback):
    """Prints the first and last logged loss on rank 0."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and "loss" in trainer.callback_metrics:
            self.losses.append(trainer.callback_metrics["loss"].item())

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.losses:
            print(
                f"loss: {self.losses[0]:.3f} (first step) -> {self.losses[-1]:.3f} (last step) "
                f"over {trainer.global_step} optimizer steps"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nodes", type=int, default=2, help="emulated nodes")
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--partition-size", default="4", help="int or 'node'")
    p.add_argument("--accumulation", type=int, default=2, help="micro-steps per optimizer step")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=8)
    args = p.parse_args()

    seed_everything(0)
    config = GPTConfig(vocab_size=256, block_size=32, n_layer=4, n_head=4, n_embd=128)
    world = args.nodes * args.ranks_per_node
    samples = world * args.micro_batch * args.accumulation * args.max_steps
    data = DataLoader(
        SyntheticTokens(samples, config.block_size, config.vocab_size, branching=2),
        batch_size=args.micro_batch,
        shuffle=True,
    )
    partition_size = (
        args.partition_size if args.partition_size == "node" else int(args.partition_size)
    )
    comm = CommStatsMonitor(prog_bar=True)
    trainer = Trainer(
        # All ranks run on this machine: `devices` processes, of which every
        # `ranks_per_node` consecutive ones count as one node.
        strategy=MiCSStrategy(partition_size=partition_size, ranks_per_node=args.ranks_per_node),
        accelerator="cpu",
        devices=world,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulation,
        logger=False,
        enable_checkpointing=False,
        callbacks=[LossSummary(), comm],
        log_every_n_steps=1,
    )
    trainer.fit(LitGPT(config, lr=3e-3), data)
    if trainer.is_global_zero:
        print(comm.format_summary())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
