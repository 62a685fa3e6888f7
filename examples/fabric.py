"""MiCS with Lightning Fabric: Lightning's demo Transformer on random tokens.

python examples/fabric.py                  # 4 CPU processes emulating 2 nodes x 2 ranks
python examples/fabric.py --accelerator gpu --devices 8 --num-nodes 4   # on a cluster
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.pytorch.demos import Transformer
from torch.utils.data import DataLoader, TensorDataset

import lightning_mics

VOCAB, SEQ_LEN = 256, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--ranks-per-node", type=int, default=2, help="emulated node size")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--checkpoint", default="fabric_example.ckpt")
    args = parser.parse_args()

    strategy = lightning_mics.fabric.MiCSStrategy(
        partition_size="node",
        # Only to emulate several nodes on one machine; on a cluster the node size is `devices`.
        ranks_per_node=args.ranks_per_node if args.accelerator == "cpu" else None,
    )
    fabric = Fabric(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        precision="bf16-mixed",
    )
    fabric.launch()
    fabric.seed_everything(0)

    model = Transformer(vocab_size=VOCAB, nlayers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)  # shards the model, rebinds the optimizer
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=5)

    tokens = torch.randint(0, VOCAB, (512, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4, shuffle=True)
    loader = fabric.setup_dataloaders(loader)  # a distributed sampler: every rank its own data

    step = 0
    for i, (inputs, target) in enumerate(loader):
        is_last = (i + 1) % args.accumulation == 0
        # Non-final micro-steps reduce-scatter inside the partition group only (two-hop sync).
        with fabric.no_backward_sync(model, enabled=not is_last):
            loss = F.nll_loss(model(inputs, target), target.reshape(-1))
            fabric.backward(loss / args.accumulation)
        if not is_last:
            continue
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        step += 1
        stats = lightning_mics.comm_stats(model).log_dict(prefix="comm/", reset=True)
        fabric.print(
            f"step {step}: loss {loss.item():.3f}, "
            f"inter-node {stats['comm/inter_node_bytes'] / 1e6:.2f} MB"
        )
        if step == args.steps:
            break

    # A sharded checkpoint (one shard per rank, written once); `fabric.load` restores in place.
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": step}
    fabric.save(args.checkpoint, state)
    fabric.load(args.checkpoint, state)
    fabric.print(f"saved and reloaded {args.checkpoint} at step {state['step']}")


if __name__ == "__main__":
    main()
