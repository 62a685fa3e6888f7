"""MiCS with the Lightning Trainer: Lightning's demo Transformer on random tokens.

    python examples/trainer.py                 # 4 CPU processes emulating 2 nodes x 2 ranks
    python examples/trainer.py --accelerator gpu --devices 8 --num-nodes 4   # on a cluster

The Trainer launches its own processes (or uses those Slurm / torchrun started).
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos import LightningTransformer
from torch.utils.data import DataLoader, TensorDataset

import lightning_mics  # registers strategy="mics" with the Trainer and Fabric
from lightning_mics.callbacks import CommStatsMonitor

VOCAB, SEQ_LEN = 256, 32


class RandomTokensTransformer(LightningTransformer):
    """Lightning's demo model with offline data and AdamW."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def prepare_data(self) -> None:
        pass  # nothing to download

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(
            0, VOCAB, (256, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0)
        )
        # The Trainer adds a DistributedSampler over all ranks: each rank sees its own slice.
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--ranks-per-node", type=int, default=2, help="emulated node size")
    parser.add_argument("--max-steps", type=int, default=20)
    args = parser.parse_args()

    strategy = lightning_mics.MiCSStrategy(
        partition_size="node",  # one replica of the model states per node
        # Only to emulate several nodes on one machine; on a cluster the node size is `devices`.
        ranks_per_node=args.ranks_per_node if args.accelerator == "cpu" else None,
    )
    trainer = Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        precision="bf16-mixed",
        accumulate_grad_batches=2,  # two-hop gradient sync: one cross-replica all-reduce per step
        gradient_clip_val=1.0,
        max_steps=args.max_steps,
        callbacks=[CommStatsMonitor()],
        logger=False,
        enable_checkpointing=False,
    )
    model = RandomTokensTransformer()
    trainer.fit(model)
    if trainer.is_global_zero:
        print(f"final train_loss {trainer.callback_metrics['train_loss']:.3f}")


if __name__ == "__main__":
    main()
