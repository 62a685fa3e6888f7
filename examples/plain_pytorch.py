"""MiCS without Lightning: plain PyTorch, launched with torchrun.

torchrun --nproc-per-node=4 examples/plain_pytorch.py --ranks-per-node 2   # CPU, 2 x 2
torchrun --nnodes=4 --nproc-per-node=8 ... examples/plain_pytorch.py        # GPU cluster
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_mics import (
    MiCSConfig,
    MiCSTopology,
    apply_mics,
    clip_grad_norm_,
    comm_stats,
    destroy_meshes,
    micro_step,
)

VOCAB, SEQ_LEN = 256, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks-per-node", type=int, default=None, help="emulated node size")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per step")
    args = parser.parse_args()

    if torch.cuda.is_available():
        # NOTE: NCCL needs each rank's device set before the first collective.
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    # torchrun sets LOCAL_WORLD_SIZE to the ranks on this node.
    ranks_per_node = args.ranks_per_node or int(os.environ["LOCAL_WORLD_SIZE"])
    topology = MiCSTopology.create(
        dist.get_world_size(), ranks_per_node=ranks_per_node, partition_size="node"
    )
    if dist.get_rank() == 0:
        print(topology.describe())

    torch.manual_seed(0)
    model = Transformer(vocab_size=VOCAB, nlayers=2)
    model = apply_mics(model, topology, MiCSConfig(), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # create it after apply_mics

    tokens = torch.randint(0, VOCAB, (512, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    dataset = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    sampler = DistributedSampler(dataset, dist.get_world_size(), dist.get_rank(), shuffle=True)
    loader = iter(DataLoader(dataset, batch_size=4, sampler=sampler))

    for step in range(1, args.steps + 1):
        for m in range(args.accumulation):
            inputs, target = (t.to(device) for t in next(loader))
            with micro_step(model, is_last=m == args.accumulation - 1):
                loss = F.nll_loss(model(inputs, target), target.reshape(-1))
                (loss / args.accumulation).backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        stats = comm_stats(model).log_dict(prefix="comm/", reset=True)
        if dist.get_rank() == 0:
            print(
                f"step {step}: loss {loss.item():.3f}, "
                f"inter-node {stats['comm/inter_node_bytes'] / 1e6:.2f} MB"
            )

    destroy_meshes()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
